"""The diffusion scheduler (vLLM `--scheduler-cls`) and per-request diffusion params."""
