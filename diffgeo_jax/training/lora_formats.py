"""LoRA files as other trainers release them, turned into the peft names `lora.load` reads.

`lora.load` recognises, from the file (or folder) it is given:

* diffusers pipeline files (`StableDiffusionPipeline.save_lora_weights`: keys
  `unet.<module>.lora_A.weight`, or the older `.lora.down` / `to_q_lora.down` names that training
  scripts' `convert_state_dict_to_diffusers` writes, e.g. the DUO authors' `train/unlearn-sd.py`);
* bare peft keys (`get_peft_model_state_dict(unet)` saved as is, or diffusers'
  `ModelMixin.save_lora_adapter`): `<module>.lora_A.weight`, loaded for any `prefix`;
* peft folders (`PeftModel.save_pretrained`): `adapter_model.safetensors` with keys
  `base_model.model.<module>.lora_A.weight` and `adapter_config.json` beside it (r, lora_alpha,
  rank_pattern, alpha_pattern, use_rslora, use_dora: `read_peft_config`);
* kohya-ss files (sd-scripts and the trainers that copy its layout): keys
  `lora_unet_<module>.lora_down.weight`, `.lora_up.weight` and a scalar `.alpha` per module
  (scaling alpha / rank; no alpha: alpha = rank), `lora_te_` / `lora_te1_` / `lora_te2_` for the
  text encoders (`KOHYA_PREFIXES`). `<module>` is the torch module name with every '.' turned into
  '_' (`down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0`), or, for SDXL, the original
  (sgm / LDM) UNet's names (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`,
  `middle_block_0_in_layers_2`, `output_blocks_2_2_conv`, `out_2`), which diffusers converts in
  `lora_conversion_utils._maybe_map_sgm_blocks_to_diffusers` / `_convert_unet_lora_key`.

Kohya names are resolved against the module names of the model being loaded, not by string
rules: an underscored name must equal exactly one module name of `params` with '.' -> '_'; sgm
block numbers are laid onto the model's own blocks (how many resnets each block has, which have
attentions, downsamplers and upsamplers), so the same rule serves SD 1.x / 2.x / XL shapes. A name
that matches no module, or two, and keys that are not plain LoRA (LyCORIS `hada_` / `lokr_`,
DoRA `dora_scale`, `lora_mid`) are reported together in one `KohyaKeyError`.
"""

from __future__ import annotations

import collections
import json
import os
import re
from collections.abc import Mapping

import numpy as np

PEFT_WEIGHTS = 'adapter_model.safetensors'
PEFT_CONFIG = 'adapter_config.json'
PEFT_MODEL_PREFIX = 'base_model.model.'
# `lora.load`'s prefix -> the kohya key prefixes of that model.
KOHYA_PREFIXES = {'unet': ('lora_unet_',), 'text_encoder': ('lora_te_', 'lora_te1_'),
                  'text_encoder_2': ('lora_te2_',)}
_KOHYA_KEY = re.compile(r'^(?P<prefix>lora_(?:unet|te|te1|te2)_)(?P<name>[^.]+)\.(?P<what>.+)$')
_KOHYA_FACTORS = {'lora_down.weight': 'A', 'lora_up.weight': 'B'}


class KohyaKeyError(ValueError):
  """Kohya keys that do not name exactly one module of the model, or are not plain LoRA."""

  def __init__(self, source: str, unknown=(), ambiguous=(), unsupported=(), unpaired=()):
    self.unknown, self.ambiguous = sorted(unknown), sorted(ambiguous)
    self.unsupported, self.unpaired = sorted(unsupported), sorted(unpaired)
    parts = []
    if self.unknown:
      parts.append(f'{len(self.unknown)} name no module of the model: {self.unknown}')
    if self.ambiguous:
      parts.append(f'{len(self.ambiguous)} name several modules: {self.ambiguous}')
    if self.unsupported:
      parts.append(f'{len(self.unsupported)} are not plain LoRA factors (LyCORIS / DoRA / '
                   f'lora_mid are not read): {self.unsupported}')
    if self.unpaired:
      parts.append(f'{len(self.unpaired)} have no matching lora_down / lora_up: {self.unpaired}')
    super().__init__(f'kohya LoRA keys in {source} that cannot be loaded: ' + '; '.join(parts))


