"""LoRA files as released for diffusers / peft / kohya-ss load into our LoRA tree and merge to the
same UNet outputs as the torch references (tiny random UNets), and evaluate_unlearning takes such a
file as a run (configs/duo/evaluate_release.py)."""

import copy
import json
import os

import jax
import numpy as np
import pytest
import safetensors.numpy
import torch

from diffgeo_jax import digits
from diffgeo_jax.models import clip
from diffgeo_jax.training import lora, lora_formats
from tests import report
from tests.models import oracles

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Every rank and alpha differs somewhere: r 4 / alpha 6, conv1 rank 2, proj_in alpha 3.
PATTERNS = dict(r=4, lora_alpha=6, rank_pattern={'conv1': 2}, alpha_pattern={'proj_in': 3})
SD1_TARGETS = ['attn1.to_q', 'attn1.to_k', 'attn1.to_v', 'attn1.to_out.0', 'attn2.to_k', 'proj_in',
               'conv1', 'conv_shortcut', 'time_emb_proj', 'ff.net.2']
SDXL_TARGETS = ['attn1.to_q', 'attn2.to_out.0', 'proj_in', 'conv1', 'conv2', 'time_emb_proj',
                'conv_shortcut', 'downsamplers.0.conv', 'upsamplers.0.conv', 'conv_in', 'conv_out',
                'time_embedding.linear_1', 'add_embedding.linear_2']


@pytest.fixture(scope='module')
def flax_unets():
  return {name: (jax.jit(oracles.flax_unet(name)[0].apply), oracles.flax_unet(name)[1])
          for name in ('sd1', 'sdxl')}


def flax_eps(flax_unets, name, params):
  apply, _ = flax_unets[name]
  x, t, context, added = oracles.unet_inputs(name)
  return np.asarray(apply({'params': params}, x, t, context, added))


def torch_eps(tm, name):
  x, t, context, added = oracles.unet_inputs(name)
  kw = {}
  if added is not None:
    kw['added_cond_kwargs'] = {k: torch.from_numpy(v) for k, v in added.items()}
  with torch.no_grad():
    return oracles.nhwc(tm(oracles.nchw(x), torch.from_numpy(t), torch.from_numpy(context),
                           **kw).sample)


def fresh_unet(name):
  return copy.deepcopy(oracles.torch_unet(name))  # the cached one is shared by other tests


def randomize_b(module, seed=0, std=0.1):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for n, p in module.named_parameters():
      if 'lora_B' in n:
        p.copy_(std * torch.randn(p.shape, generator=gen))
  return module


def peft_factors(tm):
  """{module name: (A, B, alpha)} of the torch model's peft LoRA layers (torch layouts)."""
  from peft.tuners.lora import LoraLayer
  out = {}
  for name, m in tm.named_modules():
    if isinstance(m, LoraLayer) and 'default' in m.lora_A:
      name = name.removeprefix('base_model.model.')
      out[name] = (m.lora_A['default'].weight.detach().numpy().copy(),
                   m.lora_B['default'].weight.detach().numpy().copy(),
                   m.scaling['default'] * m.r['default'])
  return out


def kohya_file(path, factors, rename=lambda m: m, prefix='lora_unet_', dtype=np.float32):
  """A kohya-ss file of these factors: lora_down / lora_up / a 0-d alpha per module."""
  state = {}
  for module, (a, b, alpha) in factors.items():
    key = prefix + rename(module).replace('.', '_')
    state[f'{key}.lora_down.weight'] = a.astype(dtype)
    state[f'{key}.lora_up.weight'] = b.astype(dtype)
    state[f'{key}.alpha'] = np.asarray(alpha, dtype)
  safetensors.numpy.save_file(state, path)
  return path


def check(ours, ref, base, what):
  err, scale = oracles.assert_close_to_reference(ours, ref, what=what)
  effect = float(np.abs(ref - base).max())
  assert err <= 1e-5 * scale, f'{what}: {err}'
  assert effect > 100 * max(err, 1e-6), f'{what}: the LoRA barely changes the output ({effect})'
  report.record(f'{what}: max abs err (output scale {scale:.2f}, LoRA effect {effect:.2f})', err)


# -- peft ------------------------------------------------------------------------------------------

