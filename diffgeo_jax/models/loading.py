"""Load and save diffusers / transformers model folders (config.json + safetensors), without torch.

    unet, p = load_unet(dir)           # UNet2DConditionModel folder
    vae, p = load_vae(dir)             # AutoencoderKL folder
    text, p = load_text_encoder(dir)   # CLIPTextModel[WithProjection] folder
    pipe = load_pipeline(dir)          # model_index.json + unet/ vae/ text_encoder/ tokenizer/ scheduler/

Weights: `<stem>[.<variant>].safetensors`, or shards listed in `<stem>.safetensors.index[.<variant>].json`,
read with numpy (fp16 / bf16 files load into float32 parameters). PyTorch pickles (`*.bin`) are read
only when the caller passes `allow_pickle=True`, and then with `torch.load(weights_only=True)`.
`save_*` write the same layout, so models trained here load in diffusers / transformers.

Folders may be local or on Cloud Storage (`gs://bucket/sd15`, through etils epath + gcsfs), so pod
workers need no hand-copied weights: JSON and safetensors files are read straight into memory
(no local copy); only tokenizer folders (small, and read by transformers from local files) and
explicitly allowed pickles are staged once per host under `paths.cache_dir()`. `save_*` to gs://
write a local temporary folder and upload it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from absl import logging

from diffgeo_jax import paths
from diffgeo_jax.models import clip, config_utils, convert, unet, vae

PathLike = str | os.PathLike


@dataclasses.dataclass(frozen=True)
class ModelKind:
  """How to build, load and save one model class."""
  config_cls: Any
  model_cls: Callable[..., Any]
  module: Any  # the model's module: dummy_inputs, TORCH_IGNORE_KEYS, (TORCH_RENAMES)
  stem: str  # safetensors file stem
  bin_name: str  # the PyTorch pickle file name


_DIFFUSERS_STEM = 'diffusion_pytorch_model'
KINDS: dict[str, ModelKind] = {
    'UNet2DConditionModel': ModelKind(unet.UNet2DConditionConfig, unet.UNet2DConditionModel, unet,
                                      _DIFFUSERS_STEM, _DIFFUSERS_STEM + '.bin'),
    'AutoencoderKL': ModelKind(vae.AutoencoderKLConfig, vae.AutoencoderKL, vae, _DIFFUSERS_STEM,
                               _DIFFUSERS_STEM + '.bin'),
    'CLIPTextModel': ModelKind(clip.CLIPTextConfig, clip.CLIPTextModel, clip, 'model',
                               'pytorch_model.bin'),
    'CLIPTextModelWithProjection': ModelKind(clip.CLIPTextConfig, clip.CLIPTextModelWithProjection,
                                             clip, 'model', 'pytorch_model.bin'),
}


def _with_variant(name: str, variant: str | None) -> str:
  """diffusers/transformers naming: the variant goes before the last extension."""
  if not variant:
    return name
  stem, ext = name.rsplit('.', 1)
  return f'{stem}.{variant}.{ext}'


def _load_safetensors(path) -> dict[str, np.ndarray]:
  try:
    if paths.is_remote(path):  # read into memory: no local copy of a multi-GB file
      return safetensors.numpy.load(path.read_bytes())
    return safetensors.numpy.load_file(os.fspath(path))
  except Exception as e:  # safetensors raises several types for a corrupt file
    raise ValueError(f'cannot read safetensors file {path}: {e}') from e


def read_state_dict(folder: PathLike, stem: str, bin_name: str, variant: str | None = None,
                    allow_pickle: bool = False) -> dict[str, np.ndarray]:
  """The torch-layout state dict stored in `folder` (local or gs://), as numpy arrays."""
  folder = paths.resolve(folder, 'folder')
  single = folder / _with_variant(f'{stem}.safetensors', variant)
  index = folder / _with_variant(f'{stem}.safetensors.index.json', variant)
  pickle = folder / _with_variant(bin_name, variant)
  if single.is_file():
    return _load_safetensors(single)
  if index.is_file():
    weight_map = config_utils.read_json(index).get('weight_map')
    if not isinstance(weight_map, dict):
      raise ValueError(f'{index} has no "weight_map" object')
    out: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
      shard_path = folder / shard
      if not shard_path.is_file():
        raise FileNotFoundError(f'shard {shard} listed in {index} is missing')
      out.update(_load_safetensors(shard_path))
    missing = sorted(set(weight_map) - set(out))
    if missing:
      raise ValueError(f'{index} lists keys that its shards do not hold: {missing}')
    return out
  if pickle.is_file():
    if not allow_pickle:
      raise ValueError(f'{folder} holds only the PyTorch pickle {pickle.name}; '
                       'unpickling can run arbitrary code, so pass allow_pickle=True if you trust it')
    import torch  # only on this explicitly allowed path
    sd = torch.load(paths.local_file(pickle), map_location='cpu', weights_only=True)
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in sd.items()}
  listing = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else '(folder does not exist)'
  raise FileNotFoundError(
      f'no weights in {folder}: looked for {single.name}, {index.name}'
      f'{", " + pickle.name if allow_pickle else ""}; found {listing}')


