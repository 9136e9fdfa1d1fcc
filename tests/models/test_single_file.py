"""Original single-file checkpoints (SD-1.x, SD-2.x, SDXL): diffusers' `from_single_file` and our
`models.load_pipeline` read the same file to the same models.

Each case saves a tiny random diffusers pipeline, then writes its weights in the original
(CompVis / Stability) layout with the reverse mapping below - written here, independently of the
library's tables, as closed-form index arithmetic - plus what real files carry besides the models
(DDPM buffers, EMA copies, OpenCLIP's logit_scale, SD-2's unused last text layer).
"""

import os

import chex
import jax
import numpy as np
import pytest
import safetensors.numpy
import torch

from diffgeo_jax import models
from diffgeo_jax.models import single_file
from tests import report
from tests.models import oracles

TYPES = ('sd15', 'sd21', 'sdxl')
_UNET = {'sd15': 'sd1', 'sd21': 'sd2', 'sdxl': 'sdxl'}
# diffusers' single-file UNet conversion needs one int layers_per_block; 2 exercises the index
# arithmetic more than the oracles' 1.
_UNET_OVERRIDES = {'sd21': {'layers_per_block': 2, 'only_cross_attention': False}}
TOL = 1e-5


# -- tiny diffusers pipelines ----------------------------------------------------------------------

def _clip(hidden, layers, act, projection=False, seed=3):
  from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
  v = oracles.TINY_CLIP_VOCAB
  cfg = CLIPTextConfig(vocab_size=v, hidden_size=hidden, intermediate_size=2 * hidden + 5,
                       num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=16,
                       projection_dim=16, hidden_act=act, bos_token_id=v - 2, eos_token_id=v - 1,
                       pad_token_id=v - 1)
  torch.manual_seed(seed)
  cls = CLIPTextModelWithProjection if projection else CLIPTextModel
  return oracles.randomize_(cls(cfg), seed=seed)


_DDIM = {'beta_schedule': 'scaled_linear', 'clip_sample': False, 'set_alpha_to_one': False,
         'steps_offset': 1}


def _diffusers_pipeline(model_type, tok_dir):
  from diffusers import (DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                         StableDiffusionXLPipeline, UNet2DConditionModel)
  from transformers import CLIPTokenizer
  tok = CLIPTokenizer.from_pretrained(tok_dir)
  torch.manual_seed(0)
  unet = oracles.randomize_(UNet2DConditionModel(
      **{**oracles.UNET_CONFIGS[_UNET[model_type]], **_UNET_OVERRIDES.get(model_type, {})}), seed=1)
  vae = oracles.torch_vae()
  if model_type == 'sdxl':  # cross_attention_dim 24 = 16 + 8; text_embeds 16 = projection_dim
    return StableDiffusionXLPipeline(
        vae=vae, unet=unet, text_encoder=_clip(16, 2, 'quick_gelu'),
        text_encoder_2=_clip(8, 3, 'gelu', projection=True, seed=4), tokenizer=tok,
        tokenizer_2=tok, scheduler=EulerDiscreteScheduler())
  if model_type == 'sd21':
    text, scheduler = _clip(24, 2, 'gelu'), DDIMScheduler(**_DDIM, prediction_type='v_prediction')
  else:
    text, scheduler = oracles.torch_clip(), DDIMScheduler(**_DDIM)
  return StableDiffusionPipeline(vae=vae, text_encoder=text, unet=unet, tokenizer=tok,
                                 scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                 requires_safety_checker=False)


# -- the reverse mapping: diffusers layout -> original layout --------------------------------------

_RESNET = {'norm1': 'in_layers.0', 'conv1': 'in_layers.2', 'norm2': 'out_layers.0',
           'conv2': 'out_layers.3', 'time_emb_proj': 'emb_layers.1',
           'conv_shortcut': 'skip_connection'}
_UNET_TOP = {'time_embedding.linear_1': 'time_embed.0', 'time_embedding.linear_2': 'time_embed.2',
             'add_embedding.linear_1': 'label_emb.0.0', 'add_embedding.linear_2': 'label_emb.0.2',
             'conv_in': 'input_blocks.0.0', 'conv_norm_out': 'out.0', 'conv_out': 'out.2'}


def _resnet_rest(rest):
  module, leaf = rest.rsplit('.', 1)
  return f'{_RESNET[module]}.{leaf}'