def test_peft_save_pretrained_folder_and_bare_state_dict_match_the_peft_model(tmp_path, flax_unets):
  """`get_peft_model(unet, config).save_pretrained(dir)` (adapter_model.safetensors with
  base_model.model.* keys + adapter_config.json), and diffusers' `save_lora_adapter` (bare keys +
  metadata) -> lora.load + merge == the torch UNet with the adapter active."""
  from peft import LoraConfig, get_peft_model
  _, params = flax_unets['sd1']
  base = flax_eps(flax_unets, 'sd1', params)
  tm = fresh_unet('sd1')
  pm = randomize_b(get_peft_model(tm, LoraConfig(init_lora_weights='gaussian',
                                                 target_modules=SD1_TARGETS, **PATTERNS)))
  pm.save_pretrained(tmp_path / 'peft')
  keys = safetensors.numpy.load_file(tmp_path / 'peft' / 'adapter_model.safetensors')
  assert all(k.startswith('base_model.model.') for k in keys)
  ref = torch_eps(pm, 'sd1')
  for path in (tmp_path / 'peft', tmp_path / 'peft' / 'adapter_model.safetensors'):
    lp = lora.load(path, params)
    flat = lora.flatten(lp)
    assert len(flat) == len(peft_factors(pm))
    conv1 = flat['down_blocks_0', 'resnets_0', 'conv1']
    proj_in = flat['down_blocks_0', 'attentions_0', 'proj_in']
    assert [(conv1.rank, conv1.alpha), (proj_in.rank, proj_in.alpha)] == [(2, 6.0), (4, 3.0)]
    check(flax_eps(flax_unets, 'sd1', lora.merge(params, lp)), ref, base, 'peft save_pretrained')

  # The same adapter through diffusers' model-level save: bare peft keys, config in the header.
  tm2 = fresh_unet('sd1')
  tm2.add_adapter(LoraConfig(init_lora_weights='gaussian', target_modules=SD1_TARGETS, **PATTERNS))
  tm2.load_state_dict({k.removeprefix('base_model.model.'): v
                       for k, v in pm.state_dict().items()}, strict=False)
  ref2 = torch_eps(tm2, 'sd1')
  np.testing.assert_allclose(ref2, ref, atol=1e-6)
  tm2.save_lora_adapter(tmp_path / 'bare')
  lp = lora.load(tmp_path / 'bare', params)  # prefix='unet', but the file has none: bare keys
  check(flax_eps(flax_unets, 'sd1', lora.merge(params, lp)), ref2, base,
        'diffusers save_lora_adapter')

  # A peft folder that says DoRA is refused by name.
  cfg = json.loads((tmp_path / 'peft' / 'adapter_config.json').read_text())
  (tmp_path / 'peft' / 'adapter_config.json').write_text(json.dumps({**cfg, 'use_dora': True}))
  with pytest.raises(ValueError, match='use_dora is set'):
    lora.load(tmp_path / 'peft', params)


# -- kohya -----------------------------------------------------------------------------------------

def test_kohya_diffusers_names_match_peft_and_diffusers(tmp_path, flax_unets):
  """kohya-ss keys with underscored diffusers module names (SD 1.x), alpha tensors != rank, text
  encoder keys beside them: our load + merge == the torch UNet with the same peft factors ==
  diffusers' own kohya conversion (`pipe.load_lora_weights` path)."""
  from diffusers import StableDiffusionPipeline
  from peft import LoraConfig
  _, params = flax_unets['sd1']
  base = flax_eps(flax_unets, 'sd1', params)
  tm = fresh_unet('sd1')
  tm.add_adapter(LoraConfig(init_lora_weights='gaussian', target_modules=SD1_TARGETS, **PATTERNS))
  randomize_b(tm)
  factors = peft_factors(tm)
  alphas = {alpha for _, _, alpha in factors.values()}
  assert alphas == {6.0, 3.0}  # never the rank
  file = kohya_file(tmp_path / 'kohya.safetensors', factors)
  te = np.zeros((2, 24), np.float32)  # a text-encoder module next to them: ignored for the UNet
  state = safetensors.numpy.load_file(file)
  te_key = 'lora_te_text_model_encoder_layers_0_self_attn_q_proj'
  state.update({f'{te_key}.lora_down.weight': te, f'{te_key}.lora_up.weight': te.T.copy(),
                f'{te_key}.alpha': np.asarray(1, np.float32)})
  safetensors.numpy.save_file(state, file)
  assert any('to_out_0' in k for k in state) and any('ff_net_2' in k for k in state)

  lp = lora.load(file, params)
  flat = lora.flatten(lp)
  assert len(flat) == len(factors)
  q = flat['down_blocks_0', 'attentions_0', 'transformer_blocks_0', 'attn1', 'to_q']
  assert (q.rank, q.alpha) == (4, 6.0)
  ours = flax_eps(flax_unets, 'sd1', lora.merge(params, lp))
  check(ours, torch_eps(tm, 'sd1'), base, 'kohya (diffusers names) vs peft')

  ref = fresh_unet('sd1')
  sd, net_alphas = StableDiffusionPipeline.lora_state_dict(str(file), unet_config=ref.config)
  StableDiffusionPipeline.load_lora_into_unet(sd, net_alphas, ref)
  check(ours, torch_eps(ref, 'sd1'), base, 'kohya (diffusers names) vs diffusers')


