"""DECOR's algebra against closed forms: strength 0 is the identity, strength 1 leaves every row
orthogonal to the undesired rows (the debias_vl projector I - X~^T (X~ X~^T)^+ X~), strengths in
between interpolate linearly, batches equal loops; the decomposition reconstructs X and its
energies add up."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffgeo_jax.text import decor

L, M, D = 7, 3, 16


def _x(key, *shape):
  return jax.random.normal(jax.random.key(key), shape)


def _closed_form(x, xu, strength):
  """float64 numpy: X (I - strength * X~^T (X~ X~^T)^+ X~)."""
  x, xu = np.asarray(x, np.float64), np.asarray(xu, np.float64)
  p = xu.T @ np.linalg.pinv(xu @ xu.T) @ xu
  return x - strength * x @ p


class ProjectTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_closed_form_at_every_strength(self):
    x, xu = _x(0, L, D), _x(1, M, D)
    fn = self.variant(decor.project)
    for a in (0.0, 0.25, 0.5, 0.75, 1.0):
      chex.assert_trees_all_close(fn(x, xu, a), _closed_form(x, xu, a).astype(np.float32),
                                  atol=2e-5)

  def test_strength_zero_is_the_identity(self):
    x, xu = _x(0, L, D), _x(1, M, D)
    chex.assert_trees_all_equal(decor.project(x, xu, 0.0), x)

  def test_strength_one_is_orthogonal_to_the_undesired_rows(self):
    x, xu = _x(0, L, D), _x(1, M, D)
    out = decor.project(x, xu, 1.0)
    assert float(jnp.max(jnp.abs(out @ xu.T))) < 1e-4 * float(jnp.max(jnp.abs(x @ xu.T)))
    # What is left is X's component orthogonal to the row space: projecting again changes nothing.
    chex.assert_trees_all_close(decor.project(out, xu, 1.0), out, atol=1e-5)
    # The undesired text removed from itself leaves nothing.
    chex.assert_trees_all_close(decor.project(xu, xu, 1.0), jnp.zeros_like(xu), atol=1e-5)

  def test_intermediate_strengths_interpolate(self):
    x, xu = _x(0, L, D), _x(1, M, D)
    full = decor.project(x, xu, 1.0)
    for a in (0.25, 0.5, 0.75):
      chex.assert_trees_all_close(decor.project(x, xu, a), (1 - a) * x + a * full, atol=1e-5)

  def test_rank_deficient_undesired_text(self):
    # Repeated rows (PAD tokens are near copies): the basis keeps the true rank only.
    base = _x(1, 2, D)
    xu = jnp.concatenate([base, base, base[:1] * 2.0])
    v, keep = decor.undesired_basis(xu)
    assert int(keep.sum()) == 2
    x = _x(0, L, D)
    chex.assert_trees_all_close(decor.project(x, xu, 1.0),
                                _closed_form(x, base, 1.0).astype(np.float32), atol=2e-5)

  def test_top_rank(self):
    x, xu = _x(0, L, D), _x(1, M, D)
    _, s, vt = np.linalg.svd(np.asarray(xu, np.float64))
    want = np.asarray(x) - np.asarray(x) @ vt[:1].T @ vt[:1]
    chex.assert_trees_all_close(decor.project(x, xu, 1.0, rank=1), want.astype(np.float32),
                                atol=2e-5)

  def test_batched_equals_loop(self):
    x, xu = _x(0, 4, L, D), _x(1, 4, M, D)
    strength = jnp.array([0.0, 0.3, 0.7, 1.0])
    got = decor.project(x, xu, strength)
    for i in range(4):
      chex.assert_trees_all_close(got[i], decor.project(x[i], xu[i], strength[i]), atol=1e-6)
    # One undesired text for a whole batch broadcasts.
    shared = decor.project(x, xu[0], 0.5)
    for i in range(4):
      chex.assert_trees_all_close(shared[i], decor.project(x[i], xu[0], 0.5), atol=1e-6)
    # And under vmap.
    chex.assert_trees_all_close(jax.vmap(decor.project)(x, xu, strength), got, atol=1e-6)

  def test_errors_name_the_argument(self):
    with pytest.raises(ValueError, match='same width'):
      decor.project(_x(0, L, D), _x(1, M, D + 1))
    with pytest.raises(ValueError, match='x must be'):
      decor.project(_x(0, D), _x(1, M, D))
    with pytest.raises(ValueError, match='strength of shape'):
      decor.project(_x(0, 2, L, D), _x(1, M, D), jnp.ones(3))
    with pytest.raises(ValueError, match='rank must be'):
      decor.project(_x(0, L, D), _x(1, M, D), rank=0)


def test_decompose_reconstructs_and_energies_add_up():
  x = _x(0, 2, L, D)
  padding = jnp.array([[False] * 4 + [True] * 3, [False] * 2 + [True] * 5])
  dec = decor.decompose(x, padding)
  chex.assert_trees_all_close(decor.reconstruct(dec, L), x, atol=1e-5)
  chex.assert_trees_all_close(jnp.sum(dec.energy, -1), jnp.ones(2), atol=1e-6)
  chex.assert_trees_all_close(jnp.sum(dec.token_energy, -1), jnp.ones(2), atol=1e-6)
  chex.assert_trees_all_close(jnp.sum(dec.component_token_share, -1), jnp.ones((2, L)), atol=1e-5)
  # Component i's padding share is the squared norm of U's column i on the padding rows.
  u = np.asarray(dec.u)
  want = np.stack([(u[b][np.asarray(padding[b])] ** 2).sum(0) for b in range(2)])
  chex.assert_trees_all_close(dec.padding_share, want.astype(np.float32), atol=1e-6)
  # The top-1 reconstruction is the best rank-1 approximation: its error is the rest's energy.
  err = jnp.sum((x - decor.reconstruct(dec, 1)) ** 2, axis=(-2, -1))
  chex.assert_trees_all_close(err, jnp.sum(dec.s[:, 1:] ** 2, -1), rtol=1e-4)
  assert bool(jnp.all(jnp.isnan(decor.decompose(x).padding_share)))
  with pytest.raises(ValueError, match='padding must be'):
    decor.decompose(x, padding[:, :3])
  with pytest.raises(ValueError, match='k must be'):
    decor.reconstruct(dec, L + 1)


def test_settings_check_their_fields():
  texts, strength = decor.Settings('a digit three', 0.5).checked(4)
  assert texts == ['a digit three'] and strength.shape == ()
  texts, strength = decor.Settings(['a', 'b'], [0.0, 1.0], rank=2).checked(2)
  assert texts == ['a', 'b'] and strength.tolist() == [0.0, 1.0]
  for bad, field in ((decor.Settings(['a', 'b', 'c']), 'decor.undesired'),
                     (decor.Settings([]), 'decor.undesired'),
                     (decor.Settings('a', [0.5, 0.5, 0.5]), 'decor.strength'),
                     (decor.Settings('a', float('nan')), 'decor.strength'),
                     (decor.Settings('a', 1.0, rank=0), 'decor.rank'),
                     (decor.Settings('a', 1.0, rank=1.5), 'decor.rank')):
    with pytest.raises(ValueError, match=field):
      bad.checked(2)
