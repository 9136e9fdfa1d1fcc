"""Guidance: ways to steer a model's prediction at sampling time, as pure functions.

    eps = guidance.classifier_free(model_fn, x, t, cond, uncond, scale=7.5)
    eps_fn = guidance.cfg_eps_fn(model_fn, cond, uncond, scale=7.5, rescale=0.7)   # for `samplers`

`model_fn(x, t, context)` is batched over x (B, ...) and context (B, L, D). Classifier-free
guidance (Ho & Salimans, arXiv 2207.12598) mixes the conditional and unconditional predictions,
uncond + scale * (cond - uncond); a negative prompt is simply the embedding passed as `uncond`.
`rescale` is the guidance rescale of arXiv 2305.08891 (Sec. 3.4), as diffusers'
`rescale_noise_cfg`. Upsample guidance (a later issue) goes here as `upsample`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

ModelFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def _is_static(value, target: float) -> bool:
  """True when `value` is a Python number equal to `target` (decidable while tracing)."""
  return isinstance(value, (int, float)) and value == target


def _pair(a: jax.Array, b: jax.Array) -> jax.Array:
  """(2B, ...) with rows uncond_0, cond_0, uncond_1, cond_1, ... Interleaving (rather than
  concat([a, b])) keeps each sample's pair on the device that holds it when B is sharded."""
  return jnp.stack([a, b], axis=1).reshape((2 * a.shape[0],) + a.shape[1:])


def _duplicate_t(t, batch: int) -> jax.Array:
  t = jnp.asarray(t)
  if t.ndim == 0:  # a scalar t applies to the whole (doubled) batch
    return t
  if t.shape != (batch,):
    raise ValueError(f't must be a scalar or of shape ({batch},), got shape {t.shape}')
  return _pair(t, t)


def rescale_cfg(guided: jax.Array, cond: jax.Array, rescale) -> jax.Array:
  """Mixes `guided` with itself rescaled to the per-sample std of `cond` (std over all non-batch
  axes, unbiased like torch's `std`; the ddof cancels in the ratio anyway)."""
  axes = tuple(range(1, guided.ndim))
  std_cond = jnp.std(cond, axis=axes, keepdims=True, ddof=1)
  std_guided = jnp.std(guided, axis=axes, keepdims=True, ddof=1)
  # A constant prediction (std 0) is left as it is, where diffusers would return nan.
  ratio = jnp.where(std_guided > 0, std_cond / jnp.where(std_guided > 0, std_guided, 1), 1)
  rescaled = guided * ratio
  return rescale * rescaled + (1 - rescale) * guided


def classifier_free(model_fn: ModelFn, x: jax.Array, t, cond: jax.Array, uncond: jax.Array,
                    scale, rescale=0.0) -> jax.Array:
  """Classifier-free guided prediction at (x, t), with ONE batched call of `model_fn`.

  x (B, ...); t scalar or (B,); cond, uncond (B, L, D) text embeddings (or any per-sample
  context). `scale` and `rescale` may be traced. Returns (B, ...)."""
  batch = x.shape[0]
  for name, c in (('cond', cond), ('uncond', uncond)):
    if c.shape[0] != batch:
      raise ValueError(f'{name} must have batch size {batch} (that of x), got shape {c.shape}')
  if cond.shape != uncond.shape:
    raise ValueError(f'cond and uncond must have the same shape, got {cond.shape} and '
                     f'{uncond.shape}')
  out = model_fn(_pair(x, x), _duplicate_t(t, batch), _pair(uncond, cond))
  out = out.reshape((batch, 2) + out.shape[1:])
  out_uncond, out_cond = out[:, 0], out[:, 1]
  # The lerp form is exact at both ends: scale 1 gives cond, scale 0 gives uncond, bit for bit.
  guided = (1 - scale) * out_uncond + scale * out_cond
  if _is_static(rescale, 0.0):  # plain CFG, bit for bit
    return guided
  return rescale_cfg(guided, out_cond, rescale)


def cfg_eps_fn(model_fn: ModelFn, cond: jax.Array, uncond: jax.Array, scale,
               rescale=0.0) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """`eps_fn(x, t)` for the samplers: classifier-free guidance with fixed embeddings."""
  return lambda x, t: classifier_free(model_fn, x, t, cond, uncond, scale, rescale)