def find(path: str | os.PathLike, diffusers_name: str) -> tuple[str, str | None]:
  """(safetensors file, peft adapter_config.json beside it or None) for a LoRA file or folder.

  A folder holds `diffusers_name` (diffusers) or `adapter_model.safetensors` (peft)."""
  path = os.fspath(path)
  if os.path.isdir(path):
    for name in (diffusers_name, PEFT_WEIGHTS):
      if os.path.isfile(os.path.join(path, name)):
        path = os.path.join(path, name)
        break
    else:
      found = sorted(os.listdir(path))
      pickles = [f for f in found if f.endswith(('.bin', '.pt', '.pth', '.ckpt'))]
      raise FileNotFoundError(
          f'no LoRA file in {path}: looked for {diffusers_name} (diffusers) and {PEFT_WEIGHTS} '
          f'(peft); found {found}' + (f' (pickles such as {pickles[0]} are not read: save them '
                                      'as safetensors)' if pickles else ''))
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no LoRA file at {path}')
  config = os.path.join(os.path.dirname(path), PEFT_CONFIG)
  is_peft = os.path.basename(path) == PEFT_WEIGHTS and os.path.isfile(config)
  return path, (config if is_peft else None)


def read_peft_config(file: str) -> dict:
  """The LoraConfig fields of a peft `adapter_config.json` that set rank and scaling."""
  try:
    with open(file) as f:
      config = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f'cannot read the peft adapter config {file}: {e}') from e
  kind = config.get('peft_type', 'LORA')
  if kind != 'LORA':
    raise ValueError(f'{file}: peft_type {kind!r} is not LoRA')
  for flag in ('use_dora', 'lora_bias'):
    if config.get(flag):
      raise ValueError(f'{file}: {flag} is set; only plain LoRA factors are read')
  return config


def is_kohya(tensors: Mapping[str, np.ndarray]) -> bool:
  return any(_KOHYA_KEY.match(k) for k in tensors)


def _sgm_blocks(modules: list[str]) -> dict[str, tuple[str, str]]:
  """{sgm block name ('input_blocks_4_1'): (diffusers module, its kind)} laid onto the model's
  own blocks, plus the top-level sgm names."""
  children = collections.defaultdict(set)
  for m in modules:
    match = re.match(r'^((?:down|up)_blocks\.\d+|mid_block)\.(resnets|attentions|downsamplers|'
                     r'upsamplers)\.(\d+)\.', m)
    if match:
      children[match.group(1)].add((match.group(2), int(match.group(3))))
  table = {'input_blocks_0_0': ('conv_in', 'top'), 'out_2': ('conv_out', 'top'),
           'time_embed_0': ('time_embedding.linear_1', 'top'),
           'time_embed_2': ('time_embedding.linear_2', 'top'),
           'label_emb_0_0': ('add_embedding.linear_1', 'top'),
           'label_emb_0_2': ('add_embedding.linear_2', 'top'),
           'middle_block_0': ('mid_block.resnets.0', 'resnets'),
           'middle_block_1': ('mid_block.attentions.0', 'attentions'),
           'middle_block_2': ('mid_block.resnets.1', 'resnets')}

  def count(block, kind):
    return len({i for k, i in children[block] if k == kind})

  for side, sgm, sampler in (('down', 'input_blocks', 'downsamplers'),
                             ('up', 'output_blocks', 'upsamplers')):
    i = 1 if side == 'down' else 0
    b = 0
    while f'{side}_blocks.{b}' in children:
      block = f'{side}_blocks.{b}'
      n = count(block, 'resnets')
      for layer in range(n):
        parts = [(f'{block}.resnets.{layer}', 'resnets')]
        if ('attentions', layer) in children[block]:
          parts.append((f'{block}.attentions.{layer}', 'attentions'))
        if side == 'up' and layer == n - 1 and (sampler, 0) in children[block]:
          parts.append((f'{block}.{sampler}.0', sampler))
        for j, part in enumerate(parts):
          table[f'{sgm}_{i}_{j}'] = part
        i += 1
      if side == 'down' and (sampler, 0) in children[block]:
        table[f'{sgm}_{i}_0'] = (f'{block}.{sampler}.0', sampler)
        i += 1
      b += 1
  return table


