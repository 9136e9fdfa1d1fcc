"""dot_product_attention: the chunked path equals the one-shot path and a numpy reference,
values and derivatives."""

from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from diffgeo_jax.models import attention
from tests import report


def numpy_attention(q, k, v, scale, mask=None):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  scores = np.einsum('bqhd,bkhd->bhqk', q, k) * scale
  if mask is not None:
    scores = np.where(mask, scores, -1e300)
  w = np.exp(scores - scores.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum('bhqk,bkhd->bqhd', w, v)


@pytest.fixture(scope='module')
def qkv():
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (2, 37, 3, 8))
  k = jax.random.normal(keys[1], (2, 29, 3, 8))
  v = jax.random.normal(keys[2], (2, 29, 3, 8))
  return q, k, v


@pytest.mark.parametrize('max_scores', [10 ** 9, 2 * 3 * 29 * 5, 2 * 3 * 29])
def test_chunked_equals_reference(qkv, max_scores):
  """37 queries in chunks of 5 (a ragged last chunk) or of 1, or all at once."""
  q, k, v = qkv
  with mock.patch.object(attention, 'MAX_SCORES_PER_CHUNK', max_scores):
    out = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, scale=0.3))(q, k, v)
  np.testing.assert_allclose(out, numpy_attention(q, k, v, 0.3), atol=2e-6)


def _unchunked():
  return mock.patch.multiple(attention, MAX_SCORES_PER_CHUNK=10 ** 9, AD_SCORES_PER_CHUNK=10 ** 9,
                             AD_UNCHUNKED_SCORES=0)


# (forward budget, AD budget, minimum AD queries): forward chunks of 5 queries with AD chunks of
# all 3 heads x 5 queries; AD chunks of 1 head x 4 queries (ragged: 37 = 9 x 4 + 1); AD chunks
# of 1 head x 2 queries forced by the minimum.
AD_SETTINGS = [(2 * 3 * 29 * 5, 2 * 3 * 29 * 5, 5), (10 ** 9, 2 * 29 * 4, 2),
               (2 * 3 * 29, 2 * 29, 2)]


@pytest.mark.parametrize('forward,ad,min_queries', AD_SETTINGS)
def test_chunked_derivatives_equal_unchunked(qkv, forward, ad, min_queries):
  """grad, jvp and a vmapped linearize (the latent-geometry use) of the chunked attention equal
  those of one unchunked call; the chunking under AD is independent of the forward's."""
  q, k, v = qkv
  f = lambda q, k, v: jnp.sum(jnp.sin(attention.dot_product_attention(q, k, v, scale=0.3)))
  self_attend = lambda q, k, v: attention.dot_product_attention(q, k, v, scale=0.3)
  cross_attend = lambda q: attention.dot_product_attention(q, k, v, scale=0.3)  # k, v constant
  dirs = [jax.random.normal(jax.random.key(i), (4,) + a.shape) for i, a in enumerate((q, k, v))]

  def derivatives():
    grads = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)
    tangent = jax.jvp(cross_attend, (q,), (jnp.cos(q),))[1]
    _, lin = jax.linearize(self_attend, q, k, v)
    pushed = jax.jit(jax.vmap(lin))(*dirs)
    pulled = jax.vmap(jax.linear_transpose(lin, q, k, v))(pushed)
    return grads, tangent, pushed, pulled

  with _unchunked():
    full = derivatives()
  with mock.patch.multiple(attention, MAX_SCORES_PER_CHUNK=forward, AD_SCORES_PER_CHUNK=ad,
                           MIN_AD_QUERY_CHUNK=min_queries, AD_UNCHUNKED_SCORES=0):
    chunked = derivatives()
  chex.assert_trees_all_close(chunked, full, atol=1e-5, rtol=1e-5)


def test_derivative_matches_numpy_finite_difference(qkv):
  """The JVP itself (chunked over heads and queries) against a float64 central difference of the
  numpy reference, so that the unchunked comparison above is not circular."""
  q, k, v = qkv
  dq, dk, dv = (jax.random.normal(jax.random.key(10 + i), a.shape) for i, a in enumerate((q, k, v)))
  with mock.patch.multiple(attention, AD_SCORES_PER_CHUNK=2 * 29 * 4, MIN_AD_QUERY_CHUNK=2,
                           AD_UNCHUNKED_SCORES=0):
    tangent = jax.jvp(lambda q, k, v: attention.dot_product_attention(q, k, v, scale=0.3),
                      (q, k, v), (dq, dk, dv))[1]
  eps = 1e-6
  plus = numpy_attention(*(np.float64(a) + eps * np.float64(d)
                           for a, d in ((q, dq), (k, dk), (v, dv))), 0.3)
  minus = numpy_attention(*(np.float64(a) - eps * np.float64(d)
                            for a, d in ((q, dq), (k, dk), (v, dv))), 0.3)
  np.testing.assert_allclose(tangent, (plus - minus) / (2 * eps), atol=2e-5)


