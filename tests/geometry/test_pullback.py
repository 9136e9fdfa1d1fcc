"""pullback.local_basis against exact SVDs: a linear map with a known SVD, a tanh MLP and a tiny
U-Net's h-space (dense Jacobians from jax.jacfwd); chunking, early stopping, official outputs."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from diffgeo_jax.geometry import grassmann, pullback
from diffgeo_jax.models import convert, unet
from tests import report


def _rows(a):
  a = np.asarray(a)
  return a.reshape(a.shape[0], -1)


def _orthogonal(rng, n):
  q, r = np.linalg.qr(rng.randn(n, n))
  return q * np.sign(np.diag(r))


def linear_problem(seed=0, x_shape=(6, 5), h_shape=(4, 5), top=(10.0, 7.0, 5.0, 3.5, 2.5)):
  """h = W x, W = U diag(s) V^T with distinct singular values: `top` then a geometric tail."""
  rng = np.random.RandomState(seed)
  n, m = int(np.prod(x_shape)), int(np.prod(h_shape))
  u, v = _orthogonal(rng, m), _orthogonal(rng, n)
  s = np.concatenate([top, np.geomspace(1.0, 0.05, m - len(top))])
  w = (u * s) @ v[:, :m].T
  w32 = jnp.asarray(w, jnp.float32)
  h_fn = lambda x: (w32 @ x.reshape(-1)).reshape(h_shape)
  x = jnp.asarray(rng.randn(*x_shape), jnp.float32)
  return h_fn, x, w, u.T, s, v.T  # rows of u.T / v.T: left / right singular vectors


def mlp_problem(seed=1):
  """2-layer tanh MLP, x (4, 4, 2) -> h (3, 3, 2)."""
  rng = np.random.RandomState(seed)
  w1 = jnp.asarray(rng.randn(32, 32) / np.sqrt(32), jnp.float32)
  b1 = jnp.asarray(0.1 * rng.randn(32), jnp.float32)
  w2 = jnp.asarray(rng.randn(18, 32) / np.sqrt(32), jnp.float32)
  h_fn = lambda x: (w2 @ jnp.tanh(w1 @ x.reshape(-1) + b1)).reshape(3, 3, 2)
  x = jnp.asarray(np.random.RandomState(10).randn(4, 4, 2), jnp.float32)
  return h_fn, x


def dense_svd(h_fn, x):
  jac = np.asarray(jax.jit(jax.jacfwd(h_fn))(x), np.float64).reshape(-1, x.size)
  u, s, vt = np.linalg.svd(jac)
  return jac, u.T, s, vt


def assert_matches_svd(b, s, u_rows, v_rows, what, rel=1e-3, dist=1e-2):
  k = b.singular_values.shape[0]
  s_err = float(np.max(np.abs(np.asarray(b.singular_values) / s[:k] - 1)))
  d_lat = float(grassmann.geodesic_distance(_rows(b.latent_basis), v_rows[:k]))
  d_tan = float(grassmann.geodesic_distance(_rows(b.tangent_basis), u_rows[:k]))
  report.record(f'{what}: singular value max rel err', s_err)
  report.record(f'{what}: latent basis d_geo to truth', d_lat)
  report.record(f'{what}: tangent basis d_geo to truth', d_tan)
  assert s_err < rel, s_err
  assert d_lat < dist and d_tan < dist, (d_lat, d_tan)
  assert np.all(np.diff(np.asarray(b.singular_values)) < 0)


def assert_is_svd_pairing(b, jac, atol):
  """Orthonormal rows and J v_i = sigma_i u_i."""
  k = b.singular_values.shape[0]
  v, u = _rows(b.latent_basis), _rows(b.tangent_basis)
  np.testing.assert_allclose(v @ v.T, np.eye(k), atol=1e-5)
  np.testing.assert_allclose(u @ u.T, np.eye(k), atol=1e-5)
  np.testing.assert_allclose(v @ jac.T, np.asarray(b.singular_values)[:, None] * u, atol=atol)


class LinearMapTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_recovers_known_svd(self):
    h_fn, x, w, u_rows, s, v_rows = linear_problem()
    fn = self.variant(lambda x, key: pullback.local_basis(h_fn, x, 4, 100, key, tol=1e-5))
    b = fn(x, jax.random.key(0))
    chex.assert_shape(b.latent_basis, (4, 6, 5))
    chex.assert_shape(b.tangent_basis, (4, 4, 5))
    assert_matches_svd(b, s, u_rows, v_rows, f'linear map ({self.variant.type})')
    assert_is_svd_pairing(b, w, atol=1e-4)
    self.assertTrue(bool(b.converged))

  def test_official_outputs_agree(self):
    h_fn, x, w, u_rows, s, v_rows = linear_problem()
    b = pullback.local_basis(h_fn, x, 4, 100, jax.random.key(0), tol=1e-5, rayleigh_ritz=False)
    assert_matches_svd(b, s, u_rows, v_rows, 'linear map (official outputs)')
    assert_is_svd_pairing(b, w, atol=1e-3)  # u is one iteration behind v

  def test_signs_are_fixed(self):
    h_fn, x, *_ = linear_problem()
    b1 = pullback.local_basis(h_fn, x, 4, 100, jax.random.key(0), tol=1e-6)
    b2 = pullback.local_basis(h_fn, x, 4, 100, jax.random.key(7), tol=1e-6)
    v = _rows(b1.latent_basis)
    big = v[np.arange(4), np.argmax(np.abs(v), axis=1)]
    assert np.all(big > 0)
    np.testing.assert_allclose(b1.latent_basis, b2.latent_basis, atol=1e-4)
    np.testing.assert_allclose(b1.tangent_basis, b2.tangent_basis, atol=1e-4)

  def test_chunking_does_not_change_the_result(self):
    h_fn, x, *_ = linear_problem()
    ref = pullback.local_basis(h_fn, x, 5, 60, jax.random.key(3), tol=1e-5)  # all 5 at once
    for chunk_size in (1, 2):  # 2: the last chunk is partial
      b = pullback.local_basis(h_fn, x, 5, 60, jax.random.key(3), tol=1e-5, chunk_size=chunk_size)
      self.assertEqual(int(b.num_iters_run), int(ref.num_iters_run))
      chex.assert_trees_all_close(b, ref, atol=1e-5)

  def test_stops_early_and_exactly_when_the_step_drops_below_tol(self):
    h_fn, x, _, u_rows, s, v_rows = linear_problem()
    tol, max_iters = 1e-4, 200
    b = pullback.local_basis(h_fn, x, 3, max_iters, jax.random.key(1), tol=tol)
    n = int(b.num_iters_run)
    report.record('linear map k=3: iterations to tol=1e-4', n)
    assert 1 < n < max_iters and bool(b.converged) and float(b.residual) < tol
    assert_matches_svd(b, s, u_rows, v_rows, 'linear map (early stop)', rel=1e-5, dist=1e-3)
    # One iteration fewer: the last step had not yet dropped below tol -> not before convergence.
    short = pullback.local_basis(h_fn, x, 3, n - 1, jax.random.key(1), tol=tol)
    self.assertEqual(int(short.num_iters_run), n - 1)
    assert not bool(short.converged) and float(short.residual) >= tol
    # tol=0 never stops early; min_iters is honoured.
    full = pullback.local_basis(h_fn, x, 3, 40, jax.random.key(1), tol=0.0)
    self.assertEqual(int(full.num_iters_run), 40)
    assert not bool(full.converged)
    late = pullback.local_basis(h_fn, x, 3, 200, jax.random.key(1), tol=tol, min_iters=n + 5)
    self.assertEqual(int(late.num_iters_run), n + 5)

  def test_warm_start_from_init(self):
    h_fn, x, *_ = linear_problem()
    b = pullback.local_basis(h_fn, x, 4, 100, jax.random.key(0), tol=1e-5)
    again = pullback.local_basis(h_fn, x, 4, 100, None, init=b.latent_basis, tol=1e-5)
    self.assertLessEqual(int(again.num_iters_run), 2)
    chex.assert_trees_all_close(again.singular_values, b.singular_values, rtol=1e-5)

  def test_pullback_metric_and_jvp_norms(self):
    h_fn, x, w, _, s, v_rows = linear_problem()
    dirs = jnp.asarray(np.random.RandomState(5).randn(3, 6, 5), jnp.float32)
    d = _rows(dirs)
    np.testing.assert_allclose(pullback.pullback_metric(h_fn, x, dirs), d @ w.T @ w @ d.T,
                               rtol=1e-4, atol=1e-3)
    others = dirs[:2] * 2
    np.testing.assert_allclose(pullback.pullback_metric(h_fn, x, dirs, others, chunk_size=2),
                               d @ w.T @ w @ _rows(others).T, rtol=1e-4, atol=1e-3)
    true_basis = jnp.asarray(v_rows[:4].reshape(4, 6, 5), jnp.float32)
    np.testing.assert_allclose(pullback.jvp_norms(h_fn, x, true_basis), s[:4], rtol=1e-5)

  @parameterized.named_parameters(
      ('too_many_vectors', dict(num_vectors=21), 'num_vectors must be in'),
      ('no_key', dict(key=None), 'key is required'),
      ('bad_init', dict(init=np.zeros((3, 30), np.float32)), 'init must be'),
      ('zero_iters', dict(num_iters=0), 'num_iters must be'),
      ('bad_chunk', dict(chunk_size=0), 'chunk_size must be'),
  )
  def test_bad_arguments_are_named(self, override, message):
    h_fn, x, *_ = linear_problem()
    args = dict(num_vectors=3, num_iters=5, key=jax.random.key(0)) | override
    with pytest.raises(ValueError, match=message):
      pullback.local_basis(h_fn, x, **args)


class NonlinearTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_mlp_matches_dense_jacobian_svd(self):
    h_fn, x = mlp_problem()
    jac, u_rows, s, v_rows = dense_svd(h_fn, x)
    fn = self.variant(lambda x, key: pullback.local_basis(h_fn, x, 4, 200, key, tol=1e-5,
                                                          chunk_size=3))
    b = fn(x, jax.random.key(0))
    assert_matches_svd(b, s, u_rows, v_rows, f'tanh MLP ({self.variant.type})')
    assert_is_svd_pairing(b, jac, atol=1e-4)


def tiny_unet(seed=0):
  """A miniature SD UNet (digits 'tiny' widths, two resolutions to keep compiles short), random
  weights drawn with numpy (flax's jitted init alone takes ~10 s to compile on CPU)."""
  cfg = unet.UNet2DConditionConfig.from_dict(dict(
      sample_size=8, in_channels=3, out_channels=3,
      down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
      up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'),
      block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4, cross_attention_dim=16,
      attention_head_dim=4))
  model = unet.UNet2DConditionModel(cfg)
  shapes = convert.abstract_params(model.init, jax.random.key(0), *unet.dummy_inputs(cfg))
  rng = np.random.RandomState(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if leaf.ndim >= 2:  # kernels: variance 1 / fan_in
      return jnp.asarray(rng.randn(*leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1])), jnp.float32)
    base = 1.0 if 'scale' in name else 0.0
    return jnp.asarray(base + 0.1 * rng.randn(*leaf.shape), jnp.float32)

  return model, jax.tree_util.tree_map_with_path(draw, shapes)


