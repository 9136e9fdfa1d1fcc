"""LoRA: identity at init, merge arithmetic (dense, conv), merge_many, jit, targets, files, and
parity with diffusers + peft in both directions on a tiny random SD1-shaped UNet."""

import copy
import functools
import json
import math
import tempfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from absl.testing import parameterized
from flax import core, traverse_util

from diffgeo_jax.models import convert
from diffgeo_jax.training import lora, sharding
from tests import report


def tiny_params(dtype=jnp.float32):
  """Dense kernels (one under a list-held `to_out_0`), a strided-conv-sized kernel, a bias, a norm
  scale, an embedding and a 3-D kernel that LoRA must refuse."""
  rng = np.random.RandomState(0)
  r = lambda *s: jnp.asarray(rng.randn(*s), dtype)
  return {
      'blk': {'attn1': {'to_q': {'kernel': r(6, 5), 'bias': r(5)}, 'to_out_0': {'kernel': r(5, 6)}},
              'attn2': {'to_q': {'kernel': r(6, 5)}}},
      'conv': {'kernel': r(3, 3, 2, 4), 'bias': r(4)},
      'norm': {'scale': r(4)},
      'embed': {'embedding': r(10, 6)},
      'odd': {'kernel': r(4, 3, 7)},
  }


def randomize_b(lora_params, seed=1, std=0.3):
  """Non-zero B so a merge changes something (init leaves B = 0)."""
  rng = np.random.RandomState(seed)
  flat = {p: lp.replace(b=jnp.asarray(std * rng.randn(*lp.b.shape), lp.b.dtype))
          for p, lp in lora.flatten(lora_params).items()}
  return lora.unflatten(flat)


def ref_merge(w, lp, scale=1.0):
  """W + scale * (alpha / r) * A @ B in float64 numpy."""
  a, b = np.asarray(lp.a, np.float64), np.asarray(lp.b, np.float64)
  d = a @ b if a.ndim == 2 else np.einsum('hwir,ro->hwio', a, b[0, 0])
  return np.asarray(w, np.float64) + scale * lp.alpha / a.shape[-1] * d


TARGETS = r'to_q$|to_out_0$|^conv$'


class MergeTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(jnp.float32, jnp.bfloat16)
  def test_merge_is_identity_at_init(self, dtype):
    params = tiny_params(dtype)
    lp = lora.init(jax.random.key(0), params, rank=3, targets=TARGETS)
    chex.assert_trees_all_equal(self.variant(lora.merge)(params, lp, 1.0), params)
    chex.assert_trees_all_equal(self.variant(lora.merge)(params, lp), params)

  def test_init_shapes_dtype_and_gaussian_std(self):
    params = tiny_params()
    lp = lora.init(jax.random.key(0), params, rank=3, targets=TARGETS)
    flat = lora.flatten(lp)
    self.assertEqual(sorted(flat), [('blk', 'attn1', 'to_out_0'), ('blk', 'attn1', 'to_q'),
                                    ('blk', 'attn2', 'to_q'), ('conv',)])
    q, conv = flat['blk', 'attn1', 'to_q'], flat['conv',]
    chex.assert_shape([q.a, q.b, conv.a, conv.b], [(6, 3), (3, 5), (3, 3, 2, 3), (1, 1, 3, 4)])
    self.assertEqual((q.rank, q.alpha, q.scaling), (3, 3.0, 1.0))  # alpha defaults to rank
    for x in jax.tree.leaves(lp):
      self.assertEqual(x.dtype, jnp.float32)
    self.assertTrue(all(not np.any(f.b) for f in flat.values()))
    # peft "gaussian": std 1 / r
    big = lora.init(jax.random.key(1), {'w': {'kernel': jnp.zeros((400, 8))}}, rank=4, targets='w')
    self.assertAlmostEqual(float(jnp.std(big['w'].a)), 0.25, delta=0.01)
    again = lora.init(jax.random.key(0), params, rank=3, targets=TARGETS)
    chex.assert_trees_all_equal(again, lp)  # deterministic in the key

  @chex.variants(with_jit=True, without_jit=True)
  def test_merge_equals_hand_computed_dense_and_conv(self):
    params = tiny_params()
    lp = randomize_b(lora.init(jax.random.key(0), params, rank=2, targets=TARGETS, alpha=5.0))
    merged = self.variant(lora.merge)(params, lp, 0.7)
    for path, f in lora.flatten(lp).items():
      w = traverse_util.flatten_dict(params)[path + ('kernel',)]
      got = traverse_util.flatten_dict(merged)[path + ('kernel',)]
      np.testing.assert_allclose(got, ref_merge(w, f, 0.7), rtol=1e-6, atol=1e-6)
    # untouched leaves are passed through unchanged
    chex.assert_trees_all_equal(merged['norm'], params['norm'])
    chex.assert_trees_all_equal(merged['blk']['attn1']['to_q']['bias'],
                                params['blk']['attn1']['to_q']['bias'])

  def test_conv_merge_equals_conv_a_then_1x1_b(self):
    """peft's Conv2d LoRA runs conv(x, A) with the base geometry, then a 1x1 conv B."""
    params = tiny_params()
    lp = randomize_b(lora.init(jax.random.key(0), params, rank=2, targets='^conv$', alpha=3.0))
    f = lp['conv']
    x = jnp.asarray(np.random.RandomState(2).randn(2, 9, 9, 2), jnp.float32)
    conv = functools.partial(jax.lax.conv_general_dilated, window_strides=(2, 2), padding='SAME',
                             dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                             precision=jax.lax.Precision.HIGHEST)
    merged = lora.merge(params, lp)['conv']['kernel']
    lora_out = conv(conv(x, f.a), f.b, window_strides=(1, 1))
    two_step = conv(x, params['conv']['kernel']) + f.scaling * lora_out
    np.testing.assert_allclose(conv(x, merged), two_step, rtol=1e-5, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_merge_many_equals_weighted_sequential_merges(self):
    params = tiny_params()
    lp1 = randomize_b(lora.init(jax.random.key(0), params, rank=2, targets=TARGETS), seed=1)
    lp2 = randomize_b(lora.init(jax.random.key(1), params, rank=3, targets='to_q$', alpha=6),
                      seed=2)
    many = self.variant(lora.merge_many)(params, [(lp1, 0.5), (lp2, -1.5)])
    seq = lora.merge(lora.merge(params, lp1, 0.5), lp2, -1.5)
    chex.assert_trees_all_close(many, seq, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_equal(lora.merge_many(params, []), params)

  def test_bf16_base_fp32_lora_keeps_base_dtype(self):
    params = tiny_params(jnp.bfloat16)
    lp = randomize_b(lora.init(jax.random.key(0), params, rank=2, targets=TARGETS))
    merged = lora.merge(params, lp)
    chex.assert_trees_all_equal_dtypes(merged, params)
    w = params['blk']['attn1']['to_q']['kernel']
    np.testing.assert_allclose(np.asarray(merged['blk']['attn1']['to_q']['kernel'], np.float32),
                               ref_merge(w, lp['blk']['attn1']['to_q']), rtol=1e-2, atol=1e-2)

  def test_frozen_dict_params_stay_frozen(self):
    params = core.freeze(tiny_params())
    lp = lora.init(jax.random.key(0), params, rank=2, targets=TARGETS)
    chex.assert_trees_all_equal(lora.merge(params, lp), params)

  def test_only_factors_are_leaves_and_gradients_flow(self):
    params = tiny_params()
    lp = lora.init(jax.random.key(0), params, rank=2, targets='attn1/to_q$', alpha=4)
    paths = [sharding.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(lp)]
    self.assertEqual(paths, ['blk/attn1/to_q/a', 'blk/attn1/to_q/b'])
    x = jnp.ones((3, 6))

    def loss(lp):
      w = lora.merge(params, lp)['blk']['attn1']['to_q']['kernel']
      return jnp.sum((x @ w) ** 2)
    g = jax.jit(jax.grad(loss))(lp)
    self.assertEqual(g['blk']['attn1']['to_q'].alpha, 4.0)
    # dL/dB = s A^T dL/dW is non-zero although B = 0
    self.assertGreater(float(jnp.abs(g['blk']['attn1']['to_q'].b).max()), 0.0)


class TargetsAndErrorsTest(parameterized.TestCase):

  def test_regex_list_and_search_semantics(self):
    params = tiny_params()
    lp = lora.init(jax.random.key(0), params, rank=1, targets=['attn2', 'out_0$'])
    self.assertEqual(sorted(lora.flatten(lp)),
                     [('blk', 'attn1', 'to_out_0'), ('blk', 'attn2', 'to_q')])
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    lp_abs = lora.init(jax.random.key(0), abstract, rank=1, targets=['attn2', 'out_0$'])
    chex.assert_trees_all_equal(lp_abs, lp)  # only shapes are read

  @parameterized.named_parameters(
      ('no_match', dict(targets='attn9'), 'match no kernel.*blk/attn1/to_q'),
      ('rank_zero', dict(rank=0), 'rank must be an integer >= 1'),
      ('rank_float', dict(rank=1.5), 'rank must be an integer'),
      ('rank_bool', dict(rank=True), 'rank must be an integer'),
      ('alpha_zero', dict(alpha=0.0), 'alpha must be a positive'),
      ('alpha_nan', dict(alpha=float('nan')), 'alpha must be a positive'),
      ('bad_regex', dict(targets='to_(q'), 'invalid'),
      ('empty_targets', dict(targets=[]), 'targets is empty'),
      ('three_d_kernel', dict(targets='odd'), r'dense \(2-D\) and conv \(4-D\).*odd'),
  )
  def test_init_errors(self, override, message):
    kwargs = {'rank': 2, 'targets': 'to_q$', **override}
    with pytest.raises(ValueError, match=message):
      lora.init(jax.random.key(0), tiny_params(), **kwargs)

  def test_merge_rejects_factors_that_do_not_fit(self):
    params = tiny_params()
    lp = lora.init(jax.random.key(0), params, rank=2, targets='to_q$')
    other = {'blk': {'attn1': {'to_q': {'kernel': jnp.zeros((7, 5))}}}}
    with pytest.raises(ValueError, match=r'blk/attn1/to_q \(kernel \(7, 5\)'):
      lora.merge(other, lp)
    with pytest.raises(ValueError, match='blk/attn2/to_q \\(no kernel there\\)'):
      lora.merge(other, lp)
    with pytest.raises(ValueError, match='not a LoRA parameter tree'):
      lora.merge(params, {'blk': {'a': jnp.zeros(3)}})


def _hetero_lora(params):
  """Two ranks and alphas in one adapter: rank_pattern / alpha_pattern in the file."""
  lp1 = lora.init(jax.random.key(0), params, rank=3, targets=r'attn1/to_q$|^conv$', alpha=6)
  lp2 = lora.init(jax.random.key(1), params, rank=2, targets=r'to_out_0$', alpha=0.5)
  return randomize_b(lora.unflatten({**lora.flatten(lp1), **lora.flatten(lp2)}))


class FileTest(chex.TestCase):

  def test_round_trip_is_exact_and_layout_is_torch(self):
    tmp = self.enterContext(tempfile.TemporaryDirectory())
    params = tiny_params()
    lp = _hetero_lora(params)
    file = lora.save(tmp, lp)
    self.assertTrue(file.endswith('/pytorch_lora_weights.safetensors'))
    chex.assert_trees_all_equal(lora.load(tmp, params), lp)
    tensors = safetensors.numpy.load_file(file)
    self.assertEqual({k: v.shape for k, v in tensors.items()}, {
        'unet.blk.attn1.to_q.lora_A.weight': (3, 6), 'unet.blk.attn1.to_q.lora_B.weight': (5, 3),
        'unet.blk.attn1.to_out.0.lora_A.weight': (2, 5),
        'unet.blk.attn1.to_out.0.lora_B.weight': (6, 2),
        'unet.conv.lora_A.weight': (3, 2, 3, 3), 'unet.conv.lora_B.weight': (4, 3, 1, 1)})
    np.testing.assert_array_equal(tensors['unet.conv.lora_A.weight'],
                                  np.transpose(lp['conv'].a, (3, 2, 0, 1)))
    with safetensors.safe_open(file, 'np') as f:
      meta = json.loads(f.metadata()['lora_adapter_metadata'])
    self.assertEqual((meta['unet.r'], meta['unet.lora_alpha']), (3, 6))
    self.assertEqual(meta['unet.rank_pattern'], {'^blk.attn1.to_out.0': 2})
    self.assertEqual(meta['unet.alpha_pattern'], {'^blk.attn1.to_out.0': 0.5})

  def test_prefix_none_fp16_and_other_prefixes_ignored(self):
    tmp = self.enterContext(tempfile.TemporaryDirectory())
    params = tiny_params()
    lp = _hetero_lora(params)
    file = lora.save(tmp + '/bare.safetensors', lp, prefix=None, dtype=np.float16)
    tensors = safetensors.numpy.load_file(file)
    self.assertIn('conv.lora_A.weight', tensors)
    self.assertEqual(tensors['conv.lora_A.weight'].dtype, np.float16)
    back = lora.load(file, params, prefix=None)
    chex.assert_trees_all_close(back, lp, atol=2e-3)
    self.assertEqual(back['blk']['attn1']['to_out_0'].alpha, 0.5)
    # a pipeline file with a text encoder part: prefix='unet' takes only the unet keys
    both = {**{f'unet.{k}': v for k, v in tensors.items()},
            'text_encoder.foo.lora_A.weight': np.zeros((2, 3), np.float16)}
    with safetensors.safe_open(file, 'np') as f:
      meta = {f'unet.{k}': v for k, v in json.loads(f.metadata()['lora_adapter_metadata']).items()}
    safetensors.numpy.save_file(both, tmp + '/both.safetensors',
                                metadata={'lora_adapter_metadata': json.dumps(meta)})
    chex.assert_trees_all_equal(lora.load(tmp + '/both.safetensors', params), back)

  def test_without_metadata_alpha_is_rank_and_legacy_names_load(self):
    tmp = self.enterContext(tempfile.TemporaryDirectory())
    params = tiny_params()
    lp = _hetero_lora(params)
    file = lora.save(tmp, lp)
    tensors = safetensors.numpy.load_file(file)
    # training scripts' convert_state_dict_to_diffusers: to_out.0.lora_A -> to_out.0.lora.down
    # and attention-processor era files name to_q's factors to_q_lora.down / .up
    renames = {'to_out.0.lora_A': 'to_out.0.lora.down', 'to_out.0.lora_B': 'to_out.0.lora.up',
               'attn1.to_q.lora_A': 'attn1.to_q_lora.down', 'attn1.to_q.lora_B': 'attn1.to_q_lora.up'}
    legacy = {functools.reduce(lambda k, r: k.replace(*r), renames.items(), k): v
              for k, v in tensors.items()}
    self.assertIn('unet.blk.attn1.to_q_lora.up.weight', legacy)
    safetensors.numpy.save_file(legacy, tmp + '/legacy.safetensors')
    back = lora.load(tmp + '/legacy.safetensors', params)
    for path, f in lora.flatten(back).items():
      self.assertEqual(f.alpha, f.rank, path)  # diffusers' rule without metadata: scaling 1
    chex.assert_trees_all_equal(jax.tree.leaves(back), jax.tree.leaves(lp))

  def test_rslora_metadata_is_folded_into_alpha(self):
    tmp = self.enterContext(tempfile.TemporaryDirectory())
    params = tiny_params()
    lp = randomize_b(lora.init(jax.random.key(0), params, rank=4, targets='to_q$'))
    tensors = safetensors.numpy.load_file(lora.save(tmp, lp))
    meta = {'unet.r': 4, 'unet.lora_alpha': 8, 'unet.use_rslora': True}
    safetensors.numpy.save_file(tensors, tmp + '/rs.safetensors',
                                metadata={'lora_adapter_metadata': json.dumps(meta)})
    back = lora.load(tmp + '/rs.safetensors', params)
    self.assertAlmostEqual(back['blk']['attn1']['to_q'].scaling, 8 / math.sqrt(4))

  def test_load_errors_list_every_problem(self):
    tmp = self.enterContext(tempfile.TemporaryDirectory())
    params = tiny_params()
    tensors = safetensors.numpy.load_file(lora.save(tmp, _hetero_lora(params)))
    bad = dict(tensors)
    del bad['unet.conv.lora_B.weight']
    bad['unet.nowhere.lora_A.weight'] = np.zeros((2, 6), np.float32)
    bad['unet.blk.attn1.to_q.lora_B.bias'] = np.zeros((5,), np.float32)
    bad['unet.blk.attn1.to_q.lora_A.weight'] = np.zeros((3, 7), np.float32)
    safetensors.numpy.save_file(bad, tmp + '/bad.safetensors')
    with pytest.raises(convert.CheckpointMismatchError) as info:
      lora.load(tmp + '/bad.safetensors', params)
    err = info.value
    self.assertEqual(err.missing, ['conv.lora_B.weight'])
    self.assertEqual(err.unexpected, ['blk.attn1.to_q.lora_B.bias', 'nowhere.lora_A.weight'])
    self.assertEqual(err.mismatched, [('blk.attn1.to_q.lora_A.weight', (6, 3), (7, 3))])
    with pytest.raises(ValueError, match=r"no keys under prefix 'text_encoder'.*\['unet'\]"):
      lora.load(tmp, params, prefix='text_encoder')
    with pytest.raises(FileNotFoundError):
      lora.load(tmp + '/missing', params)
    meta = {'unet.r': 5, 'unet.lora_alpha': 5}
    safetensors.numpy.save_file(tensors, tmp + '/wrong_r.safetensors',
                                metadata={'lora_adapter_metadata': json.dumps(meta)})
    with pytest.raises(ValueError, match='other ranks than the tensors'):
      lora.load(tmp + '/wrong_r.safetensors', params)


# -- parity with diffusers + peft ------------------------------------------------------------------

@functools.cache
def _flax_sd1():
  from tests.models import oracles
  model, params = oracles.flax_unet('sd1')
  return jax.jit(model.apply), params


def _flax_eps(params):
  from tests.models import oracles
  apply, _ = _flax_sd1()
  x, t, context, _ = oracles.unet_inputs('sd1')
  return np.asarray(apply({'params': params}, x, t, context))


def _torch_eps(tm):
  import torch

  from tests.models import oracles
  x, t, context, _ = oracles.unet_inputs('sd1')
  with torch.no_grad():
    return oracles.nhwc(tm(oracles.nchw(x), torch.from_numpy(t), torch.from_numpy(context)).sample)


def _fresh_torch_unet():
  from tests.models import oracles
  return copy.deepcopy(oracles.torch_unet('sd1'))  # the cached one is shared by other tests


def _check_parity(ours, ref, base, what):
  from tests.models import oracles
  err, scale = oracles.assert_close_to_reference(ours, ref, what=what)
  effect = float(np.abs(ref - base).max())
  assert effect > 100 * max(err, 1e-6), f'{what}: the LoRA barely changes the output ({effect})'
  report.record(f'{what}: max abs err (output scale {scale:.2f}, LoRA effect {effect:.2f})', err)


class DiffusersParityTest(chex.TestCase):

  def test_our_file_in_diffusers_matches_our_merge(self):
    """lora.save -> diffusers' pipeline loader (lora_state_dict + load_lora_into_unet, i.e.
    pipe.load_lora_weights) -> torch UNet with peft adapters == our UNet with merge(params, lp).
    Dense and conv targets, two ranks and alphas (rank_pattern / alpha_pattern)."""
    from diffusers import StableDiffusionPipeline
    tmp = self.enterContext(tempfile.TemporaryDirectory())
    _, params = _flax_sd1()
    lp1 = lora.init(jax.random.key(0), params, rank=4, alpha=8,
                    targets=r'attn1/to_(q|k|v|out_0)$|resnets_\d/conv1$')
    lp2 = lora.init(jax.random.key(1), params, rank=2, alpha=3, targets=r'attn2/to_(q|v)$|proj_in$')
    lp = randomize_b(lora.unflatten({**lora.flatten(lp1), **lora.flatten(lp2)}), std=0.1)
    lora.save(tmp, lp)

    tm = _fresh_torch_unet()
    state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(tmp,
                                                                      return_lora_metadata=True)
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, tm, metadata=metadata)
    n_lora = sum(1 for n, _ in tm.named_modules() if n.endswith('lora_A.default_0'))
    self.assertEqual(n_lora, len(lora.flatten(lp)))
    _check_parity(_flax_eps(lora.merge(params, lp)), _torch_eps(tm), _flax_eps(params),
                  'ours -> diffusers')

  def test_peft_adapter_saved_by_diffusers_matches_our_load_and_merge(self):
    """A peft LoRA (gaussian init, r=4, alpha=8, per-module rank/alpha patterns, Linear + Conv2d),
    saved as diffusers' training scripts do (convert_state_dict_to_diffusers of
    get_peft_model_state_dict, then save_lora_weights with the adapter metadata) -> lora.load +
    merge == the torch UNet with the adapter."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    tmp = self.enterContext(tempfile.TemporaryDirectory())
    _, params = _flax_sd1()
    tm = _fresh_torch_unet()
    tm.add_adapter(LoraConfig(
        r=4, lora_alpha=8, init_lora_weights='gaussian',
        target_modules=['attn1.to_q', 'attn1.to_k', 'attn1.to_v', 'attn1.to_out.0', 'proj_in',
                        'conv1'],
        rank_pattern={'conv1': 2}, alpha_pattern={'proj_in': 3}))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
      for name, p in tm.named_parameters():
        if 'lora_B' in name:
          p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(tm))
    self.assertTrue(any('.lora.down.' in k for k in layers))  # the legacy names are exercised
    StableDiffusionPipeline.save_lora_weights(
        tmp, unet_lora_layers=layers,
        unet_lora_adapter_metadata=tm.peft_config['default'].to_dict())

    lp = lora.load(tmp, params)
    flat = lora.flatten(lp)
    conv1 = flat['down_blocks_0', 'resnets_0', 'conv1']
    proj_in = flat['down_blocks_0', 'attentions_0', 'proj_in']
    q = flat['down_blocks_0', 'attentions_0', 'transformer_blocks_0', 'attn1', 'to_q']
    self.assertEqual([(f.rank, f.alpha) for f in (conv1, proj_in, q)],
                     [(2, 8.0), (4, 3.0), (4, 8.0)])
    _check_parity(_flax_eps(lora.merge(params, lp)), _torch_eps(tm), _flax_eps(params),
                  'peft -> ours')

    # No metadata (older diffusers files): both sides fall back to alpha = r.
    plain = get_peft_model_state_dict(tm)
    StableDiffusionPipeline.save_lora_weights(tmp + '/plain', unet_lora_layers=plain)
    lp_plain = lora.load(tmp + '/plain', params)
    self.assertTrue(all(f.alpha == f.rank for f in lora.flatten(lp_plain).values()))
    tm2 = _fresh_torch_unet()
    state, alphas = StableDiffusionPipeline.lora_state_dict(tmp + '/plain')
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, tm2)
    _check_parity(_flax_eps(lora.merge(params, lp_plain)), _torch_eps(tm2), _flax_eps(params),
                  'peft, no metadata -> diffusers vs ours')