# The tiny SDXL UNet (oracles 'sdxl': layers_per_block 1; down: plain, cross-attn, cross-attn; up:
# cross-attn, cross-attn, plain) in the original sgm / LDM names, written out by hand.
SGM_BLOCKS = {
    'down_blocks.0.resnets.0': 'input_blocks.1.0',
    'down_blocks.0.downsamplers.0': 'input_blocks.2.0',
    'down_blocks.1.resnets.0': 'input_blocks.3.0', 'down_blocks.1.attentions.0': 'input_blocks.3.1',
    'down_blocks.1.downsamplers.0': 'input_blocks.4.0',
    'down_blocks.2.resnets.0': 'input_blocks.5.0', 'down_blocks.2.attentions.0': 'input_blocks.5.1',
    'mid_block.resnets.0': 'middle_block.0', 'mid_block.attentions.0': 'middle_block.1',
    'mid_block.resnets.1': 'middle_block.2',
    'up_blocks.0.resnets.0': 'output_blocks.0.0', 'up_blocks.0.attentions.0': 'output_blocks.0.1',
    'up_blocks.0.resnets.1': 'output_blocks.1.0', 'up_blocks.0.attentions.1': 'output_blocks.1.1',
    'up_blocks.0.upsamplers.0': 'output_blocks.1.2',
    'up_blocks.1.resnets.0': 'output_blocks.2.0', 'up_blocks.1.attentions.0': 'output_blocks.2.1',
    'up_blocks.1.resnets.1': 'output_blocks.3.0', 'up_blocks.1.attentions.1': 'output_blocks.3.1',
    'up_blocks.1.upsamplers.0': 'output_blocks.3.2',
    'up_blocks.2.resnets.0': 'output_blocks.4.0', 'up_blocks.2.resnets.1': 'output_blocks.5.0',
}
SGM_TOP = {'conv_in': 'input_blocks.0.0', 'conv_out': 'out.2',
           'time_embedding.linear_1': 'time_embed.0', 'time_embedding.linear_2': 'time_embed.2',
           'add_embedding.linear_1': 'label_emb.0.0', 'add_embedding.linear_2': 'label_emb.0.2'}
SGM_LAYERS = {'conv1': 'in_layers.2', 'conv2': 'out_layers.3', 'time_emb_proj': 'emb_layers.1',
              'conv_shortcut': 'skip_connection'}


def to_sgm(module: str) -> str:
  if module in SGM_TOP:
    return SGM_TOP[module]
  for block, sgm in SGM_BLOCKS.items():
    if module.startswith(block + '.'):
      rest = module[len(block) + 1:]
      if 'resnets' in block:
        rest = SGM_LAYERS[rest]
      elif 'downsamplers' in block:
        rest = {'conv': 'op'}[rest]
      return f'{sgm}.{rest}'
  raise KeyError(module)


