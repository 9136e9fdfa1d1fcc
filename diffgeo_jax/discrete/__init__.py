"""Discrete diffusion: CTMC processes over token sequences and exact toy data (Jump Your Steps)."""
