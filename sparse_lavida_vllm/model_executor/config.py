"""The MDM model configuration: LLaDA's config.json field names plus the register token."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

ARCHITECTURE = "SparseLLaDAModelLM"
LLADA_ARCHITECTURE = "LLaDAModelLM"


@dataclass(frozen=True)
class MDMConfig:
    """Shape and special tokens of a LLaDA-architecture masked diffusion model.

    Field names follow LLaDA's `config.json` so a published LLaDA checkpoint maps onto it.
    `register_token_id` is the one extra embedding row the sparse parameterization adds; `block_causal` says the
    checkpoint was trained with the step-causal mask (Sparse-LaViDa's `--block_causal`), so requests default to
    sparse sampling. A config.json that names neither (a published LLaDA checkpoint) gets no register token, no
    registers and dense sampling by default: sparse sampling on an untrained model collapses quality (Table 8).
    """

    vocab_size: int = 512
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 4
    mlp_hidden_size: int = 256
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_sequence_length: int = 4096
    mask_token_id: int = 510
    register_token_id: int | None = 511
    eos_token_id: int = 2
    pad_token_id: int = 0
    num_registers: int = 64  # the register count the checkpoint was trained with
    block_causal: bool = True  # trained with the step-causal mask: requests default to sparse sampling
    # How image requests are laid out for this checkpoint (codec, grid, prompt prefixes, sampler defaults);
    # None: a text-only model. Read by multimodal.layout.ImageLayout; kept as plain JSON in config.json.
    image_generation: dict | None = None
    model_type: str = "llada"
    architectures: tuple[str, ...] = (ARCHITECTURE,)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        for name in ("mask_token_id", "register_token_id", "eos_token_id"):
            value = getattr(self, name)
            if (value is not None or name != "register_token_id") and not 0 <= value < self.vocab_size:
                raise ValueError(f"{name} must be in [0, vocab_size), got {value}")
        if self.num_registers < 0:
            raise ValueError(f"num_registers must be >= 0, got {self.num_registers}")
        if self.num_registers and self.register_token_id is None:
            raise ValueError(f"num_registers ({self.num_registers}) needs a register_token_id in config.json")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        d = asdict(self)
        d["architectures"] = list(self.architectures)
        if self.image_generation is None:
            del d["image_generation"]
        d["embedding_size"] = self.vocab_size
        d["weight_tying"] = False
        d["include_bias"] = False
        d["layer_norm_type"] = "rms"
        d["activation_type"] = "silu"
        d["block_type"] = "llama"
        return d

    @classmethod
    def from_dict(cls, d: dict) -> MDMConfig:
        if d.get("weight_tying"):
            raise ValueError("weight_tying=true is not supported: the LM head must be untied")
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        # LLaDA calls the table size embedding_size (padded vocab); use it for the weight shapes.
        if "embedding_size" in d and d["embedding_size"]:
            kw["vocab_size"] = int(d["embedding_size"])
        if "n_kv_heads" not in d or d.get("n_kv_heads") is None:
            kw["n_kv_heads"] = kw.get("n_heads", cls.n_heads)
        if "architectures" in kw:
            kw["architectures"] = tuple(kw["architectures"])
        # a checkpoint that declares no register token and no step-causal training gets none (never an invented id)
        kw.setdefault("register_token_id", None)
        kw.setdefault("num_registers", 0 if kw["register_token_id"] is None else cls.num_registers)
        kw.setdefault("block_causal", False)
        return cls(**kw)

    def save(self, folder: str | Path) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> MDMConfig:
        return cls.from_dict(json.loads((Path(folder) / "config.json").read_text()))
