"""Loading and saving model and pipeline folders: diffusers/transformers write, we read, and back."""

import json
import os
import shutil

import chex
import jax
import numpy as np
import pytest
import safetensors.numpy
import torch

from diffgeo_jax import models
from diffgeo_jax.models import config_utils, convert, loading
from tests.models import oracles


def _unet_eps(model, params, name='sd1'):
  x, t, context, added = oracles.unet_inputs(name)
  return model.apply({'params': params}, x, t, context, added)


@pytest.fixture(scope='module')
def diffusers_unet_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('unet')
  oracles.torch_unet('sd1').save_pretrained(path)
  return path


def test_load_unet_from_diffusers_folder_matches_torch(diffusers_unet_dir):
  unet, params = models.load_unet(diffusers_unet_dir)
  x, t, context, added = oracles.unet_inputs('sd1')
  ref, _ = oracles.torch_unet_outputs('sd1', x, t, context, added)
  oracles.assert_close_to_reference(_unet_eps(unet, params), ref)


@pytest.mark.parametrize('kind', ['unet_sdxl', 'vae', 'clip', 'clip_projection'])
def test_save_load_round_trip_is_exact_and_reference_loads_it(tmp_path, kind):
  if kind == 'unet_sdxl':
    model, params = oracles.flax_unet('sdxl')
    ref_module = oracles.torch_unet('sdxl')
  elif kind == 'vae':
    model, params = oracles.flax_vae()
    ref_module = oracles.torch_vae()
  else:
    ref_module = oracles.torch_clip(with_projection=kind == 'clip_projection')
    ref_module.save_pretrained(tmp_path / 'src')
    model, params = models.load_text_encoder(tmp_path / 'src')
  loading.save_model(tmp_path / 'ours', model, params)
  model2, params2 = loading.load_model(tmp_path / 'ours', 'none')
  assert type(model2) is type(model) and model2.config == model.config
  chex.assert_trees_all_equal(params2, params)  # exact
  # The reference library loads what we wrote, with the same weights.
  reloaded = type(ref_module).from_pretrained(tmp_path / 'ours').eval()
  module = loading.KINDS[type(model).__name__].module
  ref_params = convert.torch_to_flax(oracles.state_dict_numpy(reloaded), params,
                                     ignore=module.TORCH_IGNORE_KEYS,
                                     renames=getattr(module, 'TORCH_RENAMES', ()))
  chex.assert_trees_all_equal(ref_params, params)


def test_fp16_variant_and_bf16_weights_load_into_float32(tmp_path):
  tm = oracles.torch_unet('sd1')
  sd = oracles.state_dict_numpy(tm)
  half = {k: v.astype(np.float16) for k, v in sd.items()}
  os.makedirs(tmp_path / 'fp16')
  with open(tmp_path / 'fp16' / 'config.json', 'w') as f:
    json.dump(dict(tm.config), f)
  safetensors.numpy.save_file(half, str(tmp_path / 'fp16' / 'diffusion_pytorch_model.fp16.safetensors'))
  with pytest.raises(FileNotFoundError, match='diffusion_pytorch_model.safetensors'):
    models.load_unet(tmp_path / 'fp16')  # without the variant there are no weights
  _, params = models.load_unet(tmp_path / 'fp16', variant='fp16')
  leaves = jax.tree.leaves(params)
  assert all(a.dtype == np.float32 for a in leaves)
  np.testing.assert_array_equal(params['conv_in']['bias'], half['conv_in.bias'].astype(np.float32))

  bf16_dir = tmp_path / 'bf16'
  tm_bf16 = type(tm).from_config(tm.config)
  tm_bf16.load_state_dict(tm.state_dict())
  tm_bf16.to(torch.bfloat16).save_pretrained(bf16_dir)
  _, params = models.load_unet(bf16_dir)
  np.testing.assert_array_equal(
      params['conv_in']['bias'], tm.conv_in.bias.detach().to(torch.bfloat16).float().numpy())


def test_sharded_checkpoint_loads(tmp_path):
  tm = oracles.torch_unet('sd1')
  tm.save_pretrained(tmp_path, max_shard_size='100KB')
  assert os.path.exists(tmp_path / 'diffusion_pytorch_model.safetensors.index.json')
  assert len([f for f in os.listdir(tmp_path) if f.endswith('.safetensors')]) > 1
  _, params = models.load_unet(tmp_path)
  _, expected = oracles.flax_unet('sd1')
  chex.assert_trees_all_equal(params, expected)
  os.remove(tmp_path / sorted(f for f in os.listdir(tmp_path) if f.endswith('.safetensors'))[0])
  with pytest.raises(FileNotFoundError, match='shard .* is missing'):
    models.load_unet(tmp_path)


def test_pickle_needs_explicit_permission(tmp_path, diffusers_unet_dir):
  shutil.copy(diffusers_unet_dir / 'config.json', tmp_path / 'config.json')
  torch.save(oracles.torch_unet('sd1').state_dict(), tmp_path / 'diffusion_pytorch_model.bin')
  with pytest.raises(ValueError, match='allow_pickle=True'):
    models.load_unet(tmp_path)
  _, params = models.load_unet(tmp_path, allow_pickle=True)
  chex.assert_trees_all_equal(params, oracles.flax_unet('sd1')[1])


