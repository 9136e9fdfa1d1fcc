"""Abstract models for ahead-of-time compilation: the Flax modules and their parameters as
`jax.ShapeDtypeStruct`s (`jax.eval_shape` of init: no weights are read or made), with the
per-sample shapes of the UNet's input and conditioning.

Models: 'digits' (the shipped pipeline's configs), 'tiny' (a few-thousand-parameter pixel UNet for
tests), and the Stable Diffusion shapes 'sd15', 'sd21', 'sdxl' from the diffusers configs shipped
in `models/reference_configs/`. SD conditioning is the text encoder's (77, D) output, computed
outside the compiled step; SDXL's is the dict {'context': (77, 2048), 'text_embeds': (1280,),
'time_ids': (6,)} the UNet takes (see `models.unet`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import numpy as np

from diffgeo_jax import digits
from diffgeo_jax.models import clip, config_utils, convert, unet as unet_lib, vae as vae_lib

MODELS = ('tiny', 'digits', 'sd15', 'sd21', 'sdxl')
REFERENCE_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'models',
                                 'reference_configs')
TEXT_LENGTH = 77  # CLIP's token sequence


@dataclasses.dataclass(frozen=True)
class AbstractModel:
  name: str
  unet: Any
  unet_params: Any  # ShapeDtypeStructs
  vae: Any  # None for a pixel-space model
  vae_params: Any
  text_encoder: Any
  text_encoder_params: Any
  scheduler_config: dict
  sample_shape: tuple[int, int, int]  # the UNet's input (h, w, C) at the model's resolution
  context: Any  # one sample's conditioning, ShapeDtypeStructs without the batch axis

  @property
  def unet_parameters(self) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.unet_params)))


def _abstract(model, inputs) -> Any:
  return convert.abstract_params(model.init, jax.random.key(0), *inputs)


# 'tiny': the digits model's test widths (configs/digits/t2i.py:tiny) at two resolutions (one
# cross-attention block, one plain block, the cross-attention mid block), so that every job
# compiles in seconds: CI compiles each job for two topologies.
_TINY_UNET = dict(block_out_channels=(8, 8), norm_num_groups=4, cross_attention_dim=16,
                  attention_head_dim=4,
                  down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
                  up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'))
_TINY_TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2)


@functools.lru_cache(maxsize=None)
def abstract_model(name: str) -> AbstractModel:
  if name not in MODELS:
    raise ValueError(f'model must be one of {MODELS}, got {name!r}')
  if name in ('tiny', 'digits'):
    return _pixel_model(name)
  folder = os.path.join(REFERENCE_CONFIGS, name)
  read = lambda part: config_utils.read_json(os.path.join(folder, f'{part}.json'))
  ucfg = unet_lib.UNet2DConditionConfig.from_dict(read('unet'))
  unet = unet_lib.UNet2DConditionModel(ucfg)
  vcfg = vae_lib.AutoencoderKLConfig.from_dict(read('vae'))
  vae = vae_lib.AutoencoderKL(vcfg)
  tcfg = clip.CLIPTextConfig.from_dict(read('text_encoder'))
  text = clip.CLIPTextModel(tcfg)
  size = ucfg.sample_size
  cross = ucfg.per_block('cross_attention_dim')[0]
  context: Any = jax.ShapeDtypeStruct((TEXT_LENGTH, cross), np.float32)
  if ucfg.addition_embed_type == 'text_time':
    pooled = ucfg.projection_class_embeddings_input_dim - 6 * ucfg.addition_time_embed_dim
    context = {'context': context, 'text_embeds': jax.ShapeDtypeStruct((pooled,), np.float32),
               'time_ids': jax.ShapeDtypeStruct((6,), np.float32)}
  return AbstractModel(
      name, unet, _abstract(unet, unet_lib.dummy_inputs(ucfg)), vae,
      _abstract(vae, vae_lib.dummy_inputs(vcfg)), text, _abstract(text, clip.dummy_inputs(tcfg)),
      read('scheduler'), (size, size, ucfg.in_channels), context)


def _pixel_model(name: str) -> AbstractModel:
  folder = digits.pipeline_dir()
  read = lambda *p: config_utils.read_json(os.path.join(folder, *p))
  tiny = name == 'tiny'
  ucfg = unet_lib.UNet2DConditionConfig.from_dict(
      {**read('unet', 'config.json'), **(_TINY_UNET if tiny else {})})
  tcfg = clip.CLIPTextConfig.from_dict(
      {**read('text_encoder', 'config.json'), **(_TINY_TEXT if tiny else {})})
  unet = unet_lib.UNet2DConditionModel(ucfg)
  text = clip.CLIPTextModel(tcfg)
  size = ucfg.sample_size
  return AbstractModel(
      name, unet, _abstract(unet, unet_lib.dummy_inputs(ucfg)), None, None, text,
      _abstract(text, clip.dummy_inputs(tcfg)), read('scheduler', 'scheduler_config.json'),
      (size, size, ucfg.in_channels),
      jax.ShapeDtypeStruct((tcfg.max_position_embeddings, ucfg.per_block('cross_attention_dim')[0]),
                           np.float32))
