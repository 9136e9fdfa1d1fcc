"""Retraining many classifiers as one vmapped loop equals sequential retraining; ROAR's removal
against a brute-force loop; GOAR's steps are unit-length, covariant under rotations for gradient
attributions (so the sets of rotated data are the rotated sets); the synthetic generator's labels
and ground truth, and its rank correlation against scipy."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from diffgeo_jax.xai import attributions, goar, retrain, roar, synthetic


def _data(m, n=64, d=6, seed=0):
  rng = np.random.default_rng(seed)
  xs = rng.standard_normal((m, n, d)).astype(np.float32)
  ys = (xs[..., 0] + 0.5 * xs[..., 1] > 0).astype(np.int32)
  return xs, ys


def test_vmapped_retraining_equals_sequential():
  model = retrain.MLP(hidden=(16,), num_classes=2)
  xs, ys = _data(4)
  keys = jax.random.split(jax.random.key(0), 4)
  kw = dict(steps=30, batch_size=16, learning_rate=1e-2)
  many = retrain.train_many(model, xs, ys, keys, **kw)
  for m in range(4):
    one = retrain.train_one(model, xs[m], ys[m], keys[m], **kw)
    chex.assert_trees_all_close(jax.tree.map(lambda a: a[m], many), one, atol=1e-5, rtol=1e-5)
  acc = retrain.accuracy_many(model, many, xs, ys)
  assert acc.shape == (4,) and float(acc.min()) > 0.8  # it learned the linear rule


def test_retrain_and_test_layout():
  # (level, seed) -> model level * S + seed: each cell equals a model trained alone.
  model = retrain.MLP(hidden=(8,), num_classes=2)
  xs, ys = _data(2)
  acc = retrain.retrain_and_test(model, xs, ys[0], xs, ys[0], seeds=(3, 4), steps=10,
                                 batch_size=8)
  for level in range(2):
    for s, seed in enumerate((3, 4)):
      p = retrain.train_one(model, xs[level], ys[0], jax.random.key(seed), steps=10, batch_size=8)
      pred = jnp.argmax(model.apply({'params': p}, xs[level]), -1)
      np.testing.assert_allclose(acc[level, s], np.mean(np.asarray(pred) == ys[0]), atol=1e-6)


def test_roar_remove_matches_brute_force():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((5, 4, 4, 3)).astype(np.float32)
  a = rng.standard_normal(x.shape)
  fill = np.array([0.1, 0.2, 0.3], np.float32)  # per channel
  for fraction in (0.0, 0.1, 0.5, 1.0):
    got = roar.remove(x, a, fraction, fill)
    k = int(round(fraction * 48))
    for i in range(5):
      want = x[i].copy()
      order = np.argsort(-np.abs(a[i]).ravel(), kind='stable')[:k]
      for flat in order:
        h, w, c = np.unravel_index(flat, x.shape[1:])
        want[h, w, c] = fill[c]
      np.testing.assert_array_equal(got[i], want)
  assert roar.removal_sets(x, a, (0.1, 0.9), fill).shape == (2,) + x.shape
  with pytest.raises(ValueError, match='same shape'):
    roar.remove(x, a[:2], 0.1, fill)


def test_goar_steps_are_unit_and_covariant_under_rotation():
  rng = np.random.default_rng(2)
  d = 6
  x = rng.standard_normal((8, d)).astype(np.float32)
  y = rng.integers(0, 2, 8)
  a = rng.standard_normal((8, d)).astype(np.float32)
  moved = goar.step(x, a, 0.7)
  np.testing.assert_allclose(np.linalg.norm(moved - x, axis=1), 0.7, rtol=1e-5)
  np.testing.assert_allclose(goar.step(x, np.zeros_like(a), 0.7), x)
  # A nonlinear model on rotated data, f_R(z) = f(R^T z): its gradient is R grad f, so GOAR's
  # sets of the rotated samples are the rotated sets (ROAR's removal is not).
  w1 = rng.standard_normal((d, 8)).astype(np.float32)
  w2 = rng.standard_normal((8, 2)).astype(np.float32)
  f = lambda z: jnp.tanh(z @ w1) @ w2
  r = np.linalg.qr(rng.standard_normal((d, d)))[0].astype(np.float32)
  f_rot = lambda z: f(z @ r)  # rows: z = x R^T, so z R = x
  grad = lambda fn: (lambda xx, yy, k: np.asarray(attributions.attribute('gradient', fn, xx, yy)))
  sets = goar.perturbation_sets(x, y, grad(f), 0.5, 3)
  sets_rot = goar.perturbation_sets(x @ r.T, y, grad(f_rot), 0.5, 3)
  np.testing.assert_allclose(sets_rot, sets @ r.T, atol=1e-5)
  fill = np.zeros(d, np.float32)
  a0 = grad(f)(x, y, 0)
  assert not np.allclose(roar.remove(x @ r.T, a0 @ r.T, 0.5, fill),
                         roar.remove(x, a0, 0.5, fill) @ r.T, atol=1e-3)


def test_goar_projection_is_applied_each_level():
  x = np.ones((2, 3), np.float32)
  calls = []
  sets = goar.perturbation_sets(
      x, np.zeros(2), lambda xx, yy, k: np.ones_like(xx), 1.0, 2,
      project=lambda xx, k: calls.append(k) or np.clip(xx, 0.5, None))
  assert calls == [1, 2]
  np.testing.assert_allclose(sets[0], np.clip(1 - 1 / np.sqrt(3), 0.5, None))
  np.testing.assert_allclose(sets[1], 0.5)


def test_synthetic_labels_and_ground_truth():
  data = synthetic.gaussian_clusters(200, dims=10, num_clusters=4, seed=0)
  test = synthetic.gaussian_clusters(50, dims=10, num_clusters=4, seed=1, params_seed=0)
  assert data.x.shape == (800, 10) and np.array_equal(data.weights[::200], test.weights[::50])
  for k in range(4):
    rows = data.cluster == k
    assert 0.35 < data.y[rows].mean() < 0.65  # balanced within each cluster
    np.testing.assert_allclose(data.x[rows].mean(0), data.centres[k], atol=0.25)
    # The label is the sign of the offset's projection on the cluster's masked weights.
    off = data.x[rows] - data.centres[k]
    np.testing.assert_array_equal(data.y[rows], (off @ data.weights[rows][0] > 0))
  assert np.all((data.weights == 0) | (np.abs(data.weights) <= 1))


def test_rank_correlation_matches_scipy():
  rng = np.random.default_rng(3)
  a = rng.standard_normal((20, 9))
  g = rng.standard_normal((20, 9)) * (rng.random((20, 9)) < 0.5)  # ties at zero
  got = synthetic.rank_correlation(a, g)
  want = [scipy.stats.spearmanr(np.abs(a[i]), np.abs(g[i])).statistic for i in range(20)]
  np.testing.assert_allclose(got, want, atol=1e-12)
