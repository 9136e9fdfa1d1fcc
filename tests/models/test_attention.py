"""dot_product_attention: the chunked path equals the one-shot path and a numpy reference,
values and derivatives."""

from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffgeo_jax.models import attention


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


def test_chunked_derivatives_equal_unchunked(qkv):
  q, k, v = qkv
  f = lambda q, k, v: jnp.sum(jnp.sin(attention.dot_product_attention(q, k, v, scale=0.3)))
  full = jax.grad(f, argnums=(0, 1, 2))(q, k, v)
  attend = lambda q: attention.dot_product_attention(q, k, v, scale=0.3)
  dq = jnp.cos(q)
  tangent = jax.jvp(attend, (q,), (dq,))[1]
  with mock.patch.object(attention, 'MAX_SCORES_PER_CHUNK', 2 * 3 * 29 * 5):
    chunked = jax.grad(f, argnums=(0, 1, 2))(q, k, v)
    tangent_chunked = jax.jvp(attend, (q,), (dq,))[1]
  chex.assert_trees_all_close(chunked, full, atol=1e-5)
  chex.assert_trees_all_close(tangent_chunked, tangent, atol=1e-5)


def test_mask_and_jax_impl(qkv):
  q, k, v = qkv
  mask = np.tril(np.ones((37, 29), bool))[None, None]
  out = attention.dot_product_attention(q, k, v, scale=0.3, mask=mask)
  np.testing.assert_allclose(out, numpy_attention(q, k, v, 0.3, mask), atol=2e-6)
  out_jax = attention.dot_product_attention(q, k, v, scale=0.3, impl='jax')
  np.testing.assert_allclose(out_jax, numpy_attention(q, k, v, 0.3), atol=2e-6)
  with pytest.raises(ValueError, match='attention_impl must be one of'):
    attention.dot_product_attention(q, k, v, scale=0.3, impl='flash')
