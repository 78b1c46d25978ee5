"""Reference generate loops over token rows: dense (vanilla MDM), sparse (Sparse-LaViDa), and the I2 oracle."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from sparse_lavida_vllm.diffusion.masks import build_step_causal_sequence, inference_step_spans
from sparse_lavida_vllm.diffusion.planners import UnmaskPlan
from sparse_lavida_vllm.diffusion.sampling import SamplingConfig, guide_logits
from sparse_lavida_vllm.diffusion.stepping import PlanWalker, sample_and_choose
from sparse_lavida_vllm.model_executor.attention import KVCache, SpanAttention
from sparse_lavida_vllm.model_executor.model import LLaDAMDM


@dataclass(frozen=True)
class SparseOptions:
    """The paper's Table 6 axes plus the register count."""

    num_registers: int = 64
    cache_prompt: bool = True
    cache_response: bool = True
    truncate: bool = True

    def __post_init__(self) -> None:
        if self.num_registers < 0:
            raise ValueError(f"num_registers must be >= 0, got {self.num_registers}")


@dataclass
class StepTrace:
    decode: Tensor  # response positions fed as masks and predicted this step (the decode set)
    chosen: Tensor  # the positions kept: C_k
    forward_tokens: int  # rows through the model this step (all CFG branches)
    logits: Tensor | None = None  # guided logits of the decode rows, when recorded


@dataclass
class GenerateResult:
    tokens: Tensor  # (L,) the response
    steps: list[StepTrace] = field(default_factory=list)
    prefill_tokens: int = 0

    @property
    def partition(self) -> list[Tensor]:
        return [s.chosen for s in self.steps]

    @property
    def forward_tokens(self) -> int:
        return self.prefill_tokens + sum(s.forward_tokens for s in self.steps)


