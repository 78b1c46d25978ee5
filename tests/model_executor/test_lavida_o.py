"""LaViDa-O: our flat-rows model vs a straightforward re-implementation of the published forward, the loader, I2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

diffusers = pytest.importorskip("diffusers")
from diffusers.models.resnet import Downsample2D, Upsample2D  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from sparse_lavida_vllm.diffusion.masks import inference_step_spans  # noqa: E402
from sparse_lavida_vllm.diffusion.planners import image_plan, text_plan  # noqa: E402
from sparse_lavida_vllm.diffusion.sampling import SamplingConfig, guide_logits  # noqa: E402
from sparse_lavida_vllm.drivers.check import consistency_error  # noqa: E402
from sparse_lavida_vllm.drivers.lavida_o_image import (  # noqa: E402
    context_inputs,
    edit_branches,
    generate_image_sparse,
    image_context,
    image_step_causal_logits,
)
from sparse_lavida_vllm.drivers.text import SparseOptions, generate_sparse  # noqa: E402
from sparse_lavida_vllm.model_executor.attention import SpanAttention  # noqa: E402
from sparse_lavida_vllm.model_executor.lavida_o_config import LaViDaOConfig, load_config  # noqa: E402
from sparse_lavida_vllm.model_executor.lavida_o_model import ModalKVCache  # noqa: E402
from sparse_lavida_vllm.model_executor.lavida_o_weights import (  # noqa: E402
    load_lavida_o,
    random_lavida_o,
    write_tiny_checkpoint,
)
from sparse_lavida_vllm.model_executor.patch_ids import codes_to_patches, patches_to_codes  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny tensors, one thread

CODES = 16  # tiny codebook; the image mask code is CODES + 1 as 8193 is for 8192 codes
IMG = 50  # the image placeholder id in the tiny vocabulary (126089 in the published one)
EDIT = 51  # the edit source-image placeholder (126090)
GRID = 8  # 8x8 codes -> 4x4 transformer positions


def tiny_config(**kw) -> LaViDaOConfig:
    base = dict(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, mlp_hidden_size=48,
                rope_theta=500000.0, mask_token_id=60, eos_token_id=1, pad_token_id=1, d_model_gen=16,
                mlp_hidden_size_gen=24, dual_tower=True, dual_tower_layers=0, downsample=True,
                num_vq_embeddings=CODES, image_token_id=IMG, edit_image_token_id=EDIT, num_register_tokens=(2, 3),
                num_register_groups=(25, 25), block_causal=True, register_token_id=61, register_code=CODES + 2)
    base.update(kw)
    return LaViDaOConfig(**base)


# ---- an independent implementation of the published forward (llava_llada / modeling_llada / u_vit) ---------

class PubRMS(nn.Module):
    """modeling_llada.RMSLayerNorm: normalise in fp32, cast back, then weight * x."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)).to(dtype)
        return self.weight * x


