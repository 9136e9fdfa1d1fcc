"""Flax linen port of diffusers' `UNet2DConditionModel` (SD 1.x, 2.x and SDXL), NHWC.

The config mirrors diffusers' `config.json` one-to-one, and parameter names equal diffusers' module
names, so every diffusers checkpoint converts mechanically (`convert.py`).

    eps = unet.apply({'params': p}, x, t, context)                   # x (B,H,W,C), t () or (B,)
    h = unet.apply({'params': p}, x, t, context, method='hspace')    # mid-block output, no up path
    eps, h = unet.apply({'params': p}, x, t, context, method='with_hspace')

Timesteps may be fractional: the sinusoidal embedding is defined for any real t.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffgeo_jax.models import config_utils
from diffgeo_jax.models.attention import check_attention_impl
from diffgeo_jax.models.layers import (Dtype, TimestepEmbedding, conv, get_activation, group_norm,
                                       timestep_embedding)
from diffgeo_jax.models.unet_blocks import DownBlock, MidBlock, UpBlock

WEIGHTS_NAME = 'diffusion_pytorch_model.safetensors'
TORCH_IGNORE_KEYS: tuple[str, ...] = ()

_DOWN_TYPES = ('CrossAttnDownBlock2D', 'DownBlock2D')
_UP_TYPES = ('CrossAttnUpBlock2D', 'UpBlock2D')

# Config keys that do not change the forward pass of the model we port.
_IGNORED = frozenset({'dropout', 'mid_block_only_cross_attention', 'addition_embed_type_num_heads'})
# Features we do not port: key -> accepted value(s).
_UNSUPPORTED = {
    'encoder_hid_dim': None, 'encoder_hid_dim_type': None, 'class_embed_type': None,
    'num_class_embeds': None, 'dual_cross_attention': False, 'time_embedding_type': 'positional',
    'attention_type': 'default', 'class_embeddings_concat': False, 'cross_attention_norm': None,
}


@dataclasses.dataclass(frozen=True)
class UNet2DConditionConfig:
  """diffusers `UNet2DConditionModel` config (defaults are diffusers' defaults = SD 1.x)."""
  sample_size: Any = None
  in_channels: int = 4
  out_channels: int = 4
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  down_block_types: tuple = ('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',)
  mid_block_type: str = 'UNetMidBlock2DCrossAttn'
  up_block_types: tuple = ('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3
  only_cross_attention: bool = False
  block_out_channels: tuple = (320, 640, 1280, 1280)
  layers_per_block: int = 2
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  act_fn: str = 'silu'
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: int = 1280
  transformer_layers_per_block: int = 1
  reverse_transformer_layers_per_block: Any = None
  attention_head_dim: int = 8
  num_attention_heads: Any = None
  use_linear_projection: bool = False
  addition_embed_type: Any = None
  addition_time_embed_dim: Any = None
  upcast_attention: bool = False
  resnet_time_scale_shift: str = 'default'
  resnet_skip_time_act: bool = False
  resnet_out_scale_factor: float = 1.0
  time_embedding_dim: Any = None
  time_embedding_act_fn: Any = None
  timestep_post_act: Any = None
  time_cond_proj_dim: Any = None
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3
  projection_class_embeddings_input_dim: Any = None

  def __post_init__(self):
    n = len(self.block_out_channels)
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ValueError(f'down_block_types ({len(self.down_block_types)}), up_block_types '
                       f'({len(self.up_block_types)}) and block_out_channels ({n}) must have one '
                       'entry per resolution')
    for key, kinds, allowed in (('down_block_types', self.down_block_types, _DOWN_TYPES),
                                ('up_block_types', self.up_block_types, _UP_TYPES)):
      bad = [k for k in kinds if k not in allowed]
      if bad:
        raise ValueError(f'{key} has unsupported block types {bad}; supported: {allowed}')
    if self.mid_block_type != 'UNetMidBlock2DCrossAttn':
      raise ValueError(f"mid_block_type={self.mid_block_type!r} is not supported; "
                       "supported: 'UNetMidBlock2DCrossAttn'")
    if self.addition_embed_type not in (None, 'text_time'):
      raise ValueError(f'addition_embed_type={self.addition_embed_type!r} is not supported; '
                       "supported: None, 'text_time'")
    if self.addition_embed_type == 'text_time' and (
        self.addition_time_embed_dim is None or self.projection_class_embeddings_input_dim is None):
      raise ValueError("addition_embed_type='text_time' needs addition_time_embed_dim and "
                       'projection_class_embeddings_input_dim')
    if self.norm_num_groups is None:
      raise ValueError('norm_num_groups=None is not supported')
    for key in ('layers_per_block', 'attention_head_dim', 'cross_attention_dim',
                'transformer_layers_per_block', 'only_cross_attention', 'num_attention_heads'):
      self.per_block(key)

  def per_block(self, key: str) -> tuple:
    """A per-resolution setting as a tuple (diffusers accepts an int or one entry per block)."""
    value = getattr(self, key)
    n = len(self.block_out_channels)
    if key == 'num_attention_heads' and value is None:
      # diffusers' long-standing naming quirk: `attention_head_dim` holds the number of heads.
      value = self.attention_head_dim
    if not isinstance(value, tuple):
      return (value,) * n
    if len(value) != n:
      raise ValueError(f'{key} has {len(value)} entries; expected {n} (one per block_out_channels)')
    return value

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], source: str = 'config') -> 'UNet2DConditionConfig':
    return config_utils.from_dict(cls, d, source, ignored=_IGNORED, unsupported=_UNSUPPORTED)

  def to_dict(self) -> dict:
    return config_utils.to_dict(self, 'UNet2DConditionModel', _diffusers_version='0.42.1')


