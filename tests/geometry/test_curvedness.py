"""Curvedness candidates (geometry/curvedness.py) on maps whose answer is known."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffgeo_jax.geometry import curvedness
from tests import report
from tests.geometry.test_grassmann import _orthogonal


def _circle(x):
  """x (2,) -> h (2,): the unit circle in x[0]; x[1] is ignored. J has rank 1 and one
  unit singular value, with tangent direction (-sin x0, cos x0)."""
  return jnp.stack([jnp.cos(x[0]), jnp.sin(x[0])])


class CurvednessTest(chex.TestCase):

  def test_chord_arc_on_a_half_circle(self):
    c = curvedness.segment(_circle, jnp.array([0.0, 0.0]), jnp.array([math.pi, 0.0]),
                           kind='chord_arc', num_points=5)
    np.testing.assert_allclose(c, 1 - 2 / math.pi, rtol=1e-5)  # chord 2, arc length pi

  def test_tangent_drift_and_tortuosity_on_a_circle(self):
    # The tangent line turns by 3pi/4 along the segment: drift 3pi/4; its end lines are pi/4 apart
    # on the Grassmannian of lines (a line turned by 3pi/4 is a line turned by -pi/4).
    x0, x1 = jnp.array([0.0, 0.0]), jnp.array([0.75 * math.pi, 0.0])
    kw = dict(num_points=7, num_vectors=1, num_iters=5, key=jax.random.key(0))
    drift = curvedness.segment(_circle, x0, x1, kind='tangent_drift', **kw)
    np.testing.assert_allclose(drift, 0.75 * math.pi, rtol=1e-5)
    tort = curvedness.segment(_circle, x0, x1, kind='tangent_tortuosity', **kw)
    np.testing.assert_allclose(tort, 3.0, rtol=1e-4)
    # the latent basis (e1 everywhere) does not move
    lat = curvedness.segment(_circle, x0, x1, kind='tangent_drift', basis='latent', **kw)
    assert float(lat) < 1e-5

  def test_affine_map_is_flat(self):
    rng = np.random.RandomState(4)
    w = jnp.asarray(np.diag([5.0, 3.0, 2.0, 1.0, 0.5]) @ _orthogonal(rng, 5), jnp.float32)
    h_fn = lambda x: w @ x + 1.0
    x0, x1 = jnp.asarray(rng.randn(5), jnp.float32), jnp.asarray(rng.randn(5), jnp.float32)
    chord_arc = curvedness.segment(h_fn, x0, x1, kind='chord_arc')
    drift = curvedness.segment(h_fn, x0, x1, num_vectors=2, num_iters=50, key=jax.random.key(1),
                               tol=1e-6, num_points=4)
    report.record('curvedness of an affine map: chord_arc, tangent_drift',
                  f'{float(chord_arc):.2e}, {float(drift):.2e}')
    assert abs(float(chord_arc)) < 1e-6 and float(drift) < 1e-4

  def test_arguments(self):
    x = jnp.zeros(2)
    with pytest.raises(ValueError, match='kind must be one of'):
      curvedness.segment(_circle, x, x, kind='ricci')
    with pytest.raises(ValueError, match='pass num_vectors and key'):
      curvedness.segment(_circle, x, x + 1)
    with pytest.raises(ValueError, match='same shape'):
      curvedness.segment(_circle, x, jnp.zeros(3), kind='chord_arc')