def _prepare(model: LLaDAMDM, prompt_ids: Tensor, plan: UnmaskPlan, sampling: SamplingConfig,
             uncond_prompt_ids: Tensor | None, response_init: Tensor | None,
             image_only_prompt_ids: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
    """The prompts of every CFG branch (cond, uncond, image-only) and the initial canvas (mask where planned)."""
    mask_id = model.config.mask_token_id
    device = prompt_ids.device
    prompts = [prompt_ids]
    if sampling.cfg_scale > 0:
        if uncond_prompt_ids is None:  # LaViDa-O's unconditional branch: the prompt replaced by masks
            uncond_prompt_ids = torch.full_like(prompt_ids, mask_id)
        prompts.append(uncond_prompt_ids)
        if sampling.image_cfg_scale > 0:
            if image_only_prompt_ids is None:
                raise ValueError("image_cfg_scale > 0 needs image_only_prompt_ids (the edit's text masked)")
            prompts.append(image_only_prompt_ids)
    if any(pr.shape != prompt_ids.shape for pr in prompts):
        raise ValueError("every CFG branch prompt must have the prompt's length (positions are shared)")
    if response_init is None:
        response = torch.full((plan.length,), mask_id, dtype=torch.long, device=device)
    else:
        response = response_init.clone().to(device)
    planned = torch.cat([s.positions for s in plan.stages]).to(device) if plan.stages else \
        torch.empty(0, dtype=torch.long, device=device)
    if planned.numel() != int((response == mask_id).sum()) or bool((response[planned] != mask_id).any()):
        raise ValueError("the plan must decode exactly the masked positions of response_init")
    return prompts, response


@torch.no_grad()
def generate_dense(model: LLaDAMDM, prompt_ids: Tensor, plan: UnmaskPlan, sampling: SamplingConfig,
                   uncond_prompt_ids: Tensor | None = None, response_init: Tensor | None = None,
                   record_logits: bool = False, image_only_prompt_ids: Tensor | None = None) -> GenerateResult:
    """Vanilla MDM sampling: every step feeds prompt + all L response positions, full attention.

    With guidance every branch is a full forward at the guided steps; outside `cfg_interval` only cond runs.
    """
    prompts, response = _prepare(model, prompt_ids, plan, sampling, uncond_prompt_ids, response_init,
                                 image_only_prompt_ids)
    p = prompt_ids.numel()
    positions = torch.arange(p + plan.length, device=prompt_ids.device)
    stepper = PlanWalker(plan, sampling, response)
    result = GenerateResult(response)
    for step, (decode, count) in enumerate(stepper.decode_sets()):
        branches = prompts if sampling.guided_at(step, plan.num_steps) else prompts[:1]
        branch_logits = [model(torch.cat([pr, response]), positions, SpanAttention(None), p + decode)
                         for pr in branches]
        logits = guide_logits(branch_logits, sampling)
        keep, tokens = sample_and_choose(logits, decode, count, sampling.at_step(step, plan.num_steps), step)
        chosen = stepper.commit(decode, keep, tokens)
        result.steps.append(StepTrace(decode.clone(), chosen, positions.numel() * len(branches),
                                      logits if record_logits else None))
    return result


@torch.no_grad()
def generate_sparse(model: LLaDAMDM, prompt_ids: Tensor, plan: UnmaskPlan, sampling: SamplingConfig,
                    options: SparseOptions = SparseOptions(), uncond_prompt_ids: Tensor | None = None,
                    response_init: Tensor | None = None, record_logits: bool = False,
                    image_only_prompt_ids: Tensor | None = None) -> GenerateResult:
    """Sparse-LaViDa sampling: per step feed [C_{k-1} | decode set | registers] over a KV cache.

    Rows of one step, in order: commit rows C_{k-1} (cached after this pass), clean rows that are
    recomputed because their cache is off, the decode set, the other masked positions when
    truncation is off, and the registers. Commit rows see only clean keys (the step-causal rule);
    every other row sees all keys. With caches and truncation off and no registers this is the
    dense MDM. CFG branches (uncond, image-only) are companion sequences with caches of their own; outside
    `cfg_interval` a companion runs only its rows to be cached, so its cache stays in step with the canvas.
    """
    cfg = model.config
    prompts, response = _prepare(model, prompt_ids, plan, sampling, uncond_prompt_ids, response_init,
                                 image_only_prompt_ids)
    device = prompt_ids.device
    p, length, m = prompt_ids.numel(), plan.length, options.num_registers
    mask_id = cfg.mask_token_id
    given = (response != mask_id).nonzero().flatten()  # infilling context, known before step 1
    # room for every row of a step (at most p + L + m), so each pass writes its K/V in place;
    # a tensor-parallel shard caches only its own K/V heads
    caches = [KVCache(cfg.n_layers, p + length + m, model.local_kv_heads, cfg.head_dim,
                      next(model.parameters()).dtype, device) for _ in prompts]
    register_positions = torch.arange(p + length, p + length + m, device=device)
    if m and cfg.register_token_id is None:
        raise ValueError("num_registers > 0 needs a register token: this checkpoint's config has no register_token_id")
    register_ids = torch.full((m,), cfg.register_token_id or 0, dtype=torch.long, device=device)
    result = GenerateResult(response)

    prefix_positions = torch.cat([torch.arange(p, device=device), p + given])
    if options.cache_prompt:  # prefill: prompt (+ given tokens) attend among themselves only
        for pr, cache in zip(prompts, caches):
            ids = torch.cat([pr, response[given]])
            no_rows = torch.empty(0, dtype=torch.long, device=device)
            model(ids, prefix_positions, SpanAttention(None, cache, ids.numel()), logits_rows=no_rows)
            cache.advance(ids.numel())
        result.prefill_tokens = prefix_positions.numel() * len(prompts)

    stepper = PlanWalker(plan, sampling, response)
    committed = torch.empty(0, dtype=torch.long, device=device)  # response positions decoded so far
    last_chosen = torch.empty(0, dtype=torch.long, device=device)
    for step, (decode, count) in enumerate(stepper.decode_sets()):
        commit = last_chosen if options.cache_response else last_chosen[:0]
        live_clean = committed if not options.cache_response else committed[:0]
        if options.truncate:
            extra = decode[:0]
        else:
            masked_now = (response == mask_id)
            masked_now[decode] = False
            extra = masked_now.nonzero().flatten()
        clean_rel = torch.cat([commit, live_clean])
        guided = sampling.guided_at(step, plan.num_steps)
        branch_logits, rows_run = [], 0
        for b, (pr, cache) in enumerate(zip(prompts, caches)):
            decodes = b == 0 or guided  # an unguided companion only writes its commit rows
            live_prefix_ids = torch.cat([pr, response[given]]) if not options.cache_prompt else pr[:0]
            live_prefix_pos = prefix_positions if not options.cache_prompt else prefix_positions[:0]
            n_commit = commit.numel()
            n_masks = decode.numel() + extra.numel() if decodes else 0
            ids = torch.cat([response[commit], live_prefix_ids, response[live_clean],
                             torch.full((n_masks,), mask_id, dtype=torch.long, device=device),
                             register_ids if decodes else register_ids[:0]])
            positions = torch.cat([p + commit, live_prefix_pos, p + live_clean,
                                   torch.cat([p + decode, p + extra, register_positions]) if decodes
                                   else register_positions[:0]])
            n_clean = clean_rel.numel() + live_prefix_ids.numel()
            if ids.numel() == 0:
                continue
            spans = inference_step_spans(cache.length, ids.numel(), n_commit, n_clean)
            rows = torch.arange(n_clean, n_clean + (decode.numel() if decodes else 0), device=device)
            out = model(ids, positions, SpanAttention(spans, cache, n_commit), rows)
            if decodes:
                branch_logits.append(out)
            cache.advance(n_commit)
            rows_run += ids.numel()
        logits = guide_logits(branch_logits, sampling)
        keep, tokens = sample_and_choose(logits, decode, count, sampling.at_step(step, plan.num_steps), step)
        chosen = stepper.commit(decode, keep, tokens)
        result.steps.append(StepTrace(decode.clone(), chosen, rows_run, logits if record_logits else None))
        committed = torch.cat([committed, chosen])
        last_chosen = chosen
    return result


@torch.no_grad()
def step_causal_logits(model: LLaDAMDM, prompt_ids: Tensor, response_ids: Tensor, clean_blocks: list[Tensor],
                       masked_blocks: list[Tensor], num_registers: int) -> list[Tensor]:
    """One full forward under the Algorithm 1 mask; the logits of each masked block's rows.

    This is the I2 oracle: for clean blocks C_1..C_{k-1} and masked block D_k it must equal the
    sparse sampler's incremental logits at step k.
    """
    seq = build_step_causal_sequence(prompt_ids, response_ids, clean_blocks, masked_blocks, num_registers,
                                     model.config.mask_token_id, model.config.register_token_id)
    rows = torch.cat(seq["masked_rows"]) if seq["masked_rows"] else torch.empty(0, dtype=torch.long)
    logits = model(seq["ids"], seq["positions"], SpanAttention(seq["spans"]), rows)
    return list(torch.split(logits, [r.numel() for r in seq["masked_rows"]]))
