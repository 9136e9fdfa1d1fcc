"""Original single-file Stable Diffusion checkpoints (SD-1.x, SD-2.x, SDXL) -> `Pipeline`.

    pipe = models.load_pipeline('v1-5-pruned-emaonly.safetensors', tokenizer='clip-vit-l/')
    pipe = models.load_pipeline('sd_xl_base_1.0.safetensors', config='sdxl-folder/')

`load_pipeline(path, config=None, *, tokenizer=None, tokenizer_2=None, extract_ema=False,
ignore_keys=(), allow_pickle=False, dtype=..., param_dtype=..., attention_impl=...)` reads one
file in the original (CompVis / Stability) layout, renames its keys to the diffusers layout and
builds the models through the same config + state-dict path as a diffusers folder
(`loading.KINDS`, `convert.torch_to_flax`), so both give bit-identical parameters.

* Model type: read from the keys (`detect_model_type`): SD-1.x has the HF CLIP encoder under
  `cond_stage_model.transformer.`, SD-2.x the OpenCLIP encoder under `cond_stage_model.model.`,
  SDXL both `conditioner.embedders.0.transformer.` (HF) and `conditioner.embedders.1.model.`
  (OpenCLIP). All need `model.diffusion_model.` (UNet) and `first_stage_model.` (VAE). Anything
  else (an SDXL refiner, a LoRA, a lone diffusers model) is an `UnknownCheckpointError` that names
  the prefixes it looked for and the ones it found.
* `config`: None (the shipped config of the detected type), a reference name - 'sd15', 'sd21'
  (SD-2.1 768, v-prediction), 'sdxl' (SDXL base) - which must agree with the keys, or a diffusers
  pipeline folder (local or gs://; weights in it are not read) with `unet/config.json`,
  `vae/config.json`, `text_encoder[_2]/config.json`, and optionally `scheduler/` (else the
  reference scheduler of the detected type: e.g. give an SD-2.x 512-base file a folder whose
  scheduler says `epsilon`), `tokenizer[_2]/` and `model_index.json` (pipeline class, settings).
* Tokenizers: an original file holds none. They come from `tokenizer=` / `tokenizer_2=` (a folder
  or a `CLIPTokenizer`), else from the config folder; with neither a `ValueError` says what to pass.
* Keys are never dropped silently. Every key is converted or matches a documented rule; anything
  left over is a `CheckpointMismatchError` (under its original name), as is a missing or misshaped
  weight. The rules: (a) `model_ema.*` (EMA copies of the UNet) is ignored unless
  `extract_ema=True`, which loads them instead of `model.diffusion_model.*` (as diffusers'
  `extract_ema`; files such as `*-emaonly` hold the EMA weights as the model's own); (b) the DDPM
  schedule buffers (`betas`, `alphas_cumprod`, ...): the schedule comes from the scheduler config;
  (c) OpenCLIP's `logit_scale` and `attn_mask` and CLIP's `position_ids` (buffers); (d) SD-2.x
  reads its OpenCLIP encoder at the penultimate layer, so the diffusers text encoder has one layer
  fewer than the file: the file's last `resblocks.N` layer and its `text_projection` are not
  loaded (logged at INFO) - only when the file has exactly `num_hidden_layers + 1` layers and the
  model has no projection; (e) `ignore_keys`: regexes of keys the caller knows are unused.
* Files: `.safetensors` (the header is checked first: a truncated or corrupt file is an
  `UnreadableCheckpointError` naming the path and the byte counts); `.ckpt` (a PyTorch pickle) only
  with `allow_pickle=True`, then read with `torch.load(weights_only=True)` (a nested `state_dict`
  entry is unwrapped).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from diffgeo_jax import paths
from diffgeo_jax.models import config_utils, convert, loading

SUFFIXES = ('.safetensors', '.ckpt')
REFERENCE_CONFIGS = ('sd15', 'sd21', 'sdxl')
_REFERENCE_DIR = os.path.join(os.path.dirname(__file__), 'reference_configs')

UNET_PREFIX = 'model.diffusion_model.'
VAE_PREFIX = 'first_stage_model.'
EMA_PREFIX = 'model_ema.'
# model type -> component -> (key prefix in the file, text encoder layout: 'hf' | 'openclip').
TEXT_ENCODERS = {
    'sd15': {'text_encoder': ('cond_stage_model.transformer.', 'hf')},
    'sd21': {'text_encoder': ('cond_stage_model.model.', 'openclip')},
    'sdxl': {'text_encoder': ('conditioner.embedders.0.transformer.', 'hf'),
             'text_encoder_2': ('conditioner.embedders.1.model.', 'openclip')},
}
_PIPELINE_CLASS = {'sd15': 'StableDiffusionPipeline', 'sd21': 'StableDiffusionPipeline',
                   'sdxl': 'StableDiffusionXLPipeline'}
_SETTINGS = {'sd15': {'requires_safety_checker': False},
             'sd21': {'requires_safety_checker': False},
             'sdxl': {'force_zeros_for_empty_prompt': True}}
_DEFAULT_CLASS = {'unet': 'UNet2DConditionModel', 'vae': 'AutoencoderKL',
                  'text_encoder': 'CLIPTextModel', 'text_encoder_2': 'CLIPTextModelWithProjection'}
_TEXT_CLASSES = ('CLIPTextModel', 'CLIPTextModelWithProjection')
_ALLOWED_CLASSES = {'unet': ('UNet2DConditionModel',), 'vae': ('AutoencoderKL',),
                    'text_encoder': _TEXT_CLASSES, 'text_encoder_2': _TEXT_CLASSES}
# Keys that are not model weights (rules (b) and (c) of the module docstring).
IGNORED_KEYS = (
    (r'^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod'
     r'|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod'
     r'|posterior_variance|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2'
     r'|logvar|lvlb_weights)$'),
    r'^(cond_stage_model\.model|conditioner\.embedders\.1\.model)\.(logit_scale|attn_mask)$',
)


class UnreadableCheckpointError(ValueError):
  """The file cannot be read as a checkpoint: truncated, corrupt, or not what its name says."""


class UnknownCheckpointError(ValueError):
  """The file's keys are not an SD-1.x, SD-2.x or SDXL original single-file checkpoint."""


