"""Guidance: ways to steer a model's prediction at sampling time, as pure functions.

    eps = guidance.classifier_free(model_fn, x, t, cond, uncond, scale=7.5)
    eps_fn = guidance.cfg_eps_fn(model_fn, cond, uncond, scale=7.5, rescale=0.7)   # for `samplers`

`model_fn(x, t, context)` is batched over x (B, ...) and context (B, L, D). Classifier-free
guidance (Ho & Salimans, arXiv 2207.12598) mixes the conditional and unconditional predictions,
uncond + scale * (cond - uncond); a negative prompt is simply the embedding passed as `uncond`.
`rescale` is the guidance rescale of arXiv 2305.08891 (Sec. 3.4), as diffusers'
`rescale_noise_cfg`. Upsample guidance (arXiv 2404.01709) is `upsample`.

The pipeline's guidance objects (`CFG`, `Unguided`, `UpsampleGuidance`, and
`chromatography.PromptSwitch`) share one protocol, `Guidance`: `eps_fn(model_fn, s, contexts)`.
This module imports only `resolution` and `schedules`-level code.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable
from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp

from diffgeo_jax.diffusion import resolution

ModelFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
EpsFn = Callable[[jax.Array, jax.Array], jax.Array]


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
  context: a pytree of (B, ...) leaves, e.g. SDXL's dict with text_embeds and time_ids). `scale` and `rescale` may be traced. Returns (B, ...)."""
  batch = x.shape[0]
  for name, c in (('cond', cond), ('uncond', uncond)):
    shapes = [leaf.shape for leaf in jax.tree.leaves(c)]
    if any(s[0] != batch for s in shapes):
      raise ValueError(f'{name} must have batch size {batch} (that of x), got shape(s) {shapes}')
  if jax.tree.structure(cond) != jax.tree.structure(uncond) or any(
      a.shape != b.shape for a, b in zip(jax.tree.leaves(cond), jax.tree.leaves(uncond))):
    raise ValueError(f'cond and uncond must have the same shape, got '
                     f'{jax.tree.map(jnp.shape, cond)} and {jax.tree.map(jnp.shape, uncond)}')
  out = model_fn(_pair(x, x), _duplicate_t(t, batch), jax.tree.map(_pair, uncond, cond))
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


# -- upsample guidance (Hwang, Park & Jo, arXiv 2404.01709) ----------------------------------------
#
#     eps_hat = guidance.upsample(eps_fn, x_t, t, s, factor=2, weight=1.0, eta=0.6)
#     eps_fn_hi = guidance.upsample_eps_fn(eps_fn, s, factor=2, weight=1.0)   # for `samplers`
#
# eps_hat(x_t, t) = eps(x_t, t) + w_t U[eps(D x_t / sqrt(P_t), tau(t)) / m - D eps(x_t, t)], with D
# the m x m average pool, U the nearest upsampling (D U = I), P_t and tau(t) from `resolution`
# and w_t = theta H(t - (1 - eta) T) (theta = `weight`, H(0) = 1, T = num_train_timesteps).
# Hence D eps_hat = (1 - w_t) D eps + w_t eps_low / m and (I - U D) eps_hat = (I - U D) eps.


def _check_range(value, name: str, low: float, high: float | None = None) -> None:
  if isinstance(value, jax.core.Tracer):
    return
  v = float(value)
  if not (v == v and v >= low and (high is None or v <= high) and abs(v) != float('inf')):
    bounds = f'[{low}, {high}]' if high is not None else f'[{low}, inf)'
    raise ValueError(f'{name} must be in {bounds}, got {value!r}')


def upsample_window(t, s, weight=1.0, eta=1.0) -> jax.Array:
  """w_t = theta H(t - (1 - eta) T), theta = weight: guidance only for the first (noisiest) eta
  fraction of the T training timesteps; eta = 1 is always on, eta = 0 never. Shape of t."""
  threshold = (1 - eta) * s.num_train_timesteps
  return jnp.where(jnp.asarray(t, jnp.float32) >= threshold, weight, 0.0).astype(jnp.float32)


def _bcast(a, x):
  a = jnp.asarray(a, x.dtype)
  return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def _to_eps(s, out, x, t):
  """The eps implied by a model output of the schedule's prediction_type."""
  return out if s.prediction_type == 'epsilon' else s.split_prediction(out, x, t)[1]


