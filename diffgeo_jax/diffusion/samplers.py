"""Pure-function samplers over `eps_fn(x, t) -> model output`, as diffusers' schedulers run them.

    x0 = samplers.ddim(eps_fn, x_T, schedule, num_steps=50, eta=0.0, key=None)
    x0, traj = samplers.ddim(eps_fn, x_T, schedule, 50, return_trajectory=True)  # .x_t, .pred_x0
    x0 = samplers.sample('euler', eps_fn, x_T, schedule, 50)    # every sampler: this signature

`eps_fn` returns the model output of the schedule's `prediction_type` (epsilon, v or x0); the
samplers convert it. `x_T` is unit Gaussian noise: samplers that work in the VE scale (Euler) scale
it themselves, as diffusers' `init_noise_sigma` does. Each loop is one `lax.scan` over the
timesteps diffusers' scheduler of the same config uses for `num_steps`; jit the caller to compile
the whole sampler with the model. Stochastic samplers draw step i's noise as
`jax.random.normal(jax.random.split(key, num_steps)[i], x.shape)`.

`first_step=k` runs only steps k, k+1, ... of the `num_steps` grid (SDEdit / image-to-image): then
`x_T` is the VP sample x_t at the grid's k-th timestep (`schedule.add_noise(x0, noise, t_k)`),
not unit noise.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffgeo_jax.diffusion.schedules import NoiseSchedule, check_num_steps

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]


@flax.struct.dataclass
class Trajectory:
  """Per step i (in sampling order): the input x_t, the model's predicted x_0, and t."""
  x_t: jax.Array  # (num_steps, *x.shape)
  pred_x0: jax.Array  # (num_steps, *x.shape)
  t: jax.Array  # (num_steps,) float32


def _table(s: NoiseSchedule) -> np.ndarray:
  """alpha_bar as numpy: timestep grids are laid out at trace time, so the schedule must be a
  constant of the traced function (closed over), not one of its traced arguments."""
  if isinstance(s.alphas_cumprod, jax.core.Tracer):
    raise ValueError('the NoiseSchedule is a traced value: close over it instead of passing it '
                     'as an argument of jit/vmap (its timestep grid is built at trace time)')
  return np.asarray(s.alphas_cumprod, np.float32)


def _check_x(x_T, name='x_T'):
  if not hasattr(x_T, 'shape') or x_T.ndim < 1:
    raise ValueError(f'{name} must be an array of shape (B, ...), got {type(x_T).__name__}')


def _check_eta(eta, sampler: str, low: float | None = None, only: float | None = None):
  """eta is a Python number (it picks the loop's structure); `only`: the one value the sampler
  supports; `low`: its lower bound."""
  if isinstance(eta, bool) or not isinstance(eta, (int, float)) or eta != eta:
    raise ValueError(f'eta must be a Python number, got {eta!r}')
  if only is not None and eta != only:
    raise ValueError(f'{sampler} supports only eta={only:g}, got eta={eta!r}')
  if low is not None and eta < low:
    raise ValueError(f'eta must be >= {low:g} for {sampler}, got {eta!r}')


def _noise(key, num_steps, shape, dtype):
  if key is None:
    raise ValueError('this sampler is stochastic: pass key=jax.random.key(seed)')
  return jax.vmap(lambda k: jax.random.normal(k, shape, dtype))(jax.random.split(key, num_steps))


def _clip(s: NoiseSchedule, x0):
  return jnp.clip(x0, -s.clip_sample_range, s.clip_sample_range) if s.clip_sample else x0


def _run(body, x_init, per_step, ts, first_step, return_trajectory):
  """`lax.scan` of `body` over steps [first_step:] of the per-step inputs."""
  if not 0 <= first_step < len(ts):
    raise ValueError(f'first_step must be in [0, {len(ts)}), got {first_step}')
  per_step = jax.tree.map(lambda a: jnp.asarray(a)[first_step:], per_step)
  x, outs = jax.lax.scan(body, x_init, per_step)
  if isinstance(x, tuple):  # multistep carry: the sample comes first
    x = x[0]
  if not return_trajectory:
    return x
  x_t, x0 = outs
  return x, Trajectory(x_t, x0, jnp.asarray(ts[first_step:], jnp.float32))


# -- DDIM (and its inversion) ----------------------------------------------------------------------

