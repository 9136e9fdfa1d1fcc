"""Resolution operators and the per-resolution schedule of a diffusion process (arXiv 2401.10247,
2404.01709): the leaf module under resolution chromatography (`chromatography`) and upsample
guidance (`guidance.upsample`); it imports only the schedule.

    y = resolution.avg_pool(x, m)                 # D_m: (B, H, W, C) -> (B, H/m, W/m, C)
    x = resolution.nearest_upsample(y, m)         # U_m, with D_m U_m = I
    tau = resolution.adjusted_timestep(s, t, m)   # SNR(tau) = m**2 SNR(t), float, traceable
    p = resolution.power(s, t, m)                 # P_t = alpha_bar_t + (1 - alpha_bar_t) / m**2

Average pooling D_m by m per spatial axis keeps a smooth x_0 and divides the noise variance by
m^2, so the resolution-m view of x_t has SNR_m(t) = m^2 SNR(t), i.e. log-SNR lambda(t) + 2 ln m.
D_m x_t / sqrt(P_t) = sqrt(alpha_bar_tau) D_m x_0 + sqrt(1 - alpha_bar_tau) eps' exactly, with
alpha_bar_tau = alpha_bar_t / P_t. Images are NHWC; `factor` m pools H and W.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffgeo_jax.diffusion.schedules import NoiseSchedule


# -- checks ----------------------------------------------------------------------------------------

def is_concrete(a) -> bool:
  return not isinstance(a, jax.core.Tracer)


def check_factor(factor, name: str = 'factor') -> None:
  """A resolution factor m of the schedule math: a positive number (traced values pass)."""
  if not is_concrete(factor):
    return
  f = np.asarray(factor)
  if (isinstance(factor, bool) or f.dtype.kind not in 'iuf' or not np.all(np.isfinite(f))
      or np.any(f <= 0)):
    raise ValueError(f'{name} must be a positive number, got {factor!r}')


def check_nhwc(x, name: str = 'x') -> None:
  if not hasattr(x, 'ndim') or x.ndim != 4:
    raise ValueError(f'{name} must be NHWC (B, H, W, C), got shape '
                     f'{getattr(x, "shape", type(x).__name__)}')


def check_int_factor(factor, name: str = 'factor') -> None:
  if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
    raise ValueError(f'{name} must be a positive int, got {factor!r}')


def check_pool_factor(x, factor, name: str = 'factor', x_name: str = 'x') -> None:
  """The pooling factor of NHWC `x`: a positive int dividing H and W."""
  check_nhwc(x, x_name)
  check_int_factor(factor, name)
  h, w = x.shape[1:3]
  if h % factor or w % factor:
    raise ValueError(f'{name}={factor} must divide the spatial size (H, W) = ({h}, {w}) of '
                     f'{x_name}')


def check_t(s: NoiseSchedule, t, name: str = 't') -> None:
  """t in [0, T-1] when it is concrete (a traced t cannot be checked)."""
  if not is_concrete(t):
    return
  a = np.asarray(t, np.float64)
  if not np.all(np.isfinite(a)) or np.any(a < 0) or np.any(a > s.num_train_timesteps - 1):
    raise ValueError(f'{name} must be in [0, {s.num_train_timesteps - 1}], got {t!r}')


# -- D and U ---------------------------------------------------------------------------------------

def avg_pool(x: jax.Array, factor: int) -> jax.Array:
  """D: (B, H, W, C) -> (B, H/m, W/m, C), the mean of each m x m block."""
  check_pool_factor(x, factor)
  b, h, w, c = x.shape
  return x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def nearest_upsample(x: jax.Array, factor: int) -> jax.Array:
  """U: (B, h, w, C) -> (B, h m, w m, C), each pixel repeated m x m times (D U = I)."""
  check_nhwc(x)
  check_int_factor(factor)
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


# -- per-resolution SNR and the schedule mapping ---------------------------------------------------

def resolution_log_snr(s: NoiseSchedule, t, factor) -> jax.Array:
  """lambda_m(t) = lambda(t) + 2 ln m at (float) timesteps t."""
  check_factor(factor)
  return s.log_snr_at(t) + 2 * jnp.log(jnp.asarray(factor, jnp.float32))


def resolution_snr(s: NoiseSchedule, t, factor) -> jax.Array:
  """SNR_m(t) = m^2 alpha_bar_t / (1 - alpha_bar_t)."""
  return jnp.exp(resolution_log_snr(s, t, factor))


def power(s: NoiseSchedule, t, factor) -> jax.Array:
  """P_t = alpha_bar_t + (1 - alpha_bar_t) / m^2: the variance of D_m x_t for unit-variance,
  smooth x_0 (the "power adjustment" divides D_m x_t by sqrt(P_t))."""
  check_factor(factor)
  ab = s.alpha_cumprod_at(t)
  return ab + (1 - ab) / jnp.asarray(factor, jnp.float32) ** 2


def adjusted_timestep(s: NoiseSchedule, t, factor) -> jax.Array:
  """tau(t): the float timestep with SNR(tau) = m^2 SNR(t) (log-SNR matching, linear in t between
  integers as `NoiseSchedule.log_snr_at`), so alpha_bar_tau = alpha_bar_t / P_t. t scalar or any
  shape (traceable); tau <= t for m >= 1, clipped at 0 where m^2 SNR(t) exceeds SNR(0)."""
  check_t(s, t)
  return s.timestep_at_log_snr(resolution_log_snr(s, t, factor))