def _from_eps(s, eps, x, t):
  if s.prediction_type == 'epsilon':
    return eps
  ab = _bcast(s.alpha_cumprod_at(t), x)
  a, sd = jnp.sqrt(ab), jnp.sqrt(1 - ab)
  x0 = (x - sd * eps) / a
  return a * eps - sd * x0 if s.prediction_type == 'v_prediction' else x0


def upsample(eps_fn: Callable[[jax.Array, jax.Array], jax.Array], x_t: jax.Array, t, s,
             factor: int = 2, weight=1.0, *, eta=1.0, time_adjustment: bool = True,
             power_adjustment: bool = True) -> jax.Array:
  """Upsample-guided prediction at high resolution x_t (B, H, W, C), t scalar or (B,) (int or
  float); `eps_fn` is the model at its native resolution H/m x W/m (any resolution works).

  Two calls of eps_fn: (x_t, t) and, inside the window, (y, tau) with y = D x_t / sqrt(P_t) at
  1/m^2 of the pixels. Ablations: time_adjustment=False uses tau = t, power_adjustment=False
  uses P_t = 1. weight 0 (or t outside the window) returns eps_fn(x_t, t) bit for bit; with a
  scalar t the low-resolution call is skipped there (`lax.cond`). Outputs of v / x0 prediction
  models are converted to eps, guided, and converted back to the schedule's prediction_type."""
  resolution.check_pool_factor(x_t, factor, x_name='x_t')
  _check_range(weight, 'weight', 0.0)
  _check_range(eta, 'eta', 0.0, 1.0)
  batch = x_t.shape[0]
  if jnp.ndim(t) not in (0, 1) or (jnp.ndim(t) == 1 and jnp.shape(t) != (batch,)):
    raise ValueError(f't must be a scalar or of shape ({batch},), got shape {jnp.shape(t)}')
  out = eps_fn(x_t, t)
  if factor == 1 or _is_static(weight, 0.0) or _is_static(eta, 0.0):
    return out  # D = U = I (factor 1) or no guidance: nothing to add
  w = upsample_window(t, s, weight, eta)

  def guided():
    eps = _to_eps(s, out, x_t, t)
    tau = resolution.adjusted_timestep(s, t, factor) if time_adjustment else t
    y = resolution.avg_pool(x_t, factor)
    if power_adjustment:
      y = y / _bcast(jnp.sqrt(resolution.power(s, t, factor)), y)
    eps_low = _to_eps(s, eps_fn(y, tau), y, tau)
    delta = eps_low / factor - resolution.avg_pool(eps, factor)
    eps_hat = eps + _bcast(w, eps) * resolution.nearest_upsample(delta, factor)
    return _from_eps(s, eps_hat, x_t, t).astype(out.dtype)

  if w.ndim == 0:
    return jax.lax.cond(w != 0, guided, lambda: out)
  return jnp.where(_bcast(w != 0, out), guided(), out)


def upsample_eps_fn(eps_fn, s, factor: int = 2, weight=1.0, *, eta=1.0,
                    time_adjustment: bool = True, power_adjustment: bool = True):
  """`eps_fn(x, t)` for every sampler: `upsample` around `eps_fn` (which may itself be a CFG
  eps_fn: that is order='after' of `upsample_cfg_eps_fn`)."""
  _check_range(weight, 'weight', 0.0)
  _check_range(eta, 'eta', 0.0, 1.0)
  return lambda x, t: upsample(eps_fn, x, t, s, factor, weight, eta=eta,
                               time_adjustment=time_adjustment, power_adjustment=power_adjustment)


