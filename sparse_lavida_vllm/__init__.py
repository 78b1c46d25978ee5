"""Serve masked discrete diffusion models with the Sparse-LaViDa sparse parameterization."""

__version__ = "0.1.0"
