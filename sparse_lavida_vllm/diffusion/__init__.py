"""Pure-PyTorch masked-diffusion core: masks, planners, sampling and one step's bookkeeping (no models)."""
