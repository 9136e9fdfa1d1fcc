"""Principal angles and Grassmann distances against closed forms and scipy."""

import math

import chex
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from absl.testing import parameterized

from diffgeo_jax.geometry import grassmann
from tests import report


def _orthogonal(rng, n):
  q, r = np.linalg.qr(rng.randn(n, n))
  return q * np.sign(np.diag(r))


class PrincipalAnglesTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(0.0, 0.3, math.pi / 4, 1.2, math.pi / 2)
  def test_two_planes_at_a_known_angle(self, angle):
    # span(e1, e2) vs span(e1, cos a e2 + sin a e3) in R^3: angles (0, a); rotated into R^7.
    a = np.array([[1, 0, 0], [0, 1, 0]], np.float32)
    b = np.array([[1, 0, 0], [0, math.cos(angle), math.sin(angle)]], np.float32)
    q = _orthogonal(np.random.RandomState(0), 7)[:3]
    a, b = a @ q, b @ q
    theta = self.variant(grassmann.principal_angles)(a, b)
    np.testing.assert_allclose(theta, [0.0, angle], atol=1e-6)
    np.testing.assert_allclose(self.variant(grassmann.geodesic_distance)(a, b), angle, atol=1e-6)
    np.testing.assert_allclose(grassmann.projection_distance(a, b), math.sin(angle), atol=1e-6)

  def test_change_of_basis_gives_zero(self):
    rng = np.random.RandomState(1)
    a = grassmann.orthonormal_rows(jnp.asarray(rng.randn(5, 40), jnp.float32))
    same = [
        _orthogonal(rng, 5).astype(np.float32) @ a,  # rotation within the subspace
        a * np.array([1, -1, 1, -1, -1], np.float32)[:, None],  # sign flips
        a[np.array([3, 0, 4, 1, 2])],  # row permutation
        jnp.asarray(rng.randn(5, 5) + 3 * np.eye(5), jnp.float32) @ a,  # any invertible mix
    ]
    dists = [float(grassmann.geodesic_distance(a, b)) for b in same]
    report.record('d_geo after a change of basis (float32), max', max(dists))
    assert max(dists) < 1e-5, dists
    for b in same[:3]:  # already orthonormal: no QR needed
      assert float(grassmann.geodesic_distance(a, b, orthonormalize=False)) < 1e-5

  @parameterized.parameters(1, 3, 8)
  def test_orthogonal_subspaces_are_farthest(self, k):
    q = _orthogonal(np.random.RandomState(k), 20).astype(np.float32)
    a, b = q[:k], q[k:2 * k]
    np.testing.assert_allclose(grassmann.principal_angles(a, b), np.full(k, math.pi / 2),
                               atol=1e-6)
    np.testing.assert_allclose(grassmann.geodesic_distance(a, b), math.pi / 2 * math.sqrt(k),
                               rtol=1e-6)
    np.testing.assert_allclose(grassmann.projection_distance(a, b), math.sqrt(k), rtol=1e-6)

  @parameterized.parameters((3, 3, 10), (2, 4, 10), (4, 2, 9), (6, 6, 50))
  def test_against_scipy(self, ka, kb, d):
    rng = np.random.RandomState(ka * 100 + kb)
    a, b = rng.randn(ka, d), rng.randn(kb, d)
    ours = np.asarray(grassmann.principal_angles(a.astype(np.float32), b.astype(np.float32)))
    ref = np.sort(scipy.linalg.subspace_angles(a.T, b.T))  # scipy: columns, descending
    np.testing.assert_allclose(ours, ref, atol=2e-6)

  def test_small_angles_keep_their_digits(self):
    # arccos(cos) in float32 would give ~3e-4 here; the sine branch resolves 1e-6.
    rng = np.random.RandomState(2)
    a = rng.randn(3, 30)
    b = a + 1e-6 * rng.randn(3, 30)
    ref = np.sort(scipy.linalg.subspace_angles(a.T, b.T))
    ours = np.asarray(grassmann.principal_angles(a.astype(np.float32), b.astype(np.float32)))
    err = float(np.max(np.abs(ours - ref)))
    report.record('principal angles ~1e-6 rad, float32 vs scipy float64: max abs err', err)
    assert err < 2e-7, (ours, ref)

  def test_feature_axes_are_flattened(self):
    rng = np.random.RandomState(3)
    a, b = rng.randn(3, 4, 4, 2).astype(np.float32), rng.randn(3, 4, 4, 2).astype(np.float32)
    np.testing.assert_allclose(grassmann.geodesic_distance(a, b),
                               grassmann.geodesic_distance(a.reshape(3, -1), b.reshape(3, -1)),
                               rtol=1e-6)

  def test_path_length(self):
    e = np.eye(3, dtype=np.float32)
    lines = np.stack([e[:1], (e[:1] + e[1:2]) / math.sqrt(2), e[1:2]])  # 0, 45, 90 degrees
    np.testing.assert_allclose(grassmann.path_length(lines), math.pi / 2, rtol=1e-6)

  @parameterized.named_parameters(
      ('vector', np.zeros(5), np.zeros((1, 5)), 'A must be a basis'),
      ('feature_shape', np.zeros((2, 5)), np.zeros((2, 6)), 'same feature shape'),
      ('layout', np.zeros((2, 4, 3)), np.zeros((2, 12)), 'same feature shape'),
      ('k_differs', np.eye(5)[:2], np.eye(5)[:3], 'same dimension'),
      ('too_many_rows', np.zeros((6, 5)), np.zeros((6, 5)), 'cannot be linearly independent'),
  )
  def test_bad_shapes_name_the_argument(self, a, b, message):
    with pytest.raises(ValueError, match=message):
      grassmann.geodesic_distance(a, b)