def is_single_file(source) -> bool:
  """True for a path (not a folder) ending in .safetensors or .ckpt."""
  text = os.fspath(source)
  return text.endswith(SUFFIXES) and not os.path.isdir(text)


# -- reading ---------------------------------------------------------------------------------------

def _safetensors_problem(head: bytes, size: int) -> str | None:
  """What is wrong with a safetensors file of `size` bytes whose first bytes are `head`, or None."""
  if size < 8:
    return f'the file has {size} bytes, fewer than the 8-byte header length'
  (n,) = struct.unpack('<Q', head[:8])
  if n > size - 8:
    return f'the header says it is {n} bytes long, but the file has only {size - 8} after it'
  try:
    header = json.loads(head[8:8 + n])
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    return f'the header is not valid JSON ({e})'
  if not isinstance(header, dict):
    return 'the header is not a JSON object'
  ends = []
  for name, entry in header.items():
    offsets = entry.get('data_offsets') if isinstance(entry, dict) else None
    if name == '__metadata__':
      continue
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)):
      return f'the header entry of {name!r} has no valid data_offsets'
    ends.append(offsets[1])
  need = 8 + n + max(ends, default=0)
  if need > size:
    return (f'it is truncated: its header lists {len(ends)} tensors filling {need} bytes, but the '
            f'file has {size} (an interrupted download?)')
  return None


