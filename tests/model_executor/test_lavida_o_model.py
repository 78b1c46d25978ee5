"""LaViDa-O's model: our flat-rows forward vs a straightforward re-implementation of the published forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

diffusers = pytest.importorskip("diffusers")
from diffusers.models.resnet import Downsample2D, Upsample2D  # noqa: E402

from sparse_lavida_vllm.drivers.lavida_o_image import (  # noqa: E402
    context_inputs,
    image_context,
)
from sparse_lavida_vllm.model_executor.lavida_o_config import LaViDaOConfig  # noqa: E402
from sparse_lavida_vllm.model_executor.lavida_o_weights import (  # noqa: E402
    random_lavida_o,
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
