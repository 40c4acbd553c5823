"""Causal video diffusion distillation pipeline."""