def read_checkpoint(path, allow_pickle: bool = False) -> dict[str, np.ndarray]:
  """The flat {key: numpy array} of a .safetensors or (with allow_pickle) .ckpt file."""
  file = paths.resolve(path, 'path')
  text = os.fspath(file)
  if not file.is_file():
    raise FileNotFoundError(f'checkpoint file not found: {text}')
  if text.endswith('.safetensors'):
    if paths.is_remote(file):
      data = file.read_bytes()
      head, size = data, len(data)
    else:
      size = os.path.getsize(text)
      with open(text, 'rb') as f:
        head = f.read(8)
        if len(head) == 8:
          head += f.read(min(struct.unpack('<Q', head)[0], size))
    problem = _safetensors_problem(head, size)
    if problem:
      raise UnreadableCheckpointError(f'cannot read safetensors file {text}: {problem}')
    try:
      return loading._load_safetensors(file)  # noqa: SLF001 (the package's one reader)
    except ValueError as e:
      raise UnreadableCheckpointError(str(e)) from e
  if not text.endswith('.ckpt'):
    raise UnreadableCheckpointError(f'{text}: expected a .safetensors or .ckpt file')
  if not allow_pickle:
    raise ValueError(f'{text} is a PyTorch pickle; unpickling can run arbitrary code, so pass '
                     'allow_pickle=True if you trust it (or convert it to .safetensors)')
  import torch  # noqa: PLC0415 (only on this explicitly allowed path)
  try:
    sd = torch.load(paths.local_file(file), map_location='cpu', weights_only=True)
  except Exception as e:  # zipfile / pickle errors of a truncated or corrupt file
    raise UnreadableCheckpointError(f'cannot read PyTorch checkpoint {text}: {e}') from e
  while isinstance(sd, Mapping) and isinstance(sd.get('state_dict'), Mapping):
    sd = sd['state_dict']
  out = {}
  for k, v in sd.items():
    if isinstance(v, torch.Tensor):
      out[k] = (v.float() if v.dtype == torch.bfloat16 else v).numpy()
    else:
      logging.info('%s: skipping the non-tensor entry %r', text, k)
  return out


# -- model type ------------------------------------------------------------------------------------

def _required_prefixes(model_type: str) -> tuple[str, ...]:
  return (UNET_PREFIX, VAE_PREFIX) + tuple(p for p, _ in TEXT_ENCODERS[model_type].values())


def detect_model_type(keys: Iterable[str], source: str = 'checkpoint') -> str:
  """'sd15' | 'sd21' | 'sdxl' from the keys of an original checkpoint; `UnknownCheckpointError`
  (naming what was looked for and what was found) for anything else."""
  keys = list(keys)
  has = lambda prefix: any(k.startswith(prefix) for k in keys)
  found = [t for t in ('sdxl', 'sd21', 'sd15') if all(has(p) for p in _required_prefixes(t))]
  if len(found) == 1:
    return found[0]
  heads = sorted({'.'.join(k.split('.')[:2]) + '.' for k in keys})
  expected = '; '.join(f'{t}: {", ".join(_required_prefixes(t))}' for t in REFERENCE_CONFIGS)
  hint = ''
  if has('conditioner.embedders.0.model.') and not has('conditioner.embedders.1.'):
    hint = ' It looks like an SDXL refiner (one OpenCLIP encoder), which is not supported.'
  elif has('conv_in.') or has('down_blocks.') or has('text_model.'):
    hint = (' It looks like one model in the diffusers/transformers layout: load its folder with '
            'load_unet / load_vae / load_text_encoder.')
  what = 'the key prefixes of several model types' if found else 'no known key layout'
  raise UnknownCheckpointError(
      f'{source} has {what}: expected an original SD-1.x / SD-2.x / SDXL single-file checkpoint '
      f'with keys under ({expected}); found {len(keys)} keys under {heads[:12]}'
      f'{" ..." if len(heads) > 12 else ""}.{hint}')


# -- key mapping: original layout -> diffusers layout ----------------------------------------------

