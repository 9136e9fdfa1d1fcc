"""Discrete-time VP noise schedules (DDPM / Stable Diffusion), as a pytree.

    s = schedules.from_diffusers_config(json.load(open('scheduler/scheduler_config.json')))
    s = schedules.scaled_linear(1000, 0.00085, 0.012)     # Stable Diffusion's schedule
    x_t = s.add_noise(x0, noise, t)                      # t integer or float

x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t in [0, T-1]. Between integer steps
(the geometry and resolution work evaluate the model there) the log-SNR is interpolated linearly
in t, which keeps alpha_bar monotone and exact at the integers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffgeo_jax.models.config_utils import ConfigError

PREDICTION_TYPES = ('epsilon', 'v_prediction', 'sample')
TIMESTEP_SPACINGS = ('leading', 'trailing', 'linspace')
BETA_SCHEDULES = ('linear', 'scaled_linear', 'squaredcos_cap_v2')


def interp(x, xp, fp) -> jax.Array:
  """`jnp.interp(x, xp, fp)` (xp increasing; constant beyond the ends) without a loop: the
  interval comes from comparing x with every xp (`searchsorted(method='compare_all')`, T = 1000
  comparisons) instead of jnp.interp's bisection `while` loop. Inside a sampler's step loop that
  nested `while` made an index XLA:GPU's dynamic-slice pass cannot evaluate (FAILED_PRECONDITION
  "Failed to evaluate instruction (min.4) since it depends on infeed or parameters", openxla/xla
  #49299: launch/train_duo.py on an H100), and serialised ~10 tiny steps per lookup on any chip."""
  x = jnp.asarray(x)
  i = jnp.clip(jnp.searchsorted(xp, x, side='right', method='compare_all'), 1, xp.shape[0] - 1)
  dx = xp[i] - xp[i - 1]
  f = fp[i - 1] + (x - xp[i - 1]) / jnp.where(dx == 0, 1, dx) * (fp[i] - fp[i - 1])
  f = jnp.where(dx == 0, fp[i], f)
  return jnp.where(x < xp[0], fp[0], jnp.where(x > xp[-1], fp[-1], f))