def test_kohya_sgm_names_match_peft_and_diffusers(tmp_path, flax_unets):
  """kohya-ss SDXL keys in the original UNet's names (input_blocks / middle_block /
  output_blocks, in_layers_2, emb_layers_1, skip_connection, op, out_2, time_embed, label_emb),
  fp16 alpha tensors: our load + merge == the torch UNet with the same factors == diffusers."""
  from diffusers import StableDiffusionXLPipeline
  from peft import LoraConfig
  _, params = flax_unets['sdxl']
  base = flax_eps(flax_unets, 'sdxl', params)
  tm = fresh_unet('sdxl')
  tm.add_adapter(LoraConfig(init_lora_weights='gaussian', target_modules=SDXL_TARGETS, **PATTERNS))
  randomize_b(tm, seed=1)
  factors = peft_factors(tm)
  file = kohya_file(tmp_path / 'sgm.safetensors', factors, rename=to_sgm)
  state = safetensors.numpy.load_file(file)
  state = {k: v.astype(np.float16) if k.endswith('.alpha') else v for k, v in state.items()}
  safetensors.numpy.save_file(state, file)
  for name in ('input_blocks_3_1_transformer_blocks_0_attn1_to_q', 'middle_block_0_in_layers_2',
               'output_blocks_1_2_conv', 'input_blocks_2_0_op', 'out_2', 'label_emb_0_2',
               'output_blocks_0_0_skip_connection', 'input_blocks_0_0'):
    assert f'lora_unet_{name}.lora_down.weight' in state, name
  assert not any('down_blocks' in k or 'up_blocks' in k for k in state)

  lp = lora.load(file, params)
  assert len(lora.flatten(lp)) == len(factors)
  ours = flax_eps(flax_unets, 'sdxl', lora.merge(params, lp))
  check(ours, torch_eps(tm, 'sdxl'), base, 'kohya (sgm names) vs peft')

  ref = fresh_unet('sdxl')
  sd, net_alphas = StableDiffusionXLPipeline.lora_state_dict(str(file), unet_config=ref.config)
  StableDiffusionXLPipeline.load_lora_into_unet(sd, net_alphas, ref)
  check(ours, torch_eps(ref, 'sdxl'), base, 'kohya (sgm names) vs diffusers')


def test_kohya_text_encoder_keys_load_under_their_prefix(tmp_path):
  """lora_te_ keys with prefix='text_encoder' give the same tree as the diffusers layout of the
  same factors; with prefix='unet' a text-encoder-only kohya file names what it holds."""
  tc = oracles.torch_clip()
  model = clip.CLIPTextModel(clip.CLIPTextConfig.from_dict(tc.config.to_dict()))
  params = clip.abstract_params(model)
  rng = np.random.RandomState(0)
  factors = {f'text_model.encoder.layers.{i}.self_attn.{p}': (
      rng.randn(3, 24).astype(np.float32), rng.randn(24, 3).astype(np.float32), 5.0)
      for i in (0, 1) for p in ('q_proj', 'out_proj')}
  factors['text_model.encoder.layers.1.mlp.fc1'] = (rng.randn(2, 24).astype(np.float32),
                                                   rng.randn(37, 2).astype(np.float32), 1.0)
  kohya_file(tmp_path / 'te.safetensors', factors, prefix='lora_te_')
  got = lora.flatten(lora.load(tmp_path / 'te.safetensors', params, prefix='text_encoder'))
  assert len(got) == 5
  for module, (a, b, alpha) in factors.items():
    f = got[tuple(module.replace('layers.', 'layers_').split('.'))]
    np.testing.assert_array_equal(f.a, a.T)
    np.testing.assert_array_equal(f.b, b.T)
    assert f.alpha == alpha
  with pytest.raises(ValueError, match=r"no kohya keys for 'unet'.*\['lora_te_'\]"):
    lora.load(tmp_path / 'te.safetensors', params)
  with pytest.raises(ValueError, match='kohya LoRA file.*pass prefix'):
    lora.load(tmp_path / 'te.safetensors', params, prefix=None)


