"""Countdown, the token dataset of Jump Your Steps' trained model (the digits as tokens, the other
trained task, live in the digits world: `digits.digit_tokens`).

    x = data.countdown(np.random.default_rng(0), n, length=64, vocab_size=32)   # (n, L) int32
    data.countdown_errors(x)                  # violation rate of "next = prev - 1 unless prev = 0"

Countdown (Jump Your Steps, Sec. 5): repeated countdowns start, start - 1, ..., 0 with uniform
starts, truncated to the length; a Markov chain, so its exact posterior given any mask pattern
(`countdown_posterior`) and its entropy (`countdown_entropy`) are cheap: the Bayes limits of a
trained denoiser.
"""

from __future__ import annotations


import numpy as np



# -- Countdown -------------------------------------------------------------------------------------

def _check_int(value, name, low):
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
    raise ValueError(f'{name} must be an integer >= {low}, got {value!r}')


def countdown(rng: np.random.Generator, n: int, length: int, vocab_size: int) -> np.ndarray:
  """(n, length) int32 Countdown sequences: repeat {start ~ U{0..V-1}; start, start - 1, ..., 0},
  truncated to `length`. A function of `rng`'s state alone (the official code uses an unseeded
  `random`); drawn as the equivalent Markov chain, one column at a time."""
  if not isinstance(rng, np.random.Generator):
    raise ValueError(f'rng must be a numpy Generator, got {type(rng).__name__}')
  _check_int(n, 'n', 0)
  _check_int(length, 'length', 1)
  _check_int(vocab_size, 'vocab_size', 2)
  starts = rng.integers(0, vocab_size, (n, length))  # column k: the start used if one is due at k
  x = np.empty((n, length), np.int32)
  x[:, 0] = starts[:, 0]
  for k in range(1, length):
    prev = x[:, k - 1]
    x[:, k] = np.where(prev > 0, prev - 1, starts[:, k])
  return x


def _check_sequences(x, name='x') -> np.ndarray:
  x = np.asarray(x)
  if x.ndim != 2 or x.shape[1] < 2 or not np.issubdtype(x.dtype, np.integer):
    raise ValueError(f'{name} must be integer sequences of shape (n, L) with L >= 2, got '
                     f'{x.shape} {x.dtype}')
  return x


def countdown_errors(x) -> float:
  """The Countdown error rate: over transitions i = 1..L-1, x[i] != x[i-1] - 1 where x[i-1] > 0
  is an error (after a 0 any token may follow); errors / (n (L - 1)). Tokens are compared as
  integers: a leftover MASK (= V) is an error wherever it is checked."""
  x = _check_sequences(x).astype(np.int64)
  prev, cur = x[:, :-1], x[:, 1:]
  return float(np.mean((prev > 0) & (cur != prev - 1)))


def countdown_errors_official(x) -> float:
  """The official metric (`check_err` + `count_err_fn` of sony/jys dataset.py, read at commit
  edd7c07), re-implemented from its logic: the first token counts as correct; then, for each next
  token, if the previous number is 0 the token counts as correct and becomes the previous number;
  otherwise it is checked against previous - 1 and the previous number is RESET TO 0, so the token
  after a checked one is never checked. Only about every other transition is tested and errors
  are undercounted. Rate per sequence = wrong checked tokens / L (the first token included in L),
  averaged over sequences."""
  x = _check_sequences(x).astype(np.int64)
  prev = x[:, 0]
  errors = np.zeros(len(x), np.int64)
  for k in range(1, x.shape[1]):
    cur = x[:, k]
    checked = prev != 0
    errors += checked & (cur != prev - 1)
    prev = np.where(checked, 0, cur)
  return float(np.mean(errors / x.shape[1]))


def countdown_chain(vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(initial (V,), transition (V, V)) of the Countdown Markov chain: uniform start; from k > 0
  to k - 1; from 0 to a uniform start."""
  _check_int(vocab_size, 'vocab_size', 2)
  trans = np.zeros((vocab_size, vocab_size))
  trans[0] = 1.0 / vocab_size
  trans[np.arange(1, vocab_size), np.arange(vocab_size - 1)] = 1.0
  return np.full(vocab_size, 1.0 / vocab_size), trans


def countdown_entropy(length: int, vocab_size: int) -> float:
  """Exact entropy of a Countdown sequence in nats: log V for the first token and for every
  token after a 0 (the only random choices). The per-token value entropy / L is the Bayes limit
  of an ELBO in nats per token."""
  _check_int(length, 'length', 1)
  init, trans = countdown_chain(vocab_size)
  p, zeros = init, 0.0
  for _ in range(length - 1):
    zeros += p[0]
    p = p @ trans
  return float((1.0 + zeros) * np.log(vocab_size))


def countdown_posterior(x_t, vocab_size: int) -> np.ndarray:
  """Exact p(x_0^i | x_t) (n, L, V), float64, for Countdown data under absorbing noise: x_t holds
  clean tokens or MASK (= V), and a mask carries no information about the value, so this is
  forward-backward on the chain with each clean token an exact observation. The Bayes-optimal
  denoiser: its masked cross-entropy and accuracy are the limits a trained model approaches."""
  x = _check_sequences(x_t, 'x_t')
  if x.min() < 0 or x.max() > vocab_size:
    raise ValueError(f'x_t must hold tokens in [0, {vocab_size}] (MASK = {vocab_size}), got '
                     f'min {x.min()}, max {x.max()}')
  init, trans = countdown_chain(vocab_size)
  n, length = x.shape
  obs = np.where((x == vocab_size)[..., None], 1.0,
                 np.arange(vocab_size)[None, None] == x[..., None]).astype(np.float64)
  alpha = np.empty((n, length, vocab_size))
  a = init[None] * obs[:, 0]
  for k in range(length):
    if k:
      a = (a @ trans) * obs[:, k]
    a = a / np.maximum(a.sum(-1, keepdims=True), 1e-300)
    alpha[:, k] = a
  beta = np.ones((n, vocab_size))
  post = np.empty_like(alpha)
  for k in range(length - 1, -1, -1):
    p = alpha[:, k] * beta
    post[:, k] = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
    beta = trans @ (obs[:, k] * beta).T
    beta = beta.T / np.maximum(beta.T.sum(-1, keepdims=True), 1e-300)
  return post