@flax.struct.dataclass
class NoiseSchedule:
  betas: jax.Array  # (T,) float32
  alphas_cumprod: jax.Array  # (T,) float32: alpha_bar_t
  # alpha_bar "after" the last step (DDIM's `final_alpha_cumprod`): 1 if set_alpha_to_one.
  final_alpha_cumprod: jax.Array
  prediction_type: str = flax.struct.field(pytree_node=False, default='epsilon')
  timestep_spacing: str = flax.struct.field(pytree_node=False, default='leading')
  steps_offset: int = flax.struct.field(pytree_node=False, default=0)
  clip_sample: bool = flax.struct.field(pytree_node=False, default=False)
  clip_sample_range: float = flax.struct.field(pytree_node=False, default=1.0)

  @property
  def num_train_timesteps(self) -> int:
    return self.betas.shape[0]

  @property
  def log_snr(self) -> jax.Array:
    """(T,) log(alpha_bar / (1 - alpha_bar))."""
    return jnp.log(self.alphas_cumprod) - jnp.log1p(-self.alphas_cumprod)

  @property
  def sigmas(self) -> jax.Array:
    """(T,) the VE noise levels sqrt((1 - alpha_bar) / alpha_bar) (Euler / DPM-Solver). A zero
    terminal SNR (`rescale_betas_zero_snr`) is read as alpha_bar = 2**-24 here, as diffusers'
    Euler and DPM-Solver do, so the first sigma is finite."""
    ab = jnp.maximum(self.alphas_cumprod, 2.0 ** -24)
    return jnp.sqrt((1 - ab) / ab)

  def log_snr_at(self, t) -> jax.Array:
    """log-SNR at (float) timesteps t, linear in t between integers; t is clipped to [0, T-1]."""
    t = jnp.asarray(t, jnp.float32)
    return interp(t, jnp.arange(self.num_train_timesteps, dtype=jnp.float32), self.log_snr)

  def alpha_cumprod_at(self, t) -> jax.Array:
    """alpha_bar at (float) timesteps t: the table value at integers (bit for bit, as diffusers
    indexes it), the log-SNR interpolation in between."""
    t = jnp.asarray(t, jnp.float32)
    table = self.alphas_cumprod[jnp.clip(jnp.round(t), 0, self.num_train_timesteps - 1).astype(jnp.int32)]
    return jnp.where(t == jnp.round(t), table, jax.nn.sigmoid(self.log_snr_at(t)))

  def timestep_at_log_snr(self, log_snr) -> jax.Array:
    """Inverse of `log_snr_at`: the float timestep with that log-SNR (clipped to [0, T-1])."""
    # log-SNR decreases with t; interp needs increasing x.
    ts = jnp.arange(self.num_train_timesteps, dtype=jnp.float32)
    return interp(jnp.asarray(log_snr, jnp.float32), self.log_snr[::-1], ts[::-1])

  def add_noise(self, x0, noise, t) -> jax.Array:
    """q(x_t | x_0) sample with the given noise; t scalar or (B,) (integers or floats)."""
    ab = _per_sample(self.alpha_cumprod_at(t), x0)
    return jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * noise

  def split_prediction(self, model_output, x_t, t, alpha_cumprod=None):
    """(x0, eps) implied by a model output of this schedule's `prediction_type` at x_t."""
    ab = _per_sample(self.alpha_cumprod_at(t) if alpha_cumprod is None else alpha_cumprod, x_t)
    a, s = jnp.sqrt(ab), jnp.sqrt(1 - ab)
    if self.prediction_type == 'epsilon':
      eps = model_output
      x0 = (x_t - s * eps) / a
    elif self.prediction_type == 'v_prediction':
      x0 = a * x_t - s * model_output
      eps = a * model_output + s * x_t
    else:  # 'sample'
      x0 = model_output
      eps = (x_t - a * x0) / s
    return x0, eps

  def inference_timesteps(self, num_steps: int) -> np.ndarray:
    """The integer timesteps diffusers' DDPM/DDIM `set_timesteps(num_steps)` produce, descending."""
    check_num_steps(num_steps, self.num_train_timesteps)
    n, T = num_steps, self.num_train_timesteps
    if self.timestep_spacing == 'linspace':
      ts = np.linspace(0, T - 1, n).round()[::-1]
    elif self.timestep_spacing == 'leading':
      ts = (np.arange(0, n) * (T // n)).round()[::-1] + self.steps_offset
    else:  # trailing
      ts = np.round(np.arange(T, 0, -T / n)) - 1
    return ts.astype(np.int64).copy()


def check_num_steps(num_steps: Any, num_train_timesteps: int) -> None:
  if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f'num_steps must be a positive integer, got {num_steps!r}')
  if num_steps > num_train_timesteps:
    raise ValueError(f'num_steps={num_steps} is larger than the schedule\'s '
                     f'num_train_timesteps={num_train_timesteps}')


def _per_sample(a, x):
  """Broadcast a scalar or (B,) coefficient against x (B, ...)."""
  a = jnp.asarray(a, x.dtype)
  return a.reshape(a.shape + (1,) * (x.ndim - a.ndim)) if a.ndim else a


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Shift and scale sqrt(alpha_bar) so the last step has SNR 0 (arXiv 2305.08891, Alg. 1)."""
  sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
  first, last = sqrt_ab[0], sqrt_ab[-1]
  sqrt_ab = (sqrt_ab - last) * first / (first - last)
  ab = sqrt_ab ** 2
  alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
  return (1 - alphas).astype(betas.dtype)


def from_betas(betas, *, prediction_type: str = 'epsilon', timestep_spacing: str = 'leading',
               steps_offset: int = 0, set_alpha_to_one: bool = True, clip_sample: bool = False,
               clip_sample_range: float = 1.0, rescale_betas_zero_snr: bool = False) -> NoiseSchedule:
  """A schedule from its betas (float32, as diffusers computes them)."""
  betas = np.asarray(betas, np.float32)
  if betas.ndim != 1 or not np.all((betas > 0) & (betas <= 1)):
    raise ValueError('betas must be a 1-D array with values in (0, 1]')
  if prediction_type not in PREDICTION_TYPES:
    raise ValueError(f'prediction_type={prediction_type!r}; supported: {PREDICTION_TYPES}')
  if timestep_spacing not in TIMESTEP_SPACINGS:
    raise ValueError(f'timestep_spacing={timestep_spacing!r}; supported: {TIMESTEP_SPACINGS}')
  if rescale_betas_zero_snr:
    betas = rescale_zero_terminal_snr(betas)
  alphas_cumprod = np.cumprod(1.0 - betas, dtype=np.float32)
  final = 1.0 if set_alpha_to_one else float(alphas_cumprod[0])
  return NoiseSchedule(jnp.asarray(betas), jnp.asarray(alphas_cumprod),
                       jnp.asarray(final, jnp.float32), prediction_type, timestep_spacing,
                       int(steps_offset), bool(clip_sample), float(clip_sample_range))


def linear(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
           **kwargs) -> NoiseSchedule:
  """DDPM's schedule: betas linear in t."""
  return from_betas(np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float32),
                    **kwargs)