_UNET_RESNET = {'in_layers.0': 'norm1', 'in_layers.2': 'conv1', 'out_layers.0': 'norm2',
                'out_layers.3': 'conv2', 'emb_layers.1': 'time_emb_proj',
                'skip_connection': 'conv_shortcut'}
_VAE_RESNET = {'norm1': 'norm1', 'conv1': 'conv1', 'norm2': 'norm2', 'conv2': 'conv2',
               'nin_shortcut': 'conv_shortcut'}
_VAE_ATTENTION = {'norm': 'group_norm', 'q': 'to_q', 'k': 'to_k', 'v': 'to_v',
                  'proj_out': 'to_out.0'}

# A table maps an original module path to (diffusers module path, renames of its direct children
# or None to keep the rest of the key unchanged).
Table = dict[str, tuple[str, dict[str, str] | None]]


def unet_table(c) -> Table:
  """Original (LDM `openaimodel.UNetModel`) module paths of a UNet with config `c`."""
  t: Table = {'time_embed.0': ('time_embedding.linear_1', None),
              'time_embed.2': ('time_embedding.linear_2', None),
              'input_blocks.0.0': ('conv_in', None), 'out.0': ('conv_norm_out', None),
              'out.2': ('conv_out', None),
              'middle_block.0': ('mid_block.resnets.0', _UNET_RESNET),
              'middle_block.1': ('mid_block.attentions.0', None),
              'middle_block.2': ('mid_block.resnets.1', _UNET_RESNET)}
  if c.addition_embed_type == 'text_time':
    t['label_emb.0.0'] = ('add_embedding.linear_1', None)
    t['label_emb.0.2'] = ('add_embedding.linear_2', None)
  layers, n = c.per_block('layers_per_block'), len(c.block_out_channels)
  k = 1
  for b in range(n):
    for j in range(layers[b]):
      t[f'input_blocks.{k}.0'] = (f'down_blocks.{b}.resnets.{j}', _UNET_RESNET)
      if c.down_block_types[b] == 'CrossAttnDownBlock2D':
        t[f'input_blocks.{k}.1'] = (f'down_blocks.{b}.attentions.{j}', None)
      k += 1
    if b < n - 1:
      t[f'input_blocks.{k}.0.op'] = (f'down_blocks.{b}.downsamplers.0.conv', None)
      k += 1
  k = 0
  for b, count in enumerate(reversed(layers)):
    attention = c.up_block_types[b] == 'CrossAttnUpBlock2D'
    for j in range(count + 1):
      t[f'output_blocks.{k}.0'] = (f'up_blocks.{b}.resnets.{j}', _UNET_RESNET)
      if attention:
        t[f'output_blocks.{k}.1'] = (f'up_blocks.{b}.attentions.{j}', None)
      if b < n - 1 and j == count:
        t[f'output_blocks.{k}.{2 if attention else 1}.conv'] = (f'up_blocks.{b}.upsamplers.0.conv',
                                                                None)
      k += 1
  return t


def vae_table(c) -> Table:
  """Original (taming `Encoder` / `Decoder`) module paths of an AutoencoderKL with config `c`."""
  t: Table = {}
  n, layers = len(c.block_out_channels), c.layers_per_block
  for part in ('encoder', 'decoder'):
    t[f'{part}.conv_in'] = (f'{part}.conv_in', None)
    t[f'{part}.norm_out'] = (f'{part}.conv_norm_out', None)
    t[f'{part}.conv_out'] = (f'{part}.conv_out', None)
    t[f'{part}.mid.block_1'] = (f'{part}.mid_block.resnets.0', _VAE_RESNET)
    t[f'{part}.mid.block_2'] = (f'{part}.mid_block.resnets.1', _VAE_RESNET)
    if c.mid_block_add_attention:
      t[f'{part}.mid.attn_1'] = (f'{part}.mid_block.attentions.0', _VAE_ATTENTION)
  for i in range(n):
    for j in range(layers):
      t[f'encoder.down.{i}.block.{j}'] = (f'encoder.down_blocks.{i}.resnets.{j}', _VAE_RESNET)
    if i < n - 1:
      t[f'encoder.down.{i}.downsample.conv'] = (f'encoder.down_blocks.{i}.downsamplers.0.conv',
                                                None)
  for k in range(n):  # the decoder's `up` list runs from the lowest resolution's opposite end
    i = n - 1 - k
    for j in range(layers + 1):
      t[f'decoder.up.{i}.block.{j}'] = (f'decoder.up_blocks.{k}.resnets.{j}', _VAE_RESNET)
    if k < n - 1:
      t[f'decoder.up.{i}.upsample.conv'] = (f'decoder.up_blocks.{k}.upsamplers.0.conv', None)
  if c.use_quant_conv:
    t['quant_conv'] = ('quant_conv', None)
  if c.use_post_quant_conv:
    t['post_quant_conv'] = ('post_quant_conv', None)
  return t