# Inside an sgm block, the original names of the layers diffusers renamed.
_SGM_LAYERS = {
    'resnets': {'in_layers_2': 'conv1', 'out_layers_3': 'conv2', 'emb_layers_1': 'time_emb_proj',
                'skip_connection': 'conv_shortcut'},
    'downsamplers': {'op': 'conv'},
}
_SGM_NAME = re.compile(r'^(?P<block>input_blocks_\d+_\d+|middle_block_\d+|output_blocks_\d+_\d+|'
                       r'time_embed_\d+|label_emb_0_\d+|out_\d+)(?:_(?P<rest>.+))?$')


def _resolve(name: str, index: Mapping[str, list[str]], sgm: Mapping[str, tuple[str, str]]
             ) -> list[str]:
  """The modules an underscored kohya module name can mean (0, 1, or several)."""
  if name in index:
    return index[name]
  m = _SGM_NAME.match(name)
  if not m or m.group('block') not in sgm:
    return []
  module, kind = sgm[m.group('block')]
  rest = m.group('rest')
  if kind == 'top':
    return [module] if rest is None else []
  if rest is None:
    return []
  rest = _SGM_LAYERS.get(kind, {}).get(rest, rest)
  return index.get(f'{module}.{rest}'.replace('.', '_'), [])


def from_kohya(tensors: Mapping[str, np.ndarray], modules: list[str], prefix: str | None,
               source: str) -> tuple[dict[str, np.ndarray], dict[str, float]]:
  """(peft-named state `<module>.lora_A.weight` / `.lora_B.weight`, {module: alpha}) of the keys
  of a kohya file that belong to `prefix` ('unet', 'text_encoder', 'text_encoder_2'), resolved
  against `modules` (the torch module names of the model's kernels). Keys of the other models are
  ignored. Alpha is given only for modules with an `.alpha` tensor."""
  if prefix not in KOHYA_PREFIXES:
    raise ValueError(f'{source} is a kohya LoRA file, whose keys name their model: pass prefix as '
                     f'one of {sorted(KOHYA_PREFIXES)}, got {prefix!r}')
  mine = KOHYA_PREFIXES[prefix]
  index = collections.defaultdict(list)
  for m in modules:
    index[m.replace('.', '_')].append(m)
  sgm = _sgm_blocks(modules) if prefix == 'unet' else {}
  groups: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
  unsupported, found = [], set()
  for key, value in tensors.items():
    m = _KOHYA_KEY.match(key)
    if m is None:
      unsupported.append(key)  # a diffusers / peft key inside a kohya file
      continue
    found.add(m.group('prefix'))
    if m.group('prefix') not in mine:
      continue
    what = m.group('what')
    if what in _KOHYA_FACTORS or what == 'alpha':
      groups[m.group('name')][what] = value
    else:
      unsupported.append(key)
  if not groups and not unsupported:
    raise ValueError(f'{source} has no kohya keys for {prefix!r} ({"/".join(mine)}...); its '
                     f'prefixes: {sorted(found)}')
  state, alphas = {}, {}
  unknown, ambiguous, unpaired = [], [], []
  for name, parts in sorted(groups.items()):
    key = f'{KOHYA_PREFIXES[prefix][0]}{name}'
    missing = [w for w in _KOHYA_FACTORS if w not in parts]
    if missing:
      unpaired.append(f'{key} (no {", ".join(missing)})')
      continue
    targets = _resolve(name, index, sgm)
    if not targets:
      unknown.append(key)
      continue
    if len(targets) > 1:
      ambiguous.append(f'{key} -> {targets}')
      continue
    module = targets[0]
    if f'{module}.lora_A.weight' in state:
      ambiguous.append(f'{key} -> {module} (named twice)')
      continue
    state[f'{module}.lora_A.weight'] = parts['lora_down.weight']
    state[f'{module}.lora_B.weight'] = parts['lora_up.weight']
    if 'alpha' in parts:
      alpha = np.asarray(parts['alpha'], np.float64)
      if alpha.size != 1:
        unsupported.append(f'{key}.alpha (shape {alpha.shape}, expected a scalar)')
        continue
      alphas[module] = float(alpha.reshape(()))
  if unknown or ambiguous or unsupported or unpaired:
    raise KohyaKeyError(source, unknown, ambiguous, unsupported, unpaired)
  return state, alphas


