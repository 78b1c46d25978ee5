"""What the diffusion scheduler sends to the model runner and gets back: plain data that survives pickling."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.outputs import ModelRunnerOutput

# The final output of a request carries its diffusion metrics here: kv_transfer_params is vLLM's one per-request
# dict that travels from the engine core to the API server (and into RequestOutput); entrypoints/metrics.py
# turns it into Prometheus counters on /metrics. See docs/serving.md ("Metrics").
METRICS_KEY = "sparse_lavida_metrics"


@dataclass
class PromptImage:
    """One chat image of a request's prompt (LaViDa-O understanding): its anyres tiles as vLLM's processor made them
    and where its rows sit in the prompt. The runner turns the tiles into `length` feature rows (the model's
    `embed_multimodal`) fed at prompt positions offset .. offset + length - 1."""

    offset: int
    length: int
    pixel_values: torch.Tensor  # (1 + tiles, 3, S, S)
    image_size: tuple[int, int]  # (width, height) of the original image: the anyres grid and unpadding need it


@dataclass
class RequestStep:
    """One request's rows for one engine step.

    Sparse mode: an optional prefill pass (the prompt, full attention among itself, written to
    cache slots [0, P)), then the step pass: [commit rows C_{k-1} | decode masks | registers]
    with commit rows written to cache slots [cache_len, cache_len + n_commit). Cache slot i of a
    request lives at block_ids[i // block_size] * block_size + i % block_size. Dense mode: one
    pass over prompt + canvas with full attention and no cache.
    """

    req_id: str
    sparse: bool
    block_ids: list[int]
    prefill_ids: list[int]  # sparse: the prompt (+ an inpainting canvas's given tokens) on the first step, else []
    cache_len: int  # cached tokens before the step pass (after this step's prefill)
    commit_ids: list[int]
    commit_positions: list[int]
    decode_positions: list[int]  # absolute positions of the decode set (fed as [mask])
    register_start: int
    num_registers: int
    dense_ids: list[int]  # dense: prompt + canvas (masks included); positions 0..n-1
    # sampling: the reference sampler's knobs for this (request, step)
    step: int
    count: int  # tokens to keep; -1 lets the threshold policy decide
    temperature: float
    top_k: int
    top_p: float
    remasking: str
    confidence_threshold: float
    seed: int
    # min_tokens: these ids get -inf logits on decode rows at absolute positions < ban_below
    banned_ids: list[int] = field(default_factory=list)
    ban_below: int = 0
    # token constraints on every decode row (diffusion.sampling.constrain_logits)
    allowed_token_ids: list[int] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)
    min_p: float = 0.0
    prefill_positions: list[int] = field(default_factory=list)  # of prefill_ids
    # classifier-free guidance: a companion branch (uncond, image-only) is a step of its own, with its own KV
    # blocks, that names the request it guides; the runner combines its decode logits with the request's
    guides: str | None = None  # companion: the request id it guides; None: a request of its own
    branch: int = 0  # 0 cond, 1 uncond, 2 image-only
    cfg_scale: float = 0.0
    image_cfg_scale: float = 0.0
    token_range: tuple[int, int] | None = None  # only these ids are sampled (an image canvas: the codebook)
    # what decode rows and registers are fed; None: the model's mask / register token (a LaViDa-O image request:
    # the packed ids of the mask patch and the register patch, lavida_o.PatchIds)
    mask_id: int | None = None
    register_id: int | None = None
    # chat images in the prompt: sent with the step that first feeds the prompt (the sparse prefill, a dense
    # request's first step); a dense request's later steps reuse the runner's copy of the features (`image_rows`)
    images: list[PromptImage] = field(default_factory=list)
    image_rows: bool = False  # this step feeds the prompt, whose image rows take the features

    @property
    def num_step_rows(self) -> int:
        """Rows of the step pass (sparse: commit + decode + registers), the prefill excluded."""
        return self.num_rows - len(self.prefill_ids)

    @property
    def num_rows(self) -> int:
        if not self.sparse:
            return len(self.dense_ids)
        return (len(self.prefill_ids) + len(self.commit_ids) + len(self.decode_positions) + self.num_registers)


@dataclass
class DiffusionSchedulerOutput(SchedulerOutput):
    steps: list[RequestStep] = field(default_factory=list)


@dataclass
class DiffusionRunnerOutput(ModelRunnerOutput):
    # req_id -> (indices into the decode set that were kept, their sampled tokens)
    kept: dict[str, tuple[list[int], list[int]]] = field(default_factory=dict)
    # req_id -> why its step failed in the runner (it fails alone; the others of the step ran without it)
    failed: dict[str, str] = field(default_factory=dict)