def original_unet_key(key, cfg):
  """LDM `UNetModel` name of a diffusers UNet key: block b's layer j of L is input block
  1 + b (L + 1) + j, its downsampler 1 + b (L + 1) + L; up block b's layer j is output block
  b (L + 1) + j, its upsampler that block's 1 (no attention) or 2."""
  per = cfg['layers_per_block'] + 1
  parts = key.split('.')
  head = '.'.join(parts[:-1])
  if head in _UNET_TOP:
    return f'{_UNET_TOP[head]}.{parts[-1]}'
  if parts[0] == 'mid_block':
    i = int(parts[2])
    if parts[1] == 'resnets':
      return f'middle_block.{2 * i}.{_resnet_rest(".".join(parts[3:]))}'
    return f'middle_block.1.{".".join(parts[3:])}'
  b, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), '.'.join(parts[4:])
  if parts[0] == 'down_blocks':
    if kind == 'downsamplers':
      return f'input_blocks.{1 + b * per + per - 1}.0.op.{parts[-1]}'
    index = 1 + b * per + j
  else:
    if kind == 'upsamplers':
      slot = 2 if cfg['up_block_types'][b] == 'CrossAttnUpBlock2D' else 1
      return f'output_blocks.{b * per + per - 1}.{slot}.conv.{parts[-1]}'
    index = b * per + j
  slot, rest = (0, _resnet_rest(rest)) if kind == 'resnets' else (1, rest)
  return f'{"input_blocks" if parts[0] == "down_blocks" else "output_blocks"}.{index}.{slot}.{rest}'


_VAE_SUB = {'conv_norm_out': 'norm_out', 'conv_shortcut': 'nin_shortcut', 'group_norm': 'norm',
            'to_q': 'q', 'to_k': 'k', 'to_v': 'v', 'to_out.0': 'proj_out'}


def original_vae_key(key, n):
  for new, old in (('mid_block.resnets.0', 'mid.block_1'), ('mid_block.resnets.1', 'mid.block_2'),
                   ('mid_block.attentions.0', 'mid.attn_1'), ('downsamplers.0', 'downsample'),
                   ('upsamplers.0', 'upsample'), ('.resnets.', '.block.'),
                   ('down_blocks.', 'down.'), *_VAE_SUB.items()):
    key = key.replace(new, old)
  if key.startswith('decoder.up_blocks.'):
    _, _, k, rest = key.split('.', 3)
    key = f'decoder.up.{n - 1 - int(k)}.{rest}'
  return key


def openclip_state(sd, extra_layer):
  """OpenCLIP text-tower keys of a transformers CLIP text state dict (with or without the
  `text_model.` level); `extra_layer` appends a random final layer, as SD-2's 24-layer file
  holds for a 23-layer diffusers encoder."""
  sd = {k.removeprefix('text_model.'): v for k, v in sd.items() if 'position_ids' not in k}
  out = {'token_embedding.weight': sd['embeddings.token_embedding.weight'],
         'positional_embedding': sd['embeddings.position_embedding.weight'],
         'ln_final.weight': sd['final_layer_norm.weight'],
         'ln_final.bias': sd['final_layer_norm.bias'],
         'logit_scale': np.array(4.6, np.float32)}
  hidden = out['token_embedding.weight'].shape[1]
  out['text_projection'] = (sd['text_projection.weight'].T if 'text_projection.weight' in sd
                            else np.random.RandomState(5).randn(hidden, 16).astype(np.float32))
  layers = 1 + max(int(k.split('.')[2]) for k in sd if k.startswith('encoder.layers.'))
  for i in range(layers + extra_layer):
    src = f'encoder.layers.{min(i, layers - 1)}.'
    get = lambda name: sd[src + name] + (0.5 if i == layers else 0.0)  # noqa: B023
    dst = f'transformer.resblocks.{i}.'
    for leaf in ('weight', 'bias'):
      out[dst + f'attn.in_proj_{leaf}'] = np.concatenate(
          [get(f'self_attn.{p}_proj.{leaf}') for p in 'qkv'], axis=0)
      for new, old in (('self_attn.out_proj', 'attn.out_proj'), ('layer_norm1', 'ln_1'),
                       ('layer_norm2', 'ln_2'), ('mlp.fc1', 'mlp.c_fc'), ('mlp.fc2', 'mlp.c_proj')):
        out[dst + f'{old}.{leaf}'] = get(f'{new}.{leaf}')
  return out


