"""LaViDa-O's image drivers: sparse (Sparse-LaViDa, over positions) and dense generation, and the Algorithm 1 oracle."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sparse_lavida_vllm.diffusion.masks import build_step_causal_sequence, inference_step_spans
from sparse_lavida_vllm.diffusion.planners import UnmaskPlan, code_step
from sparse_lavida_vllm.diffusion.sampling import SamplingConfig, guide_logits, sample_tokens, step_generator
from sparse_lavida_vllm.model_executor.attention import SpanAttention
from sparse_lavida_vllm.model_executor.lavida_o_config import LaViDaOConfig
from sparse_lavida_vllm.model_executor.lavida_o_model import LaViDaOMDM, ModalKVCache


@dataclass
class ImageStep:
    decode: Tensor  # positions (response-relative) fed as masks this step
    logits: Tensor  # (len(decode), codes_per_position, num_vq_embeddings)


@dataclass
class ImageResult:
    patches: Tensor  # (positions, codes_per_position) the generated code patches
    steps: list[ImageStep]
    forward_rows: int  # rows through the model, prefill included


def _register_patch(config: LaViDaOConfig, count: int, device: torch.device) -> Tensor:
    if count and config.register_code is None:
        raise ValueError("image registers need register_code in config.json (the checkpoint declares none)")
    return torch.full((count, config.codes_per_position), config.register_code or 0, dtype=torch.long, device=device)


@dataclass(frozen=True)
class ImageContext:
    """One guidance branch's context around the image: text before it (with an edit's source-image positions among
    them, as 2x2 code patches, and on checkpoints with a vision tower the source's SigLIP rows) and text after it."""

    prompt_ids: Tensor  # (p,) ids; entries at source_rows and feature_rows are ignored
    suffix_ids: Tensor  # (s,) text after the image placeholders (LaViDa-O's closing <|eot_id|>)
    source_rows: Tensor  # (n,) indices into prompt_ids of the source image's positions (edits), else empty
    source_codes: Tensor  # (n, codes_per_position)
    # (f,) indices into prompt_ids of text-stream rows fed given embeddings instead of their ids' (an edit's SigLIP
    # copy of the source: lavida_o_vision.edit_understanding), and those embeddings (f, d_model)
    feature_rows: Tensor | None = None
    features: Tensor | None = None


def image_context(config: LaViDaOConfig, prompt_ids: Tensor, suffix_ids: Tensor | None = None,
                  source_rows: Tensor | None = None, source_codes: Tensor | None = None,
                  understanding: tuple[Tensor, Tensor] | None = None) -> ImageContext:
    """`understanding` (rows, features): prompt rows that carry the understanding branch's features (the edit
    prompt's `<image>`, as lavida_o_vision.edit_understanding lays it out)."""
    empty = torch.empty(0, dtype=torch.long, device=prompt_ids.device)
    rows = empty if source_rows is None else source_rows.to(prompt_ids.device)
    codes = empty.view(0, config.codes_per_position) if source_codes is None else source_codes
    if codes.shape != (rows.numel(), config.codes_per_position):
        raise ValueError(f"source_codes must have shape ({rows.numel()}, {config.codes_per_position}), "
                         f"got {tuple(codes.shape)}")
    if rows.numel() and config.gen_enc_add_pos_emb:
        raise ValueError("gen_enc_add_pos_emb=true (Sparse-LaViDa) changes how an edit's source image is embedded "
                         "and that code is not published: edits are not supported on this checkpoint")
    feature_rows = features = None
    if understanding is not None:
        feature_rows, features = understanding[0].to(prompt_ids.device), understanding[1]
        if features.shape != (feature_rows.numel(), config.d_model):
            raise ValueError(f"understanding features must have shape ({feature_rows.numel()}, {config.d_model}), "
                             f"got {tuple(features.shape)}")
    return ImageContext(prompt_ids, empty if suffix_ids is None else suffix_ids, rows, codes, feature_rows,
                        features)


