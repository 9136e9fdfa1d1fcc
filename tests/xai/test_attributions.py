"""Attributions against closed forms on a linear model (logits = x W + c: gradient = W[:, y],
input x gradient = x * W[:, y], integrated gradients = (x - b) * W[:, y] exactly, SmoothGrad =
W[:, y] for any noise) and against central finite differences and completeness on a nonlinear
model; vmapped batches equal per-input calls, jit and no-jit."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffgeo_jax.xai import attributions

N, D, C = 6, 5, 3


def _linear():
  w = jax.random.normal(jax.random.key(0), (D, C))
  c = jax.random.normal(jax.random.key(1), (C,))
  return w, c, (lambda x: x @ w + c)


def _x():
  return jax.random.normal(jax.random.key(2), (N, D))


Y = jnp.array([0, 1, 2, 0, 1, 2])


class LinearModelTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_closed_forms(self):
    w, _, f = _linear()
    x = _x()
    wy = w[:, Y].T  # (N, D)
    for method, want in (('gradient', wy), ('input_x_gradient', x * wy),
                         ('integrated_gradients', x * wy), ('smoothgrad', wy)):
      fn = self.variant(lambda xx, yy, k, m=method: attributions.attribute(m, f, xx, yy, k))
      chex.assert_trees_all_close(fn(x, Y, jax.random.key(3)), want, atol=1e-5, rtol=1e-5)

  def test_integrated_gradients_from_a_baseline(self):
    w, _, f = _linear()
    x, b = _x(), jnp.full((D,), 0.3)
    got = attributions.attribute('integrated_gradients', f, x, Y, baseline=b, steps=4)
    chex.assert_trees_all_close(got, (x - b) * w[:, Y].T, atol=1e-5)

  def test_random_ignores_the_model_and_follows_the_key(self):
    _, _, f = _linear()
    x = _x()
    a = attributions.attribute('random', f, x, Y, jax.random.key(5))
    b = attributions.attribute('random', lambda z: 2 * f(z), x, Y, jax.random.key(5))
    chex.assert_trees_all_equal(a, b)
    assert not np.allclose(a, attributions.attribute('random', f, x, Y, jax.random.key(6)))


def _mlp():
  k1, k2 = jax.random.split(jax.random.key(7))
  w1 = jax.random.normal(k1, (D, 8)) / np.sqrt(D)
  w2 = jax.random.normal(k2, (8, C)) / np.sqrt(8)
  return lambda x: jnp.tanh(x @ w1) @ w2


def test_gradient_matches_central_differences_on_a_nonlinear_model():
  f = _mlp()
  x = np.asarray(_x(), np.float64)
  got = np.asarray(attributions.attribute('gradient', f, x, Y))
  h = 1e-3
  for i in range(N):
    for j in range(D):
      e = np.zeros(D)
      e[j] = h
      fd = (f(jnp.asarray(x[i] + e)[None])[0, Y[i]] - f(jnp.asarray(x[i] - e)[None])[0, Y[i]]) / (
          2 * h)
      np.testing.assert_allclose(got[i, j], fd, atol=2e-3)


def test_integrated_gradients_completeness():
  # sum_j IG_j = f_y(x) - f_y(baseline) as the path integral converges (midpoint rule).
  f = _mlp()
  x = _x()
  ig = attributions.attribute('integrated_gradients', f, x, Y, steps=256)
  want = f(x)[jnp.arange(N), Y] - f(jnp.zeros_like(x))[jnp.arange(N), Y]
  chex.assert_trees_all_close(ig.sum(axis=1), want, atol=1e-4)


def test_batched_equals_per_input():
  f = _mlp()
  x = _x()
  key = jax.random.key(9)
  keys = jax.random.split(key, N)
  for method in attributions.METHODS:
    batched = attributions.attribute(method, f, x, Y, key)
    fn = getattr(attributions, method)
    loop = jnp.stack([fn(f, x[i], Y[i], keys[i]) for i in range(N)])
    chex.assert_trees_all_close(batched, loop, atol=1e-6)


def test_errors():
  f = _mlp()
  with pytest.raises(ValueError, match='method must be one of'):
    attributions.attribute('lime', f, _x(), Y)
  with pytest.raises(ValueError, match='targets'):
    attributions.attribute('gradient', f, _x(), Y[:3])
  with pytest.raises(ValueError, match='needs a key'):
    attributions.attribute('smoothgrad', f, _x(), Y)
