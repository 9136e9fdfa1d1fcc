"""AutoencoderKL: parity with diffusers for encode (mean, logvar) and decode; posterior sampling."""

import functools

import chex
import jax
import numpy as np
import pytest
import torch
from absl.testing import parameterized

from diffgeo_jax.models import convert, vae
from tests import report
from tests.models import oracles


class VAEParityTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_encode_and_decode_match_diffusers(self):
    model, params = oracles.flax_vae()
    tm = oracles.torch_vae()
    img = np.random.RandomState(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    z = np.random.RandomState(1).randn(2, 8, 8, 4).astype(np.float32)
    encode = self.variant(functools.partial(model.apply, method='encode'))
    decode = self.variant(functools.partial(model.apply, method='decode'))
    post = encode({'params': params}, img)
    dec = decode({'params': params}, z)
    with torch.no_grad():
      ref_post = tm.encode(oracles.nchw(img)).latent_dist
      ref_dec = oracles.nhwc(tm.decode(oracles.nchw(z)).sample)
    e1, _ = oracles.assert_close_to_reference(post.mean, oracles.nhwc(ref_post.mean), what='mean')
    e2, _ = oracles.assert_close_to_reference(post.logvar, oracles.nhwc(ref_post.logvar),
                                              what='logvar')
    e3, _ = oracles.assert_close_to_reference(dec, ref_dec, what='decode')
    report.record(f'vae {self.variant.type} max abs err', f'mean {e1:.2e}, logvar {e2:.2e}, '
                  f'decode {e3:.2e}')

  def test_forward_is_decode_of_mode_and_sample_uses_key(self):
    model, params = oracles.flax_vae()
    img = np.random.RandomState(0).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    post = model.apply({'params': params}, img, method='encode')
    recon = model.apply({'params': params}, img)
    chex.assert_trees_all_close(recon, model.apply({'params': params}, post.mean, method='decode'),
                                atol=1e-6)
    key = jax.random.key(0)
    s1, s2 = post.sample(key), post.sample(key)
    chex.assert_trees_all_close(s1, s2, atol=0)
    noise = jax.random.normal(key, post.mean.shape)
    chex.assert_trees_all_close(s1, post.mean + np.exp(0.5 * post.logvar) * noise, atol=1e-6)
    with pytest.raises(ValueError, match='key'):
      model.apply({'params': params}, img, sample_posterior=True)

  def test_kl_matches_closed_form(self):
    post = vae.DiagonalGaussian(np.full((1, 2, 2, 1), 0.5, np.float32),
                                np.full((1, 2, 2, 1), np.log(2.0), np.float32))
    # 4 elements of KL(N(0.5, 2) || N(0, 1)) = 0.5 * (0.25 + 2 - 1 - log 2)
    np.testing.assert_allclose(post.kl(), [4 * 0.5 * (0.25 + 1 - np.log(2.0))], rtol=1e-6)


class VAELegacyKeysTest(parameterized.TestCase):

  def test_pre_0_14_attention_names_load(self):
    """Old checkpoints call the mid-block attention query/key/value/proj_attn."""
    model, params = oracles.flax_vae()
    sd = oracles.state_dict_numpy(oracles.torch_vae())
    legacy = {}
    for k, v in sd.items():
      k = (k.replace('.to_q.', '.query.').replace('.to_k.', '.key.').replace('.to_v.', '.value.')
           .replace('.to_out.0.', '.proj_attn.'))
      legacy[k] = v
    assert any('.proj_attn.' in k for k in legacy)
    target = convert.abstract_params(model.init, jax.random.key(0), *vae.dummy_inputs(model.config))
    loaded = convert.torch_to_flax(legacy, target, renames=vae.TORCH_RENAMES)
    chex.assert_trees_all_close(loaded, params, atol=0)

  def test_bad_input_shape_names_argument(self):
    model, params = oracles.flax_vae()
    with pytest.raises(ValueError, match='img must be'):
      model.apply({'params': params}, np.zeros((1, 3, 16, 16), np.float32), method='encode')
    with pytest.raises(ValueError, match='z must be'):
      model.apply({'params': params}, np.zeros((1, 8, 8, 3), np.float32), method='decode')
