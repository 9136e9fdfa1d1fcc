"""Samplers for discrete diffusion on an arbitrary array of times (uniform, JYS, anything).

    result = samplers.sample(key, denoiser, proc, times, shape=(B, L), method='euler')
    result.tokens  # (B, L) int32;  result.nfe: denoiser calls made (steps + final denoise)

`denoiser(x_t int32 (B, L), t float (B,)) -> p(x_0^i | x_t)` (B, L, V) is the one model contract.
`times` runs from noise to data, t_0 > t_1 > ... > t_N >= 0: N steps, each one denoiser call at the
step's start. Methods (paper Sec. 2, official `ddms/sedd.py`):
  euler     tau-leaping: every token jumps independently with probability dt R~_t (rates frozen at
            the step start; at most one jump per token, negative mass clipped as SEDD does).
  tweedie   the analytic step: every token independently from the exact per-token posterior
            q(x_s^i | x_t, x_0^i) averaged over p(x_0^i | x_t) -- accounts for the schedule over
            [s, t] instead of freezing the rate.
  gillespie k-Gillespie (absorbing only): step i unmasks exactly k_i tokens, chosen by the
            smallest exponential holding times of their total reverse rates, each drawn from its
            rate row; k_i follows the schedule: the masked count goes from round(L m(t_i)/m(t_0))
            to round(L m(t_{i+1})/m(t_0)).
The final denoising call (the official code's `if_last`) draws every token still masked / noisy
from p(x_0^i | x_{t_N}) at t_N. It is made by default only when there is noise left at t_N
(sigma_bar(t_N) > 0): with the log-linear schedule a last step that ends at t = 0 already unmasks
every token (its unmasking probability is 1), so a further call would cost an NFE and change
nothing. `nfe` counts every call honestly.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from diffgeo_jax.discrete import processes

METHODS = ('euler', 'tweedie', 'gillespie')


class SampleResult(NamedTuple):
  tokens: jax.Array  # (B, L) int32 in [0, V) (or MASK where final_denoise=False left some)
  nfe: int  # denoiser calls: len(times) - 1 steps, + 1 for the final denoising call


def check_times(times) -> np.ndarray:
  """`times` as a float64 array after checking it is 1-D, strictly decreasing, in [0, 1]."""
  t = np.asarray(times, np.float64)
  if t.ndim != 1 or t.size < 2:
    raise ValueError(f'times must be a 1-D array of >= 2 times (N steps need N + 1), got shape '
                     f'{t.shape}')
  if np.any(np.diff(t) >= 0):
    raise ValueError(f'times must be strictly decreasing (noise -> data), got {t}')
  if t[-1] < 0 or t[0] > 1:
    raise ValueError(f'times must lie in [0, 1], got [{t[-1]}, {t[0]}]')
  return t


def needs_final_denoise(process, t_last: float) -> bool:
  """Whether noise is left at t_last (sigma_bar(t_last) > 0), so that the final denoising call
  is needed to reach clean tokens."""
  return bool(float(process.schedule.total(t_last)) > 0)


def uniform_times(nfe: int, t_max: float = 1.0, t_min: float = 0.0) -> np.ndarray:
  """The uniform schedule: nfe + 1 equally spaced times from t_max down to t_min."""
  if not isinstance(nfe, (int, np.integer)) or nfe < 1:
    raise ValueError(f'nfe must be a positive integer, got {nfe!r}')
  return np.linspace(t_max, t_min, nfe + 1)


# -- one step's per-token probabilities ------------------------------------------------------------

def euler_probs(process, x_t, t, s, probs) -> jax.Array:
  """Tau-leaping from t to s < t: (..., L, S) per-token probabilities onehot + (t - s) R~_t."""
  rates = process.reverse_rates(x_t, t, probs)
  return processes.tau_leaping_probs(x_t, rates, t - s)


def tweedie_probs(process, x_t, t, s, probs) -> jax.Array:
  """The analytic step from t to s < t, per token:
      q(x_s = j | x_t) = sum_a p(x_0 = a | x_t) K_s[a, j] K_{s->t}[j, x_t] / K_t[a, x_t],
  the exact one-token posterior; the only approximation left is the factorisation across tokens."""
  t = processes._per_position(t, x_t)[..., 0]  # x.shape[:-1]
  s = processes._per_position(s, x_t)[..., 0]
  k_t = process.transition_matrix(t)[..., None, :, :]  # (..., 1, S, S)
  k_s = process.transition_matrix(s)[..., None, :, :]
  k_st = process.transition_matrix(t, s)[..., None, :, :]
  v = probs.shape[-1]
  shape = x_t.shape + k_t.shape[-2:]
  idx = jnp.broadcast_to(x_t[..., None, None], x_t.shape + (k_t.shape[-2], 1))
  to_x = jnp.take_along_axis(jnp.broadcast_to(k_t, shape), idx, -1)[..., :v, 0]  # K_t[a, x_t]
  into_x = jnp.take_along_axis(jnp.broadcast_to(k_st, shape), idx, -1)[..., 0]  # K_{s->t}[j, x_t]
  # a with K_t[a, x_t] = 0 cannot have produced x_t; the denoiser gives them p = 0.
  w = jnp.where(to_x > 0, probs / jnp.where(to_x > 0, to_x, 1.0), 0.0)  # (..., L, V)
  q = jnp.einsum('...a,...aj->...j', w, jnp.broadcast_to(k_s, shape)[..., :v, :]) * into_x
  return q / jnp.sum(q, -1, keepdims=True)


def denoise_probs(process, x_t, probs) -> jax.Array:
  """The final call: every token from p(x_0^i | x_t) (probabilities over the V real tokens)."""
  del process, x_t
  return probs


STEP_PROBS = {'euler': euler_probs, 'tweedie': tweedie_probs}


def masked_counts(process, times, length: int) -> np.ndarray:
  """k-Gillespie's target masked counts per time: round(L m(t) / m(t_0)), (N + 1,) int."""
  m = np.asarray(process.mask_prob(jnp.asarray(times, jnp.float32)), np.float64)
  return np.rint(length * m / m[0]).astype(np.int32)