def upsample_cfg_eps_fn(model_fn: ModelFn, s, cond: jax.Array, uncond: jax.Array, scale,
                        rescale=0.0, *, order: str = 'after', factor: int = 2, weight=1.0,
                        eta=1.0, time_adjustment: bool = True, power_adjustment: bool = True):
  """Upsample guidance combined with classifier-free guidance, in an explicit order:

  order='after' (DiM's choice): upsample guidance on the CFG-guided eps; the low-resolution pass
    is CFG-guided too. order='before' (viperyl's SD1.5 choice): upsample guidance on the uncond
    and cond predictions separately, then CFG (and rescale) on the guided pair.
  Both cost two batched model calls per guided step (2B at full, 2B at 1/m^2 resolution). With
  rescale = 0 they are the same function (upsample guidance is affine in the model's outputs and
  CFG a linear mix with weights summing to 1), up to float rounding; with guidance rescale they
  differ (its std ratio is taken of the CFG output before or after the upsample term)."""
  if order == 'after':
    return upsample_eps_fn(cfg_eps_fn(model_fn, cond, uncond, scale, rescale), s, factor, weight,
                           eta=eta, time_adjustment=time_adjustment,
                           power_adjustment=power_adjustment)
  if order != 'before':
    raise ValueError(f"order must be 'after' or 'before' (upsample guidance after or before "
                     f"classifier-free guidance), got {order!r}")
  _check_range(weight, 'weight', 0.0)
  _check_range(eta, 'eta', 0.0, 1.0)
  shapes = lambda c: jax.tree.map(jnp.shape, c)
  if shapes(cond) != shapes(uncond):
    raise ValueError(f'cond and uncond must have the same shape, got {shapes(cond)} and '
                     f'{shapes(uncond)}')
  ctx = jax.tree.map(_pair, uncond, cond)

  def eps_fn(x, t):
    batch = x.shape[0]
    if any(leaf.shape[0] != batch for leaf in jax.tree.leaves(cond)):
      raise ValueError(f'cond must have batch size {batch} (that of x), got shape(s) '
                       f'{shapes(cond)}')
    paired = lambda xx, tt: model_fn(xx, tt, ctx)
    out = upsample(paired, _pair(x, x), _duplicate_t(t, batch), s, factor, weight, eta=eta,
                   time_adjustment=time_adjustment, power_adjustment=power_adjustment)
    out = out.reshape((batch, 2) + out.shape[1:])
    guided = (1 - scale) * out[:, 0] + scale * out[:, 1]
    return guided if _is_static(rescale, 0.0) else rescale_cfg(guided, out[:, 1], rescale)

  return eps_fn


# -- guidance objects: one protocol for the pipeline ----------------------------------------------
#
# A guidance turns the model into the samplers' eps_fn. It is a pytree (a flax.struct dataclass):
# its numbers (the CFG scale, a switch time) are traced leaves, so a new scale reuses the compiled
# sampler; its settings (factor, order, rescale) are static, part of the compiled program's key.
# Text is not part of it: the pipeline encodes the prompt sets it `reads` into `Contexts`.


@flax.struct.dataclass
class Contexts:
  """The text conditioning of one batch, each (B, L, D) (or a pytree of (B, ...) leaves), sharded
  like x: the prompts', the negative prompts' (`uncond`) and a second prompt set (`late`, prompt
  switching); None where no guidance reads it."""
  cond: Any
  uncond: Any = None
  late: Any = None


class Guidance(Protocol):
  """eps_fn(x, t) for the samplers from a `model_fn(x, t, context)`."""

  def reads(self) -> frozenset[str]:
    """The `Contexts` fields it needs besides `cond` (decided on concrete values, before jit)."""

  def check(self) -> None:
    """Raises ValueError naming the field for a setting out of range (concrete values)."""

  def eps_fn(self, model_fn: ModelFn, s, ctx: Contexts) -> EpsFn:
    """The guided prediction."""


@flax.struct.dataclass
class Unguided:
  """The model on the prompts alone (no guidance)."""

  def reads(self) -> frozenset[str]:
    return frozenset()

  def check(self) -> None:
    pass

  def eps_fn(self, model_fn: ModelFn, s, ctx: Contexts) -> EpsFn:
    return lambda x, t: model_fn(x, t, ctx.cond)


