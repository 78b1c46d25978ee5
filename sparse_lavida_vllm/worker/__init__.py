"""The diffusion worker and model runner (vLLM `--worker-cls`)."""
