"""vLLM plugin registration and the `sparse-lavida serve|generate` commands."""