@flax.struct.dataclass
class CFG:
  """Classifier-free guidance (`classifier_free`), uncond + scale (cond - uncond), on the negative
  prompts' embeddings. scale 1 is the model on the prompts alone (it reads no negative prompt: half
  the cost); a scale below 1 is honoured (0: the unconditional model). `scale` is traced;
  `rescale` (arXiv 2305.08891) is static, so rescale 0 compiles plain CFG, bit for bit."""
  scale: Any = 7.5
  rescale: float = flax.struct.field(pytree_node=False, default=0.0)

  def __post_init__(self):  # static settings only: the traced leaves may be tracers
    _check_range(self.rescale, 'CFG.rescale', 0.0, 1.0)

  def reads(self) -> frozenset[str]:
    return frozenset() if _is_static(self.scale, 1.0) else frozenset({'uncond'})

  def check(self) -> None:
    _check_range(self.scale, 'CFG.scale', -float('inf'))
    _check_range(self.rescale, 'CFG.rescale', 0.0, 1.0)

  def eps_fn(self, model_fn: ModelFn, s, ctx: Contexts) -> EpsFn:
    if ctx.uncond is None:  # scale 1: the pipeline encoded no negative prompt
      return Unguided().eps_fn(model_fn, s, ctx)
    return cfg_eps_fn(model_fn, ctx.cond, ctx.uncond, self.scale, self.rescale)


def inner_cfg(inner, ctx: Contexts, name: str):
  """(uncond or None, scale, rescale) of a wrapped CFG or Unguided."""
  if isinstance(inner, Unguided):
    return None, 1.0, 0.0
  if isinstance(inner, CFG):
    return ctx.uncond, inner.scale, inner.rescale
  raise ValueError(f'{name}.inner must be a guidance.CFG or guidance.Unguided, got '
                   f'{type(inner).__name__}')


@flax.struct.dataclass
class UpsampleGuidance:
  """Upsample guidance (arXiv 2404.01709; `upsample_cfg_eps_fn`) around `inner` (CFG or Unguided):
  sample above the model's resolution (height/width = factor x its default). Its settings are
  static; the inner CFG scale is traced."""
  factor: int = flax.struct.field(pytree_node=False, default=2)
  weight: float = flax.struct.field(pytree_node=False, default=1.0)
  eta: float = flax.struct.field(pytree_node=False, default=1.0)
  time_adjustment: bool = flax.struct.field(pytree_node=False, default=True)
  power_adjustment: bool = flax.struct.field(pytree_node=False, default=True)
  order: str = flax.struct.field(pytree_node=False, default='after')
  inner: Any = dataclasses.field(default_factory=CFG)

  def __post_init__(self):  # static settings only (a bad one fails where it is written)
    self._check_settings()

  def reads(self) -> frozenset[str]:
    return self.inner.reads()

  def check(self) -> None:
    self._check_settings()
    inner_cfg(self.inner, Contexts(None), 'UpsampleGuidance')
    self.inner.check()

  def _check_settings(self) -> None:
    if isinstance(self.factor, bool) or not isinstance(self.factor, int) or self.factor < 1:
      raise ValueError(f'UpsampleGuidance.factor must be a positive int, got {self.factor!r}')
    _check_range(self.weight, 'UpsampleGuidance.weight', 0.0)
    _check_range(self.eta, 'UpsampleGuidance.eta', 0.0, 1.0)
    if self.order not in ('after', 'before'):
      raise ValueError(f"UpsampleGuidance.order must be 'after' or 'before', got {self.order!r}")

  def eps_fn(self, model_fn: ModelFn, s, ctx: Contexts) -> EpsFn:
    uncond, scale, rescale = inner_cfg(self.inner, ctx, 'UpsampleGuidance')
    kw = dict(factor=self.factor, weight=self.weight, eta=self.eta,
              time_adjustment=self.time_adjustment, power_adjustment=self.power_adjustment)
    if uncond is None:
      return upsample_eps_fn(lambda x, t: model_fn(x, t, ctx.cond), s, **kw)
    return upsample_cfg_eps_fn(model_fn, s, ctx.cond, uncond, scale, rescale, order=self.order,
                               **kw)


def as_guidance(value) -> Guidance:
  """A guidance object; a number is shorthand for `CFG(scale=number)`. Checked."""
  if isinstance(value, numbers.Real) and not isinstance(value, bool):  # also numpy scalars
    value = CFG(float(value))
  if not all(callable(getattr(value, m, None)) for m in ('reads', 'check', 'eps_fn')):
    raise ValueError('guidance must be a number (the CFG scale) or a guidance object '
                     '(guidance.CFG, guidance.Unguided, guidance.UpsampleGuidance, '
                     f'chromatography.PromptSwitch), got {type(value).__name__}')
  value.check()
  return value