class UNetHSpaceTest(chex.TestCase):

  def test_unet_hspace_matches_dense_jacobian_svd(self):
    model, params = tiny_unet()
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(8, 8, 3), jnp.float32)
    context = jnp.asarray(rng.randn(4, 16), jnp.float32)
    h_fn = pullback.unet_h_fn(model, params, 437.5, context)
    h, h_ref = jax.jit(lambda x: (h_fn(x), model.apply(
        {'params': params}, x[None], 437.5, context[None], method='hspace')[0]))(x)
    chex.assert_trees_all_close(h, h_ref, atol=1e-5)

    jac, u_rows, s, v_rows = dense_svd(h_fn, x)
    fn = jax.jit(lambda x, key: pullback.local_basis(h_fn, x, 4, 150, key, tol=1e-5))
    b = fn(x, jax.random.key(1))
    report.record('tiny UNet h-space: iterations', int(b.num_iters_run))
    assert_matches_svd(b, s, u_rows, v_rows, 'tiny UNet h-space (t=437.5)')
    assert_is_svd_pairing(b, jac, atol=1e-4 * s[0])

  def test_unet_h_fn_arguments(self):
    model, params = tiny_unet()
    with pytest.raises(ValueError, match='context must be'):
      pullback.unet_h_fn(model, params, 10, np.zeros((2, 4, 16), np.float32))
    with pytest.raises(ValueError, match='t must be a scalar'):
      pullback.unet_h_fn(model, params, np.zeros(2), np.zeros((4, 16), np.float32))
    h_fn = pullback.unet_h_fn(model, params, 10, np.zeros((1, 4, 16), np.float32))
    with pytest.raises(ValueError, match='one sample'):
      h_fn(jnp.zeros((1, 8, 8, 3)))
