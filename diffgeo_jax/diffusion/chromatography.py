"""Resolution chromatography (arXiv 2401.10247): how fast each resolution's signal is generated.

    S = chromatography.signal_fraction(s, m)          # (T,) S_m(t) = alpha_bar_t / P_t
    g = chromatography.generation_rate(s, m)          # (T,) g_m(t) = -dS_m/dt (the chromatogram)
    t_pk = chromatography.peak_time(s, m)             # argmax_t g_m(t)

Average pooling D_m by m per spatial axis keeps a smooth x_0 and divides the noise variance by
m^2, so the resolution-m view of x_t has SNR_m(t) = m^2 SNR(t), i.e. log-SNR lambda(t) + 2 ln m.
With the power P_t = alpha_bar_t + (1 - alpha_bar_t) / m^2,
D_m x_t / sqrt(P_t) = sqrt(alpha_bar_tau) D_m x_0 + sqrt(1 - alpha_bar_tau) eps' exactly, where
alpha_bar_tau = alpha_bar_t / P_t = S_m(t) = sigmoid(lambda(t) + 2 ln m): the schedule mapping
t -> tau (`resolution.adjusted_timestep`, with the pooling D_m and upsampling U_m of
`resolution`) that upsample guidance (`guidance.upsample`) and the cascade (`cascade`) use.

Also here: the time-dependent prompt composition (`prompt_switch_eps_fn`, the pipeline's
`PromptSwitch` guidance, `switch_time`) and
cascaded upscaling (`cascade`). Images are NHWC; `factor` m pools H and W.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffgeo_jax.diffusion import guidance, samplers
from diffgeo_jax.diffusion.resolution import (adjusted_timestep, avg_pool, check_factor,
                                              check_int_factor, check_nhwc, check_t, is_concrete,
                                              nearest_upsample, power)
from diffgeo_jax.diffusion.schedules import NoiseSchedule

ModelFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
EpsFn = Callable[[jax.Array, jax.Array], jax.Array]


# -- the chromatogram ------------------------------------------------------------------------------

def signal_fraction(s: NoiseSchedule, factor) -> jax.Array:
  """(T,) S_m(t) = alpha_bar_t / P_t = SNR_m / (1 + SNR_m): the fraction of the resolution-m
  view of x_t that is signal. m = 1 gives alphas_cumprod."""
  ab = s.alphas_cumprod
  check_factor(factor)
  return ab / (ab + (1 - ab) / jnp.asarray(factor, jnp.float32) ** 2)


def generation_rate(s: NoiseSchedule, factor) -> jax.Array:
  """(T,) g_m(t) = -dS_m/dt per timestep: central differences inside, one-sided at both ends
  (`jnp.gradient`). Its peak is where resolution m is generated fastest."""
  return -jnp.gradient(signal_fraction(s, factor))


def band_generation_rate(s: NoiseSchedule, factor) -> jax.Array:
  """(T,) the band-pass chromatogram g_m(t) - g_{2m}(t): the rate of the detail present at
  resolution m but not at 2m. It is signed (negative early, while the coarser band dominates)
  and integrates to about S_2m(T-1) - S_m(T-1) ~ 0."""
  return generation_rate(s, factor) - generation_rate(s, 2 * factor)


def peak_time(s: NoiseSchedule, factor, band: bool = False) -> jax.Array:
  """The integer timestep where g_m (or, with band, g_m - g_{2m}) is largest."""
  g = band_generation_rate(s, factor) if band else generation_rate(s, factor)
  return jnp.argmax(g)


# -- time-dependent prompt composition -------------------------------------------------------------

def switch_time(s: NoiseSchedule, factor, level: float = 0.5, rule: str = 'half') -> jax.Array:
  """The timestep at which to hand over from the prompt that should decide the content at
  resolution factor m (e.g. m = image size for a global colour) to the next prompt.

  rule='half' (default): the float t with S_m(t) = level, i.e. lambda(t) = logit(level) - 2 ln m;
  at level 1/2 that is SNR(t) = 1/m^2. Switching there leaves a fraction S_m(t_s) = level of that
  resolution's signal generated under the first prompt: the chromatogram's prediction of how much
  of the attribute the first prompt keeps. rule='peak': `peak_time(s, m)`, the fastest
  generation (at m^2 SNR ~ 0.7-1.5 on the SD and DDPM schedules, vs exactly 1 for 'half' at
  level 1/2). Where S_m(T-1) > level already (very coarse m), 'half' returns T-1."""
  check_factor(factor)
  if rule == 'peak':
    return peak_time(s, factor).astype(jnp.float32)
  if rule != 'half':
    raise ValueError(f"rule must be 'half' or 'peak', got {rule!r}")
  if is_concrete(level) and not 0 < float(level) < 1:
    raise ValueError(f'level must be in (0, 1), got {level!r}')
  logit = jnp.log(level) - jnp.log1p(-jnp.asarray(level, jnp.float32))
  return s.timestep_at_log_snr(logit - 2 * jnp.log(jnp.asarray(factor, jnp.float32)))


def _select(t, switch, early, late):
  """early where t > switch, late elsewhere; t scalar or (B,) against contexts (B, ...) (or
  pytrees of them, e.g. SDXL's dict with the pooled embedding and time ids)."""
  on = jnp.asarray(t, jnp.float32) > switch

  def pick(e, l):
    o = on.reshape(on.shape + (1,) * (e.ndim - 1)) if on.ndim == 1 else on
    return jnp.where(o, e, l)

  return jax.tree.map(pick, early, late)


def prompt_switch_eps_fn(model_fn: ModelFn, context_early: jax.Array, context_late: jax.Array,
                         switch: float, *, uncond: jax.Array | None = None, scale=1.0,
                         rescale=0.0) -> EpsFn:
  """`eps_fn(x, t)` for the samplers that conditions on `context_early` while t > switch (the
  coarse resolutions) and on `context_late` for t <= switch: one model call per step, the context
  being picked by `jnp.where` on t (scalar or (B,)). With `uncond`, classifier-free guidance
  (`guidance.classifier_free`, still one batched call) on the switched context."""
  shapes = lambda c: jax.tree.map(jnp.shape, c)
  if shapes(context_early) != shapes(context_late):
    raise ValueError(f'context_early and context_late must have the same shape, got '
                     f'{shapes(context_early)} and {shapes(context_late)}')
  if is_concrete(switch) and not np.all(np.isfinite(np.asarray(switch, np.float64))):
    raise ValueError(f'switch must be a finite timestep, got {switch!r}')
  if uncond is None:
    return lambda x, t: model_fn(x, t, _select(t, switch, context_early, context_late))
  def eps_fn(x, t):
    cond = _select(t, switch, context_early, context_late)
    return guidance.classifier_free(model_fn, x, t, cond, uncond, scale, rescale)

  return eps_fn


@flax.struct.dataclass
class PromptSwitch:
  """Guidance object (`guidance.Guidance`) for time-dependent prompt composition: the prompts
  while t > `switch_timestep`, the pipeline's `late_prompts` after (`prompt_switch_eps_fn`), under
  `inner` (guidance.CFG or guidance.Unguided). `switch_time` picks the time for a resolution;
  the time is traced (a sweep over it compiles once)."""
  switch_timestep: Any
  inner: Any = flax.struct.field(default_factory=guidance.CFG)

  def reads(self) -> frozenset[str]:
    return frozenset({'late'}) | self.inner.reads()

  def check(self) -> None:
    if is_concrete(self.switch_timestep) and not np.all(
        np.isfinite(np.asarray(self.switch_timestep, np.float64))):
      raise ValueError('PromptSwitch.switch_timestep must be a finite timestep, got '
                       f'{self.switch_timestep!r}')
    guidance.inner_cfg(self.inner, guidance.Contexts(None), 'PromptSwitch')
    self.inner.check()

  def eps_fn(self, model_fn: ModelFn, s, ctx: guidance.Contexts) -> EpsFn:
    uncond, scale, rescale = guidance.inner_cfg(self.inner, ctx, 'PromptSwitch')
    return prompt_switch_eps_fn(model_fn, ctx.cond, ctx.late, self.switch_timestep,
                                uncond=uncond, scale=scale, rescale=rescale)


# -- cascaded upscaling ----------------------------------------------------------------------------

def cascade_start(x_low: jax.Array, s: NoiseSchedule, t, factor: int, noise_low: jax.Array,
                  noise_high: jax.Array) -> jax.Array:
  """The high-resolution x_t continuing a low-resolution sample x_low (B, h, w, C):

      y_tau = sqrt(alpha_bar_tau) x_low + sqrt(1 - alpha_bar_tau) noise_low,  tau = tau(t)
      x_t = sqrt(P_t) U y_tau + sqrt(1 - alpha_bar_t) (I - U D) noise_high

  so that D x_t / sqrt(P_t) = y_tau exactly, and x_t is distributed as the forward process at t
  from x_0 = U x_low (with noise_low = m D noise_high it equals `s.add_noise(U x_low, noise_high,
  t)`): the missing high-frequency noise is added on top of the upsampled low-res sample."""
  check_nhwc(x_low, 'x_low')
  check_int_factor(factor)
  check_t(s, t)
  hi_shape = (x_low.shape[0], x_low.shape[1] * factor, x_low.shape[2] * factor, x_low.shape[3])
  if noise_low.shape != x_low.shape:
    raise ValueError(f'noise_low must have shape {x_low.shape}, got {noise_low.shape}')
  if noise_high.shape != hi_shape:
    raise ValueError(f'noise_high must have shape {hi_shape}, got {noise_high.shape}')
  tau = adjusted_timestep(s, t, factor)
  y_tau = s.add_noise(x_low, noise_low, tau)
  ab = s.alpha_cumprod_at(t)
  high_freq = noise_high - nearest_upsample(avg_pool(noise_high, factor), factor)
  return (jnp.sqrt(power(s, t, factor)) * nearest_upsample(y_tau, factor)
          + jnp.sqrt(1 - ab) * high_freq)


def cascade(eps_fn: EpsFn, x_low: jax.Array, s: NoiseSchedule, tau: float, num_steps: int,
            key, *, factor: int = 2, sampler: str = 'ddim', eta: float = 0.0, noise_low=None,
            noise_high=None, return_info: bool = False):
  """Cascaded upscaling: noise the low-resolution sample x_low (B, h, w, C) to about `tau`,
  upsample it by `factor` and continue sampling at (B, h m, w m, C) with `samplers.sample`.

  The high-res sampler starts at step k of its `num_steps` grid whose timestep t_k is nearest to
  the t with SNR(t) = SNR(tau) / m^2; x_low is then noised to tau(t_k) (`adjusted_timestep`: near
  `tau`, the grid being discrete) and lifted by `cascade_start`. `key` splits into (noise_low, noise_high,
  sampler noise); explicit `noise_low` / `noise_high` replace the drawn ones. With return_info,
  also a dict: first_step, t (= t_k), tau (the one used), x_start."""
  check_nhwc(x_low, 'x_low')
  check_int_factor(factor)
  if (isinstance(tau, bool) or not isinstance(tau, (int, float, np.number))
      or not 0 <= tau <= s.num_train_timesteps - 1):
    raise ValueError(f'tau must be a number in [0, {s.num_train_timesteps - 1}], got {tau!r}')
  if sampler not in samplers.SAMPLERS:
    raise ValueError(f'unknown sampler {sampler!r}; supported: {sorted(samplers.SAMPLERS)}')
  # The start step is static (a grid index): found with numpy from the closed-over schedule.
  ab = np.maximum(np.asarray(samplers._table(s), np.float64), 2.0 ** -24)  # zero terminal SNR
  lam = np.log(ab) - np.log1p(-ab)
  ts = np.arange(len(lam), dtype=np.float64)
  lam_tau = np.interp(float(tau), ts, lam)
  t_target = np.interp(lam_tau - 2 * math.log(factor), lam[::-1], ts[::-1])
  grid = np.asarray(samplers.timesteps(sampler, s, num_steps), np.float64)
  k = int(np.argmin(np.abs(grid - t_target)))
  t_k = float(grid[k])
  k_low, k_high, k_steps = jax.random.split(key, 3)
  hi_shape = (x_low.shape[0], x_low.shape[1] * factor, x_low.shape[2] * factor, x_low.shape[3])
  if noise_low is None:
    noise_low = jax.random.normal(k_low, x_low.shape, x_low.dtype)
  if noise_high is None:
    noise_high = jax.random.normal(k_high, hi_shape, x_low.dtype)
  x_start = cascade_start(x_low, s, t_k, factor, jnp.asarray(noise_low), jnp.asarray(noise_high))
  x0 = samplers.sample(sampler, eps_fn, x_start, s, num_steps, key=k_steps, eta=eta,
                       first_step=k)
  if not return_info:
    return x0
  return x0, dict(first_step=k, t=t_k, tau=adjusted_timestep(s, t_k, factor), x_start=x_start)
