"""Attribution methods for any classifier `logits_fn(x) -> (N, C)`, batched over inputs with vmap.

    a = attributions.attribute('integrated_gradients', logits_fn, x, targets, key)  # x's shape

Each method explains the logit of `targets` (one class per input) with a map of the input's shape:
* gradient (vanilla gradient, "sensitivity"): d logit_y / dx;
* input_x_gradient: x * d logit_y / dx (elementwise);
* integrated_gradients (Sundararajan et al. 2017): (x - b) * the mean gradient along the straight
  path from the baseline b (zeros, or `baseline`) to x, by the midpoint rule with `steps` points
  (exact for a model linear along the path; completeness sum(a) = f(x) - f(b) as steps grow);
* smoothgrad (Smilkov et al. 2017): the mean gradient at x + N(0, (noise * (max x - min x))^2)
  over `samples` draws per input;
* random: a standard normal map, independent of the model (the baseline every metric must beat).
The per-input logit function sees one input at a time (`logits_fn(x[None])[0]`), so a Flax model
applied to a batch works unchanged and BatchNorm-free models give per-sample gradients.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

LogitsFn = Callable[[jax.Array], jax.Array]
METHODS = ('gradient', 'input_x_gradient', 'integrated_gradients', 'smoothgrad', 'random')


def _target_logit(logits_fn: LogitsFn):
  """(x, y) -> logit y of the single input x."""
  return lambda x, y: logits_fn(x[None])[0, y]


def gradient(logits_fn: LogitsFn, x, y, key=None) -> jax.Array:
  """d logit_y / dx of one input x (no batch axis)."""
  del key
  return jax.grad(_target_logit(logits_fn))(x, y)


def input_x_gradient(logits_fn: LogitsFn, x, y, key=None) -> jax.Array:
  return x * gradient(logits_fn, x, y)


def integrated_gradients(logits_fn: LogitsFn, x, y, key=None, *, steps: int = 32,
                         baseline=None) -> jax.Array:
  b = jnp.zeros_like(x) if baseline is None else jnp.broadcast_to(baseline, x.shape)
  alphas = (jnp.arange(steps, dtype=x.dtype) + 0.5) / steps  # midpoints of [0, 1]
  g = jax.vmap(lambda a: gradient(logits_fn, b + a * (x - b), y))(alphas)
  return (x - b) * jnp.mean(g, axis=0)


def smoothgrad(logits_fn: LogitsFn, x, y, key=None, *, samples: int = 32,
               noise: float = 0.15) -> jax.Array:
  if key is None:
    raise ValueError('smoothgrad needs a key (its noise)')
  sigma = noise * (jnp.max(x) - jnp.min(x))
  eps = jax.random.normal(key, (samples,) + x.shape, x.dtype) * sigma
  return jnp.mean(jax.vmap(lambda e: gradient(logits_fn, x + e, y))(eps), axis=0)


def random(logits_fn: LogitsFn, x, y, key=None) -> jax.Array:
  del logits_fn, y
  if key is None:
    raise ValueError('the random attribution needs a key')
  return jax.random.normal(key, x.shape, x.dtype)


_FNS = {'gradient': gradient, 'input_x_gradient': input_x_gradient,
        'integrated_gradients': integrated_gradients, 'smoothgrad': smoothgrad, 'random': random}


def attribute(method: str, logits_fn: LogitsFn, x, targets, key: jax.Array | None = None,
              **options) -> jax.Array:
  """Attributions (N, ...) of inputs x (N, ...) for classes `targets` (N,), one vmapped pass.
  `key` is split per input (smoothgrad, random); `options` go to the method (steps, baseline,
  samples, noise)."""
  if method not in _FNS:
    raise ValueError(f'method must be one of {METHODS}, got {method!r}')
  x = jnp.asarray(x)
  targets = jnp.asarray(targets)
  if x.ndim < 2 or targets.shape != x.shape[:1]:
    raise ValueError(f'x must be (N, ...) and targets (N,), got {x.shape} and {targets.shape}')
  keys = jax.random.split(key if key is not None else jax.random.key(0), x.shape[0])
  fn = _FNS[method]
  if method in ('smoothgrad', 'random') and key is None:
    raise ValueError(f'{method} needs a key')
  return jax.vmap(lambda xi, yi, ki: fn(logits_fn, xi, yi, ki, **options))(x, targets, keys)
