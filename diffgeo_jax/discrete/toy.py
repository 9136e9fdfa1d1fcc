"""Toy data whose distribution is enumerable, its exact denoiser, and the exact distribution a
tau-leaping sampler produces on a given array of times (for exact KL(data || sampled)).

    data = toy.markov(init, trans, length=3)                 # or toy.countdown(4, 3), toy.independent
    denoiser = data.denoiser(proc)                           # (x_t (B, L), t (B,)) -> (B, L, V)
    q = data.sampled_distribution(proc, times)               # (V^L,) over data.sequences
    toy.kl(data.probs, q)                                    # KL(data || sampled)

Small by design: the propagation holds a dense (S^L, S^L) step matrix, S = process.num_states.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from diffgeo_jax.discrete import processes

MAX_STATES = 5000  # S^L above this is refused by the dense propagation


def _all_sequences(num_states: int, length: int) -> np.ndarray:
  """All num_states^length sequences (N, L) int32, in C order (row n = np.unravel_index(n))."""
  return np.array(list(itertools.product(range(num_states), repeat=length)), np.int32).reshape(
      -1, length)


def kl(p, q) -> float:
  """KL(p || q) in nats over a common enumeration; inf where q = 0 < p."""
  p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
  if p.shape != q.shape:
    raise ValueError(f'p and q must have the same shape, got {p.shape} and {q.shape}')
  s = p > 0
  if np.any(q[s] <= 0):
    return float('inf')
  return float(np.sum(p[s] * (np.log(p[s]) - np.log(q[s]))))


@dataclasses.dataclass(frozen=True, eq=False)
class ToyData:
  """A distribution over sequences of length L with tokens in [0, V): `table` of shape (V,)*L."""
  table: np.ndarray

  def __post_init__(self):
    t = np.asarray(self.table, np.float64)
    if t.ndim < 1 or len(set(t.shape)) != 1 or t.shape[0] < 2:
      raise ValueError(f'table must have shape (V,)*L with V >= 2, got {t.shape}')
    if np.any(t < 0) or not np.isclose(t.sum(), 1.0, atol=1e-9):
      raise ValueError(f'table must be non-negative and sum to 1, got sum {t.sum()}')
    object.__setattr__(self, 'table', t / t.sum())

  @property
  def vocab_size(self) -> int:
    return self.table.shape[0]

  @property
  def length(self) -> int:
    return self.table.ndim

  @property
  def probs(self) -> np.ndarray:
    """p_data over `sequences`, (V^L,) float64."""
    return self.table.reshape(-1)

  @property
  def sequences(self) -> np.ndarray:
    """All V^L clean sequences (V^L, L) int32, aligned with `probs`."""
    return _all_sequences(self.vocab_size, self.length)

  def marginals(self) -> np.ndarray:
    """Per-position marginals p(x^i) (L, V)."""
    return np.stack([self.table.sum(tuple(j for j in range(self.length) if j != i))
                     for i in range(self.length)])

  def sample(self, key, n: int) -> jax.Array:
    """n i.i.d. sequences (n, L) int32: the `data_sampler(key, n)` of the JYS contract."""
    idx = jax.random.choice(key, self.probs.size, (n,), p=jnp.asarray(self.probs, jnp.float32))
    return jnp.asarray(self.sequences)[idx]

  def _check_process(self, process):
    if not isinstance(process, processes._Process):
      raise ValueError(f'process must be processes.Absorbing or processes.Uniform, got {process!r}')
    if process.vocab_size != self.vocab_size:
      raise ValueError(f'process.vocab_size={process.vocab_size} differs from the data\'s '
                       f'vocab_size={self.vocab_size}')

  def denoiser(self, process):
    """The exact per-position posterior p(x_0^i | x_t) by enumeration:
    p(x_0 | x_t) is proportional to p_data(x_0) prod_i K_t[x_0^i, x_t^i]. For an x_t of data
    probability 0 the prior p_data is replaced by a uniform one (still defined, still jittable)."""
    self._check_process(process)
    seqs = jnp.asarray(self.sequences)  # (N, L)
    p0 = jnp.asarray(self.probs, jnp.float32)
    onehot = jax.nn.one_hot(seqs, self.vocab_size, dtype=jnp.float32)  # (N, L, V)

    def denoise(x_t, t):
      processes._check_tokens(x_t, 'x_t', process.num_states)
      if x_t.shape[-1] != self.length:
        raise ValueError(f'x_t must have length L={self.length}, got shape {x_t.shape}')
      k = process.transition_matrix(processes._per_position(t, x_t)[..., 0])  # (..., S, S)
      # lik[..., n] = prod_i K[..., seqs[n, i], x_t[..., i]]
      cols = jnp.take_along_axis(k[..., None, :, :], x_t[..., :, None, None], axis=-1)[..., 0]
      lik = jnp.prod(cols[..., jnp.arange(self.length)[None, :], seqs], axis=-1)  # (..., N)
      w = p0 * lik
      # A state no data sequence can produce (reachable through the factorised steps): fall
      # back to a uniform prior over sequences, the limit of p_data + delta * uniform, delta -> 0.
      w = jnp.where(jnp.sum(w, -1, keepdims=True) > 0, w, lik)
      w = w / jnp.maximum(jnp.sum(w, -1, keepdims=True), 1e-30)
      return jnp.einsum('...n,nlv->...lv', w, onehot)

    return denoise

  def noisy_sequences(self, process) -> np.ndarray:
    """All S^L noisy sequences (S^L, L) int32, S = process.num_states."""
    self._check_process(process)
    return _all_sequences(process.num_states, self.length)

  def marginal(self, process, t) -> np.ndarray:
    """The exact q_t over `noisy_sequences(process)`, (S^L,) float64."""
    self._check_process(process)
    k = np.asarray(process.transition_matrix(jnp.asarray(t, jnp.float32)), np.float64)
    k = k[:self.vocab_size]  # from clean tokens only
    q = self.table
    for i in range(self.length):  # apply K along axis i
      q = np.moveaxis(np.tensordot(q, k, axes=([i], [0])), -1, i)
    return q.reshape(-1)

  def _check_steps(self, process, times, method):
    self._check_process(process)
    from diffgeo_jax.discrete import samplers  # noqa: PLC0415 (samplers imports nothing of toy)
    times = samplers.check_times(times)
    if method not in samplers.STEP_PROBS:
      raise ValueError(f'method must be one of {tuple(samplers.STEP_PROBS)}, got {method!r}')
    states = self.noisy_sequences(process)
    if states.shape[0] > MAX_STATES:
      raise ValueError(f'S^L = {states.shape[0]} noisy sequences exceed MAX_STATES={MAX_STATES}')
    return times, samplers.STEP_PROBS[method], states

  def _factorised(self, per_token, targets) -> np.ndarray:
    """M[x, y] = prod_i per_token[x, i, targets[y, i]]: a factorised step as a dense matrix."""
    per_token = np.asarray(per_token, np.float64)
    m = np.ones((per_token.shape[0], targets.shape[0]))
    for i in range(self.length):
      m *= per_token[:, i, :][:, targets[:, i]]
    return m

  def _step_matrices(self, process, times, method):
    """The sampler's dense step matrices (S^L, S^L) per step, then the final denoising call's
    (S^L, V^L), or, with no noise left at t_N (no call, as `samplers.sample` does), the map of
    the clean states onto `sequences`."""
    from diffgeo_jax.discrete import samplers  # noqa: PLC0415
    times, step_probs, states = self._check_steps(process, times, method)
    denoise = jax.jit(self.denoiser(process))
    xs = jnp.asarray(states)
    ones = jnp.ones((states.shape[0],), jnp.float32)
    for t, s in zip(times[:-1], times[1:]):
      probs = denoise(xs, t * ones)
      yield self._factorised(step_probs(process, xs, t * ones, s * ones, probs), states)
    if samplers.needs_final_denoise(process, times[-1]):
      yield self._factorised(denoise(xs, times[-1] * ones), self.sequences)
    else:  # every state reachable at t = 0 is clean: read it off as a clean sequence
      clean = np.all(states < self.vocab_size, axis=1)
      m = np.zeros((states.shape[0], self.probs.size))
      m[np.flatnonzero(clean), np.ravel_multi_index(states[clean].T, self.table.shape)] = 1.0
      yield m

  def sampled_distribution(self, process, times, start: str = 'prior',
                           method: str = 'euler') -> np.ndarray:
    """The exact distribution (V^L,) over `sequences` of `samplers.sample(method=...)` on `times`
    (t_0 > t_1 > ... > t_N) with the exact denoiser: N steps, each token drawn independently from
    the method's per-token step probabilities, then (when t_N > 0) the final denoising call (every
    token from p(x_0^i | x_{t_N})) unless sigma_bar(t_N) = 0. start: 'prior' (all MASK / uniform tokens) or 'marginal'
    (the exact q_{t_0})."""
    if start not in ('prior', 'marginal'):
      raise ValueError(f"start must be 'prior' or 'marginal', got {start!r}")
    times, _, states = self._check_steps(process, times, method)
    if start == 'marginal':
      q = self.marginal(process, times[0])
    elif isinstance(process, processes.Absorbing):
      q = np.zeros(states.shape[0])
      q[-1] = 1.0  # all MASK is the last sequence in C order
    else:
      q = np.full(states.shape[0], 1.0 / states.shape[0])
    for m in self._step_matrices(process, times, method):
      q = q @ m
    return q

  def cde(self, process, times) -> np.ndarray:
    """The exact compounding decoding error of every parallel step (paper eq. 3-5): for each step
    t_i -> t_{i+1} (and t_N -> 0 when t_N > 0), E_{x ~ q_{t_i}} of the total correlation of the TRUE
    one-step distribution q(x_{t_{i+1}} | x_{t_i} = x) -- the KL between it and the product of its
    per-token marginals. Returns (N,) or (N + 1,) nats; Theorem 3.1: KL(data || sampled) <= sum,
    for a sampler with exact per-token steps (`method='tweedie'`, start='marginal')."""
    times, _, states = self._check_steps(process, times, 'tweedie')
    if times[-1] > 0:
      times = np.append(times, 0.0)
    s_num = process.num_states
    out = []
    for t, s in zip(times[:-1], times[1:]):
      joint = self._true_step(process, states, t, s)  # (S^L at t, S^L at s)
      p_t = joint.sum(1)
      cond = joint / np.where(p_t > 0, p_t, 1.0)[:, None]
      # per-token marginals of the conditional, then their product over all sequences at s
      marg = np.stack([np.stack([cond[:, states[:, i] == j].sum(1) for j in range(s_num)], 1)
                       for i in range(self.length)], 1)  # (S^L, L, S)
      prod = self._factorised(marg, states)
      nz = cond > 0
      log_ratio = np.zeros_like(cond)
      log_ratio[nz] = np.log(cond[nz]) - np.log(prod[nz])
      out.append(float(np.sum(p_t[:, None] * cond * log_ratio)))
    return np.array(out)

  def _true_step(self, process, states, t, s) -> np.ndarray:
    """The exact joint q(x_t, x_s) over (S^L, S^L) for t > s: sum over x_0 of
    p(x_0) K_s(x_0 -> x_s) K_{s->t}(x_s -> x_t)."""
    k_st = np.asarray(process.transition_matrix(jnp.float32(t), jnp.float32(s)), np.float64)
    q_s = self.marginal(process, s)
    fwd = self._factorised(k_st[states], states)  # (x_s, x_t): prod_i K_{s->t}[x_s^i, x_t^i]
    return (q_s[:, None] * fwd).T  # rows x_t, columns x_s


def independent(marginals) -> ToyData:
  """Independent tokens with per-position marginals (L, V)."""
  m = np.asarray(marginals, np.float64)
  if m.ndim != 2 or m.shape[1] < 2 or np.any(m < 0) or not np.allclose(m.sum(1), 1):
    raise ValueError(f'marginals must be (L, V) rows of probabilities, got shape {m.shape}')
  table = m[0]
  for row in m[1:]:
    table = np.multiply.outer(table, row)
  return ToyData(table)


def markov(init, trans, length: int) -> ToyData:
  """A Markov chain: x^1 ~ init (V,), x^{i+1} ~ trans[x^i] (V, V)."""
  init, trans = np.asarray(init, np.float64), np.asarray(trans, np.float64)
  v = init.shape[0] if init.ndim == 1 else -1
  if v < 2 or trans.shape != (v, v) or not np.allclose(trans.sum(1), 1) or np.any(trans < 0):
    raise ValueError(f'need init (V,) and row-stochastic trans (V, V), got {init.shape}, '
                     f'{trans.shape}')
  if not isinstance(length, int) or length < 1:
    raise ValueError(f'length must be a positive integer, got {length!r}')
  table = init
  for _ in range(length - 1):
    table = table[..., :, None] * trans
  return ToyData(table)


def countdown(vocab_size: int, length: int) -> ToyData:
  """Mini-Countdown: x^1 uniform; x^{i+1} = x^i - 1 if x^i > 0, else uniform again."""
  if not isinstance(vocab_size, int) or vocab_size < 2:
    raise ValueError(f'vocab_size must be an integer >= 2, got {vocab_size!r}')
  trans = np.zeros((vocab_size, vocab_size))
  trans[0] = 1.0 / vocab_size
  trans[np.arange(1, vocab_size), np.arange(vocab_size - 1)] = 1.0
  return markov(np.full(vocab_size, 1.0 / vocab_size), trans, length)
