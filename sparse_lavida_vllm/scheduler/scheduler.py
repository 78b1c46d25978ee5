"""The diffusion scheduler: one unmasking step per running request per engine step; KV for committed tokens only."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from vllm.logger import init_logger
from vllm.utils.math_utils import cdiv
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreEventType, EngineCoreOutput, EngineCoreOutputs
from vllm.v1.request import Request, RequestStatus

from sparse_lavida_vllm.diffusion.reference import PlanWalker
from sparse_lavida_vllm.scheduler.output import (
    METRICS_KEY,
    DiffusionRunnerOutput,
    DiffusionSchedulerOutput,
    RequestStep,
)
from sparse_lavida_vllm.scheduler.params import DiffusionParamError, DiffusionParams, parse_params

logger = init_logger("vllm.sparse_lavida." + __name__)  # under "vllm": shown in vLLM's log format


@dataclass
class DiffusionState:
    """Everything the scheduler knows about one running request between engine steps."""

    params: DiffusionParams
    prompt: list[int]
    canvas: torch.Tensor  # (L,) response tokens, [mask] where not decoded yet
    decoded: torch.Tensor  # (L,) bool; not `canvas != mask`: a sampled token may be the mask id itself
    stepper: PlanWalker  # the reference sampler's plan walker: same decode sets, same counts
    decode_sets: object  # its generator of (decode set, count)
    current: tuple[torch.Tensor, int | None] | None = None
    step: int = 0
    prefilled: bool = False
    last_chosen: list[int] = field(default_factory=list)  # response positions decoded last step: C_{k-1}
    emitted: int = 0  # response tokens already sent to the client
    forward_tokens: int = 0
    blocks_needed: int = 0  # KV blocks the request holds once every commit is written


class DiffusionScheduler(Scheduler):
    """vLLM's V1 scheduler with a diffusion schedule() and update_from_output().

    Admission reserves a request's whole KV need (prompt + response) against the free pool, so
    a running request never runs out of blocks mid-generation and none is ever preempted; a
    request that does not fit waits in the queue. The blocks themselves are allocated lazily
    through the KV cache manager, for the prompt at prefill and for C_{k-1} at step k.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        hf_config = self.vllm_config.model_config.hf_config
        self.mdm_config = hf_config.to_mdm_config()
        self.states: dict[str, DiffusionState] = {}
        self.rejected: dict[str, str] = {}  # request id -> validation error (finished as errors)
        self.batch_sizes: list[int] = []  # requests per engine step (continuous batching evidence)
        self.num_blocks_total = self.kv_cache_manager.block_pool.get_num_free_blocks()

    # ---- requests in ------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        super().add_request(request)
        try:
            parse_params(request.sampling_params, request.num_prompt_tokens, self.max_model_len,
                         self.mdm_config.num_registers)
        except DiffusionParamError as e:  # the API server validates first; this guards the offline path
            self.rejected[request.request_id] = f"{e.field}: {e}"

    def _new_state(self, request: Request) -> DiffusionState:
        params = parse_params(request.sampling_params, request.num_prompt_tokens, self.max_model_len,
                              self.mdm_config.num_registers)
        canvas = torch.full((params.gen_length,), self.mdm_config.mask_token_id, dtype=torch.long)
        stepper = PlanWalker(params.plan(), params.sampling, canvas)
        state = DiffusionState(params, list(request.prompt_token_ids), canvas,
                               torch.zeros(params.gen_length, dtype=torch.bool), stepper, stepper.decode_sets())
        state.current = next(state.decode_sets, None)
        tokens = request.num_prompt_tokens + params.gen_length if params.sparse else 0
        state.blocks_needed = cdiv(tokens, self.block_size)
        return state

    def _reserved_blocks(self) -> int:
        """Blocks promised to running requests but not allocated yet."""
        held = 0
        for req_id, state in self.states.items():
            blocks = self.kv_cache_manager.get_block_ids(req_id)[0] if state.prefilled else []
            held += max(state.blocks_needed - len(blocks), 0)
        return held

    # ---- schedule ---------------------------------------------------------------------------

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_num_running_reqs:
            request = self.waiting.peek_request()
            if request.request_id in self.rejected:
                break  # finished as an error by the next update_from_output
            state = self._new_state(request)
            free = self.kv_cache_manager.block_pool.get_num_free_blocks() - self._reserved_blocks()
            if state.blocks_needed > self.num_blocks_total:  # could never run: fail it, keep serving
                self.rejected[request.request_id] = (f"needs {state.blocks_needed} KV blocks, the pool has "
                                                     f"{self.num_blocks_total}")
                break
            if state.blocks_needed > free:
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

    def _step_for(self, request: Request, state: DiffusionState) -> RequestStep:
        params, sampling = state.params, state.params.sampling
        decode, count = state.current
        p = request.num_prompt_tokens
        prefill_ids: list[int] = []
        commit = state.last_chosen if params.sparse else []
        if params.sparse and not state.prefilled:
            prefill_ids = state.prompt
            self._allocate(request, p)
            state.prefilled = True
        cache_len = request.num_computed_tokens
        self._allocate(request, len(commit))
        block_ids = list(self.kv_cache_manager.get_block_ids(request.request_id)[0]) if params.sparse else []
        dense_ids = state.prompt + state.canvas.tolist() if not params.sparse else []
        banned = sorted(self._stop_ids(params)) if params.min_tokens else []
        return RequestStep(
            req_id=request.request_id, sparse=params.sparse, block_ids=block_ids, prefill_ids=prefill_ids,
            cache_len=cache_len, commit_ids=state.canvas[commit].tolist(),
            commit_positions=[p + i for i in commit], decode_positions=(p + decode).tolist(),
            register_start=p + params.gen_length, num_registers=params.num_registers if params.sparse else 0,
            dense_ids=dense_ids, step=state.step, count=-1 if count is None else count,
            temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
            remasking=sampling.remasking, confidence_threshold=sampling.confidence_threshold, seed=sampling.seed,
            banned_ids=banned, ban_below=p + params.min_tokens if banned else 0,
            allowed_token_ids=list(params.allowed_token_ids), logit_bias=dict(params.logit_bias), min_p=params.min_p)

    def schedule(self, throttle_prefills: bool = False) -> DiffusionSchedulerOutput:
        self.current_step += 1
        self.kv_cache_manager.new_step_starts()
        self._admit()
        steps = [self._step_for(r, self.states[r.request_id]) for r in self.running]
        output = DiffusionSchedulerOutput.make_empty()
        output.steps = steps
        output.num_scheduled_tokens = {s.req_id: s.num_rows for s in steps}
        output.total_num_scheduled_tokens = sum(output.num_scheduled_tokens.values())
        output.finished_req_ids = self.finished_req_ids
        self.finished_req_ids = set()
        if steps:
            self.batch_sizes.append(len(steps))
        return output

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

    def _stop_ids(self, params: DiffusionParams) -> set[int]:
        return set(params.stop_token_ids) | ({self.mdm_config.eos_token_id} if params.stop_at_eos else set())

    def _metrics(self, request: Request, state: DiffusionState) -> dict[str, int | str]:
        """Per-request diffusion metrics; dense_forward_tokens is what the dense MDM runs for the same steps."""
        return {"mode": "sparse" if state.params.sparse else "dense", "steps": state.step,
                "forward_tokens": state.forward_tokens,
                "dense_forward_tokens": state.step * (request.num_prompt_tokens + state.params.gen_length),
                "num_registers": state.params.num_registers if state.params.sparse else 0,
                "output_tokens": state.emitted}

    def update_from_output(self, scheduler_output: DiffusionSchedulerOutput,
                           model_runner_output: DiffusionRunnerOutput) -> dict[int, EngineCoreOutputs]:
        outputs: dict[int, list[EngineCoreOutput]] = defaultdict(list)
        kept = getattr(model_runner_output, "kept", {})
        for rs in getattr(scheduler_output, "steps", []):
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
            state.forward_tokens += rs.num_rows
            state.step += 1
            state.current = next(state.decode_sets, None)
            new, status = self._emit(request, state)
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
        return super()._free_request(request, delay_free_blocks)

    def num_free_blocks(self) -> int:
        return self.kv_cache_manager.block_pool.get_num_free_blocks()
