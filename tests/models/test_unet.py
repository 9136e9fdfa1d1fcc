"""UNet2DConditionModel: parity with diffusers (SD1/SD2/SDXL-shaped), h-space, AD, bf16, errors."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from diffgeo_jax.models import unet
from tests import report
from tests.models import oracles


class UNetParityTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters('sd1', 'sd2', 'sdxl')
  def test_eps_and_hspace_match_diffusers(self, name):
    model, params = oracles.flax_unet(name)
    x, t, context, added = oracles.unet_inputs(name)
    ref_eps, ref_h = oracles.torch_unet_outputs(name, x, t, context, added)

    fwd = self.variant(functools.partial(model.apply, method='with_hspace'))
    eps, h = fwd({'params': params}, x, t, context, added)
    hspace = self.variant(functools.partial(model.apply, method='hspace'))
    h_only = hspace({'params': params}, x, t, context, added)

    err_eps, scale = oracles.assert_close_to_reference(eps, ref_eps, what=f'{name} eps')
    err_h, _ = oracles.assert_close_to_reference(h, ref_h, what=f'{name} h-space')
    chex.assert_trees_all_close(h_only, h, atol=1e-6)
    report.record(f'unet {name} {self.variant.type} eps max abs err (scale {scale:.2f})', err_eps)
    report.record(f'unet {name} {self.variant.type} h-space max abs err', err_h)

  def test_call_equals_with_hspace(self):
    model, params = oracles.flax_unet('sd1')
    x, t, context, _ = oracles.unet_inputs('sd1')
    eps = model.apply({'params': params}, x, t, context)
    eps2, _ = model.apply({'params': params}, x, t, context, method='with_hspace')
    chex.assert_trees_all_close(eps, eps2, atol=0)

  def test_scalar_timestep_broadcasts(self):
    model, params = oracles.flax_unet('sd1')
    x, _, context, _ = oracles.unet_inputs('sd1')
    a = model.apply({'params': params}, x, 250.0, context)
    b = model.apply({'params': params}, x, jnp.array([250.0, 250.0]), context)
    chex.assert_trees_all_close(a, b, atol=1e-6)
    ref, _ = oracles.torch_unet_outputs('sd1', x, np.array([250.0, 250.0], np.float32), context, None)
    oracles.assert_close_to_reference(a, ref)


class HSpaceDerivativeTest(chex.TestCase):
  """jvp / vjp of x -> h under jit against central finite differences, in float64."""

  def test_jvp_and_vjp_match_finite_differences(self):
    model32, params = oracles.flax_unet('sd1')
    model = unet.UNet2DConditionModel(model32.config, dtype=jnp.float64)
    x, _, context, _ = oracles.unet_inputs('sd1', batch=1)
    with jax.enable_x64(True):
      p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
      x64, c64 = jnp.asarray(x, jnp.float64), jnp.asarray(context, jnp.float64)
      h_fn = jax.jit(lambda z: model.apply({'params': p64}, z, 300.0, c64, method='hspace'))
      rng = np.random.RandomState(3)
      v = jnp.asarray(rng.randn(*x.shape))
      h, jv = jax.jit(lambda z, d: jax.jvp(h_fn, (z,), (d,)))(x64, v)
      eps = 1e-5
      fd = (h_fn(x64 + eps * v) - h_fn(x64 - eps * v)) / (2 * eps)
      jv_err = float(jnp.max(jnp.abs(jv - fd)) / jnp.max(jnp.abs(fd)))
      assert jv_err < 1e-6, jv_err

      u = jnp.asarray(rng.randn(*h.shape))
      _, vjp_fn = jax.vjp(h_fn, x64)
      (jtu,) = jax.jit(vjp_fn)(u)
      # <u, J v> by finite differences == <J^T u, v> by reverse mode.
      lhs, rhs = float(jnp.vdot(u, fd)), float(jnp.vdot(jtu, v))
      assert abs(lhs - rhs) <= 1e-6 * abs(lhs), (lhs, rhs)
      report.record('unet h-space jvp vs finite differences, relative err (float64)', jv_err)
      report.record('unet h-space <u, Jv> by finite differences vs <J^T u, v> by vjp',
                    f'{lhs:.8f} vs {rhs:.8f}')


class BFloat16Test(chex.TestCase):

  def test_bf16_activations_run_and_error_is_reported(self):
    model, params = oracles.flax_unet('sd1')
    x, t, context, _ = oracles.unet_inputs('sd1')
    ref = model.apply({'params': params}, x, t, context)
    bf16 = unet.UNet2DConditionModel(model.config, dtype=jnp.bfloat16)
    out = jax.jit(bf16.apply)({'params': params}, x, t, context)
    self.assertEqual(out.dtype, jnp.float32)  # output in the input's dtype
    err = float(jnp.max(jnp.abs(out - ref)))
    scale = float(jnp.max(jnp.abs(ref)))
    report.record(f'unet bf16 activations: max abs err vs float32 (output scale {scale:.2f})', err)
    assert np.isfinite(err) and err < 0.1 * scale


class InputValidationTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('nchw_input', dict(x=np.zeros((1, 4, 16, 16), np.float32)), 'x must be'),
      ('odd_size', dict(x=np.zeros((1, 14, 14, 4), np.float32)), 'divisible'),
      ('bad_context_dim', dict(context=np.zeros((1, 7, 25), np.float32)), 'context must be'),
      ('bad_t', dict(t=np.zeros((3,), np.float32)), 't must be'),
  )
  def test_bad_inputs_name_the_argument(self, override, message):
    model, params = oracles.flax_unet('sd1')
    args = dict(x=np.zeros((1, 16, 16, 4), np.float32), t=np.float32(1.0),
                context=np.zeros((1, 7, 24), np.float32))
    args.update(override)
    with pytest.raises(ValueError, match=message):
      model.apply({'params': params}, args['x'], args['t'], args['context'])

  def test_sdxl_needs_added_cond_kwargs(self):
    model, params = oracles.flax_unet('sdxl')
    x, t, context, _ = oracles.unet_inputs('sdxl')
    with pytest.raises(ValueError, match='added_cond_kwargs'):
      model.apply({'params': params}, x, t, context)


class ConfigTest(parameterized.TestCase):

  @parameterized.parameters('sd1', 'sd2', 'sdxl')
  def test_config_round_trips_through_diffusers(self, name):
    from diffusers import UNet2DConditionModel
    cfg = unet.UNet2DConditionConfig.from_dict(dict(oracles.torch_unet(name).config))
    d = cfg.to_dict()
    self.assertEqual(unet.UNet2DConditionConfig.from_dict(d), cfg)
    rebuilt = UNet2DConditionModel.from_config(d)
    self.assertEqual(set(rebuilt.state_dict()), set(oracles.torch_unet(name).state_dict()))

  @parameterized.named_parameters(
      ('wrong_type', {'block_out_channels': 'abc'}, 'block_out_channels'),
      ('unsupported_feature', {'class_embed_type': 'timestep'}, 'class_embed_type'),
      ('length_mismatch', {'block_out_channels': (32, 64)}, 'block_out_channels'),
      ('unknown_block', {'down_block_types': ('AttnDownBlock2D', 'DownBlock2D'),
                         'block_out_channels': (32, 64),
                         'up_block_types': ('UpBlock2D', 'UpBlock2D')}, 'AttnDownBlock2D'),
      ('per_block_length', {'attention_head_dim': (2, 4)}, 'attention_head_dim'),
  )
  def test_malformed_config_names_the_key(self, override, key):
    from diffgeo_jax.models import config_utils
    d = dict(oracles.UNET_CONFIGS['sd1'], **override)
    with pytest.raises(config_utils.ConfigError, match=key):
      unet.UNet2DConditionConfig.from_dict(d, source='bad.json')


class RematAndConditioningTest(chex.TestCase):
  """`remat=True` changes memory, not maths; SDXL's conditioning as one dict equals the
  added_cond_kwargs call."""

  def test_remat_gives_the_same_parameters_outputs_and_gradients(self, name='tiny'):
    # The AOT tiny UNet (resnets, a cross-attention block and mid block: every remat site), at
    # random weights; small enough that the two gradient programs compile in seconds.
    from diffgeo_jax.aot import shapes
    model = shapes.abstract_model(name).unet
    params = unet.init_params(model, jax.random.key(0))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
    t = jnp.asarray([10, 900])
    context = jnp.asarray(rng.normal(size=(2, 7, model.config.cross_attention_dim)), jnp.float32)
    remat = model.clone(remat=True)
    chex.assert_trees_all_equal_shapes_and_dtypes(
        remat.init(jax.random.key(0), x, t, context)['params'], params)

    def loss(p, m):
      return jnp.sum(m.apply({'params': p}, x, t, context) ** 2)
    value, grads = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, model)
    value_r, grads_r = jax.jit(jax.value_and_grad(loss), static_argnums=1)(params, remat)
    np.testing.assert_allclose(value_r, value, rtol=1e-6)
    # The recomputed forward may fuse differently: float32 rounding, relative to each leaf's scale.
    err = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))),
                       grads_r, grads)
    worst = max(jax.tree.leaves(err))
    assert worst < 1e-5, worst
    report.record(f'unet {name} remat gradient max error relative to each leaf max', worst)

  def test_sdxl_conditioning_dict_equals_added_cond_kwargs(self):
    model, params = oracles.flax_unet('sdxl')
    x, t, context, added = oracles.unet_inputs('sdxl')
    want = model.apply({'params': params}, x, t, context, added)
    got = model.apply({'params': params}, x, t, {'context': context, **added})
    chex.assert_trees_all_equal(got, want)
    h = model.apply({'params': params}, x, t, {'context': context, **added}, method='hspace')
    chex.assert_trees_all_equal(h, model.apply({'params': params}, x, t, context, added,
                                               method='hspace'))
    with pytest.raises(ValueError, match="must hold 'context'"):
      model.apply({'params': params}, x, t, dict(added))
    with pytest.raises(ValueError, match='not both'):
      model.apply({'params': params}, x, t, {'context': context, **added}, added)