def test_unknown_ambiguous_and_non_lora_kohya_keys_are_one_named_error(tmp_path):
  params = {'blk': {'a_b': {'kernel': np.zeros((4, 3))}},
            'blk_a': {'b': {'kernel': np.zeros((4, 3))}},
            'down': {'kernel': np.zeros((4, 3))}}
  a, b = np.ones((2, 4), np.float32), np.ones((3, 2), np.float32)
  state = {'lora_unet_down.lora_down.weight': a, 'lora_unet_down.lora_up.weight': b,
           'lora_unet_blk_a_b.lora_down.weight': a, 'lora_unet_blk_a_b.lora_up.weight': b,
           'lora_unet_nowhere_to_q.lora_down.weight': a, 'lora_unet_nowhere_to_q.lora_up.weight': b,
           'lora_unet_down.hada_w1_a': a, 'lora_unet_half.lora_down.weight': a,
           'lora_unet_input_blocks_9_1_proj_in.lora_down.weight': a,
           'lora_unet_input_blocks_9_1_proj_in.lora_up.weight': b}
  safetensors.numpy.save_file(state, tmp_path / 'bad.safetensors')
  with pytest.raises(lora_formats.KohyaKeyError) as info:
    lora.load(tmp_path / 'bad.safetensors', params)
  err = info.value
  assert err.unknown == ['lora_unet_input_blocks_9_1_proj_in', 'lora_unet_nowhere_to_q']
  assert err.ambiguous == ["lora_unet_blk_a_b -> ['blk.a_b', 'blk_a.b']"]
  assert err.unsupported == ['lora_unet_down.hada_w1_a']
  assert err.unpaired == ['lora_unet_half (no lora_up.weight)']
  for part in ('name no module', 'name several modules', 'not plain LoRA', 'no matching'):
    assert part in str(err)
  # Without the bad keys the good one loads, with alpha = rank (no .alpha tensor).
  good = {k: v for k, v in state.items() if k.startswith('lora_unet_down.lora')}
  safetensors.numpy.save_file(good, tmp_path / 'good.safetensors')
  f = lora.flatten(lora.load(tmp_path / 'good.safetensors', params))[('down',)]
  assert (f.rank, f.alpha) == (2, 2.0)


def test_folder_without_a_lora_file_names_what_it_looked_for(tmp_path):
  (tmp_path / 'adapter_model.bin').write_bytes(b'')
  with pytest.raises(FileNotFoundError, match=r'pytorch_lora_weights.safetensors \(diffusers\) '
                     r'and adapter_model.safetensors \(peft\).*adapter_model.bin are not read'):
    lora.load(tmp_path, {})


# -- a DUO release in evaluate_unlearning ----------------------------------------------------------



def test_a_duo_style_release_loads_as_its_peft_factors(tmp_path):
  """A LoRA saved as the DUO authors' train/unlearn-sd.py saves it (peft adapter on attn1 q/k/v/out,
  convert_state_dict_to_diffusers, StableDiffusionPipeline.save_lora_weights: `lora.down` names,
  no metadata) merges into the digits UNet as W + B A per module (scaling r / r = 1). Evaluating
  such a file with launch/evaluate_unlearning.py is tested in tests/launch/test_train_duo.py."""
  from diffusers import StableDiffusionPipeline, UNet2DConditionModel
  from diffusers.utils import convert_state_dict_to_diffusers
  from peft import LoraConfig
  from peft.utils import get_peft_model_state_dict

  from diffgeo_jax import models
  from diffgeo_jax.models import convert
  tm = UNet2DConditionModel.from_pretrained(os.path.join(digits.pipeline_dir(), 'unet'))
  tm.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights='gaussian',
                            target_modules=['attn1.to_k', 'attn1.to_q', 'attn1.to_v',
                                            'attn1.to_out.0']))
  randomize_b(tm, std=0.05)
  peft_state = {k: v.detach().numpy() for k, v in get_peft_model_state_dict(tm).items()}
  StableDiffusionPipeline.save_lora_weights(
      tmp_path, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(tm)))
  file = tmp_path / 'pytorch_lora_weights.safetensors'
  assert any(k.endswith('.lora.down.weight') for k in safetensors.numpy.load_file(file))
  params = models.load_unet(os.path.join(digits.pipeline_dir(), 'unet'))[1]
  merged = lora.merge(params, lora.load(file, params))
  modules = sorted({k.rsplit('.lora_', 1)[0] for k in peft_state})
  assert len(modules) >= 8
  flat_base = dict(jax.tree_util.tree_leaves_with_path(params))
  flat_merged = dict(jax.tree_util.tree_leaves_with_path(merged))
  by_path = {tuple(k.key for k in path): path for path in flat_base}
  for m in modules:
    path = by_path[convert.torch_key_to_flax_prefix(f'{m}.weight') + ('kernel',)]
    want = (peft_state[f'{m}.lora_B.weight'] @ peft_state[f'{m}.lora_A.weight']).T
    np.testing.assert_allclose(np.asarray(flat_merged[path] - flat_base[path]), want,
                               rtol=1e-5, atol=1e-6, err_msg=m)