class UNet2DConditionModel(nn.Module):
  """diffusers `UNet2DConditionModel`, NHWC. `dtype` is the activation dtype (params stay float32);
  `attention_impl` selects the attention kernel (see `attention.dot_product_attention`); `remat`
  rematerialises every resnet and transformer in the backward pass (`nn.remat`: activations of
  one block at a time instead of the whole network, for about one more forward pass; the same
  parameters and outputs).

  `context` may also be a dict {'context': (B, L, D), 'text_embeds': ..., 'time_ids': ...}: the
  whole conditioning of an SDXL UNet as one pytree, so code that batches, pairs or shards the
  conditioning (guidance, losses) treats SD and SDXL alike."""
  config: UNet2DConditionConfig
  dtype: Dtype = jnp.float32
  attention_impl: str = 'softmax'
  remat: bool = False

  def setup(self):
    c = self.config
    check_attention_impl(self.attention_impl)
    boc = c.block_out_channels
    n = len(boc)
    layers, heads = c.per_block('layers_per_block'), c.per_block('num_attention_heads')
    cross, tlayers = c.per_block('cross_attention_dim'), c.per_block('transformer_layers_per_block')
    only_cross = c.per_block('only_cross_attention')
    rev_tlayers = (tuple(c.reverse_transformer_layers_per_block)
                   if c.reverse_transformer_layers_per_block is not None else tuple(reversed(tlayers)))
    time_embed_dim = c.time_embedding_dim or boc[0] * 4
    common = dict(temb_channels=time_embed_dim, resnet_eps=c.norm_eps, resnet_act_fn=c.act_fn,
                  resnet_groups=c.norm_num_groups, resnet_time_scale_shift=c.resnet_time_scale_shift,
                  resnet_skip_time_act=c.resnet_skip_time_act,
                  use_linear_projection=c.use_linear_projection, upcast_attention=c.upcast_attention,
                  attention_impl=self.attention_impl, remat=self.remat, dtype=self.dtype)

    self.conv_in = conv(boc[0], c.conv_in_kernel, self.dtype)
    self.time_embedding = TimestepEmbedding(time_embed_dim, act_fn=c.act_fn,
                                            cond_proj_dim=c.time_cond_proj_dim,
                                            post_act_fn=c.timestep_post_act, dtype=self.dtype)
    if c.addition_embed_type == 'text_time':
      self.add_embedding = TimestepEmbedding(time_embed_dim, dtype=self.dtype)

    down = []
    for i, kind in enumerate(c.down_block_types):
      down.append(DownBlock(
          out_channels=boc[i], in_channels=boc[max(i - 1, 0)], num_layers=layers[i],
          transformer_layers=tlayers[i], add_downsample=i < n - 1,
          downsample_padding=c.downsample_padding, cross_attention_dim=cross[i],
          num_attention_heads=heads[i] if kind == 'CrossAttnDownBlock2D' else None,
          only_cross_attention=only_cross[i], output_scale_factor=c.resnet_out_scale_factor,
          **common))
    self.down_blocks = down
    self.mid_block = MidBlock(out_channels=boc[-1], transformer_layers=tlayers[-1],
                              num_attention_heads=heads[-1], cross_attention_dim=cross[-1],
                              output_scale_factor=c.mid_block_scale_factor, **common)
    up, rboc = [], tuple(reversed(boc))
    rlayers, rheads, rcross = reversed(layers), tuple(reversed(heads)), tuple(reversed(cross))
    rlayers, ronly = tuple(rlayers), tuple(reversed(only_cross))
    for i, kind in enumerate(c.up_block_types):
      up.append(UpBlock(
          out_channels=rboc[i], in_channels=rboc[min(i + 1, n - 1)],
          prev_output_channel=rboc[max(i - 1, 0)], num_layers=rlayers[i] + 1,
          transformer_layers=rev_tlayers[i], add_upsample=i < n - 1, cross_attention_dim=rcross[i],
          num_attention_heads=rheads[i] if kind == 'CrossAttnUpBlock2D' else None,
          only_cross_attention=ronly[i], output_scale_factor=c.resnet_out_scale_factor, **common))
    self.up_blocks = up
    self.conv_norm_out = group_norm(c.norm_num_groups, c.norm_eps, self.dtype)
    self.conv_out = conv(c.out_channels, c.conv_out_kernel, self.dtype)

  # -- the forward pass, in the two halves h-space splits it into -------------------------------

  def _check_inputs(self, x, t, context, added_cond_kwargs):
    c = self.config
    if x.ndim != 4 or x.shape[-1] != c.in_channels:
      raise ValueError(f'x must be (B, H, W, {c.in_channels}) (NHWC), got shape {x.shape}')
    factor = 2 ** (len(c.block_out_channels) - 1)
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f'x spatial size {x.shape[1:3]} must be divisible by {factor} '
                       f'(2 ** number of downsamplers)')
    t = jnp.asarray(t)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, x.shape[0])):
      raise ValueError(f't must be a scalar or of shape ({x.shape[0]},), got shape {t.shape}')
    cross = c.per_block('cross_attention_dim')
    if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[-1] != cross[0]:
      raise ValueError(f'context must be ({x.shape[0]}, L, {cross[0]}), got shape {context.shape}')
    if c.addition_embed_type == 'text_time':
      if added_cond_kwargs is None or not {'text_embeds', 'time_ids'} <= set(added_cond_kwargs):
        raise ValueError("added_cond_kwargs must hold 'text_embeds' and 'time_ids' for a UNet with "
                         "addition_embed_type='text_time' (SDXL)")
    return jnp.broadcast_to(t, (x.shape[0],))

  def _embed_time(self, x, t, added_cond_kwargs, timestep_cond):
    c = self.config
    t_emb = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
    emb = self.time_embedding(t_emb.astype(self.dtype), timestep_cond)
    if c.addition_embed_type == 'text_time':
      text_embeds = added_cond_kwargs['text_embeds']
      time_ids = jnp.asarray(added_cond_kwargs['time_ids'])
      time_embeds = timestep_embedding(time_ids.reshape(-1), c.addition_time_embed_dim,
                                       c.flip_sin_to_cos, c.freq_shift).reshape(x.shape[0], -1)
      add = jnp.concatenate([text_embeds, time_embeds.astype(text_embeds.dtype)], axis=-1)
      if add.shape[-1] != c.projection_class_embeddings_input_dim:
        raise ValueError(f'text_embeds and time_ids embed to {add.shape[-1]} features; the config '
                         f'expects projection_class_embeddings_input_dim='
                         f'{c.projection_class_embeddings_input_dim}')
      emb = emb + self.add_embedding(add.astype(self.dtype))
    if c.time_embedding_act_fn is not None:
      emb = get_activation(c.time_embedding_act_fn)(emb)
    return emb

  def _down_mid(self, x, t, context, added_cond_kwargs, timestep_cond):
    t = self._check_inputs(x, t, context, added_cond_kwargs)
    emb = self._embed_time(x, t, added_cond_kwargs, timestep_cond)
    x, context = x.astype(self.dtype), context.astype(self.dtype)
    if self.config.center_input_sample:
      x = 2 * x - 1.0
    x = self.conv_in(x)
    skips = (x,)
    for block in self.down_blocks:
      x, block_skips = block(x, emb, context)
      skips += block_skips
    return self.mid_block(x, emb, context), skips, emb, context

  def _up(self, h, skips, emb, context):
    x = h
    up_layers = reversed(self.config.per_block('layers_per_block'))
    for block, layers in zip(self.up_blocks, up_layers):
      k = layers + 1  # each up block eats one skip per resnet, from the end
      x, skips = block(x, skips[-k:], emb, context), skips[:-k]
    x = get_activation(self.config.act_fn)(self.conv_norm_out(x))
    return self.conv_out(x)

  def __call__(self, x, t, context, added_cond_kwargs=None, timestep_cond=None):
    """Noise prediction (or v / x0, per the scheduler's prediction_type), same shape as x."""
    return self.with_hspace(x, t, context, added_cond_kwargs, timestep_cond)[0]

  def hspace(self, x, t, context, added_cond_kwargs=None, timestep_cond=None):
    """The mid-block output (B, H / 2**(n-1), W / 2**(n-1), C_last); the up path is not run."""
    context, added_cond_kwargs = split_conditioning(context, added_cond_kwargs)
    return self._down_mid(x, t, context, added_cond_kwargs, timestep_cond)[0].astype(x.dtype)

  def with_hspace(self, x, t, context, added_cond_kwargs=None, timestep_cond=None):
    """(eps, h) from one forward pass."""
    context, added_cond_kwargs = split_conditioning(context, added_cond_kwargs)
    h, skips, emb, ctx = self._down_mid(x, t, context, added_cond_kwargs, timestep_cond)
    return self._up(h, skips, emb, ctx).astype(x.dtype), h.astype(x.dtype)