def ddim_step(s: NoiseSchedule, model_output, x_t, t, alpha_prev, eta=0.0, noise=None):
  """One DDIM update x_t -> x_{t_prev} given alpha_bar(t_prev). Returns (x_prev, pred_x0)."""
  ab = s.alpha_cumprod_at(t)
  x0, eps = s.split_prediction(model_output, x_t, t, ab)
  x0 = _clip(s, x0)  # eps stays the unclipped one, as diffusers (use_clipped_model_output=False)
  variance = (1 - alpha_prev) / (1 - ab) * (1 - ab / alpha_prev)
  std = eta * jnp.sqrt(variance)
  x_prev = (jnp.sqrt(alpha_prev) * x0 + jnp.sqrt(jnp.maximum(1 - alpha_prev - std ** 2, 0.0)) * eps)
  if noise is not None:
    x_prev = x_prev + std * noise
  return x_prev, x0


def _ddim_grid(s: NoiseSchedule, num_steps: int):
  ts = s.inference_timesteps(num_steps)
  prev = ts - s.num_train_timesteps // num_steps
  ac = _table(s)
  alpha_prev = np.where(prev >= 0, ac[np.clip(prev, 0, None)], float(s.final_alpha_cumprod))
  return ts, alpha_prev.astype(np.float32)


def ddim(eps_fn: EpsFn, x_T, schedule: NoiseSchedule, num_steps: int, *, key=None,
         eta: float = 0.0, first_step: int = 0, return_trajectory: bool = False):
  """DDIM (arXiv 2010.02502) with diffusers' DDIMScheduler timesteps; eta=0 is deterministic
  (then `key` is unused), eta > 0 needs `key`."""
  s = schedule
  _check_x(x_T)
  _check_eta(eta, 'ddim', low=0.0)
  ts, alpha_prev = _ddim_grid(s, num_steps)
  noises = _noise(key, num_steps, x_T.shape, x_T.dtype) if eta > 0 else jnp.zeros((num_steps,))

  def body(x, inp):
    t, a_prev, noise = inp
    out = eps_fn(x, t)
    x_prev, x0 = ddim_step(s, out, x, t, a_prev, eta, noise if eta > 0 else None)
    return x_prev, (x, x0)

  return _run(body, x_T, (ts.astype(np.float32), alpha_prev, noises), ts, first_step,
              return_trajectory)


def ddim_inversion(eps_fn: EpsFn, x_0, schedule: NoiseSchedule, num_steps: int, *,
                   return_trajectory: bool = False):
  """Runs deterministic DDIM backwards, x_0 -> x_T, on the same timesteps as `ddim` (ascending), as
  diffusers' DDIMInverseScheduler: the model is evaluated at the step's target timestep on the
  current (less noisy) x — the usual approximation, exact as the step size goes to zero."""
  s = schedule
  _check_x(x_0, 'x_0')
  ts, alpha_prev = _ddim_grid(s, num_steps)
  ts, alpha_from = ts[::-1].copy(), alpha_prev[::-1].copy()

  def body(x, inp):
    t, a_from = inp
    # Read the prediction at the noise level x actually has (alpha_bar = a_from), then move to t.
    x0, eps = s.split_prediction(eps_fn(x, t), x, t, a_from)
    ab = s.alpha_cumprod_at(t)
    x_next = jnp.sqrt(ab) * _clip(s, x0) + jnp.sqrt(1 - ab) * eps
    return x_next, (x, x0)

  return _run(body, x_0, (ts.astype(np.float32), alpha_from), ts, 0, return_trajectory)


# -- DDPM ------------------------------------------------------------------------------------------

def ddpm_step(s: NoiseSchedule, model_output, x_t, t, alpha_prev, noise=None):
  """One ancestral step (DDPMScheduler, variance 'fixed_small'). Returns (x_prev, pred_x0)."""
  ab = s.alpha_cumprod_at(t)
  x0, _ = s.split_prediction(model_output, x_t, t, ab)
  x0 = _clip(s, x0)
  alpha_t = ab / alpha_prev
  beta_t = 1 - alpha_t
  mean = (jnp.sqrt(alpha_prev) * beta_t / (1 - ab)) * x0 + (jnp.sqrt(alpha_t) * (1 - alpha_prev) / (1 - ab)) * x_t
  if noise is None:
    return mean, x0
  variance = jnp.maximum((1 - alpha_prev) / (1 - ab) * beta_t, 1e-20)
  return mean + jnp.sqrt(variance) * noise, x0


