"""The LLaDA-architecture masked diffusion transformer with the [reg] token (one model file)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparse_lavida_vllm.model_executor.attention import AttentionBackend, SpanAttention
from sparse_lavida_vllm.model_executor.config import MDMConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * self.weight.float()).to(dtype)


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin of shape (rows, 1, head_dim) for explicit position ids (GPT-NeoX half rotation, as LLaDA)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float().unsqueeze(-1) * inv_freq
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class LLaDABlock(nn.Module):
    """Pre-norm block; parameter names match LLaDA's checkpoints (q_proj, attn_out, ff_proj, up_proj, ff_out)."""

    def __init__(self, config: MDMConfig) -> None:
        super().__init__()
        d, hd = config.d_model, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, hd
        self.attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps)
        self.q_proj = nn.Linear(d, config.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, config.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, config.n_kv_heads * hd, bias=False)
        self.attn_out = nn.Linear(config.n_heads * hd, d, bias=False)
        self.ff_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.up_proj = nn.Linear(d, config.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(config.mlp_hidden_size, d, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, layer: int, attention: AttentionBackend) -> Tensor:
        rows = x.shape[0]
        h = self.attn_norm(x)
        q = apply_rope(self.q_proj(h).view(rows, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(h).view(rows, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(h).view(rows, self.n_kv_heads, self.head_dim)
        x = x + self.attn_out(attention.attend(layer, q, k, v).reshape(rows, -1))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class LLaDAMDM(nn.Module):
    """Masked diffusion transformer over a flat list of rows with explicit positions.

    forward() takes the rows of one pass (any mix of prompt, committed, masked and register
    tokens), an attention backend that knows the step mask and the cache, and the indices of the
    rows whose logits are wanted; the LM head runs only on those rows.
    """

    def __init__(self, config: MDMConfig) -> None:
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.d_model),
            "blocks": nn.ModuleList(LLaDABlock(config) for _ in range(config.n_layers)),
            "ln_f": RMSNorm(config.d_model, config.rms_norm_eps),
            "ff_out": nn.Linear(config.d_model, config.vocab_size, bias=False),
        })

    def hidden_states(self, input_ids: Tensor, positions: Tensor, attention: AttentionBackend) -> Tensor:
        t = self.model.transformer
        x = t["wte"](input_ids)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        for i, block in enumerate(t["blocks"]):
            x = block(x, cos, sin, i, attention)
        return x

    def forward(self, input_ids: Tensor, positions: Tensor, attention: AttentionBackend | None = None,
                logits_rows: Tensor | None = None) -> Tensor:
        """Returns logits (len(logits_rows), vocab), or for every row when logits_rows is None."""
        x = self.hidden_states(input_ids, positions, attention or SpanAttention(None))
        if logits_rows is not None:
            x = x[logits_rows]
        t = self.model.transformer
        return t["ff_out"](t["ln_f"](x))