def original_checkpoint(pipe, model_type):
  """The pipeline's weights as one original-layout state dict, with the extras real files have."""
  sd = lambda m: oracles.state_dict_numpy(m)
  out = {}
  cfg = pipe.unet.config
  for k, v in sd(pipe.unet).items():
    out['model.diffusion_model.' + original_unet_key(k, cfg)] = v
  n = len(pipe.vae.config.block_out_channels)
  for k, v in sd(pipe.vae).items():
    if '.mid_block.attentions.' in k and v.ndim == 2:
      v = v[:, :, None, None]  # the original attention projections are 1x1 convolutions
    out['first_stage_model.' + original_vae_key(k, n)] = v
  text = {k.removeprefix('text_model.'): v for k, v in sd(pipe.text_encoder).items()}
  if model_type == 'sd15':
    for k, v in text.items():
      out['cond_stage_model.transformer.text_model.' + k] = v
    out['cond_stage_model.transformer.text_model.embeddings.position_ids'] = np.arange(16)[None]
  elif model_type == 'sd21':
    for k, v in openclip_state(text, extra_layer=True).items():
      out['cond_stage_model.model.' + k] = v
  else:
    for k, v in text.items():
      out['conditioner.embedders.0.transformer.text_model.' + k] = v
    for k, v in openclip_state(sd(pipe.text_encoder_2), extra_layer=False).items():
      out['conditioner.embedders.1.model.' + k] = v
  if model_type != 'sdxl':  # LDM's DDPM buffers and EMA bookkeeping
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float32) ** 2
    out['betas'], out['alphas_cumprod'] = betas, np.cumprod(1 - betas)
    out['model_ema.decay'], out['model_ema.num_updates'] = np.array(0.9999), np.array(10)
  if model_type == 'sd15':  # EMA copies (different values), ignored unless extract_ema=True
    for k in [k for k in out if k.startswith('model.diffusion_model.')]:
      out['model_ema.' + k[len('model.'):].replace('.', '')] = out[k] * 2
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


# -- fixtures --------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def make_case(tmp_path_factory):
  """model type -> (diffusers folder, single file, loaded by us), each built once per module."""
  tok_dir = tmp_path_factory.mktemp('tok')
  oracles.write_tiny_clip_tokenizer(str(tok_dir))
  cache = {}

  def make(model_type):
    if model_type not in cache:
      path = tmp_path_factory.mktemp(model_type)
      pipe = _diffusers_pipeline(model_type, tok_dir)
      pipe.save_pretrained(path / 'folder')
      file = path / f'{model_type}.safetensors'
      safetensors.numpy.save_file(original_checkpoint(pipe, model_type), str(file))
      loaded = models.load_pipeline(file, config=path / 'folder')
      cache[model_type] = (path / 'folder', file, loaded)
    return cache[model_type]
  return make


def _from_single_file(model_type, file, folder):
  from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
  cls = StableDiffusionXLPipeline if model_type == 'sdxl' else StableDiffusionPipeline
  # A local config folder keeps diffusers offline (no hub look-up of a default config).
  return cls.from_single_file(str(file), config=str(folder), local_files_only=True,
                              safety_checker=None)


def _err(ours, ref, what, errs):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, f'{what}: {ours.shape} != {ref.shape}'
  errs[what] = float(np.abs(ours - ref).max())


# -- tests -----------------------------------------------------------------------------------------