def pub_rope(t: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """RotaryEmbedding with explicit position ids: t (B, nh, T, hs)."""
    hs = t.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, hs, 2, dtype=torch.float) / hs))
    freqs = torch.einsum("i,j->ij", pos.float(), inv)
    emb = torch.cat([freqs, freqs], -1)
    sin, cos = emb.sin()[None, None], emb.cos()[None, None]
    x1, x2 = t.view(*t.shape[:-1], 2, hs // 2).unbind(-2)
    return t * cos + torch.cat([-x2, x1], -1) * sin


class PubBlock(nn.Module):
    def __init__(self, layer_id: int, c: LaViDaOConfig) -> None:
        super().__init__()
        d, dg, hd = c.d_model, c.d_model_gen, c.d_model // c.n_heads
        self.c, self.split = c, layer_id > (c.dual_tower_layers if c.dual_tower_layers is not None else 9999)
        self.attn_norm, self.ff_norm = PubRMS(d, c.rms_norm_eps), PubRMS(d, c.rms_norm_eps)
        self.q_proj, self.attn_out = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        self.k_proj, self.v_proj = nn.Linear(d, c.n_kv_heads * hd, bias=False), nn.Linear(d, c.n_kv_heads * hd,
                                                                                         bias=False)
        self.ff_proj, self.up_proj = nn.Linear(d, c.mlp_hidden_size, bias=False), nn.Linear(d, c.mlp_hidden_size,
                                                                                            bias=False)
        self.ff_out = nn.Linear(c.mlp_hidden_size, d, bias=False)
        self.attn_norm_vision, self.ff_norm_vision = PubRMS(dg, c.rms_norm_eps), PubRMS(dg, c.rms_norm_eps)
        self.q_proj_vision = nn.Linear(dg, d, bias=False)
        self.k_proj_vision = nn.Linear(dg, c.n_kv_heads * hd, bias=False)
        self.v_proj_vision = nn.Linear(dg, c.n_kv_heads * hd, bias=False)
        self.ff_proj_vision = nn.Linear(dg, c.mlp_hidden_size_gen, bias=False)
        self.up_proj_vision = nn.Linear(dg, c.mlp_hidden_size_gen, bias=False)
        self.ff_out_vision = nn.Linear(c.mlp_hidden_size_gen, dg, bias=False)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """LLaDABlock.attention for one sequence (T, C): heads, RoPE at `pos`, SDPA (GQA by repeat), attn_out."""
        c, T = self.c, q.shape[0]
        hd = c.d_model // c.n_heads
        q = q.view(1, T, c.n_heads, hd).transpose(1, 2)
        k = k.view(1, T, c.n_kv_heads, hd).transpose(1, 2)
        v = v.view(1, T, c.n_kv_heads, hd).transpose(1, 2)
        q, k = pub_rope(q, pos, c.rope_theta), pub_rope(k, pos, c.rope_theta)
        rep = c.n_heads // c.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        att = F.scaled_dot_product_attention(q, k, v)
        return self.attn_out(att.transpose(1, 2).reshape(T, -1))

    def forward(self, x: torch.Tensor, mod: torch.Tensor) -> torch.Tensor:
        """x (T, d_model) with image rows zero-padded beyond d_model_gen; mod (T,) the modality_indices."""
        dg, d = self.c.d_model_gen, self.c.d_model
        x_raw = x
        x_t, x_v = x[~mod], x[mod][:, :dg]
        h_t, h_v = self.attn_norm(x_t), self.attn_norm_vision(x_v)
        qt, kt, vt = self.q_proj(h_t), self.k_proj(h_t), self.v_proj(h_t)
        qv, kv, vv = self.q_proj_vision(h_v), self.k_proj_vision(h_v), self.v_proj_vision(h_v)
        pos = torch.arange(x.shape[0])
        att = torch.zeros(x.shape[0], d)
        if self.split:  # each modality packed and attended alone, at its raw positions
            att[~mod] = self.attention(qt, kt, vt, pos[~mod])
            att[mod] = self.attention(qv, kv, vv, pos[mod])
        else:
            def merge(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
                out = torch.zeros(x.shape[0], a.shape[-1])
                out[~mod], out[mod] = a, b
                return out
            att = self.attention(merge(qt, qv), merge(kt, kv), merge(vt, vv), pos)
        x = x_raw + att
        x_t, x_v = x[~mod], x[mod][:, :dg]
        x_t = x_t + self.ff_out(F.silu(self.ff_proj(self.ff_norm(x_t))) * self.up_proj(self.ff_norm(x_t)))
        hv = self.ff_norm_vision(x_v)
        x_v = x_v + self.ff_out_vision(F.silu(self.ff_proj_vision(hv)) * self.up_proj_vision(hv))
        out = torch.zeros_like(x)
        out[~mod] = x_t
        out[mod] = F.pad(x_v, (0, d - dg))  # merge_qkv(..., pad=True)
        return out


class PubUVit(nn.Module):
    """u_vit.Simple_UVitBlock without the MLP: diffusers' Down/Upsample2D with the publishers' arguments."""

    def __init__(self, channels: int, down: bool) -> None:
        super().__init__()
        if down:
            self.downsample = Downsample2D(channels, use_conv=True, padding=0, name="Conv2d_0", kernel_size=2,
                                           norm_type="rms_norm", eps=1e-6, elementwise_affine=True, bias=False)
        else:
            self.upsample = Upsample2D(channels, use_conv_transpose=True, kernel_size=2, padding=0, name="conv",
                                       norm_type="rms_norm", eps=1e-6, elementwise_affine=True, bias=False,
                                       interpolate=False)
        self.down = down

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x.view(1, h, w, -1).permute(0, 3, 1, 2)
        x = self.downsample(x) if self.down else self.upsample(x)
        return x.flatten(2).transpose(1, 2)[0]


class Published(nn.Module):
    """LlavaLladaForMaskedDiffusion's parameter tree and t2i forward (wte + gen embedding, blocks, ln_f, heads)."""

    def __init__(self, c: LaViDaOConfig) -> None:
        super().__init__()
        self.c = c
        self.model = nn.Module()
        self.model.transformer = nn.ModuleDict({
            "wte": nn.Embedding(c.vocab_size, c.d_model),
            "blocks": nn.ModuleList(PubBlock(i, c) for i in range(c.n_layers)),
            "ln_f": PubRMS(c.d_model, c.rms_norm_eps),
            "ff_out": nn.Linear(c.d_model, c.vocab_size, bias=False),
        })
        dg, n = c.d_model_gen, c.num_vq_embeddings
        if c.gen_mlp_type == "embed":
            self.model.gen_embedding = nn.Embedding(n + 256, dg)
            self.model.gen_predictor = nn.Linear(dg, n, bias=False)
        else:  # llava_arch.build_gen_embedding's 'dit' / 'dit2' (torch's own RMSNorm)
            self.model.gen_embedding = nn.Sequential(nn.Embedding(n + 256, dg), nn.RMSNorm(dg, eps=1e-6),
                                                     nn.Linear(dg, dg, bias=False))
            self.model.gen_embedding_2 = nn.Sequential(nn.RMSNorm(dg, eps=1e-6), nn.Linear(dg, dg, bias=False))
            self.model.gen_predictor = nn.Sequential(nn.Linear(dg, dg, bias=False), nn.RMSNorm(dg, eps=1e-6),
                                                     nn.Linear(dg, n, bias=False))
            if c.gen_mlp_type == "dit2":
                self.model.gen_predictor_2 = nn.Sequential(nn.RMSNorm(dg, eps=1e-6), nn.Linear(dg, dg, bias=False))
        if c.downsample:
            self.model.downsample_gen = PubUVit(c.d_model_gen, down=True)
            self.model.upsample_gen = PubUVit(c.d_model_gen, down=False)

    def embed_codes(self, codes: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """call_gen_embedding, zero-padded to d_model (pad_along_last_dim)."""
        gen = self.model.gen_embedding(codes)
        if self.c.downsample:
            gen = self.model.downsample_gen(gen, h, w)
        if self.c.gen_mlp_type != "embed":
            gen = self.model.gen_embedding_2(gen)
        return F.pad(gen, (0, self.c.d_model - self.c.d_model_gen))

    def forward(self, ids: torch.Tensor, codes: torch.Tensor, h: int, w: int,
                source: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (T,) with IMG (and, for edits, EDIT) placeholders; codes (h*w,) and the source image's codes.
        Returns text logits (T, V) and code logits (h*w, codebook)."""
        c, t = self.c, self.model.transformer
        gen_mask, enc_mask = ids == c.image_token_id, ids == c.edit_image_token_id
        x = t["wte"](ids.masked_fill(gen_mask | enc_mask, 0))
        x[gen_mask] = self.embed_codes(codes, h, w)
        if source is not None:
            x[enc_mask] = self.embed_codes(source, h, w)
        mod = gen_mask | enc_mask if c.enc_use_image_branch else gen_mask  # modality_indices
        for block in t["blocks"]:
            x = block(x, mod)
        hidden = t["ln_f"](x)  # hidden_states[-1]: post ln_f, image rows still zero-padded
        gen_h = hidden[gen_mask][:, :c.d_model_gen]
        if c.downsample:
            gen_h = self.model.upsample_gen(gen_h, h // 2, w // 2)
        if c.gen_mlp_type == "dit2":
            gen_h = self.model.gen_predictor_2(gen_h)
        return t["ff_out"](hidden), self.model.gen_predictor(gen_h)


def sequence(seed: int, prompt: int = 7, suffix: int = 3, per_position: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """A t2i-shaped sequence: prompt text | image placeholders | trailing text; and an 8x8 code grid, some masked."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.randint(2, 45, (prompt,), generator=g), torch.full((GRID * GRID // per_position,), IMG),
                     torch.randint(2, 45, (suffix,), generator=g)])
    codes = torch.randint(0, CODES, (GRID * GRID,), generator=g)
    codes[torch.rand(GRID * GRID, generator=g) < 0.4] = CODES + 1  # the mask code
    return ids, codes


@pytest.mark.parametrize("dual_tower_layers, downsample, gen_mlp_type", [
    (0, True, "embed"), (1, True, "embed"), (None, True, "embed"), (0, False, "embed"), (0, True, "dit"),
    (1, True, "dit2"), (0, False, "dit2")])
def test_forward_equals_the_published_forward(dual_tower_layers: int | None, downsample: bool,
                                              gen_mlp_type: str) -> None:
    config = tiny_config(dual_tower_layers=dual_tower_layers, downsample=downsample, gen_mlp_type=gen_mlp_type)
    ours = random_lavida_o(config, seed=1)
    published = Published(config)
    published.load_state_dict(ours.state_dict(), strict=True)  # same parameter names, nothing left over
    ids, codes = sequence(2, per_position=config.codes_per_position)
    want_text, want_codes = published(ids, codes, GRID, GRID)
    image_rows = (ids == IMG).nonzero().flatten()
    if downsample:
        patches, to_codes = codes_to_patches(codes, GRID, GRID), lambda x: patches_to_codes(x, GRID, GRID)
    else:
        patches, to_codes = codes.view(-1, 1), lambda x: x[:, 0]
    positions = torch.arange(ids.numel())
    got_text = ours(ids, positions, image_rows=image_rows, image_codes=patches)
    got_codes = to_codes(ours.image_logits(ids, positions, image_rows=image_rows, image_codes=patches))
    text_rows = (ids != IMG).nonzero().flatten()
    assert (got_text - want_text[text_rows]).abs().max().item() <= 1e-5
    assert (got_codes - want_codes).abs().max().item() <= 1e-5
    # rows are packable in any order: explicit positions carry the layout
    perm = torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(0))
    inv = torch.argsort(perm)
    shuffled = ours.image_logits(ids[perm], positions[perm], image_rows=inv[image_rows], image_codes=patches)
    assert (to_codes(shuffled) - want_codes).abs().max().item() <= 1e-5


@pytest.mark.parametrize("enc_use_image_branch", [True, False])
def test_edit_forward_equals_the_published_forward(enc_use_image_branch: bool) -> None:
    """An edit's source image: image rows (enc_use_image_branch) or text rows with the padded patch embedding."""
    config = tiny_config(enc_use_image_branch=enc_use_image_branch)
    ours = random_lavida_o(config, seed=7)
    published = Published(config)
    published.load_state_dict(ours.state_dict(), strict=True)
    g = torch.Generator().manual_seed(8)
    n = GRID * GRID // 4
    ids = torch.cat([torch.randint(2, 45, (3,), generator=g), torch.full((n,), EDIT),
                     torch.randint(2, 45, (4,), generator=g), torch.full((n,), IMG), torch.tensor([7])])
    source = torch.randint(0, CODES, (GRID * GRID,), generator=g)
    codes = torch.full((GRID * GRID,), CODES + 1)
    _, want = published(ids, codes, GRID, GRID, source)
    enc_rows, gen_rows = (ids == EDIT).nonzero().flatten(), (ids == IMG).nonzero().flatten()
    src, gen = codes_to_patches(source, GRID, GRID), codes_to_patches(codes, GRID, GRID)
    positions = torch.arange(ids.numel())
    if enc_use_image_branch:
        got = ours.image_logits(ids, positions, logits_rows=gen_rows, image_rows=torch.cat([enc_rows, gen_rows]),
                                image_codes=torch.cat([src, gen]))
    else:
        embeds = ours.model.transformer["wte"](ids.masked_fill(ids >= EDIT, 0))
        embeds[enc_rows] = F.pad(ours.embed_patches(src), (0, config.d_model - config.d_model_gen))
        got = ours.image_logits(ids, positions, image_rows=gen_rows, image_codes=gen, text_embeds=embeds)
    assert (patches_to_codes(got, GRID, GRID) - want).abs().max().item() <= 1e-5
    # the inputs the sparse driver builds for this context ([prompt | suffix | image rows], true positions)
    p = int(gen_rows[0])
    ctx = image_context(config, ids[:p], ids[p + n:], enc_rows, src)
    image_rows = torch.arange(p + 1, p + 1 + n)
    inputs = context_inputs(ours, ctx, torch.zeros(n, dtype=torch.long), image_rows, gen)
    rows_positions = torch.cat([torch.arange(p), torch.tensor([p + n]), torch.arange(p, p + n)])
    driver = ours.image_logits(positions=rows_positions, logits_rows=image_rows, **inputs)
    assert (patches_to_codes(driver, GRID, GRID) - want).abs().max().item() <= 1e-5


def test_text_rows_can_come_as_embeddings() -> None:
    """Embeddings in place of ids (understanding features, LaViDa-O's mask-embedding CFG prompt) feed text rows."""
    model = random_lavida_o(tiny_config(), seed=6)
    ids, codes = sequence(4)
    image_rows = (ids == IMG).nonzero().flatten()
    patches = codes_to_patches(codes, GRID, GRID)
    positions = torch.arange(ids.numel())
    wte = model.model.transformer["wte"]
    masked = torch.where(ids == IMG, ids, torch.full_like(ids, model.config.mask_token_id))
    want = model.image_logits(masked, positions, image_rows=image_rows, image_codes=patches)
    embeds = wte(masked)  # all rows; image rows' entries are ignored
    got = model.image_logits(ids, positions, image_rows=image_rows, image_codes=patches, text_embeds=embeds)
    assert torch.equal(got, want)
    assert not torch.allclose(got, model.image_logits(ids, positions, image_rows=image_rows, image_codes=patches))
    with pytest.raises(ValueError, match="logits_rows must all be text rows"):  # the LM head never sees image rows
        model(ids, positions, logits_rows=image_rows[:2], image_rows=image_rows, image_codes=patches)
    with pytest.raises(ValueError, match="logits_rows must all be image rows"):
        model.image_logits(ids, positions, logits_rows=torch.tensor([0]), image_rows=image_rows, image_codes=patches)


def test_per_modality_layers_change_the_logits() -> None:
    """The split layers matter (the comparison above is not blind to them)."""
    ids, codes = sequence(3)
    image_rows = (ids == IMG).nonzero().flatten()
    patches = codes_to_patches(codes, GRID, GRID)
    outs = []
    for layers in (0, None):
        model = random_lavida_o(tiny_config(dual_tower_layers=layers), seed=4)
        outs.append(model.image_logits(ids, torch.arange(ids.numel()), image_rows=image_rows, image_codes=patches))
    assert (outs[0] - outs[1]).abs().max().item() > 1e-3


def test_patch_layout_is_the_2x2_grid() -> None:
    codes = torch.arange(GRID * GRID)
    patches = codes_to_patches(codes, GRID, GRID)
    assert patches[0].tolist() == [0, 1, 8, 9] and patches[1].tolist() == [2, 3, 10, 11]
    assert patches[4].tolist() == [16, 17, 24, 25]
    assert torch.equal(patches_to_codes(patches, GRID, GRID), codes)


# ---- I2 on the sparse image path ----------------------------------------------------------------------------

@pytest.mark.parametrize("num_registers, suffix", [(0, 0), (3, 0), (3, 2)])
def test_i2_sparse_image_logits_equal_one_algorithm1_forward(num_registers: int, suffix: int) -> None:
    model = random_lavida_o(tiny_config(), seed=5)
    prompt = torch.randint(2, 45, (6,), generator=torch.Generator().manual_seed(6))
    tail = torch.randint(2, 45, (suffix,), generator=torch.Generator().manual_seed(9))  # e.g. the closing eot
    plan = image_plan(GRID // 2, GRID // 2, 5, "cosine", "stratified", generator=torch.Generator().manual_seed(7))
    sampling = SamplingConfig(temperature=0.9, seed=8)
    result = generate_image_sparse(model, prompt, plan, sampling, num_registers, suffix_ids=tail)
    assert bool((result.patches < CODES).all())  # every code decoded, from the codebook
    clean: list[torch.Tensor] = []
    for step in result.steps:
        oracle = image_step_causal_logits(model, prompt, result.patches, clean, [step.decode], num_registers,
                                          suffix_ids=tail)[0]
        assert (step.logits - oracle).abs().max().item() <= 1e-5
        clean.append(step.decode)
    # several masked blocks in one Algorithm 1 forward == each alone (multi-path training sequences)
    blocks = [s.decode for s in result.steps]
    together = image_step_causal_logits(model, prompt, result.patches, blocks[:2], blocks[2:], num_registers, tail)
    for block, logits in zip(blocks[2:], together):
        alone = image_step_causal_logits(model, prompt, result.patches, blocks[:2], [block], num_registers, tail)[0]
        assert (alone - logits).abs().max().item() <= 1e-5
    if suffix:  # the suffix is really read: other text after the image changes the first step
        other = generate_image_sparse(model, prompt, plan, sampling, num_registers, suffix_ids=tail.flip(0) + 1)
        assert (other.steps[0].logits - result.steps[0].logits).abs().max().item() > 1e-4


def test_i2_holds_per_cfg_branch() -> None:
    """Guided step logits == the guidance formula over one Algorithm 1 forward per branch prompt."""
    model = random_lavida_o(tiny_config(), seed=15)
    prompt = torch.randint(2, 45, (6,), generator=torch.Generator().manual_seed(16))
    plan = image_plan(GRID // 2, GRID // 2, 6, "shift", "stratified", generator=torch.Generator().manual_seed(17))
    sampling = SamplingConfig(temperature=0.8, cfg_scale=4.0, cfg_interval=(0.2, 0.8), seed=18)
    result = generate_image_sparse(model, prompt, plan, sampling, num_registers=3)
    uncond = torch.full_like(prompt, model.config.mask_token_id)
    clean: list[torch.Tensor] = []
    guided = 0
    for k, step in enumerate(result.steps):
        branches = [prompt, uncond] if sampling.guided_at(k, plan.num_steps) else [prompt]
        guided += len(branches) == 2
        per_branch = [image_step_causal_logits(model, pr, result.patches, clean, [step.decode], 3)[0]
                      for pr in branches]
        expected = guide_logits(per_branch, sampling)
        assert (step.logits - expected).abs().max().item() <= 1e-5 * (1 + 2 * sampling.cfg_scale)
        clean.append(step.decode)
    assert 0 < guided < plan.num_steps  # the interval both applied and skipped guidance
    plain = generate_image_sparse(model, prompt, plan, SamplingConfig(temperature=0.8, seed=18), num_registers=3)
    assert plain.forward_rows < result.forward_rows


@pytest.mark.parametrize("enc_use_image_branch", [True, False])
def test_i2_holds_for_every_edit_guidance_branch(enc_use_image_branch: bool) -> None:
    """Edits: cond, uncond and image-only branches each equal one Algorithm 1 forward; guidance combines them."""
    model = random_lavida_o(tiny_config(enc_use_image_branch=enc_use_image_branch), seed=19)
    g = torch.Generator().manual_seed(20)
    n = GRID * GRID // 4
    prompt = torch.cat([torch.randint(2, 45, (2,), generator=g), torch.full((n,), EDIT),
                        torch.randint(2, 45, (3,), generator=g)])
    source_rows = torch.arange(2, 2 + n)
    source_codes = torch.randint(0, CODES, (n, 4), generator=g)
    tail = torch.tensor([7])
    plan = image_plan(GRID // 2, GRID // 2, 4, "shift", "stratified", generator=torch.Generator().manual_seed(21))
    sampling = SamplingConfig(temperature=0.8, cfg_scale=1.2, image_cfg_scale=1.4, seed=22)
    result = generate_image_sparse(model, prompt, plan, sampling, 3, suffix_ids=tail, source_rows=source_rows,
                                   source_codes=source_codes)
    cond = image_context(model.config, prompt, tail, source_rows, source_codes)
    uncond, image_only = edit_branches(model.config, cond)
    assert bool((image_only.suffix_ids == model.config.mask_token_id).all())  # LaViDa-O masks every text row
    clean: list[torch.Tensor] = []
    gain = (1 + sampling.cfg_scale) * (1 + 2 * sampling.image_cfg_scale) + sampling.cfg_scale
    for step in result.steps:
        per_branch = [image_step_causal_logits(model, ctx, result.patches, clean, [step.decode], 3)[0]
                      for ctx in (cond, uncond, image_only)]
        assert (step.logits - guide_logits(per_branch, sampling)).abs().max().item() <= 1e-5 * gain
        clean.append(step.decode)
    # the source image is really read
    other = generate_image_sparse(model, prompt, plan, sampling, 3, suffix_ids=tail, source_rows=source_rows,
                                  source_codes=(source_codes + 1) % CODES)
    assert (other.steps[0].logits - result.steps[0].logits).abs().max().item() > 1e-4


def test_edits_refuse_what_is_not_published() -> None:
    prompt = torch.randint(2, 45, (6,), generator=torch.Generator().manual_seed(1))
    rows, codes = torch.tensor([1, 2]), torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="gen_enc_add_pos_emb"):
        image_context(tiny_config(gen_enc_add_pos_emb=True), prompt, None, rows, codes)
    model = random_lavida_o(tiny_config(), seed=2)
    plan = image_plan(2, 2, 2, "linear", "raster")
    with pytest.raises(ValueError, match="source image"):
        generate_image_sparse(model, prompt, plan, SamplingConfig(cfg_scale=1.0, image_cfg_scale=1.0), 0)


def test_i1_cached_image_kv_never_depends_on_masks_or_registers() -> None:
    model = random_lavida_o(tiny_config(), seed=10)
    cfg = model.config
    prompt = torch.randint(2, 45, (5,), generator=torch.Generator().manual_seed(11))
    committed = torch.randint(0, CODES, (3, 4), generator=torch.Generator().manual_seed(12))

    def cache_after_step(decode: torch.Tensor, decode_codes: torch.Tensor, registers: int) -> torch.Tensor:
        cache = ModalKVCache(cfg.n_layers, 40, cfg.n_kv_heads, cfg.head_dim)
        model(prompt, torch.arange(5), SpanAttention(None, cache, 5), logits_rows=torch.empty(0, dtype=torch.long))
        cache.advance(5)
        codes = torch.cat([committed, decode_codes, torch.full((registers, 4), cfg.register_code)])
        positions = torch.cat([5 + torch.tensor([0, 5, 9]), 5 + decode, torch.arange(21, 21 + registers)])
        rows = torch.arange(codes.shape[0])
        spans = inference_step_spans(cache.length, rows.numel(), num_commit=3)
        model.image_logits(torch.zeros_like(rows), positions, SpanAttention(spans, cache, 3), rows[3:4], rows, codes)
        cache.advance(3)
        return torch.stack([cache.k[:, :, :8], cache.v[:, :, :8]])

    mask = torch.full((4, 4), cfg.mask_code)
    base = cache_after_step(torch.tensor([1, 2, 3, 4]), mask, 3)
    for decode, codes, registers in [
        (torch.tensor([1, 2, 3, 4]), torch.randint(0, CODES, (4, 4)), 3),  # other contents in the decode rows
        (torch.tensor([7, 8]), mask[:2], 0),  # another decode set, no registers
        (torch.tensor([1, 2, 3, 4, 6, 10]), torch.full((6, 4), cfg.mask_code), 5),  # more rows, more registers
    ]:
        assert torch.allclose(cache_after_step(decode, codes, registers), base, atol=1e-6)


def test_text_requests_run_through_the_reference_samplers() -> None:
    """Text rows only: the engine's own sparse sampler and Algorithm 1 oracle apply unchanged (I2 for text)."""
    model = random_lavida_o(tiny_config(), seed=13)
    prompt = torch.randint(2, 45, (5,), generator=torch.Generator().manual_seed(14))
    sampling = SamplingConfig(temperature=0.7, seed=3)
    assert consistency_error(model, prompt, text_plan(8, 4, 4), sampling, num_registers=2) <= 1e-5
    result = generate_sparse(model, prompt, text_plan(8, 4, 4), sampling, SparseOptions(num_registers=2))
    assert bool((result.tokens != model.config.mask_token_id).all())


def test_sparse_image_path_feeds_fewer_rows_than_positions_times_steps() -> None:
    model = random_lavida_o(tiny_config(), seed=9)
    prompt = torch.randint(2, 45, (6,), generator=torch.Generator().manual_seed(1))
    plan = image_plan(GRID // 2, GRID // 2, 4, "linear", "raster")
    result = generate_image_sparse(model, prompt, plan, SamplingConfig(seed=2), num_registers=3)
    dense_rows = plan.num_steps * (prompt.numel() + plan.length)
    assert result.forward_rows < dense_rows
    with pytest.raises(ValueError, match="register_code"):
        generate_image_sparse(random_lavida_o(tiny_config(register_code=None)), prompt, plan, SamplingConfig(), 2)


# ---- config and loader ---------------------------------------------------------------------------------------

def published_like_config() -> dict:
    """The shape of a LaViDa-O config.json: LLaDA keys, llava keys, dual-tower keys, Sparse-LaViDa flags."""
    return {
        "architectures": ["LlavaLladaForMaskedDiffusion"], "model_type": "llava_llada", "d_model": 4096,
        "n_heads": 32, "n_kv_heads": 32, "n_layers": 32, "mlp_hidden_size": 12288, "mlp_ratio": 4,
        "vocab_size": 126464, "embedding_size": 126464, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
        "max_sequence_length": 4096, "mask_token_id": 126336, "eos_token_id": 126081, "pad_token_id": 126081,
        "include_bias": False, "weight_tying": False, "block_type": "llama", "layer_norm_type": "rms",
        "activation_type": "silu", "rope": True, "d_model_gen": 2048, "mlp_hidden_size_gen": 8192,
        "dual_tower": True, "dual_tower_layers": 16, "downsample": True, "enc_use_image_branch": True,
        "mm_vqvae": "/mnt/localssd/Meissonic/vqvae", "mm_vision_tower": "google/siglip-so400m-patch14-384",
        "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 1152, "block_causal": True,
        "num_register_tokens": "64,64", "num_register_groups": "25,25", "gen_enc_add_pos_emb": True,
        # what train.py writes for scripts/train/base.sh's understanding flags
        "image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad", "mm_vision_select_layer": -2,
        "image_grid_pinpoints": [[384, 768], [768, 384], [768, 768], [1152, 384], [384, 1152]],
        "mm_resampler_type": "spatial_pool", "mm_spatial_pool_mode": "conv", "mm_spatial_pool_stride": 2,
        "mm_spatial_pool_out_channels": 1152, "mm_newline_position": "grid",
    }


def test_config_reads_the_published_keys() -> None:
    c = LaViDaOConfig.from_dict(published_like_config(), num_vq_embeddings=8192)
    assert (c.d_model, c.d_model_gen, c.mlp_hidden_size_gen, c.dual_tower_layers) == (4096, 2048, 8192, 16)
    assert c.first_split_layer == 17  # the code splits when layer_id > dual_tower_layers
    assert c.mask_code == 8193 and c.codes_per_position == 4 and c.image_token_id == 126089
    assert c.num_register_tokens == (64, 64) and c.registers("image") == 64 and c.num_register_groups == (25, 25)
    assert c.register_token_id is None and c.register_code is None  # never invented
    assert c.understanding.mm_projector_type == "mlp2x_gelu" and c.understanding.pooled_side == 13
    assert c.extra["mm_vision_select_layer"] == -2  # read by no code path of SigLipVisionTower: kept as read
    back = c.to_dict()
    assert back["num_register_tokens"] == "64,64" and back["mm_vision_tower"] == "google/siglip-so400m-patch14-384"
    assert LaViDaOConfig.from_dict(back, num_vq_embeddings=8192) == c
    # the publishers' defaults: d_model_gen / mlp_hidden_size_gen < 0 mean "as the text tower"
    plain = LaViDaOConfig.from_dict({**published_like_config(), "d_model_gen": -1, "mlp_hidden_size_gen": -1,
                                     "dual_tower": False}, num_vq_embeddings=8192)
    assert plain.d_model_gen == 4096 and plain.mlp_hidden_size_gen == 12288 and plain.first_split_layer == 32
    ratio = LaViDaOConfig.from_dict({**published_like_config(), "mlp_hidden_size": None}, num_vq_embeddings=8192)
    assert ratio.mlp_hidden_size == 4 * 4096
    for key, value in (("gen_mlp_type", "unitok"), ("extra_gen_dit", True), ("weight_tying", True),
                       ("layer_norm_type", "default"), ("activation_type", "gelu"), ("unified_gen_enc", True)):
        with pytest.raises(ValueError, match=key):
            LaViDaOConfig.from_dict({**published_like_config(), key: value}, num_vq_embeddings=8192)


@pytest.fixture()
def checkpoint(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    model = write_tiny_checkpoint(tmp_path / "ckpt", tiny_config(), seed=3, max_shard_tensors=20)
    return tmp_path / "ckpt", model


def test_loader_round_trip_in_the_published_layout(checkpoint) -> None:
    folder, written = checkpoint
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "model.transformer.blocks.0.q_proj_vision.weight" in index["weight_map"]
    assert "model.downsample_gen.downsample.conv.weight" in index["weight_map"]
    assert json.loads((folder / "vqvae" / "config.json").read_text())["num_vq_embeddings"] == CODES
    raw = json.loads((folder / "config.json").read_text())
    assert raw["model_type"] == "llava_llada" and raw["num_register_tokens"] == "2,3"
    assert "num_vq_embeddings" not in raw  # that belongs to vqvae/config.json
    loaded = load_lavida_o(folder)
    assert loaded.config == written.config
    for name, tensor in written.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    # namespaces this file does not model (understanding tower, projector, the VQ copy) are skipped
    shard = folder / index["weight_map"]["model.transformer.wte.weight"]
    extra = load_file(str(shard))
    extra["model.mm_projector.0.weight"] = torch.zeros(2, 2)
    save_file(extra, str(shard))
    load_lavida_o(folder)


def _rewrite(folder: Path, name: str, tensor: torch.Tensor | None) -> str:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = index["weight_map"][name]
    state = load_file(str(folder / shard))
    if tensor is None:
        del state[name]
    else:
        state[name] = tensor
    save_file(state, str(folder / shard))
    return shard


def test_loader_errors_name_the_file_or_tensor(checkpoint) -> None:
    folder, _ = checkpoint
    name = "model.transformer.blocks.1.ff_out_vision.weight"
    shard = _rewrite(folder, name, torch.zeros(3, 3))
    with pytest.raises(ValueError, match=rf"{name} in .*{shard} has shape \(3, 3\).*\(16, 24\)"):
        load_lavida_o(folder)
    _rewrite(folder, name, None)
    with pytest.raises(ValueError, match=rf"tensor {name}: .*maps it to {shard}"):
        load_lavida_o(folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    del index["weight_map"][name]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"tensor {name} is missing"):
        load_lavida_o(folder)
    _rewrite(folder, "model.gen_predictor.weight", None)  # keep the index consistent for the next case
    other = sorted(set(index["weight_map"].values()))[-1]
    (folder / other).unlink()
    with pytest.raises(ValueError, match=rf"shard .*{other} .*missing"):
        load_lavida_o(folder)


def test_loader_refuses_unknown_tensors_and_wrong_folders(tmp_path: Path) -> None:
    folder = tmp_path / "one"
    write_tiny_checkpoint(folder, tiny_config(), seed=1)
    state = load_file(str(folder / "model.safetensors"))
    state["model.transformer.blocks.0.attn_out_vision.weight"] = torch.zeros(2, 2)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match="attn_out_vision.weight in .* is not a parameter"):
        load_lavida_o(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no model.safetensors or model.safetensors.index.json"):
        load_lavida_o(folder)
    (folder / "vqvae" / "config.json").unlink()
    with pytest.raises(ValueError, match=r"vqvae/config.json is missing"):
        load_config(folder)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**raw, "model_type": "llada", "architectures": ["LLaDAModelLM"]}))
    with pytest.raises(ValueError, match="not a LaViDa-O checkpoint"):
        load_config(folder)
    (folder / "config.json").unlink()
    with pytest.raises(ValueError, match=r"config.json is missing"):
        load_config(folder)


# ---- a text-to-image request end to end on the reference path -------------------------------------------------

def test_text_to_image_decodes_through_the_checkpoints_vq(tmp_path: Path) -> None:
    from sparse_lavida_vllm.multimodal.vq import VQCodec

    folder = tmp_path / "ckpt"
    write_tiny_checkpoint(folder, tiny_config(), seed=2)
    model = load_lavida_o(folder)
    codec = VQCodec(folder, resolution=GRID * 4)  # the tiny VQ downsamples 4x: 32 px -> 8x8 codes
    assert codec.grid == (GRID, GRID) and codec.vocab_size == CODES
    prompt = torch.randint(2, 45, (5,), generator=torch.Generator().manual_seed(3))
    plan = image_plan(GRID // 2, GRID // 2, 4, "shift", "stratified", generator=torch.Generator().manual_seed(4))
    result = generate_image_sparse(model, prompt, plan, SamplingConfig(temperature=1.0, seed=5))
    codes = patches_to_codes(result.patches, GRID, GRID)
    image = codec.decode(codes)
    assert image.size == (GRID * 4, GRID * 4) and image.mode == "RGB"
    again = generate_image_sparse(model, prompt, plan, SamplingConfig(temperature=1.0, seed=5))
    assert torch.equal(again.patches, result.patches)  # (seed, step) noise: reproducible


def test_patch_ids_pack_a_position_into_one_id_above_the_vocabulary() -> None:
    """The served engine's image rows: 4 codes (mask and register codes included) <-> one int64 id, two ranges."""
    from sparse_lavida_vllm.model_executor.patch_ids import PatchIds

    config = tiny_config()
    ids = PatchIds.of(config)
    table = CODES + 256
    patches = torch.tensor([[0, 0, 0, 0], [1, 2, 3, 4], [table - 1] * 4, [config.mask_code] * 4, [15, 0, 7, 18]])
    packed = ids.pack(patches)
    assert packed[0] == config.vocab_size and packed[1] == config.vocab_size + ((1 * table + 2) * table + 3) * table + 4
    assert bool((packed >= config.vocab_size).all()) and bool((packed < ids.source_base).all())
    assert torch.equal(ids.unpack(packed), patches)
    source = ids.pack(patches, source=True)  # an edit's source image without enc_use_image_branch: text stream
    assert bool((source >= ids.source_base).all()) and torch.equal(ids.unpack(source), patches)
    gen, text_stream = ids.kinds(torch.cat([torch.tensor([5]), packed, source]))
    assert gen.tolist() == [False] + [True] * 5 + [False] * 5 and text_stream.tolist() == [False] * 6 + [True] * 5
    assert ids.unpack(torch.tensor([ids.mask_id])).tolist() == [[config.mask_code] * 4]
    assert ids.unpack(torch.tensor([ids.register_id])).tolist() == [[config.register_code] * 4]
    image_branch = PatchIds.of(tiny_config(enc_use_image_branch=True))
    assert bool((image_branch.pack(patches, source=True) < image_branch.source_base).all())  # image-stream rows
    published = PatchIds.of(LaViDaOConfig.from_dict(published_like_config(), num_vq_embeddings=8192))
    assert published.source_base + published.span < 2**63  # int64 holds both ranges at the published sizes
    with pytest.raises(ValueError, match="codes must lie"):
        ids.pack(torch.tensor([[table, 0, 0, 0]]))
