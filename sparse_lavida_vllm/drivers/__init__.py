"""Drivers: run a model through an unmasking plan (reference samplers, LaViDa-O image and understanding drivers)."""