# Older diffusers names for the same factors, rewritten as diffusers' own loader does
# (`convert_unet_state_dict_to_peft`): training scripts save `convert_state_dict_to_diffusers(...)`,
# which turns `to_q.lora_A` into `to_q.lora.down`, and attention-processor era files use
# `to_q_lora.down`; text encoders use `q_proj.lora_linear_layer.down`.
_LEGACY_NAMES = (
    (re.compile(r'\.to_out_lora\.(up|down)\.weight$'), r'.to_out.0.lora.\1.weight'),
    (re.compile(r'\.(to_q|to_k|to_v)_lora\.(up|down)\.weight$'), r'.\1.lora.\2.weight'),
    (re.compile(r'\.lora(?:_linear_layer)?\.up\.weight$'), '.lora_B.weight'),
    (re.compile(r'\.lora(?:_linear_layer)?\.down\.weight$'), '.lora_A.weight'),
)
# The model prefixes of diffusers pipeline files; a file with none of them holds bare peft keys.
_PIPELINE_PREFIXES = ('unet.', 'text_encoder.', 'text_encoder_2.', 'transformer.')


def peft_name(key: str) -> str:
  """A legacy diffusers factor name as peft's (`x.lora.down.weight` -> `x.lora_A.weight`)."""
  for pattern, repl in _LEGACY_NAMES:
    key = pattern.sub(repl, key)
  return key


def select(tensors: Mapping[str, np.ndarray], metadata: dict | None, peft_config: str | None,
           prefix: str | None, modules: list[str], source: str
           ) -> tuple[dict[str, np.ndarray], dict, dict[str, float] | None]:
  """(state with peft names `<module>.lora_A.weight`, LoraConfig-like dict (r, lora_alpha,
  rank_pattern, alpha_pattern, use_rslora, ...; empty: none), kohya {module: alpha} or None) of
  the part of a LoRA file that belongs to `prefix`, whatever the layout (module docstring)."""
  pre = f'{prefix}.' if prefix else ''
  if is_kohya(tensors):
    state, alphas = from_kohya(tensors, modules, prefix, source)
    return state, {}, alphas
  if tensors and all(k.startswith(PEFT_MODEL_PREFIX) for k in tensors):
    state = {k[len(PEFT_MODEL_PREFIX):]: v for k, v in tensors.items()}  # one model: no prefix
  elif pre and any(k.startswith(pre) for k in tensors):
    state = {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}
    if metadata is not None:
      metadata = {k[len(pre):]: v for k, v in metadata.items() if k.startswith(pre)} or None
  elif pre and any(k.startswith(_PIPELINE_PREFIXES) for k in tensors):
    found = sorted({k.split('.', 1)[0] for k in tensors})
    raise ValueError(f'{source} has no keys under prefix {prefix!r}; its prefixes: {found}')
  else:
    state = dict(tensors)  # bare peft keys, or prefix=None
  if peft_config is not None:
    metadata = read_peft_config(peft_config)
  renamed = {}
  for k, v in state.items():
    new = peft_name(k)
    if new in renamed:
      raise ValueError(f'{source}: two keys name the same factor {pre}{new}')
    renamed[new] = v
  return renamed, metadata or {}, None
