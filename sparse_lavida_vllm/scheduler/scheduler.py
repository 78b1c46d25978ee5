"""The diffusion scheduler: one unmasking step per running request per engine step; KV for committed tokens only."""

from __future__ import annotations

import copy
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from vllm.logger import init_logger
from vllm.utils.math_utils import cdiv
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreEventType, EngineCoreOutput, EngineCoreOutputs
from vllm.v1.request import Request, RequestStatus

from sparse_lavida_vllm.diffusion.stepping import PlanWalker
from sparse_lavida_vllm.multimodal.request_rules import request_rules
from sparse_lavida_vllm.scheduler.code_walker import CodeWalker
from sparse_lavida_vllm.scheduler.image_params import GENERATE, ImageParams
from sparse_lavida_vllm.scheduler.knobs import DiffusionParamError
from sparse_lavida_vllm.scheduler.output import (
    METRICS_KEY,
    DiffusionRunnerOutput,
    DiffusionSchedulerOutput,
    PromptImage,
    RequestStep,
)
from sparse_lavida_vllm.scheduler.params import Limits, parse_params
from sparse_lavida_vllm.scheduler.text_params import DiffusionParams

logger = init_logger("vllm.sparse_lavida." + __name__)  # under "vllm": shown in vLLM's log format
UNTRAINED_SPARSE = ("sparse sampling on a checkpoint not trained with the step-causal mask (config.json has no "
                    "block_causal: true): expect much lower quality (the paper's Table 8); send sparse: false")


@dataclass
class Branch:
    """One sequence of a request: the request itself (cond) or a guidance companion (uncond, image-only).

    A companion shares the request's plan and sampled tokens but has its own prompt and so its own K/V:
    `kv` is the request under a companion id (a shallow copy), which is how vLLM's KV cache manager gives it
    blocks of its own.
    """

    kv: Request
    prompt: list[int]
    prefilled: bool = False
    suffix: list[int] = field(default_factory=list)  # text after the image, prefilled after the canvas


@dataclass
class DiffusionState:
    """Everything the scheduler knows about one running request between engine steps."""

    params: DiffusionParams | ImageParams
    prompt: list[int]
    canvas: torch.Tensor  # (L,) response tokens, [mask] where not decoded yet
    decoded: torch.Tensor  # (L,) bool; not `canvas != mask`: a sampled token may be the mask id itself
    stepper: PlanWalker | CodeWalker  # the reference sampler's plan walker: same decode sets, same counts
    decode_sets: object  # its generator of (decode set, count)
    branches: list[Branch]
    num_steps: int
    current: tuple[torch.Tensor, int | None] | None = None
    step: int = 0
    last_chosen: list[int] = field(default_factory=list)  # response positions decoded last step: C_{k-1}
    emitted: int = 0  # response tokens already sent to the client
    forward_tokens: int = 0
    dense_forward_tokens: int = 0  # what the dense MDM runs for the same steps and branches
    max_batch: int = 0  # the most requests (companions not counted) that ran in one engine step with this one
    last_turn: int = -1  # the engine step it last ran in (_within_budget: the longest-waiting goes first)
    blocks_per_branch: int = 0  # KV blocks each branch holds once every commit is written
    images: list[PromptImage] = field(default_factory=list)  # chat images in the prompt (LaViDa-O understanding)

    @property
    def given(self) -> list[int]:
        """Response positions known before the first step (an inpainting canvas): prefilled with the prompt."""
        return self.decoded.nonzero().flatten().tolist() if self.step == 0 else []


def prompt_images(request: Request) -> list[PromptImage]:
    """A request's chat images as vLLM's multimodal processor left them (worker/lavida_o_processor.py): each
    feature's tiles and image size, at its placeholder range in the prompt."""
    images = []
    for feature in request.mm_features or ():
        if feature.modality != "image" or feature.data is None:
            raise DiffusionParamError("messages", f"a {feature.modality} input reached the scheduler without its "
                                      "processed data")
        data = feature.data.get_data()
        width, height = (int(v) for v in torch.as_tensor(data["image_sizes"]).flatten().tolist())
        position = feature.mm_position
        if position.is_embed is not None and not bool(torch.as_tensor(position.is_embed).all()):
            raise DiffusionParamError("messages", "every placeholder row of an image must be a feature row")
        images.append(PromptImage(position.offset, position.length, torch.as_tensor(data["pixel_values"]),
                                  (width, height)))
    return images