def test_second_derivative_through_custom_rule(qkv):
  """A Hessian-vector product (jvp of grad) goes through the custom JVP rule twice."""
  q, k, v = qkv
  f = lambda q: jnp.sum(jnp.sin(attention.dot_product_attention(q, k, v, scale=0.3)))
  dq = jax.random.normal(jax.random.key(3), q.shape)
  hvp = lambda: jax.jvp(jax.grad(f), (q,), (dq,))[1]
  with _unchunked():
    full = hvp()
  with mock.patch.multiple(attention, MAX_SCORES_PER_CHUNK=2 * 3 * 29 * 5,
                           AD_SCORES_PER_CHUNK=2 * 29 * 4, MIN_AD_QUERY_CHUNK=2,
                           AD_UNCHUNKED_SCORES=0):
    chunked = hvp()
  chex.assert_trees_all_close(chunked, full, atol=1e-4, rtol=1e-4)


def test_chunk_rules_for_stable_diffusion_shapes():
  """The rules as documented: SD-1.5 64x64 self-attention (4096 keys, 8 heads) runs its forward
  in chunks of 128 queries x 8 heads and its derivatives in chunks of 16 queries x 1 head; 32x32
  (1024 keys): 256 x 8 and 8 x 8; cross-attention over 77 tokens: 3404 x 8 and 106 x 8."""
  assert attention.forward_chunks(1, 4096, 8, 4096) == (8, 128)
  assert attention.ad_chunks(1, 4096, 8, 4096) == (1, 16)
  assert attention.forward_chunks(1, 1024, 8, 1024) == (8, 256)
  assert attention.ad_chunks(1, 1024, 8, 1024) == (8, 8)
  assert attention.forward_chunks(1, 4096, 8, 77) == (8, 3404)
  assert attention.ad_chunks(1, 4096, 8, 77) == (8, 106)
  assert attention.ad_chunks(64, 1024, 8, 1024) == (1, 8)  # a training batch: the minimum
  # Small maps (the digits U-Net's 8x8 tokens) keep the forward's chunks: none.
  assert attention.ad_chunks(64, 64, 4, 64) == attention.forward_chunks(64, 64, 4, 64) == (4, 64)


