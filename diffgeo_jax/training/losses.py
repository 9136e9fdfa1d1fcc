"""Diffusion training losses shared by the objectives (DUO's preference objective lives in
`unlearning.duo`).

    err = losses.denoising_error(eps_pred, eps)                        # (B,) mean over C, H, W
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def denoising_error(eps_pred, eps) -> jax.Array:
  """Per-sample mean squared error over every axis but the first: (B,)."""
  eps_pred, eps = jnp.asarray(eps_pred), jnp.asarray(eps)
  if eps_pred.shape != eps.shape or eps.ndim < 2:
    raise ValueError(f'eps_pred and eps must have the same shape (B, ...), got {eps_pred.shape} '
                     f'and {eps.shape}')
  dtype = jnp.promote_types(jnp.promote_types(eps_pred.dtype, eps.dtype), jnp.float32)
  return jnp.mean(jnp.square(eps_pred.astype(dtype) - eps.astype(dtype)),
                  axis=tuple(range(1, eps.ndim)))  # at least float32 (bf16 models)