@pytest.mark.parametrize('model_type', TYPES)
def test_matches_diffusers_from_single_file(make_case, model_type):
  folder, file, loaded = make_case(model_type)
  ref = _from_single_file(model_type, file, folder)
  errs = {}
  x, t, context, added = oracles.unet_inputs(_UNET[model_type])
  kwargs = {}
  if added is not None:
    kwargs['added_cond_kwargs'] = {k: torch.from_numpy(v) for k, v in added.items()}
  with torch.no_grad():
    eps_ref = ref.unet(oracles.nchw(x), torch.from_numpy(t), torch.from_numpy(context),
                       **kwargs).sample
  # jit: one compile is several times faster than op-by-op dispatch on CPU.
  eps = jax.jit(lambda p, *a: loaded.unet.apply({'params': p}, *a))(
      loaded.unet_params, x, t, context, added)
  _err(eps, oracles.nhwc(eps_ref), 'unet eps', errs)

  img = np.random.RandomState(1).randn(2, 16, 16, 3).astype(np.float32)
  with torch.no_grad():
    post_ref = ref.vae.encode(oracles.nchw(img)).latent_dist
    dec_ref = ref.vae.decode(post_ref.mean).sample

  @jax.jit
  def vae(p, img):
    post = loaded.vae.apply({'params': p}, img, method='encode')
    return post, loaded.vae.apply({'params': p}, post.mean, method='decode')
  post, dec = vae(loaded.vae_params, img)
  _err(post.mean, oracles.nhwc(post_ref.mean), 'vae mean', errs)
  _err(post.logvar, oracles.nhwc(post_ref.logvar), 'vae logvar', errs)
  _err(dec, oracles.nhwc(dec_ref), 'vae decode', errs)

  v = oracles.TINY_CLIP_VOCAB
  ids = np.random.RandomState(2).randint(0, v - 2, (2, 16)).astype(np.int32)
  ids[:, 0], ids[0, 9], ids[1, 15] = v - 2, v - 1, v - 1
  for name in ('text_encoder', 'text_encoder_2'):
    if getattr(loaded, name) is None:
      continue
    with torch.no_grad():
      out_ref = getattr(ref, name)(torch.from_numpy(ids).long())
    model = getattr(loaded, name)
    out = jax.jit(lambda p, i: model.apply({'params': p}, i))(  # noqa: B023
        getattr(loaded, f'{name}_params'), ids)
    _err(out.last_hidden_state, out_ref.last_hidden_state, f'{name} hidden', errs)
    if out.text_embeds is not None:
      _err(out.text_embeds, out_ref.text_embeds, f'{name} text_embeds', errs)
    else:
      _err(out.pooled, out_ref.pooler_output, f'{name} pooled', errs)
  for what, err in errs.items():
    report.record(f'{model_type} {what} max |ours - diffusers from_single_file|', err)
  bad = {k: e for k, e in errs.items() if e > TOL}
  assert not bad, f'{model_type}: errors above {TOL}: {bad}'


@pytest.mark.parametrize('model_type', TYPES)
def test_params_equal_the_diffusers_folder_exactly(make_case, model_type):
  folder, _, loaded = make_case(model_type)
  ref = models.load_pipeline(folder)
  for name in ('unet', 'vae', 'text_encoder', 'text_encoder_2'):
    assert (getattr(loaded, name) is None) == (getattr(ref, name) is None), name
    if getattr(ref, name) is not None:
      assert getattr(loaded, name).config == getattr(ref, name).config, name
      chex.assert_trees_all_equal(getattr(loaded, f'{name}_params'), getattr(ref, f'{name}_params'))
  assert loaded.scheduler_config == ref.scheduler_config
  assert loaded.class_name == ref.class_name
  assert loaded.tokenizer.get_vocab() == ref.tokenizer.get_vocab()
  assert (loaded.tokenizer_2 is None) == (model_type != 'sdxl')


@pytest.mark.parametrize('model_type', TYPES)
def test_detects_the_model_type_from_the_keys(make_case, model_type):
  _, file, _ = make_case(model_type)
  keys = safetensors.numpy.load_file(str(file)).keys()
  assert single_file.detect_model_type(keys) == model_type
  other = 'sd15' if model_type != 'sd15' else 'sdxl'
  with pytest.raises(ValueError, match=f"config='{other}'.*{model_type} checkpoint"):
    models.load_pipeline(file, config=other)


def test_reference_configs_build_and_reject_tiny_weights(make_case):
  """Without config the shipped config of the detected type is used: the tiny weights do not fit
  the real shapes, and the error says which."""
  folder, file, _ = make_case('sd15')
  with pytest.raises(models.CheckpointMismatchError, match='shape mismatches') as e:
    models.load_pipeline(file, tokenizer=folder / 'tokenizer')
  assert "configs from 'sd15'" in str(e.value)
  setup = single_file._resolve_config(None, 'sdxl', 'x')  # noqa: SLF001
  assert set(setup.components) == {'unet', 'vae', 'text_encoder', 'text_encoder_2'}
  assert single_file._resolve_config('sd21', 'sd21', 'x').scheduler_config[  # noqa: SLF001
      'prediction_type'] == 'v_prediction'


