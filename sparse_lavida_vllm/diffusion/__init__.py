"""Pure-PyTorch masked-diffusion core: masks, planners, sampling and the reference samplers."""