def edit_branches(config: LaViDaOConfig, cond: ImageContext,
                  uncond_prompt_ids: Tensor | None = None) -> tuple[ImageContext, ImageContext]:
    """LaViDa-O's guidance companions (predict_t2i_edit, edit_mode 0): uncond = `uncond_prompt_ids` (the publishers'
    `is_prompt`: rows through the user turn's closing `<|eot_id|>` masked, the assistant header kept; the
    request layout builds it, multimodal/lavida_o_layout.LaViDaOLayout.uncond_ids), by default the whole prompt
    masked; the source image's rows are mask tokens there, text after the image kept. Image-only = every text row
    masked, the text after the image too (`~is_gen_enc`), the source image's VQ positions kept. Neither keeps the
    SigLIP rows (they lie inside the masked user turn)."""
    mask = config.mask_token_id
    none = cond.source_rows[:0]
    if uncond_prompt_ids is not None and uncond_prompt_ids.shape != cond.prompt_ids.shape:
        raise ValueError("uncond_prompt_ids must have the prompt's length (positions are shared)")
    uncond_ids = torch.full_like(cond.prompt_ids, mask) if uncond_prompt_ids is None else uncond_prompt_ids
    uncond = ImageContext(uncond_ids, cond.suffix_ids, none, cond.source_codes[:0])
    image_only = ImageContext(torch.full_like(cond.prompt_ids, mask), torch.full_like(cond.suffix_ids, mask),
                              cond.source_rows, cond.source_codes)
    return uncond, image_only


def context_inputs(model: LaViDaOMDM, ctx: ImageContext, extra_ids: Tensor, extra_image_rows: Tensor,
                   extra_codes: Tensor) -> dict[str, Tensor]:
    """Model inputs for rows [prompt | suffix | extra...]: source rows in the image stream when the checkpoint says
    enc_use_image_branch, else as text rows carrying the zero-padded patch embedding (the publishers' two paths);
    feature rows (an edit's SigLIP copy) as text rows carrying their features."""
    cfg = model.config
    ids = torch.cat([ctx.prompt_ids, ctx.suffix_ids, extra_ids])
    source_as_text = not cfg.enc_use_image_branch and ctx.source_rows.numel()
    has_features = ctx.feature_rows is not None and ctx.feature_rows.numel()
    if not source_as_text and not has_features:
        return {"input_ids": ids, "image_rows": torch.cat([ctx.source_rows, extra_image_rows]),
                "image_codes": torch.cat([ctx.source_codes, extra_codes])}
    # the ids of feature rows (IMAGE_TOKEN_INDEX) and source rows are not embedded: clamp them to a valid id
    embeds = model.model.transformer["wte"](ids.masked_fill(ids < 0, 0))
    if has_features:
        embeds[ctx.feature_rows] = ctx.features.to(embeds.dtype)
    if source_as_text:
        embeds[ctx.source_rows] = F.pad(model.embed_patches(ctx.source_codes), (0, cfg.d_model - cfg.d_model_gen))
        return {"input_ids": ids, "image_rows": extra_image_rows, "image_codes": extra_codes, "text_embeds": embeds}
    return {"input_ids": ids, "image_rows": torch.cat([ctx.source_rows, extra_image_rows]),
            "image_codes": torch.cat([ctx.source_codes, extra_codes]), "text_embeds": embeds}