def test_missing_unexpected_and_mismatched_keys_are_all_named(tmp_path, diffusers_unet_dir):
  shutil.copy(diffusers_unet_dir / 'config.json', tmp_path / 'config.json')
  sd = oracles.state_dict_numpy(oracles.torch_unet('sd1'))
  del sd['conv_out.bias']
  sd['mid_block.extra.weight'] = np.zeros(2, np.float32)
  sd['conv_in.weight'] = np.zeros((32, 3, 3, 3), np.float32)
  safetensors.numpy.save_file(sd, str(tmp_path / 'diffusion_pytorch_model.safetensors'))
  with pytest.raises(convert.CheckpointMismatchError) as info:
    models.load_unet(tmp_path)
  assert info.value.missing == ['conv_out.bias']
  assert info.value.unexpected == ['mid_block.extra.weight']
  assert info.value.mismatched == [('conv_in.weight', (3, 3, 4, 32), (3, 3, 3, 32))]
  assert str(tmp_path) in str(info.value)


def test_missing_files_and_malformed_configs_are_named(tmp_path, diffusers_unet_dir):
  with pytest.raises(FileNotFoundError, match='config.json'):
    models.load_unet(tmp_path)
  (tmp_path / 'config.json').write_text('{"block_out_channels": [32, 64],')
  with pytest.raises(config_utils.ConfigError, match='config.json is not valid JSON'):
    models.load_unet(tmp_path)
  cfg = json.loads((diffusers_unet_dir / 'config.json').read_text())
  cfg['norm_eps'] = 'small'
  (tmp_path / 'config.json').write_text(json.dumps(cfg))
  with pytest.raises(config_utils.ConfigError, match="'norm_eps'"):
    models.load_unet(tmp_path)
  cfg['_class_name'] = 'UNet3DConditionModel'
  (tmp_path / 'config.json').write_text(json.dumps(cfg))
  with pytest.raises(config_utils.ConfigError, match='UNet3DConditionModel'):
    models.load_unet(tmp_path)
  (tmp_path / 'config.json').write_text((diffusers_unet_dir / 'config.json').read_text())
  with pytest.raises(FileNotFoundError, match='no weights in'):
    models.load_unet(tmp_path)
  (tmp_path / 'diffusion_pytorch_model.safetensors').write_bytes(b'not a safetensors file')
  with pytest.raises(ValueError, match='cannot read safetensors'):
    models.load_unet(tmp_path)


def test_load_pipeline_and_save_back_for_diffusers(tmp_path, diffusers_pipeline_dir):
  from diffusers import StableDiffusionPipeline
  pipe = models.load_pipeline(diffusers_pipeline_dir)
  assert isinstance(pipe.unet, models.UNet2DConditionModel)
  assert isinstance(pipe.vae, models.AutoencoderKL)
  assert isinstance(pipe.text_encoder, models.CLIPTextModel)
  assert pipe.scheduler_config['_class_name'] == 'DDPMScheduler'
  ids = pipe.tokenizer(['a red digit'], padding='max_length', max_length=16,
                       return_tensors='np').input_ids
  assert ids[0, 0] == pipe.tokenizer.bos_token_id
  hid = pipe.text_encoder.apply({'params': pipe.text_encoder_params}, ids)
  with torch.no_grad():
    ref = oracles.torch_clip()(torch.from_numpy(ids)).last_hidden_state.numpy()
  oracles.assert_close_to_reference(hid.last_hidden_state, ref)
  chex.assert_trees_all_equal(pipe.unet_params, oracles.flax_unet('sd1')[1])

  loading.save_pipeline(tmp_path / 'ours', pipe)
  reloaded = StableDiffusionPipeline.from_pretrained(tmp_path / 'ours', safety_checker=None,
                                                     requires_safety_checker=False)
  x, t, context, _ = oracles.unet_inputs('sd1')
  with torch.no_grad():
    ref_eps = reloaded.unet(oracles.nchw(x), torch.from_numpy(t), torch.from_numpy(context)).sample
  oracles.assert_close_to_reference(_unet_eps(pipe.unet, pipe.unet_params), oracles.nhwc(ref_eps))
  again = models.load_pipeline(tmp_path / 'ours')
  chex.assert_trees_all_equal(again.vae_params, pipe.vae_params)


def test_pixel_space_pipeline_has_no_vae(tmp_path, diffusers_pipeline_dir):
  pipe = models.load_pipeline(diffusers_pipeline_dir)
  pipe.vae = pipe.vae_params = None
  loading.save_pipeline(tmp_path, pipe)
  assert 'vae' not in json.loads((tmp_path / 'model_index.json').read_text())
  again = models.load_pipeline(tmp_path)
  assert again.vae is None and again.vae_params is None
  index = json.loads((tmp_path / 'model_index.json').read_text())
  del index['unet']
  (tmp_path / 'model_index.json').write_text(json.dumps(index))
  with pytest.raises(config_utils.ConfigError, match='no unet'):
    models.load_pipeline(tmp_path)