def _apply_table(key: str, table: Table) -> str | None:
  """The diffusers key of an original key (without its component prefix), or None."""
  parts = key.split('.')
  for cut in range(len(parts) - 1, 0, -1):
    entry = table.get('.'.join(parts[:cut]))
    if entry is None:
      continue
    target, children = entry
    rest = parts[cut:]
    if children is not None:
      child = children.get('.'.join(rest[:-1]))
      if child is None:
        return None
      rest = [child, rest[-1]]
    return '.'.join([target, *rest])
  return None


_OPENCLIP_LAYER = re.compile(r'^transformer\.resblocks\.(\d+)\.(.+)$')
_OPENCLIP_TOP = {'token_embedding.weight': 'text_model.embeddings.token_embedding.weight',
                 'positional_embedding': 'text_model.embeddings.position_embedding.weight',
                 'ln_final.weight': 'text_model.final_layer_norm.weight',
                 'ln_final.bias': 'text_model.final_layer_norm.bias'}
_OPENCLIP_SUB = {'ln_1': 'layer_norm1', 'ln_2': 'layer_norm2',
                 'attn.out_proj': 'self_attn.out_proj', 'mlp.c_fc': 'mlp.fc1',
                 'mlp.c_proj': 'mlp.fc2'}


def _openclip_key(key: str, value: np.ndarray) -> list[tuple[str, np.ndarray]] | None:
  """(diffusers key, array) pairs of one OpenCLIP text-tower key, or None if it has no rule."""
  if key in _OPENCLIP_TOP:
    return [(_OPENCLIP_TOP[key], value)]
  if key == 'text_projection':  # used as x @ P: the Linear weight is its transpose
    return [('text_projection.weight', np.asarray(value).T)]
  m = _OPENCLIP_LAYER.match(key)
  if not m:
    return None
  layer, rest = f'text_model.encoder.layers.{m.group(1)}', m.group(2)
  if rest in ('attn.in_proj_weight', 'attn.in_proj_bias'):
    leaf = 'weight' if rest.endswith('weight') else 'bias'
    q, k, v = np.split(np.asarray(value), 3, axis=0)  # fused (3D, ...) projection
    return [(f'{layer}.self_attn.{name}_proj.{leaf}', part)
            for name, part in (('q', q), ('k', k), ('v', v))]
  module, _, leaf = rest.rpartition('.')
  if module not in _OPENCLIP_SUB:
    return None
  return [(f'{layer}.{_OPENCLIP_SUB[module]}.{leaf}', value)]


@dataclasses.dataclass
class Converted:
  """One component's diffusers-layout state dict, each key's original name, and the original keys
  that had no rule."""
  state: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  origin: dict[str, str] = dataclasses.field(default_factory=dict)
  unmapped: list[str] = dataclasses.field(default_factory=list)

  def add(self, key: str, value, original: str):
    self.state[key] = value
    self.origin[key] = original


