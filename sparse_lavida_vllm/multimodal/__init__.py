"""Image codecs: images <-> discrete token ids (a pixel codec for the demo model; VQ codecs plug in here)."""

from sparse_lavida_vllm.multimodal.codec import ImageCodec, PixelCodec

__all__ = ["ImageCodec", "PixelCodec"]