@torch.no_grad()
def generate_image_sparse(model: LaViDaOMDM, prompt_ids: Tensor, plan: UnmaskPlan, sampling: SamplingConfig,
                          num_registers: int | None = None, record_logits: bool = True,
                          uncond_prompt_ids: Tensor | None = None, suffix_ids: Tensor | None = None,
                          source_rows: Tensor | None = None, source_codes: Tensor | None = None,
                          understanding: tuple[Tensor, Tensor] | None = None) -> ImageResult:
    """Sparse-LaViDa image generation over positions: prompt (+ suffix) prefilled into the cache, then per step
    [C_{k-1} (cached after the pass) | decode positions as mask patches | image registers].

    `plan` is over the (H/2) x (W/2) position grid (planners.image_plan); each decode position samples its 4 codes
    with the (seed, step) noise; the plan's stages fix which positions are kept (all of the stage). `suffix_ids`
    is the text after the image placeholders, prefilled with the prompt at positions after the image; registers
    follow the whole sequence. Edits: `source_rows` / `source_codes` put the source image's positions in the
    prompt, and `understanding` (rows, features) its SigLIP copy on checkpoints with a vision tower (the cond
    branch only, see edit_branches). Guidance (`cfg_scale`, `image_cfg_scale`, `cfg_interval`): the companions of
    `edit_branches` (or `uncond_prompt_ids`) are sequences with caches of their own; outside `cfg_interval` they
    run only their commit rows, so their caches stay in step with the canvas.
    """
    cfg = model.config
    device = prompt_ids.device
    m = cfg.registers("image") if num_registers is None else num_registers
    length, k = plan.length, cfg.codes_per_position
    cond = image_context(cfg, prompt_ids, suffix_ids, source_rows, source_codes, understanding)
    branches = [cond]
    if sampling.cfg_scale > 0:
        uncond, image_only = edit_branches(cfg, cond, uncond_prompt_ids)
        branches.append(uncond)
        if sampling.image_cfg_scale > 0:
            if not cond.source_rows.numel():
                raise ValueError("image_cfg_scale > 0 needs an edit's source image (source_rows, source_codes)")
            branches.append(image_only)
    p, s = prompt_ids.numel(), cond.suffix_ids.numel()
    mask_patch = torch.full((k,), cfg.mask_code, dtype=torch.long, device=device)
    patches = mask_patch.repeat(length, 1)
    dtype = next(model.parameters()).dtype
    caches = [ModalKVCache(cfg.n_layers, p + s + length + m, model.local_kv_heads, cfg.head_dim, dtype, device)
              for _ in branches]
    prefix_positions = torch.cat([torch.arange(p, device=device), p + length + torch.arange(s, device=device)])
    no_rows = torch.empty(0, dtype=torch.long, device=device)
    for ctx, cache in zip(branches, caches):
        inputs = context_inputs(model, ctx, no_rows, no_rows, patches[:0])
        model(positions=prefix_positions, attention=SpanAttention(None, cache, p + s), logits_rows=no_rows, **inputs)
        cache.advance(p + s)
    registers = _register_patch(cfg, m, device)
    register_positions = torch.arange(p + s + length, p + s + length + m, device=device)
    last = torch.empty(0, dtype=torch.long, device=device)
    steps: list[ImageStep] = []
    rows_run = (p + s) * len(branches)
    for step, stage in enumerate(plan.stages):
        decode = stage.positions.to(device)
        guided = sampling.guided_at(step, plan.num_steps)
        branch_logits = []
        for b, cache in enumerate(caches):
            decodes = b == 0 or guided  # an unguided companion only writes its commit rows
            n_dec, n_reg = (decode.numel(), m) if decodes else (0, 0)
            n_img = last.numel() + n_dec + n_reg
            if n_img == 0:
                continue
            codes = torch.cat([patches[last], mask_patch.repeat(n_dec, 1), registers[:n_reg]])
            positions = torch.cat([p + last, p + decode[:n_dec], register_positions[:n_reg]])
            spans = inference_step_spans(cache.length, n_img, last.numel())
            rows = torch.arange(n_img, device=device)
            logits = model.image_logits(torch.zeros_like(rows), positions, SpanAttention(spans, cache, last.numel()),
                                        logits_rows=rows[last.numel():last.numel() + n_dec],
                                        image_rows=rows, image_codes=codes)
            cache.advance(last.numel())
            rows_run += n_img
            if decodes:
                branch_logits.append(logits)
        logits = guide_logits(branch_logits, sampling)
        tokens, _ = sample_tokens(logits.reshape(-1, logits.shape[-1]), sampling.at_step(step, plan.num_steps),
                                  step_generator(sampling.seed, step, device))
        patches[decode] = tokens.view(-1, k)
        steps.append(ImageStep(decode.clone(), logits if record_logits else logits[:0]))
        last = decode
    return ImageResult(patches, steps, rows_run)