def ddpm(eps_fn: EpsFn, x_T, schedule: NoiseSchedule, num_steps: int, *, key=None,
         eta: float = 1.0, first_step: int = 0, return_trajectory: bool = False):
  """Ancestral sampling (arXiv 2006.11239) on diffusers' DDPMScheduler timesteps for `num_steps`;
  each step goes to the next timestep of the list (the last to alpha_bar = 1), no noise at t = 0.
  Stochastic: needs `key`; `eta` is fixed at 1 (full ancestral noise)."""
  s = schedule
  _check_x(x_T)
  _check_eta(eta, 'ddpm', only=1.0)
  ts = s.inference_timesteps(num_steps)
  ac = _table(s)
  prev = np.append(ts[1:], -1)
  alpha_prev = np.where(prev >= 0, ac[np.clip(prev, 0, None)], 1.0).astype(np.float32)
  noises = _noise(key, num_steps, x_T.shape, x_T.dtype)
  add_noise = jnp.asarray(ts > 0, x_T.dtype)

  def body(x, inp):
    t, a_prev, noise, gate = inp
    x_prev, x0 = ddpm_step(s, eps_fn(x, t), x, t, a_prev, noise * gate)
    return x_prev, (x, x0)

  return _run(body, x_T, (ts.astype(np.float32), alpha_prev, noises, add_noise), ts, first_step,
              return_trajectory)


# -- samplers in VE noise levels: Euler and DPM-Solver++(2M) ---------------------------------------

def _interp_sigmas(s: NoiseSchedule, ts: np.ndarray) -> np.ndarray:
  """sigma(t) interpolated linearly in t (diffusers), then sigma = 0 appended for the last step."""
  # numpy from the table (not `s.sigmas`, a jnp expression) so grids build inside jit too.
  ab = np.maximum(_table(s), np.float32(2.0 ** -24))
  sig = np.sqrt((1 - ab) / ab)
  return np.append(np.interp(ts, np.arange(len(sig)), sig), 0.0).astype(np.float32)


