"""Countdown: the generator, the correct and official error checkers, the exact posterior and
entropy."""

import jax.numpy as jnp
import numpy as np
import pytest

from diffgeo_jax.discrete import data, processes, toy
from tests import report


def test_countdown_generator_is_seeded_valid_and_restarts_uniformly():
  x = data.countdown(np.random.default_rng(0), 2000, 64, 32)
  assert x.shape == (2000, 64) and x.dtype == np.int32
  assert x.min() == 0 and x.max() == 31
  np.testing.assert_array_equal(x, data.countdown(np.random.default_rng(0), 2000, 64, 32))
  assert not np.array_equal(x, data.countdown(np.random.default_rng(1), 2000, 64, 32))
  assert data.countdown_errors(x) == 0.0 and data.countdown_errors_official(x) == 0.0
  # Starts (first tokens and tokens after a 0) are uniform on 0..31.
  starts = np.concatenate([x[:, 0], x[:, 1:][x[:, :-1] == 0]])
  counts = np.bincount(starts, minlength=32)
  assert len(starts) > 5000 and counts.min() > 0.7 * len(starts) / 32
  with pytest.raises(ValueError, match='vocab_size must be an integer >= 2'):
    data.countdown(np.random.default_rng(0), 2, 8, 1)
  with pytest.raises(ValueError, match='rng must be a numpy Generator'):
    data.countdown(0, 2, 8, 4)


# A valid sequence 5 4 3 2 1 0 | 2 1 0 | 3 with three corruptions, hand-checked transition by
# transition (prev -> cur): (5,4) ok (4,3) ok (3,9) ERR (9,1) ERR (1,0) ok (0,2) free (2,1) ok
# (1,7) ERR (7,3) ERR: 4 errors over 9 transitions.
CORRUPTED = np.array([[5, 4, 3, 9, 1, 0, 2, 1, 7, 3]])


def test_countdown_errors_hand_counted():
  assert data.countdown_errors(CORRUPTED) == pytest.approx(4 / 9)
  two = np.concatenate([CORRUPTED, [[5, 4, 3, 2, 1, 0, 2, 1, 0, 3]]])
  assert data.countdown_errors(two) == pytest.approx(4 / 18)
  # The official check: 5 first (free); 4 checked ok, prev <- 0; 3 free, prev 3; 9 checked ERR,
  # prev <- 0; 1 free; 0 checked ok, prev <- 0; 2 free; 1 checked ok, prev <- 0; 7 free; 3 checked
  # ERR: 2 errors over L = 10.
  assert data.countdown_errors_official(CORRUPTED) == pytest.approx(2 / 10)
  with pytest.raises(ValueError, match=r'x must be integer sequences of shape \(n, L\)'):
    data.countdown_errors(np.zeros(5, np.int32))


def test_official_checker_undercounts_random_corruptions():
  rng = np.random.default_rng(3)
  x = data.countdown(rng, 500, 64, 32)
  for rate in (0.02, 0.1, 0.3):
    bad = x.copy()
    flip = rng.random(x.shape) < rate
    bad[flip] = (bad[flip] + rng.integers(1, 32, flip.sum())) % 32  # always a different token
    ours, official = data.countdown_errors(bad), data.countdown_errors_official(bad)
    report.record(f'countdown errors at corruption {rate}: correct / official',
                  f'{ours:.4f} / {official:.4f}')
    assert ours > 0 and official < 0.75 * ours  # about half the transitions are never checked


def test_countdown_posterior_and_entropy_match_the_enumerated_toy():
  v, length = 4, 5
  proc = processes.Absorbing(v)
  toy_data = toy.countdown(v, length)
  rng = np.random.default_rng(4)
  x0 = data.countdown(rng, 64, length, v)
  x_t = np.where(rng.random(x0.shape) < 0.6, v, x0).astype(np.int32)
  x_t[0] = v  # all masked: the marginals
  want = np.asarray(toy_data.denoiser(proc)(jnp.asarray(x_t), jnp.full((64,), 0.5)))
  np.testing.assert_allclose(data.countdown_posterior(x_t, v), want, atol=1e-6)
  p = toy_data.probs[toy_data.probs > 0]
  np.testing.assert_allclose(data.countdown_entropy(length, v), -np.sum(p * np.log(p)),
                             rtol=1e-12)
  # Long sequences: (1 + expected number of zeros before the last token) log V.
  assert data.countdown_entropy(64, 32) / 64 == pytest.approx(0.2443, abs=1e-4)