@torch.no_grad()
def generate_image_dense(model: LaViDaOMDM, prompt_ids: Tensor, plan: UnmaskPlan, sampling: SamplingConfig,
                         suffix_ids: Tensor | None = None, source_rows: Tensor | None = None,
                         source_codes: Tensor | None = None,
                         understanding: tuple[Tensor, Tensor] | None = None,
                         uncond_prompt_ids: Tensor | None = None, code_width: int | None = None) -> ImageResult:
    """The vanilla (dense) MDM over positions: every step feeds [prompt | all positions (mask patches where not
    decoded) | suffix] with full attention (per-modality layers still split by modality), no cache, no registers;
    decode positions sample their 4 codes with the (seed, step) noise as generate_image_sparse does. Guidance
    branches (edit_branches, `uncond_prompt_ids` as in generate_image_sparse) each run the full pass at guided steps;
    `understanding` as in generate_image_sparse. The dense reference of the served dense path.

    `code_width`: `plan` is over single VQ codes of a grid that many codes wide (planners.publishers_code_plan, the
    publishers' own sampler): a step feeds the partly decoded patches as they are, samples the 4 codes of every
    position its codes touch, and commits only its own codes."""
    cfg = model.config
    device = prompt_ids.device
    k = cfg.codes_per_position
    length = plan.length if code_width is None else plan.length // k
    cond = image_context(cfg, prompt_ids, suffix_ids, source_rows, source_codes, understanding)
    branches = [cond]
    if sampling.cfg_scale > 0:
        uncond, image_only = edit_branches(cfg, cond, uncond_prompt_ids)
        branches += [uncond, image_only] if sampling.image_cfg_scale > 0 else [uncond]
    p, s = prompt_ids.numel(), cond.suffix_ids.numel()
    patches = torch.full((length, k), cfg.mask_code, dtype=torch.long, device=device)
    positions = torch.arange(p + length + s, device=device)
    # context_inputs lays rows out [prompt | suffix | canvas]; the pass runs them in sequence order
    # [prompt | canvas | suffix] (the served dense path's order, so the keys are summed in the same order)
    order = torch.cat([torch.arange(p, device=device), p + s + torch.arange(length, device=device),
                       p + torch.arange(s, device=device)])
    new_index = torch.empty_like(order)
    new_index[order] = torch.arange(order.numel(), device=device)
    canvas_rows = p + s + torch.arange(length, device=device)
    steps: list[ImageStep] = []
    rows_run = 0
    for step, stage in enumerate(plan.stages):
        decode = stage.positions.to(device)
        if code_width is not None:  # this step's codes -> the positions they sit in, and their slots there
            decode, taken = code_step(decode, code_width)
        ran = branches if sampling.guided_at(step, plan.num_steps) else branches[:1]
        branch_logits = []
        for ctx in ran:
            inputs = context_inputs(model, ctx, torch.zeros(length, dtype=torch.long, device=device), canvas_rows,
                                    patches)
            inputs["input_ids"] = inputs["input_ids"][order]
            inputs["image_rows"] = new_index[inputs["image_rows"]]
            if "text_embeds" in inputs:
                inputs["text_embeds"] = inputs["text_embeds"][order]
            branch_logits.append(model.image_logits(positions=positions, attention=SpanAttention(None),
                                                    logits_rows=p + decode, **inputs))
            rows_run += positions.numel()
        logits = guide_logits(branch_logits, sampling)
        tokens, _ = sample_tokens(logits.reshape(-1, logits.shape[-1]), sampling.at_step(step, plan.num_steps),
                                  step_generator(sampling.seed, step, device))
        new = tokens.view(-1, k)
        patches[decode] = new if code_width is None else torch.where(taken, new, patches[decode])
        steps.append(ImageStep(decode.clone(), logits))
    return ImageResult(patches, steps, rows_run)


@torch.no_grad()
def image_step_causal_logits(model: LaViDaOMDM, context: ImageContext | Tensor, patches: Tensor,
                             clean_blocks: Sequence[Tensor], masked_blocks: Sequence[Tensor],
                             num_registers: int, suffix_ids: Tensor | None = None) -> list[Tensor]:
    """One forward under Algorithm 1 (prompt + suffix | clean position blocks | masked blocks + image registers):
    the per-code logits of each masked block. The I2 oracle of generate_image_sparse (one branch: `context`, or
    plain prompt ids + `suffix_ids`)."""
    cfg = model.config
    ctx = context if isinstance(context, ImageContext) else image_context(cfg, context, suffix_ids)
    device = ctx.prompt_ids.device
    length = patches.shape[0]
    p, s = ctx.prompt_ids.numel(), ctx.suffix_ids.numel()
    # The packing is the engine's (build_step_causal_sequence): the suffix rides in block 0 with the prompt, and the
    # response "ids" are position indices, so the packed rows say which patch each image row carries.
    seq = build_step_causal_sequence(torch.cat([ctx.prompt_ids, ctx.suffix_ids]),
                                     torch.arange(length, device=device), list(clean_blocks), list(masked_blocks),
                                     num_registers, -1, -2)
    ids, positions = seq["ids"], seq["positions"].clone()
    # true positions: suffix after the image, image rows right after the prompt (registers already follow all)
    positions[p:p + s] = p + length + torch.arange(s, device=device)
    positions[p + s:] -= s * (positions[p + s:] < p + s + length)
    image_rows = torch.arange(p + s, ids.numel(), device=device)
    img_ids = ids[p + s:]
    codes = torch.empty(image_rows.numel(), cfg.codes_per_position, dtype=torch.long, device=device)
    clean = img_ids >= 0
    codes[clean] = patches[img_ids[clean]]
    codes[img_ids == -1] = cfg.mask_code
    n_reg = int((img_ids == -2).sum())
    codes[img_ids == -2] = _register_patch(cfg, n_reg, device)
    inputs = context_inputs(model, ctx, torch.zeros_like(img_ids), image_rows, codes)
    rows = torch.cat(seq["masked_rows"]) if seq["masked_rows"] else torch.empty(0, dtype=torch.long)
    logits = model.image_logits(positions=positions, attention=SpanAttention(seq["spans"]), logits_rows=rows, **inputs)
    return list(torch.split(logits, [r.numel() for r in seq["masked_rows"]]))