def split_conditioning(context, added_cond_kwargs=None):
  """(context array, added_cond_kwargs) from a conditioning that is an array or a dict holding
  'context' and the added keys (see `UNet2DConditionModel`)."""
  if not isinstance(context, Mapping):
    return context, added_cond_kwargs
  if 'context' not in context:
    raise ValueError(f"a conditioning dict must hold 'context' (and SDXL's 'text_embeds', "
                     f"'time_ids'), got keys {sorted(context)}")
  if added_cond_kwargs is not None:
    raise ValueError('pass the added conditioning either in the context dict or as '
                     'added_cond_kwargs, not both')
  added = {k: v for k, v in context.items() if k != 'context'}
  return context['context'], (added or None)


def dummy_inputs(config: UNet2DConditionConfig, batch: int = 1, size: int | None = None) -> tuple:
  """Arguments for `init` / `jax.eval_shape` (smallest valid spatial size by default)."""
  size = size or 2 ** (len(config.block_out_channels) - 1)
  cross = config.per_block('cross_attention_dim')[0]
  x = jnp.zeros((batch, size, size, config.in_channels), jnp.float32)
  context = jnp.zeros((batch, 1, cross), jnp.float32)
  added = None
  if config.addition_embed_type == 'text_time':
    text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    added = {'text_embeds': jnp.zeros((batch, text_dim), jnp.float32),
             'time_ids': jnp.zeros((batch, 6), jnp.float32)}
  return x, jnp.zeros((batch,), jnp.float32), context, added


def init_params(model: UNet2DConditionModel, key: jax.Array) -> dict:
  """Random parameters (flax default initialisers)."""
  return model.init(key, *dummy_inputs(model.config))['params']