class DiffusionScheduler(Scheduler):
    """vLLM's V1 scheduler with a diffusion schedule() and update_from_output().

    Admission reserves a request's whole KV need (prompt + response) against the free pool, so
    a running request never runs out of blocks mid-generation and none is ever preempted; a
    request that does not fit waits in the queue. The blocks themselves are allocated lazily
    through the KV cache manager, for the prompt at prefill and for C_{k-1} at step k.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        model_config = self.vllm_config.model_config
        self.mdm_config = model_config.hf_config.to_mdm_config()
        # what this checkpoint accepts beyond the knobs (its model family's rules, multimodal/request_rules.py)
        self.rules = request_rules(model_config.architecture, model_config.model)
        self.patch_ids = self.rules.patch_ids  # LaViDa-O served whole: image positions as packed ids
        # the operator's caps: the API server refuses first; these refuse an offline (LLM class) request too, and
        # bound the registers profile_run sized the largest step for
        self.limits = Limits.from_config(self.vllm_config.additional_config)
        self.states: dict[str, DiffusionState] = {}
        self.rejected: dict[str, str] = {}  # request id -> validation error (finished as errors)
        self.batch_sizes: list[int] = []  # requests per engine step (continuous batching evidence)
        self.num_blocks_total = self.kv_cache_manager.block_pool.get_num_free_blocks()
        # Fairness (reliability, issue 11): see _fair_turn. additional_config "fair_step_rows"; 0 turns it off.
        self.fair_step_rows = int((self.vllm_config.additional_config or {}).get("fair_step_rows", 256))

    # ---- requests in ------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        super().add_request(request)
        try:
            params = self._parse(request)
        except DiffusionParamError as e:  # the API server validates first; this guards the offline path
            self.rejected[request.request_id] = f"{e.field}: {e}"
            return
        if params.sparse and not self.mdm_config.block_causal:  # Table 8: quality collapses without training
            logger.warning("request %s: %s", request.request_id, UNTRAINED_SPARSE)

    def _parse(self, request: Request) -> DiffusionParams | ImageParams:
        """The request's frozen params, with this checkpoint's defaults (sparse only if trained for it)."""
        registers, has_register = self.mdm_config.num_registers, self.mdm_config.register_token_id is not None
        extra = request.sampling_params.extra_args or {}
        if self.rules.image_registers is not None and extra.get("kind") == "image":  # LaViDa-O's image registers
            registers, has_register = self.rules.image_registers
        params = parse_params(request.sampling_params, request.num_prompt_tokens, self.max_model_len, registers,
                              default_sparse=self.mdm_config.block_causal, has_register_token=has_register,
                              limits=self.limits)
        image_spans = [(f.mm_position.offset, f.mm_position.length) for f in request.mm_features or ()]
        refused = self.rules.refusal(params, image_spans)  # the API server refuses most first; offline lands here
        if refused is not None:
            raise DiffusionParamError(*refused)
        return params

    def _new_state(self, request: Request) -> DiffusionState:
        params = self._parse(request)
        mask_id = self.mdm_config.mask_token_id
        lavida_image = isinstance(params, ImageParams) and self.patch_ids is not None
        # a LaViDa-O canvas position is a packed code patch: all mask codes until decoded
        canvas = torch.full((params.gen_length,), self.patch_ids.mask_id if lavida_image else mask_id,
                            dtype=torch.long)
        decoded = torch.zeros(params.gen_length, dtype=torch.bool)
        if isinstance(params, ImageParams) and params.init_canvas is not None:  # inpainting: given tokens
            init = torch.tensor(params.init_canvas, dtype=torch.long)
            decoded = init != GENERATE
            canvas[decoded] = init[decoded]
        plan = params.plan()
        per_code = isinstance(params, ImageParams) and params.per_code
        stepper = (CodeWalker(plan, canvas, self.patch_ids, 2 * params.width) if per_code
                   else PlanWalker(plan, params.sampling, canvas))
        prompt = list(request.prompt_token_ids)
        if isinstance(params, ImageParams):
            if lavida_image and params.source_codes is not None:  # the source image's placeholders -> its patches
                start, end = params.source_span
                codes = torch.tensor(params.source_codes, dtype=torch.long).view(end - start, -1)
                prompt[start:end] = self.patch_ids.pack(codes, source=True).tolist()
            branch_texts = params.branches(prompt, mask_id)
        else:
            branch_texts = [(prompt, [])]
        branches = [Branch(request, branch_texts[0][0], suffix=branch_texts[0][1])]
        for i, (branch_prompt, suffix) in enumerate(branch_texts[1:], start=1):
            companion = copy.copy(request)  # its own id, so its own KV blocks; freed with the request
            companion.request_id = f"{request.request_id}#{('uncond', 'image')[i - 1]}"
            companion.num_computed_tokens = 0
            branches.append(Branch(companion, branch_prompt, suffix=suffix))
        state = DiffusionState(params, prompt, canvas, decoded, stepper, stepper.decode_sets(), branches,
                               plan.num_steps, images=prompt_images(request))
        state.current = next(state.decode_sets, None)
        suffix = len(params.suffix_ids) if isinstance(params, ImageParams) else 0
        tokens = request.num_prompt_tokens + params.gen_length + suffix if params.sparse else 0
        state.blocks_per_branch = cdiv(tokens, self.block_size)
        return state

    def _blocks_needed(self, state: DiffusionState) -> int:
        return state.blocks_per_branch * len(state.branches)

    def _reserved_blocks(self) -> int:
        """Blocks promised to running requests (every branch) but not allocated yet."""
        held = 0
        for state in self.states.values():
            for branch in state.branches:
                blocks = self.kv_cache_manager.get_block_ids(branch.kv.request_id)[0] if branch.prefilled else []
                held += max(state.blocks_per_branch - len(blocks), 0)
        return held

    # ---- schedule ---------------------------------------------------------------------------

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_num_running_reqs:
            request = self.waiting.peek_request()
            if request.request_id in self.rejected:
                break  # finished as an error by the next update_from_output
            state = self._new_state(request)
            free = self.kv_cache_manager.block_pool.get_num_free_blocks() - self._reserved_blocks()
            needed = self._blocks_needed(state)  # every guidance branch's blocks, reserved together
            if needed > self.num_blocks_total:  # could never run: fail it, keep serving
                self.rejected[request.request_id] = (f"needs {needed} KV blocks, the pool has "
                                                     f"{self.num_blocks_total}")
                break
            if needed > free:
                break  # wait until running requests free their blocks
            self.waiting.pop_request()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self.states[request.request_id] = state
            if self.log_stats:
                request.record_event(EngineCoreEventType.SCHEDULED, time.monotonic())

    def _allocate(self, request: Request, num_tokens: int) -> None:
        if num_tokens == 0:
            return
        if self.kv_cache_manager.allocate_slots(request, num_tokens) is None:
            raise RuntimeError(f"KV allocation failed for {request.request_id} despite its reservation")
        request.num_computed_tokens += num_tokens  # the committed count, in the order rows were written

    def _steps_for(self, request: Request, state: DiffusionState) -> list[RequestStep]:
        """The request's step, then one per guidance companion (decode rows only at guided steps)."""
        params, sampling = state.params, state.params.sampling
        decode, count = state.current
        p = request.num_prompt_tokens
        commit = state.last_chosen if params.sparse else []
        given = state.given
        guided = sampling.guided_at(state.step, state.num_steps)
        step_sampling = sampling.at_step(state.step, state.num_steps)
        banned = sorted(self._stop_ids(params)) if params.min_tokens else []
        steps = []
        s = len(state.branches[0].suffix)
        lavida_image = isinstance(params, ImageParams) and self.patch_ids is not None
        for b, branch in enumerate(state.branches):
            decodes = b == 0 or guided  # an unguided companion only writes its commit rows to its cache
            if not params.sparse and not decodes:
                continue  # dense: nothing cached, nothing to run
            prefill_ids: list[int] = []
            if params.sparse and not branch.prefilled:
                prefill_ids = branch.prompt + branch.suffix + state.canvas[given].tolist()
                self._allocate(branch.kv, len(prefill_ids))
                branch.prefilled = True
            cache_len = branch.kv.num_computed_tokens
            self._allocate(branch.kv, len(commit))
            block_ids = list(self.kv_cache_manager.get_block_ids(branch.kv.request_id)[0]) if params.sparse else []
            dense_ids = branch.prompt + state.canvas.tolist() + branch.suffix if not params.sparse else []
            decode_positions = (p + decode).tolist() if decodes else []
            if params.sparse and not (prefill_ids or commit or decode_positions):
                continue
            # image rows are prompt rows: fed with the prefill (sparse: then cached) or every dense step (re-fed).
            # Only the request's own branch: an edit's guidance companions hold masks there (ImageParams.branches,
            # the publishers' edit_mode 0 masks the SigLIP rows in both), and text requests have no companions.
            image_rows = bool(state.images) and b == 0 and (bool(prefill_ids) or not params.sparse)
            first_feed = bool(prefill_ids) or (not params.sparse and state.step == 0)
            steps.append(RequestStep(
                req_id=branch.kv.request_id, sparse=params.sparse, block_ids=block_ids, prefill_ids=prefill_ids,
                prefill_positions=(list(range(p)) + list(range(p + params.gen_length, p + params.gen_length + s))
                                   + [p + i for i in given]) if prefill_ids else [],
                cache_len=cache_len, commit_ids=state.canvas[commit].tolist(),
                commit_positions=[p + i for i in commit], decode_positions=decode_positions,
                register_start=p + params.gen_length + s,
                num_registers=params.num_registers if params.sparse and decodes else 0,
                dense_ids=dense_ids, step=state.step, count=-1 if count is None else count,
                temperature=step_sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                remasking=sampling.remasking, confidence_threshold=sampling.confidence_threshold, seed=sampling.seed,
                banned_ids=banned, ban_below=p + params.min_tokens if banned else 0,
                allowed_token_ids=list(params.allowed_token_ids), logit_bias=dict(params.logit_bias),
                min_p=params.min_p, guides=None if b == 0 else request.request_id, branch=b,
                cfg_scale=sampling.cfg_scale, image_cfg_scale=sampling.image_cfg_scale,
                token_range=sampling.token_range,
                mask_id=self.patch_ids.mask_id if lavida_image else None,
                register_id=self.patch_ids.register_id if lavida_image else None,
                images=state.images if image_rows and first_feed else [], image_rows=image_rows))
            if decodes:
                state.dense_forward_tokens += p + params.gen_length + s
        return steps

    def schedule(self, throttle_prefills: bool = False) -> DiffusionSchedulerOutput:
        self.current_step += 1
        self.kv_cache_manager.new_step_starts()
        self._admit()
        chosen = self._within_budget(self._fair_turn())
        steps = []
        for request, rows in chosen:
            state = self.states[request.request_id]
            state.last_turn = self.current_step
            request_steps = self._steps_for(request, state)
            assert sum(rs.num_rows for rs in request_steps) == rows, "_next_rows disagrees with _steps_for"
            steps += request_steps
        output = DiffusionSchedulerOutput.make_empty()
        output.steps = steps
        # each request's rows, its companions' included (a request with nothing to run built no step)
        scheduled = {request.request_id: rows for request, rows in chosen if rows}
        output.num_scheduled_tokens = scheduled
        output.total_num_scheduled_tokens = sum(scheduled.values())
        output.finished_req_ids = self.finished_req_ids
        self.finished_req_ids = set()
        if steps:
            self.batch_sizes.append(len(scheduled))
        return output

    def _next_rows(self, state: DiffusionState) -> int:
        """The rows the request's next step runs over every branch: what _steps_for builds, counted without
        allocating anything."""
        params, (decode, _) = state.params, state.current
        guided = params.sampling.guided_at(state.step, state.num_steps)
        rows = 0
        for b, branch in enumerate(state.branches):
            decodes = b == 0 or guided
            if not params.sparse:  # prompt + canvas + suffix, re-fed whole
                rows += len(branch.prompt) + params.gen_length + len(branch.suffix) if decodes else 0
                continue
            prefill = 0 if branch.prefilled else len(branch.prompt) + len(branch.suffix) + len(state.given)
            rows += prefill + len(state.last_chosen) + (len(decode) + params.num_registers if decodes else 0)
        return rows

    def _within_budget(self, requests: list[Request]) -> list[tuple[Request, int]]:
        """The requests of this engine step, with their rows: the longest-waiting first, while the step's rows fit
        max_num_batched_tokens (vLLM's step budget, the step profile_run sized memory for). The first always runs,
        however large, so a request larger than the budget runs alone once it has waited longest. A request left
        out sits the step out and keeps its tokens (a step's noise depends on seed and step index only).
        """
        chosen, total = [], 0
        for request in sorted(requests, key=lambda r: self.states[r.request_id].last_turn):
            rows = self._next_rows(self.states[request.request_id])
            if chosen and total + rows > self.max_num_scheduled_tokens:
                continue  # a smaller one further on may still fit
            chosen.append((request, rows))
            total += rows
        return chosen

    def _fair_turn(self) -> list[Request]:
        """Fairness (reliability, issue 11): the running requests that take part in this engine step.

        Usually all of them. While requests of at most `fair_step_rows` rows per step are running, a larger one
        (by its average rows per step so far) takes part only in every ceil(rows / fair_step_rows)-th engine step
        (at most every 8th), so one large request cannot set every small request's pace. Its tokens do not
        change: a step's noise depends on (seed, step index) only, and nothing else happens to a request that
        sits a step out.
        """
        if not self.fair_step_rows:
            return self.running
        every = {}
        for request in self.running:
            state = self.states[request.request_id]
            rows = state.forward_tokens // state.step if state.step else 0
            every[request.request_id] = min(8, max(1, cdiv(rows, self.fair_step_rows)))
        if min(every.values(), default=1) > 1:  # no small request to protect
            return self.running
        return [r for r in self.running if self.current_step % every[r.request_id] == 0]

    # ---- results back -----------------------------------------------------------------------

    def _emit(self, request: Request, state: DiffusionState) -> tuple[list[int], RequestStatus | None]:
        """New tokens to stream (whole completed blocks, in position order) and the finish status."""
        params = state.params
        masked = (~state.decoded).nonzero()
        done = params.gen_length if masked.numel() == 0 else int(masked[0])
        done -= done % params.block_length if done < params.gen_length else 0
        new = state.canvas[state.emitted:done].tolist()
        status = RequestStatus.FINISHED_LENGTH_CAPPED if state.current is None else None
        stops = self._stop_ids(params)
        hit = next((i for i, t in enumerate(new) if t in stops and state.emitted + i >= params.min_tokens), None)
        if hit is not None:  # the rest of this block and every later block are dropped
            new = new[:hit + 1]
            status = RequestStatus.FINISHED_STOPPED
            request.stop_reason = None if new[-1] == self.mdm_config.eos_token_id else new[-1]
        state.emitted += len(new)
        for token in new:
            request.append_output_token_ids(token)
        return new, status

    @staticmethod
    def _preview(state: DiffusionState) -> list[int]:
        """After a step an image request asked to preview (ImageParams.preview_steps): its whole canvas, the mask id
        where not decoded yet. Sent as new tokens but not appended to the request's output tokens (nothing the
        scheduler decides reads them): the route splits the cumulative token ids into canvases of gen_length."""
        previews = getattr(state.params, "preview_steps", ())
        return state.canvas.tolist() if state.step - 1 in previews else []

    def _stop_ids(self, params: DiffusionParams) -> set[int]:
        return set(params.stop_token_ids) | ({self.mdm_config.eos_token_id} if params.stop_at_eos else set())

    def _metrics(self, request: Request, state: DiffusionState) -> dict[str, int | str]:
        """Per-request diffusion metrics; dense_forward_tokens is what the dense MDM runs for the same steps."""
        metrics: dict[str, int | str] = {}
        if state.params.sparse and not self.mdm_config.block_causal:
            metrics["warning"] = UNTRAINED_SPARSE
        return {**metrics, "mode": "sparse" if state.params.sparse else "dense", "steps": state.step,
                "forward_tokens": state.forward_tokens,
                "dense_forward_tokens": state.dense_forward_tokens,
                "num_registers": state.params.num_registers if state.params.sparse else 0,
                "output_tokens": state.emitted, "max_batch": state.max_batch}

    def update_from_output(self, scheduler_output: DiffusionSchedulerOutput,
                           model_runner_output: DiffusionRunnerOutput) -> dict[int, EngineCoreOutputs]:
        outputs: dict[int, list[EngineCoreOutput]] = defaultdict(list)
        kept = getattr(model_runner_output, "kept", {})
        for req_id, why in getattr(model_runner_output, "failed", {}).items():  # failed alone in the runner
            if req_id in self.requests and not self.requests[req_id].is_finished():
                self.rejected[req_id] = f"the model runner failed on this request: {why}"
        rows: dict[str, int] = defaultdict(int)
        for rs in getattr(scheduler_output, "steps", []):
            rows[rs.guides or rs.req_id] += rs.num_rows
        batch = len(rows)  # requests in this engine step, each with its companions
        for rs in getattr(scheduler_output, "steps", []):
            if rs.guides is not None:
                continue  # a companion: its request's entry carries the step
            request = self.requests.get(rs.req_id)
            state = self.states.get(rs.req_id)
            if request is None or state is None or request.is_finished() or rs.req_id not in kept:
                continue  # aborted while the step ran
            keep, tokens = kept[rs.req_id]
            decode, _ = state.current
            chosen = state.stepper.commit(decode, torch.tensor(keep, dtype=torch.long),
                                          torch.tensor(tokens, dtype=torch.long))
            state.last_chosen = chosen.tolist()
            state.decoded[chosen] = True
            state.forward_tokens += rows[rs.req_id]
            state.max_batch = max(state.max_batch, batch)
            state.step += 1
            state.current = next(state.decode_sets, None)
            new, status = self._emit(request, state)
            if status is None and not new:
                new = self._preview(state)
            if status is None and not new:
                continue
            metrics = None
            if status is not None:
                request.status = status
                metrics = {METRICS_KEY: self._metrics(request, state)}
                self.running.remove(request)
                self._free_request(request)
            outputs[request.client_index].append(EngineCoreOutput(
                request_id=request.request_id, new_token_ids=new, finish_reason=request.get_finished_reason(),
                stop_reason=request.stop_reason, events=request.take_events(),
                trace_headers=request.trace_headers, kv_transfer_params=metrics))
        if self.rejected:
            for request in self.finish_requests(list(self.rejected), RequestStatus.FINISHED_ERROR):
                logger.warning("request %s rejected: %s", request.request_id, self.rejected[request.request_id])
                outputs[request.client_index].append(EngineCoreOutput(
                    request_id=request.request_id, new_token_ids=[], finish_reason=request.get_finished_reason(),
                    events=request.take_events(), trace_headers=request.trace_headers))
            self.rejected.clear()

        engine_core_outputs = {i: EngineCoreOutputs(outputs=outs) for i, outs in outputs.items()}
        if self.finished_req_ids_dict:
            for client_index, finished in self.finished_req_ids_dict.items():
                eco = engine_core_outputs.setdefault(client_index, EngineCoreOutputs())
                eco.finished_requests = finished
            self.finished_req_ids_dict.clear()
        stats = self.make_stats()
        if stats is not None:
            eco = next(iter(engine_core_outputs.values()), None)
            if eco is None:
                engine_core_outputs[0] = eco = EngineCoreOutputs()
            eco.scheduler_stats = stats
        return engine_core_outputs

    def _free_request(self, request: Request, delay_free_blocks: bool = False):
        state = self.states.pop(request.request_id, None)
        if state is not None:  # per-request diffusion metrics, in the server log too
            logger.info("request %s %s: %s", request.request_id, request.status.name, self._metrics(request, state))
            for branch in state.branches[1:]:  # guidance companions' blocks go back with the request's (I5)
                self.kv_cache_manager.free(branch.kv)
        return super()._free_request(request, delay_free_blocks)

    def num_free_blocks(self) -> int:
        return self.kv_cache_manager.block_pool.get_num_free_blocks()