def _class_name(cfg: Mapping[str, Any], default: str) -> str:
  if '_class_name' in cfg:
    return cfg['_class_name']
  archs = cfg.get('architectures') or [default]
  return archs[0]


def load_model(folder: PathLike, default_class: str, *, class_name: str | None = None,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, variant: str | None = None,
               allow_pickle: bool = False, attention_impl: str = 'softmax'):
  """(model, params) from a diffusers/transformers model folder.

  `dtype`: activation dtype; `param_dtype`: dtype of the returned parameters."""
  folder = paths.resolve(folder, 'folder')
  config_path = os.fspath(folder / 'config.json')
  cfg = config_utils.read_json(config_path)
  name = class_name or _class_name(cfg, default_class)
  if name not in KINDS:
    raise config_utils.ConfigError(f'{config_path}: model class {name!r} is not supported; '
                                   f'supported: {sorted(KINDS)}')
  kind = KINDS[name]
  config = kind.config_cls.from_dict(cfg, source=config_path)
  model = kind.model_cls(config, dtype=dtype, attention_impl=attention_impl)
  target = convert.abstract_params(model.init, jax.random.key(0), *kind.module.dummy_inputs(config))
  state = read_state_dict(folder, kind.stem, kind.bin_name, variant, allow_pickle)
  params = convert.torch_to_flax(state, target, source=f'weights in {folder}',
                                 ignore=kind.module.TORCH_IGNORE_KEYS,
                                 renames=getattr(kind.module, 'TORCH_RENAMES', ()))
  params = jax.tree.map(lambda a: jnp.asarray(a, dtype=param_dtype), params)
  return model, params


def load_unet(folder: PathLike, **kwargs):
  return load_model(folder, 'UNet2DConditionModel', **kwargs)


def load_vae(folder: PathLike, **kwargs):
  return load_model(folder, 'AutoencoderKL', **kwargs)


def load_text_encoder(folder: PathLike, **kwargs):
  return load_model(folder, 'CLIPTextModel', **kwargs)


def save_model(folder: PathLike, model: Any, params: Any, *, dtype: Any = None,
               variant: str | None = None) -> None:
  """Writes `config.json` and `<stem>[.<variant>].safetensors` in the diffusers/transformers
  layout. `dtype` (e.g. np.float16) casts the stored weights."""
  name = type(model).__name__
  if name not in KINDS:
    raise ValueError(f'cannot save a {name}; supported: {sorted(KINDS)}')
  kind = KINDS[name]
  if paths.is_remote(folder):  # safetensors writes local files: write them here, then upload
    with paths.writable_folder(folder) as local:
      return save_model(local, model, params, dtype=dtype, variant=variant)
  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)
  state = convert.flax_to_torch(jax.device_get(params), dtype=dtype)
  safetensors.numpy.save_file(state, os.path.join(folder, _with_variant(f'{kind.stem}.safetensors',
                                                                         variant)),
                              metadata={'format': 'pt'})
  config = model.config.to_dict()
  if kind.stem == 'model':  # transformers reads the class from "architectures"
    config['architectures'] = [name]
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(config, f, indent=2, sort_keys=True)


# -- pipelines -------------------------------------------------------------------------------------

_MODEL_COMPONENTS = {'unet': 'UNet2DConditionModel', 'vae': 'AutoencoderKL',
                     'text_encoder': 'CLIPTextModel', 'text_encoder_2': 'CLIPTextModelWithProjection'}
_TOKENIZERS = ('tokenizer', 'tokenizer_2')


@dataclasses.dataclass
class Pipeline:
  """The parts of a diffusers text-to-image pipeline folder, as Flax models and params.

  `vae` is None for a pixel-space pipeline (the embedded digits model). `scheduler_config` is the
  raw `scheduler_config.json` (see `diffusion.schedules.from_diffusers_config`). `skipped` names
  components of model_index.json that are not loaded (safety checker, feature extractor, ...);
  `settings` holds its non-component entries (e.g. `requires_safety_checker`), written back on save.
  """
  unet: Any
  unet_params: Any
  text_encoder: Any
  text_encoder_params: Any
  tokenizer: Any
  scheduler_config: dict
  vae: Any = None
  vae_params: Any = None
  text_encoder_2: Any = None
  text_encoder_2_params: Any = None
  tokenizer_2: Any = None
  class_name: str = 'StableDiffusionPipeline'
  settings: dict = dataclasses.field(default_factory=dict)
  skipped: tuple[str, ...] = ()


def load_tokenizer(folder: PathLike):
  """`transformers.CLIPTokenizer` from a folder with tokenizer.json (what transformers 5 writes) or
  vocab.json + merges.txt (older folders, e.g. Stable Diffusion's)."""
  folder = paths.local_folder(folder, 'tokenizer folder')  # transformers reads local files
  has = lambda name: os.path.isfile(os.path.join(folder, name))
  if not (has('tokenizer.json') or (has('vocab.json') and has('merges.txt'))):
    raise FileNotFoundError(f'no tokenizer files in {folder}: expected tokenizer.json, or vocab.json '
                            'and merges.txt')
  from transformers import CLIPTokenizer  # noqa: PLC0415 (heavy import, only when needed)
  return CLIPTokenizer.from_pretrained(folder)