def scaled_linear(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                  beta_end: float = 0.012, **kwargs) -> NoiseSchedule:
  """Stable Diffusion's schedule: sqrt(beta) linear in t."""
  betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=np.float32) ** 2
  return from_betas(betas, **kwargs)


def cosine(num_train_timesteps: int = 1000, max_beta: float = 0.999, **kwargs) -> NoiseSchedule:
  """Nichol & Dhariwal's cosine schedule (diffusers' `squaredcos_cap_v2`)."""
  f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
  T = num_train_timesteps
  betas = [min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)]
  return from_betas(np.asarray(betas, np.float32), **kwargs)


# -- diffusers scheduler_config.json ---------------------------------------------------------------

_SCHEDULE_KEYS = ('num_train_timesteps', 'beta_start', 'beta_end', 'beta_schedule', 'trained_betas',
                  'prediction_type', 'timestep_spacing', 'steps_offset', 'set_alpha_to_one',
                  'rescale_betas_zero_snr', 'clip_sample', 'clip_sample_range')
# Options of diffusers' scheduler classes that our samplers implement only at these values.
_FIXED_OPTIONS: dict[str, tuple] = {
    'thresholding': (False,), 'variance_type': ('fixed_small', None),
    'interpolation_type': ('linear',), 'use_karras_sigmas': (False, None),
    'use_exponential_sigmas': (False, None), 'use_beta_sigmas': (False, None),
    'timestep_type': ('discrete',), 'final_sigmas_type': ('zero',), 'sigma_min': (None,),
    'sigma_max': (None,), 'use_lu_lambdas': (False, None), 'use_flow_sigmas': (False, None),
    'algorithm_type': ('dpmsolver++',), 'solver_type': ('midpoint',), 'solver_order': (2,),
    'lower_order_final': (True,), 'euler_at_final': (False,), 'lambda_min_clipped': (-math.inf,),
    'skip_prk_steps': (True, False), 'use_dynamic_shifting': (False, None),
}
# Options that do not change the schedule or our samplers' math.
_IGNORED = ('dynamic_thresholding_ratio', 'sample_max_value', 'flow_shift', 'time_shift_type')


def from_diffusers_config(cfg: Mapping[str, Any], source: str = 'scheduler config') -> NoiseSchedule:
  """A schedule from a diffusers `scheduler_config.json` dict (DDPM, DDIM, PNDM, Euler, DPM-Solver,
  LMS ... scheduler classes all share these keys). Unknown or unsupported options are errors that
  list what is supported."""
  kw: dict[str, Any] = {}
  for key, value in cfg.items():
    if key.startswith('_') or key in _IGNORED:
      continue
    if key in _FIXED_OPTIONS:
      allowed = _FIXED_OPTIONS[key]
      if value not in allowed and not (isinstance(value, float) and math.isinf(value) and
                                       -math.inf in allowed and value < 0):
        raise ConfigError(f'{source}: {key}={value!r} is not supported; supported: {allowed}')
      continue
    if key not in _SCHEDULE_KEYS:
      raise ConfigError(f'{source}: unknown scheduler option {key!r}; supported options: '
                        f'{sorted(_SCHEDULE_KEYS + tuple(_FIXED_OPTIONS) + _IGNORED)}')
    kw[key] = value
  T = int(kw.pop('num_train_timesteps', 1000))
  start, end = kw.pop('beta_start', 1e-4), kw.pop('beta_end', 0.02)
  schedule = kw.pop('beta_schedule', 'linear')
  trained = kw.pop('trained_betas', None)
  kw.setdefault('set_alpha_to_one', True)
  kw = {k: v for k, v in kw.items() if v is not None}
  try:
    if trained is not None:
      return from_betas(np.asarray(trained, np.float32), **kw)
    if schedule == 'linear':
      return linear(T, start, end, **kw)
    if schedule == 'scaled_linear':
      return scaled_linear(T, start, end, **kw)
    if schedule == 'squaredcos_cap_v2':
      return cosine(T, **kw)
  except ValueError as e:
    raise ConfigError(f'{source}: {e}') from e
  raise ConfigError(f'{source}: beta_schedule={schedule!r} is not supported; supported: '
                    f'{BETA_SCHEDULES}')