def euler_timesteps(s: NoiseSchedule, num_steps: int) -> np.ndarray:
  """EulerDiscreteScheduler's (float) timesteps."""
  check_num_steps(num_steps, s.num_train_timesteps)
  n, T = num_steps, s.num_train_timesteps
  if s.timestep_spacing == 'linspace':
    return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
  if s.timestep_spacing == 'leading':
    return ((np.arange(0, n) * (T // n)).round()[::-1] + s.steps_offset).astype(np.float32)
  return (np.arange(T, 0, -T / n).round() - 1).astype(np.float32)


def euler(eps_fn: EpsFn, x_T, schedule: NoiseSchedule, num_steps: int, *, key=None,
          eta: float = 0.0, first_step: int = 0, return_trajectory: bool = False):
  """Euler's method on the probability-flow ODE in sigma (EulerDiscreteScheduler, no churn).
  Deterministic: `key` is unused and `eta` must be 0."""
  s = schedule
  _check_x(x_T)
  _check_eta(eta, 'euler', only=0.0)
  ts = euler_timesteps(s, num_steps)
  sigmas = _interp_sigmas(s, ts)
  if first_step:  # x_T is the VP x_t at ts[first_step]: move it to the VE scale
    init = np.sqrt(sigmas[first_step] ** 2 + 1)
  else:  # diffusers' init_noise_sigma
    init = sigmas.max() if s.timestep_spacing in ('linspace', 'trailing') else np.sqrt(
        sigmas.max() ** 2 + 1)

  def body(x, inp):
    t, sigma, sigma_next = inp
    ab = 1.0 / (1.0 + sigma ** 2)
    x_in = x * jnp.sqrt(ab)  # the VP x_t the model was trained on
    x0, _ = s.split_prediction(eps_fn(x_in, t), x_in, t, ab)
    x_next = x + (x - x0) / sigma * (sigma_next - sigma)
    return x_next, (x_in, x0)

  return _run(body, x_T * jnp.asarray(init, x_T.dtype), (ts, sigmas[:-1], sigmas[1:]), ts,
              first_step, return_trajectory)


def dpm_solver_timesteps(s: NoiseSchedule, num_steps: int) -> np.ndarray:
  """DPMSolverMultistepScheduler's integer timesteps (no lambda clipping)."""
  check_num_steps(num_steps, s.num_train_timesteps)
  n, T = num_steps, s.num_train_timesteps
  if s.timestep_spacing == 'linspace':
    ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
  elif s.timestep_spacing == 'leading':
    ts = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1] + s.steps_offset
  else:
    ts = np.arange(T, 0, -T / n).round() - 1
  return ts.astype(np.int64).copy()


def dpmpp_2m(eps_fn: EpsFn, x_T, schedule: NoiseSchedule, num_steps: int, *, key=None,
             eta: float = 0.0, first_step: int = 0, return_trajectory: bool = False):
  """DPM-Solver++(2M) (arXiv 2211.01095), data prediction, midpoint form, first order at the first
  and the last step (diffusers' defaults: lower_order_final, final sigma 0). Deterministic: `key`
  is unused and `eta` must be 0."""
  s = schedule
  _check_x(x_T)
  _check_eta(eta, 'dpmpp_2m', only=0.0)
  ts = dpm_solver_timesteps(s, num_steps)
  sigmas = _interp_sigmas(s, ts).astype(np.float64)
  alphas = 1.0 / np.sqrt(sigmas ** 2 + 1.0)
  with np.errstate(divide='ignore'):
    lambdas = np.log(alphas) - np.log(sigmas * alphas)  # +inf at the final sigma = 0
  idx = np.arange(num_steps)
  h = lambdas[idx + 1] - lambdas[idx]
  second = (idx > first_step) & (idx < num_steps - 1)  # first order at the first and last step
  r0 = np.where(second, (lambdas[idx] - lambdas[np.maximum(idx - 1, 0)]) / np.where(h == 0, 1, h), 1)
  # x_{i+1} = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1} (e^{-h} - 1) (D0 + [second] D1 / 2)
  ratio = np.where(np.isinf(h), 0.0, (sigmas[idx + 1] * alphas[idx + 1]) / (sigmas[idx] * alphas[idx]))
  coef = -alphas[idx + 1] * np.expm1(-h)
  f32 = lambda a: jnp.asarray(a, jnp.float32)

  def body(carry, inp):
    x, x0_prev = carry
    t, sigma, ratio_i, coef_i, second_i, r0_i = inp
    ab = 1.0 / (1.0 + sigma ** 2)
    x0, _ = s.split_prediction(eps_fn(x, t), x, t, ab)
    d = x0 + second_i * 0.5 * (x0 - x0_prev) / r0_i
    return (ratio_i * x + coef_i * d, x0), (x, x0)

  return _run(body, (x_T, jnp.zeros_like(x_T)),
              tuple(map(f32, (ts, sigmas[:-1], ratio, coef, second, r0))), ts, first_step,
              return_trajectory)


SAMPLERS = {'ddim': ddim, 'ddpm': ddpm, 'euler': euler, 'dpmpp_2m': dpmpp_2m}


def timesteps(name: str, s: NoiseSchedule, num_steps: int) -> np.ndarray:
  """The timestep grid sampler `name` uses for `num_steps` (what `first_step` indexes)."""
  if name == 'euler':
    return euler_timesteps(s, num_steps)
  if name == 'dpmpp_2m':
    return dpm_solver_timesteps(s, num_steps)
  return s.inference_timesteps(num_steps)


def sample(name: str, eps_fn: EpsFn, x_T, schedule: NoiseSchedule, num_steps: int, *, key=None,
           eta: float | None = None, first_step: int = 0, return_trajectory: bool = False):
  """The sampler called `name` (for configs and binaries): they share one signature. `eta` None
  is the sampler's own (ddim 0, ddpm 1, euler and dpmpp_2m 0, the only values the last three
  take)."""
  if name not in SAMPLERS:
    raise ValueError(f'unknown sampler {name!r}; supported: {sorted(SAMPLERS)}')
  eta = {} if eta is None else {'eta': eta}
  return SAMPLERS[name](eps_fn, x_T, schedule, num_steps, key=key, first_step=first_step,
                        return_trajectory=return_trajectory, **eta)
