"""LaViDa-O image understanding through the text samplers: a prompt with images spliced in, answered dense or sparse."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sparse_lavida_vllm.diffusion.planners import UnmaskPlan
from sparse_lavida_vllm.diffusion.sampling import SamplingConfig
from sparse_lavida_vllm.drivers.text import GenerateResult, SparseOptions, generate_dense, generate_sparse
from sparse_lavida_vllm.model_executor.attention import AttentionBackend
from sparse_lavida_vllm.model_executor.lavida_o_config import LaViDaOConfig
from sparse_lavida_vllm.model_executor.lavida_o_model import LaViDaOMDM
from sparse_lavida_vllm.model_executor.lavida_o_vision import IMAGE_TOKEN_INDEX, UnderstandingPrompt


class ImagePromptModel(nn.Module):
    """LaViDaOMDM seen by the text samplers with one understanding prompt: a row whose id is IMAGE_TOKEN_INDEX gets
    the prompt's embedding at its position. The samplers put the prompt at positions 0..p-1 in every pass (dense,
    sparse prefill or live prefix, Algorithm 1 oracle), so the position names the feature row."""

    def __init__(self, model: LaViDaOMDM, prompt: UnderstandingPrompt) -> None:
        super().__init__()
        self.inner = model
        self.prompt = prompt

    @property
    def config(self) -> LaViDaOConfig:
        return self.inner.config

    @property
    def local_kv_heads(self) -> int:
        return self.inner.local_kv_heads

    def forward(self, input_ids: Tensor, positions: Tensor, attention: AttentionBackend | None = None,
                logits_rows: Tensor | None = None) -> Tensor:
        image = input_ids == IMAGE_TOKEN_INDEX
        if not bool(image.any()):
            return self.inner(input_ids, positions, attention, logits_rows)
        where = positions[image]
        if int(where.max()) >= self.prompt.ids.numel() or bool((self.prompt.ids[where] != IMAGE_TOKEN_INDEX).any()):
            raise ValueError("image rows must sit at the prompt positions of the image features")
        embeds = self.inner.model.transformer["wte"](input_ids.clamp(min=0))
        embeds[image] = self.prompt.embeds[where].to(embeds.dtype)
        return self.inner(input_ids, positions, attention, logits_rows, text_embeds=embeds)


@torch.no_grad()
def generate_understanding(model: LaViDaOMDM, prompt: UnderstandingPrompt, plan: UnmaskPlan,
                           sampling: SamplingConfig, options: SparseOptions | None = None) -> GenerateResult:
    """Answer a prompt with images: the engine's text samplers on the spliced rows. `options` None: dense MDM (every
    step sees prompt + whole response). With options: the sparse sampler; the publishers' `llada_generate(...,
    prefix_lm=True)` (their demo) is SparseOptions(num_registers=0, cache_prompt=True, cache_response=False,
    truncate=False): the prompt, image rows included, is prefilled once and attends only to itself."""
    wrapped = ImagePromptModel(model, prompt)
    if options is None:
        return generate_dense(wrapped, prompt.ids, plan, sampling)
    return generate_sparse(wrapped, prompt.ids, plan, sampling, options)