def test_no_tokenizer_is_a_clear_error(make_case, tmp_path):
  folder, file, _ = make_case('sdxl')
  bare = tmp_path / 'configs'
  for name in ('unet', 'vae', 'text_encoder', 'text_encoder_2'):
    os.makedirs(bare / name)
    (bare / name / 'config.json').write_text((folder / name / 'config.json').read_text())
  with pytest.raises(ValueError, match=r'holds no tokenizer.*Pass tokenizer='):
    models.load_pipeline(file, config=bare)
  with pytest.raises(ValueError, match=r'holds no tokenizer_2.*Pass tokenizer_2='):
    models.load_pipeline(file, config=bare, tokenizer=folder / 'tokenizer')
  pipe = models.load_pipeline(file, config=bare, tokenizer=folder / 'tokenizer',
                              tokenizer_2=folder / 'tokenizer_2')
  # No scheduler/ in the folder: the reference scheduler of the detected type.
  assert pipe.scheduler_config['_class_name'] == 'EulerDiscreteScheduler'


def test_truncated_file_is_a_named_error(make_case, tmp_path):
  folder, file, _ = make_case('sd15')
  data = file.read_bytes()
  cut = tmp_path / 'cut.safetensors'
  cut.write_bytes(data[:len(data) // 2])
  with pytest.raises(single_file.UnreadableCheckpointError, match=r'cut\.safetensors.*truncated'):
    models.load_pipeline(cut, config=folder)
  cut.write_bytes(data[:5])
  with pytest.raises(single_file.UnreadableCheckpointError, match='fewer than the 8-byte'):
    models.load_pipeline(cut, config=folder)


def test_unknown_layout_is_a_named_error(make_case, tmp_path):
  folder, _, _ = make_case('sd15')
  odd = tmp_path / 'odd.safetensors'
  safetensors.numpy.save_file({'foo.bar.weight': np.zeros(3, np.float32)}, str(odd))
  with pytest.raises(single_file.UnknownCheckpointError,
                     match=r'odd\.safetensors.*model\.diffusion_model\..*foo\.bar\.'):
    models.load_pipeline(odd, config=folder)


def test_leftover_keys_are_listed_not_dropped(make_case, tmp_path):
  folder, file, _ = make_case('sd21')
  sd = safetensors.numpy.load_file(str(file))
  sd['model.diffusion_model.input_blocks.1.0.in_layers.7.weight'] = np.zeros(2, np.float32)
  sd['denoiser.sigmas'] = np.zeros(2, np.float32)
  del sd['first_stage_model.decoder.conv_out.bias']
  bad = tmp_path / 'bad.safetensors'
  safetensors.numpy.save_file(sd, str(bad))
  with pytest.raises(models.CheckpointMismatchError) as e:
    models.load_pipeline(bad, config=folder)
  assert set(e.value.unexpected) == {'denoiser.sigmas',
                                     'model.diffusion_model.input_blocks.1.0.in_layers.7.weight'}
  assert e.value.missing == ['vae: decoder.conv_out.bias']
  del sd['model.diffusion_model.input_blocks.1.0.in_layers.7.weight']
  sd['first_stage_model.decoder.conv_out.bias'] = np.zeros(3, np.float32)
  safetensors.numpy.save_file(sd, str(bad))
  models.load_pipeline(bad, config=folder, ignore_keys=[r'^denoiser\.'])


def test_ema_weights_and_pickles_on_request(make_case, tmp_path):
  folder, file, loaded = make_case('sd15')  # the sd15 file carries EMA copies
  ema = models.load_pipeline(file, config=folder, extract_ema=True)
  chex.assert_trees_all_close(ema.unet_params, jax.tree.map(lambda a: 2 * a, loaded.unet_params),
                              rtol=0, atol=0)
  chex.assert_trees_all_equal(ema.vae_params, loaded.vae_params)
  ckpt = tmp_path / 'model.ckpt'
  sd = {k: torch.from_numpy(v) for k, v in safetensors.numpy.load_file(str(file)).items()}
  torch.save({'state_dict': sd, 'global_step': 3}, ckpt)
  with pytest.raises(ValueError, match='allow_pickle=True'):
    models.load_pipeline(ckpt, config=folder)
  pickled = models.load_pipeline(ckpt, config=folder, allow_pickle=True)
  chex.assert_trees_all_equal(pickled.unet_params, loaded.unet_params)