def convert_unet(checkpoint: Mapping[str, np.ndarray], config,
                 extract_ema: bool = False) -> Converted:
  out = Converted()
  table = unet_table(config)
  for full in [k for k in checkpoint if k.startswith(UNET_PREFIX)]:
    source = full
    if extract_ema:  # LDM's EMA names: "model_ema." + the key after "model." with its dots removed
      source = EMA_PREFIX + full[len('model.'):].replace('.', '')
      if source not in checkpoint:
        out.unmapped.append(f'{source} (the EMA copy of {full}: extract_ema=True)')
        continue
    new = _apply_table(full[len(UNET_PREFIX):], table)
    if new is None:
      out.unmapped.append(full)
    else:
      out.add(new, checkpoint[source], source)
  return out


def convert_vae(checkpoint: Mapping[str, np.ndarray], config) -> Converted:
  out = Converted()
  table = vae_table(config)
  for full in [k for k in checkpoint if k.startswith(VAE_PREFIX)]:
    new = _apply_table(full[len(VAE_PREFIX):], table)
    if new is None:
      out.unmapped.append(full)
      continue
    value = checkpoint[full]
    if '.mid_block.attentions.' in new and new.endswith('.weight') and value.ndim > 2:
      if any(d != 1 for d in value.shape[2:]):  # left for the shape check to report
        out.add(new, value, full)
        continue
      value = value.reshape(value.shape[:2])  # 1x1 convolutions -> Linear weights
    out.add(new, value, full)
  return out


def convert_text_encoder(checkpoint: Mapping[str, np.ndarray], prefix: str, layout: str, config,
                         has_projection: bool, drop_final_layer: bool) -> Converted:
  """`drop_final_layer`: the SD-2.x rule (d) of the module docstring."""
  out = Converted()
  keys = [k for k in checkpoint if k.startswith(prefix)]
  if layout == 'hf':
    for full in keys:
      out.add(full[len(prefix):], checkpoint[full], full)
    return out
  layers = {int(m.group(1)) for k in keys if (m := _OPENCLIP_LAYER.match(k[len(prefix):]))}
  dropped = []
  if drop_final_layer and len(layers) == config.num_hidden_layers + 1:
    last = f'{prefix}transformer.resblocks.{max(layers)}.'
    dropped = [k for k in keys if k.startswith(last)]
  if drop_final_layer and not has_projection:
    dropped += [k for k in keys if k == prefix + 'text_projection']
  if dropped:
    logging.info('SD-2.x text encoder: not loading %d keys that the penultimate-layer model '
                 'does not use (%s)', len(dropped), ', '.join(sorted(dropped)))
  for full in keys:
    if full in dropped or any(re.search(p, full) for p in IGNORED_KEYS):
      continue
    pairs = _openclip_key(full[len(prefix):], checkpoint[full])
    if pairs is None:
      out.unmapped.append(full)
    for new, value in pairs or ():
      out.add(new, value, full)
  return out


# -- configs ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Setup:
  components: dict[str, tuple[str, dict, str]]  # name -> (model class, config dict, its source)
  scheduler_config: dict
  tokenizer_dirs: dict[str, Any]
  class_name: str
  settings: dict


def _class_of(cfg: dict, component: str) -> str:
  return loading._class_name(cfg, _DEFAULT_CLASS[component])  # noqa: SLF001 (the folder rule)


def _reference(model_type: str, name: str) -> tuple[dict, str]:
  path = os.path.join(_REFERENCE_DIR, model_type, name)
  return config_utils.read_json(path), path