def load_pipeline(source: PathLike, *, config: str | None = None, revision: str | None = None,
                  **model_kwargs) -> Pipeline:
  """Loads a pipeline from any of the three forms users hold weights in:

  - a diffusers pipeline folder (local or gs://): model_index.json + unet/ vae/ text_encoder/ ...;
  - an original single-file checkpoint (`v1-5-pruned-emaonly.safetensors`,
    `sd_xl_base_1.0.safetensors`): see `single_file.load_pipeline`; `config` names its model
    type ('sd15', 'sd21', 'sdxl') where the keys do not tell it;
  - a Hugging Face hub model id (`stabilityai/stable-diffusion-xl-base-1.0`), resolved through
    the local hub cache (`hub.resolve`, at `revision`).

  `model_kwargs` (dtype, param_dtype, variant, allow_pickle, attention_impl) go to every model."""
  from diffgeo_jax.models import hub, single_file  # noqa: PLC0415 (they import this module)
  if single_file.is_single_file(source):
    return single_file.load_pipeline(source, config=config, **model_kwargs)
  if config is not None:
    raise ValueError(f'config={config!r} is read only for a single-file checkpoint; {source} is '
                     'a pipeline folder or a hub id (its model_index.json names its parts)')
  folder = hub.resolve(source, revision=revision, variant=model_kwargs.get('variant'))
  return _load_pipeline_folder(folder, **model_kwargs)


def _load_pipeline_folder(folder: PathLike, **model_kwargs) -> Pipeline:
  folder = paths.resolve(folder, 'folder')
  index_path = os.fspath(folder / 'model_index.json')
  index = config_utils.read_json(index_path)
  parts: dict[str, Any] = {'class_name': index.get('_class_name', 'StableDiffusionPipeline')}
  skipped = []
  for name, spec in index.items():
    if name.startswith('_'):
      continue
    if not isinstance(spec, list):  # a pipeline setting, e.g. requires_safety_checker
      parts.setdefault('settings', {})[name] = spec
      continue
    if len(spec) != 2:
      raise config_utils.ConfigError(f'{index_path}: component {name!r} must be [library, class], '
                                     f'got {spec!r}')
    if spec[1] is None:
      continue
    sub = folder / name
    if name in _MODEL_COMPONENTS:
      model, params = load_model(sub, _MODEL_COMPONENTS[name], class_name=spec[1], **model_kwargs)
      parts[name], parts[f'{name}_params'] = model, params
    elif name in _TOKENIZERS:
      parts[name] = load_tokenizer(sub)
    elif name == 'scheduler':
      parts['scheduler_config'] = config_utils.read_json(sub / 'scheduler_config.json')
    else:
      skipped.append(name)
  for required in ('unet', 'text_encoder', 'tokenizer', 'scheduler_config'):
    if required not in parts:
      raise config_utils.ConfigError(f'{index_path}: the pipeline has no {required.split("_")[0]}')
  if skipped:
    logging.info('%s: not loading components %s', folder, skipped)
  return Pipeline(**parts, skipped=tuple(skipped))


def save_pipeline(folder: PathLike, pipe: Pipeline, **save_kwargs) -> None:
  """Writes `pipe` as a diffusers pipeline folder (loadable by `load_pipeline` and diffusers),
  local or gs://."""
  if paths.is_remote(folder):
    with paths.writable_folder(folder) as local:
      return save_pipeline(local, pipe, **save_kwargs)
  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)
  index: dict[str, Any] = {'_class_name': pipe.class_name, '_diffusers_version': '0.42.1',
                           **pipe.settings}
  for name in _MODEL_COMPONENTS:
    model = getattr(pipe, name)
    if model is not None:
      save_model(os.path.join(folder, name), model, getattr(pipe, f'{name}_params'), **save_kwargs)
      lib = 'diffusers' if name in ('unet', 'vae') else 'transformers'
      index[name] = [lib, type(model).__name__]
  for name in _TOKENIZERS:
    tok = getattr(pipe, name)
    if tok is not None:
      tok.save_pretrained(os.path.join(folder, name))
      index[name] = ['transformers', 'CLIPTokenizer']
  os.makedirs(os.path.join(folder, 'scheduler'), exist_ok=True)
  with open(os.path.join(folder, 'scheduler', 'scheduler_config.json'), 'w') as f:
    json.dump(pipe.scheduler_config, f, indent=2, sort_keys=True)
  index['scheduler'] = ['diffusers', pipe.scheduler_config.get('_class_name', 'DDPMScheduler')]
  with open(os.path.join(folder, 'model_index.json'), 'w') as f:
    json.dump(index, f, indent=2, sort_keys=True)