def test_accelerator_chunks_are_memory_bound_only():
  # Off the CPU only the score tensor's size limits a chunk, and derivatives use the same chunks.
  with mock.patch.object(attention, '_on_accelerator', return_value=True):
    assert attention.forward_chunks(1, 4096, 8, 4096) == (8, 4096)  # 2^27 scores: one chunk
    assert attention.ad_chunks(1, 4096, 8, 4096) == (8, 4096)
    assert attention.forward_chunks(3, 4096, 8, 4096) == (8, 2 ** 28 // (3 * 8 * 4096))
    assert attention.ad_chunks(64, 1024, 8, 1024) == (8, 512)


def test_mask_and_jax_impl(qkv):
  q, k, v = qkv
  mask = np.tril(np.ones((37, 29), bool))[None, None]
  out = attention.dot_product_attention(q, k, v, scale=0.3, mask=mask)
  np.testing.assert_allclose(out, numpy_attention(q, k, v, 0.3, mask), atol=2e-6)
  out_jax = attention.dot_product_attention(q, k, v, scale=0.3, impl='jax')
  np.testing.assert_allclose(out_jax, numpy_attention(q, k, v, 0.3), atol=2e-6)
  with pytest.raises(ValueError, match='attention_impl must be one of'):
    attention.dot_product_attention(q, k, v, scale=0.3, impl='fused')


class FlashAttentionTest(parameterized.TestCase):
  """impl='flash': the Pallas TPU kernel, run here by Pallas's TPU interpreter (numbers), and
  compiled by libtpu for a v5e chip (memory), against the softmax path."""

  def _qkv(self, lq=256, lk=256, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    return (jax.random.normal(kq, (2, lq, 2, 40), dtype),
            jax.random.normal(kk, (2, lk, 2, 40), dtype),
            jax.random.normal(kv, (2, lk, 2, 40), dtype))

  @parameterized.parameters((jnp.float32, 1e-5, 1e-4), (jnp.bfloat16, 2e-2, 3e-2))
  def test_flash_equals_softmax_with_gradients_in_the_tpu_interpreter(self, dtype, tol, grad_tol):
    from jax.experimental.pallas import tpu as pltpu
    q, k, v = self._qkv(dtype=dtype)
    scale = 40 ** -0.5

    def loss(impl, q, k, v):
      out = attention.dot_product_attention(q, k, v, scale=scale, impl=impl)
      return jnp.sum(out * jnp.cos(out)), out
    want, want_out = loss('softmax', q, k, v)
    want_g = jax.grad(lambda *a: loss('softmax', *a)[0], argnums=(0, 1, 2))(q, k, v)
    with attention.compiling_for('tpu'), pltpu.force_tpu_interpret_mode():
      got, got_out = loss('flash', q, k, v)
      got_g = jax.grad(lambda *a: loss('flash', *a)[0], argnums=(0, 1, 2))(q, k, v)
      jaxpr = str(jax.make_jaxpr(lambda *a: loss('flash', *a))(q, k, v))
    assert 'pallas_call' in jaxpr  # the kernel ran, not the fallback
    f32 = lambda t: jnp.asarray(t, jnp.float32)
    err = float(jnp.max(jnp.abs(f32(got_out) - f32(want_out))))
    grad_err = max(float(jnp.max(jnp.abs(f32(a) - f32(b))) / jnp.max(jnp.abs(f32(b))))
                   for a, b in zip(got_g, want_g))
    name = jnp.dtype(dtype).name
    report.record(f'flash attention (TPU interpreter) vs softmax max abs error, {name}', err)
    report.record(f'flash attention gradient max error relative to scale, {name}', grad_err)
    assert err < tol and grad_err < grad_tol
    np.testing.assert_allclose(f32(got), f32(want), rtol=tol)

  def test_flash_falls_back_where_the_kernel_does_not_apply(self):
    q, k, v = self._qkv(lq=256, lk=77)  # cross-attention to 77 tokens: not a multiple of 128
    want = attention.dot_product_attention(q, k, v, scale=0.1)
    with attention.compiling_for('tpu'):
      jaxpr = str(jax.make_jaxpr(lambda *a: attention.dot_product_attention(
          *a, scale=0.1, impl='flash'))(q, k, v))
    assert 'pallas_call' not in jaxpr
    chex.assert_trees_all_equal(attention.dot_product_attention(q, k, v, scale=0.1, impl='flash'),
                                want)  # and off TPU always

  def test_flash_holds_no_scores_on_a_v5e_chip(self):
    pytest.importorskip('libtpu', reason='libtpu (pip install .[tpu]) compiles for TPU')
    from jax.sharding import NamedSharding, PartitionSpec as P
    from diffgeo_jax import distributed
    from diffgeo_jax.aot import analysis, chips
    # Four chips, the batch split over them: XLA cannot partition a Pallas kernel, so the flash
    # path runs it per device under shard_map (`attention.partitioned`).
    mesh = distributed.make_mesh(devices=chips.topology_devices('v5e:2x2'))
    s = jax.ShapeDtypeStruct((8, 4096, 8, 40), jnp.bfloat16,
                             sharding=NamedSharding(mesh, P('data')))
    temp = {}
    for impl in ('softmax', 'flash'):
      def f(q, k, v):
        with attention.partitioned(mesh):
          return attention.dot_product_attention(q, k, v, scale=40 ** -0.5, impl=impl)
      r = analysis.compile_program(lambda: jax.jit(f).lower(s, s, s), chips.CHIPS['v5e'])
      assert r['compiled'], r.get('error')
      temp[impl] = r['hbm_bytes']['temp']
    report.record('SD-1.5 64x64 self-attention temp bytes on v5e (softmax, flash)', str(temp))
    # One accelerator chunk of float32 scores (2^28 over the global batch), a quarter per chip.
    assert temp['softmax'] >= attention.ACCELERATOR_SCORES_PER_CHUNK * 4 // 4
    assert temp['flash'] < temp['softmax'] / 100


def test_flash_keeps_the_softmax_path_for_heads_the_kernel_cannot_take():
  # SD-1.5's 1280-channel blocks: 8 heads of 160 (not <= 128, not a multiple of 128).
  q = jnp.ones((1, 256, 8, 160), jnp.bfloat16)
  with attention.compiling_for('tpu'):
    jaxpr = str(jax.make_jaxpr(lambda a: attention.dot_product_attention(
        a, a, a, scale=0.1, impl='flash'))(q))
    assert 'pallas_call' not in jaxpr
    q64 = jnp.ones((1, 256, 8, 64), jnp.bfloat16)
    assert 'pallas_call' in str(jax.make_jaxpr(lambda a: attention.dot_product_attention(
        a, a, a, scale=0.1, impl='flash'))(q64))


def test_flash_bf16_gradient_with_remat_under_highest_precision_compiles_for_tpu():
  """DUO's loss runs under matmul precision 'highest' and remat recomputes the forward in the
  backward pass: the kernels are traced then, and must still get bf16 precision (Mosaic refuses
  float32 passes on bf16 tiles)."""
  pytest.importorskip('libtpu', reason='libtpu (pip install .[tpu]) compiles for TPU')
  from jax.sharding import NamedSharding, PartitionSpec as P
  from diffgeo_jax import distributed
  from diffgeo_jax.aot import analysis, chips
  mesh = distributed.make_mesh(devices=chips.topology_devices('v5e:1x1'))
  s = jax.ShapeDtypeStruct((2, 256, 2, 64), jnp.bfloat16, sharding=NamedSharding(mesh, P()))

  def loss(q):
    with jax.default_matmul_precision('highest'):
      f = jax.checkpoint(lambda q: attention.dot_product_attention(q, q, q, scale=0.1,
                                                                   impl='flash'))
      return jnp.sum(f(q).astype(jnp.float32))
  r = analysis.compile_program(lambda: jax.jit(jax.grad(loss)).lower(s), chips.CHIPS['v5e'])
  assert r['compiled'], r.get('error')