def _resolve_config(config, model_type: str, source: str) -> _Setup:
  names = ['unet', 'vae', *TEXT_ENCODERS[model_type]]
  if config is None or config in REFERENCE_CONFIGS:
    if config is not None and config != model_type:
      raise ValueError(f'config={config!r}, but the keys of {source} are those of a {model_type} '
                       f'checkpoint; pass config={model_type!r}, None, or a config folder')
    components = {}
    for name in names:
      cfg, path = _reference(model_type, f'{name}.json')
      components[name] = (_class_of(cfg, name), cfg, path)
    return _Setup(components, _reference(model_type, 'scheduler.json')[0], {},
                  _PIPELINE_CLASS[model_type], dict(_SETTINGS[model_type]))
  folder = paths.resolve(config, 'config')
  if not folder.is_dir():
    raise ValueError(f'config={config!r} is neither a reference config '
                     f'({", ".join(REFERENCE_CONFIGS)}) nor a folder of diffusers configs '
                     '(unet/config.json, vae/config.json, ...)')
  extra = [n for n in TEXT_ENCODERS['sdxl'] if n not in names and (folder / n).is_dir()]
  if extra:
    raise ValueError(f'the config folder {folder} has {extra}, but {source} is a {model_type} '
                     'checkpoint, which has no such component')
  components = {}
  for name in names:
    path = folder / name / 'config.json'
    cfg = config_utils.read_json(path)  # FileNotFoundError names the missing file
    components[name] = (_class_of(cfg, name), cfg, os.fspath(path))
  scheduler = folder / 'scheduler' / 'scheduler_config.json'
  scheduler_config = (config_utils.read_json(scheduler) if scheduler.is_file()
                      else _reference(model_type, 'scheduler.json')[0])
  tokenizers = {n: folder / n for n in ('tokenizer', 'tokenizer_2') if (folder / n).is_dir()}
  class_name, settings = _PIPELINE_CLASS[model_type], dict(_SETTINGS[model_type])
  if (folder / 'model_index.json').is_file():
    index = config_utils.read_json(folder / 'model_index.json')
    class_name = index.get('_class_name', class_name)
    settings = {k: v for k, v in index.items() if not k.startswith('_') and not isinstance(v, list)}
  return _Setup(components, scheduler_config, tokenizers, class_name, settings)


def _tokenizer(name: str, given, setup: _Setup, source: str, config):
  if given is None:
    given = setup.tokenizer_dirs.get(name)
  if given is None:
    raise ValueError(
        f'{source}: an original single-file checkpoint holds no {name}, and config={config!r} '
        f'provides none offline. Pass {name}=<a folder with vocab.json and merges.txt, or '
        f'tokenizer.json> (the {name}/ folder of a diffusers Stable Diffusion pipeline), or '
        f'config=<a diffusers pipeline folder with {name}/>')
  if isinstance(given, (str, os.PathLike)):
    return loading.load_tokenizer(given)
  return given  # a tokenizer object


# -- building --------------------------------------------------------------------------------------