# -- the loop ----------------------------------------------------------------------------------------

def _categorical(key, p):
  """One draw per row of p (..., K) (exact: argmax of log p + Gumbel; zero-mass entries never)."""
  return jax.random.categorical(key, jnp.where(p > 0, jnp.log(jnp.where(p > 0, p, 1.0)), -jnp.inf))


def _gillespie_step(key, process, x_t, t, probs, num_unmask):
  """Unmasks the `num_unmask` (B,) masked tokens with the smallest Exp(total rate) holding times."""
  rates = process.reverse_rates(x_t, t, probs)  # (B, L, S)
  masked = x_t == process.mask_id
  total = jnp.where(masked, -jnp.take_along_axis(rates, x_t[..., None], -1)[..., 0], 0.0)
  k_hold, k_draw = jax.random.split(key)
  hold = jax.random.exponential(k_hold, x_t.shape) / jnp.where(total > 0, total, 1.0)
  hold = jnp.where(masked & (total > 0), hold, jnp.inf)
  rank = jnp.argsort(jnp.argsort(hold, -1), -1)
  chosen = masked & (rank < num_unmask[:, None])
  off = jnp.where(jax.nn.one_hot(x_t, rates.shape[-1]) > 0, 0.0, jnp.maximum(rates, 0.0))
  # A chosen token whose rates all vanished (the model gives 0 everywhere) falls back to p.
  off = jnp.where(jnp.sum(off[..., :-1], -1, keepdims=True) > 0, off,
                  jnp.concatenate([probs, jnp.zeros_like(probs[..., :1])], -1))
  new = _categorical(k_draw, off[..., :-1])
  return jnp.where(chosen, new, x_t).astype(jnp.int32)


@functools.lru_cache(maxsize=64)
def _compiled(denoiser: Callable, process, method: str, final_denoise: bool):
  """The jit-compiled sampler for one (denoiser, process, method); times are a traced input."""

  def run(key, x, times, unmask):
    batch = x.shape[0]

    def step(x, inputs):
      t, s, k, n = inputs
      tb = jnp.full((batch,), t)
      probs = denoiser(x, tb)
      if method == 'gillespie':
        x = _gillespie_step(k, process, x, tb, probs, jnp.full((batch,), n))
      else:
        p = STEP_PROBS[method](process, x, tb, jnp.full((batch,), s), probs)
        x = _categorical(k, p).astype(jnp.int32)
      return x, None

    keys = jax.random.split(key, times.shape[0])
    x, _ = jax.lax.scan(step, x, (times[:-1], times[1:], keys[:-1], unmask))
    if final_denoise:
      probs = denoiser(x, jnp.full((batch,), times[-1]))
      drawn = _categorical(keys[-1], probs).astype(jnp.int32)
      if isinstance(process, processes.Absorbing):  # clean tokens stay (the denoiser agrees)
        drawn = jnp.where(x == process.mask_id, drawn, x)
      x = drawn
    return x

  return jax.jit(run)


def sample(key, denoiser: Callable, process, times, *, shape=None, x_init=None,
           method: str = 'euler', final_denoise: bool | None = None) -> SampleResult:
  """Samples on `times` (t_0 > ... > t_N) from `x_init` (B, L), or from the prior of `shape`.

  final_denoise: None (default) makes the final denoising call only when sigma_bar(t_N) > 0 (see
  the module docstring). For conditional generation by infilling, pass an `x_init` with the given tokens
  unmasked: absorbing samplers never change a clean token."""
  if method not in METHODS:
    raise ValueError(f'method must be one of {METHODS}, got {method!r}')
  if not isinstance(process, processes._Process):
    raise ValueError(f'process must be processes.Absorbing or processes.Uniform, got {process!r}')
  if method == 'gillespie' and not isinstance(process, processes.Absorbing):
    raise ValueError('method="gillespie" (k-Gillespie) needs an Absorbing process: the number of '
                     'jumps per step is the number of tokens unmasked')
  t = check_times(times)
  if (x_init is None) == (shape is None):
    raise ValueError('give exactly one of shape=(B, L) (start from the prior) or x_init')
  if x_init is None:
    if len(shape) != 2:
      raise ValueError(f'shape must be (B, L), got {shape!r}')
    key, k0 = jax.random.split(key)
    x_init = process.prior_sample(k0, tuple(shape))
  x_init = jnp.asarray(x_init)
  if x_init.ndim != 2:
    raise ValueError(f'x_init must have shape (B, L), got {x_init.shape}')
  processes._check_tokens(x_init, 'x_init', process.num_states)
  final = needs_final_denoise(process, t[-1]) if final_denoise is None else bool(final_denoise)
  unmask = np.zeros(t.size - 1, np.int32)
  if method == 'gillespie':
    counts = masked_counts(process, t, x_init.shape[1])
    unmask = -np.diff(counts)
  run = _compiled(denoiser, process, method, final)
  tokens = run(key, x_init.astype(jnp.int32), jnp.asarray(t, jnp.float32), jnp.asarray(unmask))
  return SampleResult(tokens, int(t.size - 1 + final))
