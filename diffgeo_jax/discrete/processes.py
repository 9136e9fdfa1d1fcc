"""Continuous-time Markov chains over token sequences (SEDD / Jump Your Steps conventions).

    proc = processes.Absorbing(vocab_size=V)               # states 0..V-1 and MASK = V
    x_t = proc.sample(key, x0, t)                          # x0 int32 (B, L), t scalar or (B,)
    rates = proc.reverse_rates(x_t, t, probs)              # probs = p(x_0^i | x_t): (B, L, V)

Each token of a length-L sequence jumps independently under the forward rate R_t = sigma(t) Q,
where Q is the per-token base generator (rows: from, columns: to; rows sum to 0), and
sigma_bar(t) = int sigma is the schedule's total noise. Forward marginal per token:
q_t(x_t | x_0) = expm(sigma_bar(t) Q)[x_0, x_t]. Time runs from data (t = 0) to noise (t = 1).

The reverse rate to the Hamming-1 neighbour x^{i<-j} is (paper eq. 2)
    R~_t(x, x^{i<-j}) = sigma(t) Q[j, x_i] * q_t(x^{i<-j}) / q_t(x),
where the ratio is either given (score / ratio parameterisation, `reverse_rates_from_ratios`) or
computed from the per-position clean-token posterior p(x_0^i | x_t) (`ratios`, `reverse_rates`):
    q_t(x^{i<-j}) / q_t(x) = sum_a p(x_0^i = a | x) K_t[a, j] / K_t[a, x_i],  K_t = expm(sigma_bar Q).
Rates are returned per position as (..., L, S): entry [i, j] is the rate of token i jumping to
state j, and the diagonal [i, x_i] is minus the sum of the others.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


# -- noise schedules -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LogLinear:
  """SEDD's log-linear schedule: sigma_bar(t) = -log(1 - (1 - eps) t), so that an absorbing
  token is masked with probability exactly (1 - eps) t; sigma(t) = (1 - eps) / (1 - (1 - eps) t)."""
  eps: float = 1e-3

  def __post_init__(self):
    if not 0.0 <= self.eps < 1.0:
      raise ValueError(f'eps must be in [0, 1), got {self.eps!r}')

  def total(self, t) -> jax.Array:
    """sigma_bar(t)."""
    return -jnp.log1p(-(1 - self.eps) * jnp.asarray(t, jnp.float32))

  def rate(self, t) -> jax.Array:
    """sigma(t) = d sigma_bar / dt."""
    return (1 - self.eps) / (1 - (1 - self.eps) * jnp.asarray(t, jnp.float32))


@dataclasses.dataclass(frozen=True)
class Geometric:
  """SEDD's geometric schedule: sigma_bar(t) = sigma_min^(1-t) sigma_max^t,
  sigma(t) = sigma_bar(t) log(sigma_max / sigma_min). Note sigma_bar(0) = sigma_min > 0."""
  sigma_min: float = 1e-4
  sigma_max: float = 20.0

  def __post_init__(self):
    if not 0.0 < self.sigma_min < self.sigma_max:
      raise ValueError('need 0 < sigma_min < sigma_max, got '
                       f'sigma_min={self.sigma_min!r}, sigma_max={self.sigma_max!r}')

  def total(self, t) -> jax.Array:
    t = jnp.asarray(t, jnp.float32)
    return self.sigma_min ** (1 - t) * self.sigma_max ** t

  def rate(self, t) -> jax.Array:
    return self.total(t) * float(np.log(self.sigma_max / self.sigma_min))


Schedule = LogLinear | Geometric


# -- helpers ---------------------------------------------------------------------------------------

def _check_tokens(x, name, num_states):
  if not hasattr(x, 'shape') or x.ndim < 1:
    raise ValueError(f'{name} must be an integer array of shape (..., L), got {type(x).__name__}')
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f'{name} must hold integer token ids, got dtype {x.dtype}')
  if not isinstance(x, jax.core.Tracer):
    xn = np.asarray(x)
    if xn.size and (xn.min() < 0 or xn.max() >= num_states):
      raise ValueError(f'{name} has token ids outside [0, {num_states}): '
                       f'min {xn.min()}, max {xn.max()}')


def _per_position(t, x):
  """t (scalar or x.shape[:-1]) -> float32 of shape x.shape[:-1] + (1,), broadcasting over L."""
  t = jnp.asarray(t, jnp.float32)
  if t.ndim > x.ndim - 1 or t.shape != x.shape[:t.ndim]:
    raise ValueError(f't must be a scalar or have a leading part of x.shape[:-1]={x.shape[:-1]} '
                     f'as its shape, got {t.shape}')
  t = t.reshape(t.shape + (1,) * (x.ndim - 1 - t.ndim))
  return jnp.broadcast_to(t, x.shape[:-1])[..., None]


def _check_last(a, name, size, x):
  if not hasattr(a, 'shape') or a.shape != x.shape + (size,):
    raise ValueError(f'{name} must have shape x_t.shape + ({size},) = {x.shape + (size,)}, '
                     f'got {getattr(a, "shape", type(a).__name__)}')


def tau_leaping_probs(x_t, rates, dt) -> jax.Array:
  """Per-token Euler (tau-leaping) step probabilities onehot(x_t) + dt R~, negative mass clipped
  to 0 and renormalised (as SEDD's argmax(p / Exp(1)) draw does): at most one jump per token."""
  rates = jnp.asarray(rates)
  if rates.shape[:-1] != x_t.shape:
    raise ValueError(f'rates must have shape x_t.shape + (S,), got {rates.shape} for x_t '
                     f'{x_t.shape}')
  dt = _per_position(dt, x_t)[..., None]
  p = jax.nn.one_hot(x_t, rates.shape[-1], dtype=rates.dtype) + dt * rates
  p = jnp.maximum(p, 0.0)
  return p / jnp.sum(p, -1, keepdims=True)


# -- processes -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Process:
  vocab_size: int
  schedule: Schedule = LogLinear()

  def __post_init__(self):
    if not isinstance(self.vocab_size, (int, np.integer)) or isinstance(self.vocab_size, bool) \
        or self.vocab_size < 2:
      raise ValueError(f'vocab_size must be an integer >= 2, got {self.vocab_size!r}')
    if not isinstance(self.schedule, (LogLinear, Geometric)):
      raise ValueError(f'schedule must be LogLinear or Geometric, got {self.schedule!r}')

  @property
  def num_states(self) -> int:
    """S: V + 1 (absorbing) or V (uniform)."""
    raise NotImplementedError

  def generator(self) -> np.ndarray:
    """The per-token base rate matrix Q (S, S), float64: Q[i, j] = rate i -> j, rows sum to 0."""
    raise NotImplementedError

  def transition_matrix(self, t, s=None) -> jax.Array:
    """K = expm((sigma_bar(t) - sigma_bar(s)) Q), (..., S, S) for t of shape (...): the per-token
    transition probabilities from time s to t >= s; s=None means from data (sigma_bar = 0)."""
    raise NotImplementedError

  def transition(self, x0, t) -> jax.Array:
    """q_t(x_t^i = . | x_0^i): (..., L, S) for x0 int (..., L) and t scalar or (...,)."""
    _check_tokens(x0, 'x0', self.num_states)
    k = self.transition_matrix(_per_position(t, x0))  # (..., 1, S, S)
    k = jnp.broadcast_to(k, x0.shape + k.shape[-2:])
    return jnp.take_along_axis(k, x0[..., None, None], axis=-2)[..., 0, :]

  def prior_sample(self, key, shape) -> jax.Array:
    """A draw from the t -> infinity limit: all MASK (absorbing) or uniform tokens."""
    raise NotImplementedError

  def sample(self, key, x0, t) -> jax.Array:
    """x_t ~ q_t(. | x0), one uniform per token drawn from `key` (see `add_noise`)."""
    _check_tokens(x0, 'x0', self.num_states)
    return self.add_noise(x0, t, jax.random.uniform(key, x0.shape))

  def add_noise(self, x0, t, u) -> jax.Array:
    """x_t from x0 and per-token uniforms u (same shape as x0). The same u at two times gives
    coupled samples (absorbing: the masks at s < t are a subset of those at t)."""
    raise NotImplementedError

  def ratios(self, x_t, t, probs) -> jax.Array:
    """q_t(x^{i<-j}) / q_t(x) (..., L, S) from the denoiser's p(x_0^i | x_t) (..., L, V)."""
    raise NotImplementedError

  def reverse_rates_from_ratios(self, x_t, t, ratios) -> jax.Array:
    """R~_t(x, x^{i<-j}) = sigma(t) Q[j, x_i] ratios[i, j] (j != x_i), diagonal = -sum: (..., L, S).
    Entries of `ratios` where Q[j, x_i] = 0 (and at j = x_i) are ignored."""
    _check_tokens(x_t, 'x_t', self.num_states)
    _check_last(ratios, 'ratios', self.num_states, x_t)
    sigma = self.schedule.rate(_per_position(t, x_t))[..., None]  # (..., 1, 1)
    q_into = jnp.asarray(self.generator().T, jnp.float32)[x_t]  # (..., L, S): Q[j, x_i]
    onehot = jax.nn.one_hot(x_t, self.num_states, dtype=jnp.float32)
    off = jnp.where(onehot > 0, 0.0, sigma * q_into * ratios)
    return off - onehot * jnp.sum(off, -1, keepdims=True)

  def reverse_rates(self, x_t, t, probs) -> jax.Array:
    """Reverse rates (..., L, S) from the denoiser's clean-token probabilities (..., L, V)."""
    return self.reverse_rates_from_ratios(x_t, t, self.ratios(x_t, t, probs))


@dataclasses.dataclass(frozen=True)
class Absorbing(_Process):
  """Mask diffusion: every token i < V jumps to MASK = V at rate sigma(t); Q = -I + 1 e_MASK^T
  on the real rows, MASK row zero. Keep probability e^{-sigma_bar(t)}; log-linear by default."""

  @property
  def num_states(self) -> int:
    return self.vocab_size + 1

  @property
  def mask_id(self) -> int:
    return self.vocab_size

  def generator(self) -> np.ndarray:
    q = -np.eye(self.num_states)
    q[:, self.mask_id] += 1.0
    q[self.mask_id] = 0.0
    return q

  def mask_prob(self, t) -> jax.Array:
    """m(t) = 1 - e^{-sigma_bar(t)}."""
    return -jnp.expm1(-self.schedule.total(t))

  def transition_matrix(self, t, s=None) -> jax.Array:
    d = self.schedule.total(t) - (0.0 if s is None else self.schedule.total(s))
    keep = jnp.exp(-d)[..., None, None]
    eye = jnp.eye(self.num_states, dtype=jnp.float32)
    to_mask = jnp.zeros_like(eye).at[:, self.mask_id].set(1.0)
    return jnp.where(jnp.arange(self.num_states)[:, None] == self.mask_id, eye,
                     keep * eye + (1 - keep) * to_mask)

  def prior_sample(self, key, shape) -> jax.Array:
    del key
    return jnp.full(shape, self.mask_id, jnp.int32)

  def add_noise(self, x0, t, u) -> jax.Array:
    _check_tokens(x0, 'x0', self.vocab_size)
    m = self.mask_prob(_per_position(t, x0))
    return jnp.where(u < m, self.mask_id, x0).astype(jnp.int32)

  def ratios(self, x_t, t, probs) -> jax.Array:
    """Masked token: p_j / (e^{sigma_bar} - 1) for real j, 1 for MASK. Clean token x_i: 1 at x_i,
    e^{sigma_bar} - 1 for MASK, 0 elsewhere (those never enter a reverse rate)."""
    _check_tokens(x_t, 'x_t', self.num_states)
    _check_last(probs, 'probs', self.vocab_size, x_t)
    em1 = jnp.expm1(self.schedule.total(_per_position(t, x_t)))[..., None]  # (..., 1, 1)
    masked = (x_t == self.mask_id)[..., None]
    onehot = jax.nn.one_hot(x_t, self.num_states, dtype=jnp.float32)
    at_mask = jnp.concatenate([probs / em1, jnp.ones_like(probs[..., :1])], -1)
    at_clean = onehot + em1 * jax.nn.one_hot(
        jnp.full_like(x_t, self.mask_id), self.num_states, dtype=jnp.float32)
    return jnp.where(masked, at_mask, at_clean)


@dataclasses.dataclass(frozen=True)
class Uniform(_Process):
  """Uniform diffusion: Q = 11^T / V - I; K_t = e^{-sigma_bar} I + (1 - e^{-sigma_bar}) 11^T / V."""

  @property
  def num_states(self) -> int:
    return self.vocab_size

  def generator(self) -> np.ndarray:
    v = self.vocab_size
    return np.full((v, v), 1.0 / v) - np.eye(v)

  def transition_matrix(self, t, s=None) -> jax.Array:
    d = self.schedule.total(t) - (0.0 if s is None else self.schedule.total(s))
    keep = jnp.exp(-d)[..., None, None]
    v = self.vocab_size
    return keep * jnp.eye(v, dtype=jnp.float32) + (1 - keep) / v

  def prior_sample(self, key, shape) -> jax.Array:
    return jax.random.randint(key, shape, 0, self.vocab_size, jnp.int32)

  def add_noise(self, x0, t, u) -> jax.Array:
    """Token resampled uniformly with probability m = 1 - e^{-sigma_bar}: new = floor(u V / m)."""
    _check_tokens(x0, 'x0', self.vocab_size)
    m = -jnp.expm1(-self.schedule.total(_per_position(t, x0)))
    new = jnp.minimum(jnp.floor(u / m * self.vocab_size), self.vocab_size - 1).astype(jnp.int32)
    return jnp.where(u < m, new, x0).astype(jnp.int32)

  def ratios(self, x_t, t, probs) -> jax.Array:
    """sum_a p(x_0^i = a | x) K_t[a, j] / K_t[a, x_i]."""
    _check_tokens(x_t, 'x_t', self.num_states)
    _check_last(probs, 'probs', self.vocab_size, x_t)
    k = self.transition_matrix(_per_position(t, x_t))  # (..., 1, V, V)
    k = jnp.broadcast_to(k, x_t.shape + k.shape[-2:])
    k_to_x = jnp.take_along_axis(k, x_t[..., None, None], axis=-1)[..., 0]  # (..., L, V_a)
    return jnp.einsum('...a,...aj->...j', probs / k_to_x, k)