def load_pipeline(path, config=None, *, tokenizer=None, tokenizer_2=None, extract_ema: bool = False,
                  ignore_keys: Iterable[str] = (), allow_pickle: bool = False,
                  variant: str | None = None, dtype: Any = jnp.float32,
                  param_dtype: Any = jnp.float32,
                  attention_impl: str = 'softmax') -> loading.Pipeline:
  """A `Pipeline` from an original SD-1.x / SD-2.x / SDXL single-file checkpoint (see the module
  docstring for `config`, the tokenizers and the key rules). Raises `UnreadableCheckpointError`,
  `UnknownCheckpointError` or `CheckpointMismatchError` (every problem listed at once)."""
  if variant is not None:
    raise ValueError(f'variant={variant!r} names files in a diffusers folder; {path} is one file')
  source = os.fspath(path)
  checkpoint = read_checkpoint(path, allow_pickle=allow_pickle)
  model_type = detect_model_type(checkpoint, source)
  setup = _resolve_config(config, model_type, source)
  tokenizers = {'tokenizer': _tokenizer('tokenizer', tokenizer, setup, source, config)}
  if model_type == 'sdxl':
    tokenizers['tokenizer_2'] = _tokenizer('tokenizer_2', tokenizer_2, setup, source, config)
  if extract_ema and not any(k.startswith(EMA_PREFIX) for k in checkpoint):
    raise ValueError(f'extract_ema=True, but {source} has no EMA weights ({EMA_PREFIX}*)')

  # Configs first (cheap, and the key tables depend on them), then every component's keys.
  built, converted = {}, {}
  for name, (class_name, cfg, cfg_source) in setup.components.items():
    if class_name not in _ALLOWED_CLASSES[name]:
      raise config_utils.ConfigError(f'{cfg_source}: model class {class_name!r} cannot be the '
                                     f'{name} of a Stable Diffusion pipeline; expected one of '
                                     f'{_ALLOWED_CLASSES[name]}')
    kind = loading.KINDS[class_name]
    model_config = kind.config_cls.from_dict(cfg, source=cfg_source)
    built[name] = (kind, kind.model_cls(model_config, dtype=dtype, attention_impl=attention_impl))
    if name == 'unet':
      converted[name] = convert_unet(checkpoint, model_config, extract_ema)
    elif name == 'vae':
      converted[name] = convert_vae(checkpoint, model_config)
    else:
      prefix, layout = TEXT_ENCODERS[model_type][name]
      converted[name] = convert_text_encoder(
          checkpoint, prefix, layout, model_config, has_projection='Projection' in class_name,
          drop_final_layer=model_type == 'sd21')

  # Every key of the file is converted, dropped by a documented rule, or reported.
  ignore_res = [re.compile(p) for p in (*IGNORED_KEYS, *ignore_keys)]
  claimed = set(_required_prefixes(model_type)) | {EMA_PREFIX}
  leftovers = [k for k in checkpoint if not any(k.startswith(p) for p in claimed)
               and not any(r.search(k) for r in ignore_res)]
  ema = sum(k.startswith(EMA_PREFIX) for k in checkpoint)
  if ema and not extract_ema:
    logging.info('%s: ignoring %d EMA keys (%s*); extract_ema=True loads them', source, ema,
                 EMA_PREFIX)

  parts: dict[str, Any] = {}
  missing, unexpected, mismatched = [], list(leftovers), []
  for name, (kind, model) in built.items():
    conv = converted[name]
    unexpected += [k for k in conv.unmapped if not any(r.search(k) for r in ignore_res)]
    state = {k: v for k, v in conv.state.items()
             if not any(r.search(conv.origin[k]) for r in ignore_res)}
    target = convert.abstract_params(model.init, jax.random.key(0),
                                     *kind.module.dummy_inputs(model.config))
    try:
      params = convert.torch_to_flax(state, target, source=f'{source} ({name})',
                                     ignore=kind.module.TORCH_IGNORE_KEYS,
                                     renames=getattr(kind.module, 'TORCH_RENAMES', ()))
    except convert.CheckpointMismatchError as e:
      missing += [f'{name}: {k}' for k in e.missing]
      unexpected += [f'{conv.origin.get(k, k)} (as {name} {k})' for k in e.unexpected]
      mismatched += [(f'{conv.origin.get(k, k)} (as {name} {k})', exp, got)
                     for k, exp, got in e.mismatched]
      continue
    parts[name] = model
    parts[f'{name}_params'] = jax.tree.map(lambda a: jnp.asarray(a, dtype=param_dtype), params)
    for original in set(conv.origin.values()):  # free the file's arrays as we go (multi-GB files)
      checkpoint.pop(original, None)
    del state, params, conv
    converted[name] = None
  if missing or unexpected or mismatched:
    configs = model_type if config is None else (config if isinstance(config, str)
                                                 else os.fspath(config))
    raise convert.CheckpointMismatchError(f'{source} ({model_type} single-file checkpoint, configs '
                                          f'from {configs!r})', missing, unexpected, mismatched)
  return loading.Pipeline(**parts, **tokenizers, scheduler_config=setup.scheduler_config,
                          class_name=setup.class_name, settings=setup.settings)
