"""Flax linen port of diffusers' `AutoencoderKL` (the Stable Diffusion VAE), NHWC.

    post = vae.apply({'params': p}, img, method='encode')   # post.mean, post.logvar; post.sample(key)
    img = vae.apply({'params': p}, z, method='decode')

As in diffusers, `scaling_factor` is *not* applied inside: latents for the UNet are
`post.sample(key) * config.scaling_factor`, and `decode` takes `z / config.scaling_factor`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from diffgeo_jax.models import config_utils
from diffgeo_jax.models.attention import check_attention_impl, Attention
from diffgeo_jax.models.layers import Downsample2D, Dtype, ResnetBlock2D, Upsample2D, conv, get_activation, group_norm

WEIGHTS_NAME = 'diffusion_pytorch_model.safetensors'
TORCH_IGNORE_KEYS: tuple[str, ...] = ()
# Checkpoints written before diffusers 0.14 name the mid-block attention query/key/value/proj_attn.
TORCH_RENAMES = ((r'\.query\.', '.to_q.'), (r'\.key\.', '.to_k.'), (r'\.value\.', '.to_v.'),
                 (r'\.proj_attn\.', '.to_out.0.'))

_IGNORED = frozenset({'sample_size', 'force_upcast', 'latents_mean', 'latents_std'})
_EPS = 1e-6  # diffusers' VAE hard-codes this for every norm


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple = ('DownEncoderBlock2D',)
  up_block_types: tuple = ('UpDecoderBlock2D',)
  block_out_channels: tuple = (64,)
  layers_per_block: int = 1
  act_fn: str = 'silu'
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: Any = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  def __post_init__(self):
    n = len(self.block_out_channels)
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ValueError('down_block_types, up_block_types and block_out_channels must have the same '
                       f'length, got {len(self.down_block_types)}, {len(self.up_block_types)}, {n}')
    if set(self.down_block_types) != {'DownEncoderBlock2D'}:
      raise ValueError(f'down_block_types must all be DownEncoderBlock2D, got {self.down_block_types}')
    if set(self.up_block_types) != {'UpDecoderBlock2D'}:
      raise ValueError(f'up_block_types must all be UpDecoderBlock2D, got {self.up_block_types}')

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], source: str = 'config') -> 'AutoencoderKLConfig':
    return config_utils.from_dict(cls, d, source, ignored=_IGNORED)

  def to_dict(self) -> dict:
    return config_utils.to_dict(self, 'AutoencoderKL', _diffusers_version='0.42.1')


@flax.struct.dataclass
class DiagonalGaussian:
  """The encoder's posterior N(mean, exp(logvar)), NHWC; logvar clipped to [-30, 20] as diffusers."""
  mean: jax.Array
  logvar: jax.Array

  @property
  def std(self):
    return jnp.exp(0.5 * self.logvar)

  def sample(self, key: jax.Array) -> jax.Array:
    return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

  def mode(self) -> jax.Array:
    return self.mean

  def kl(self) -> jax.Array:
    """KL(q || N(0, I)) per sample."""
    return 0.5 * jnp.sum(self.mean ** 2 + jnp.exp(self.logvar) - 1.0 - self.logvar, axis=(1, 2, 3))


class _MidBlock(nn.Module):
  """`UNetMidBlock2D` without time embedding: resnet, single-head self-attention, resnet."""
  channels: int
  groups: int
  act_fn: str
  add_attention: bool
  attention_impl: str
  dtype: Dtype

  def setup(self):
    c = self.channels
    self.resnets = [ResnetBlock2D(c, c, temb_channels=None, groups=self.groups, eps=_EPS,
                                  act_fn=self.act_fn, dtype=self.dtype) for _ in range(2)]
    if self.add_attention:
      self.attentions = [Attention(c, heads=1, dim_head=c, bias=True, norm_num_groups=self.groups,
                                   eps=_EPS, residual_connection=True,
                                   attention_impl=self.attention_impl, dtype=self.dtype)]

  def __call__(self, x):
    x = self.resnets[0](x)
    if self.add_attention:
      x = self.attentions[0](x)
    return self.resnets[1](x)


class _Block(nn.Module):
  """`DownEncoderBlock2D` (resnets, then a padded stride-2 conv) or `UpDecoderBlock2D` (resnets,
  then nearest-2x + conv)."""
  in_channels: int
  out_channels: int
  num_layers: int
  groups: int
  act_fn: str
  resample: str | None  # 'down', 'up' or None
  dtype: Dtype

  def setup(self):
    self.resnets = [ResnetBlock2D(self.in_channels if i == 0 else self.out_channels,
                                  self.out_channels, temb_channels=None, groups=self.groups,
                                  eps=_EPS, act_fn=self.act_fn, dtype=self.dtype)
                    for i in range(self.num_layers)]
    if self.resample == 'down':
      self.downsamplers = [Downsample2D(self.out_channels, padding=0, dtype=self.dtype)]
    elif self.resample == 'up':
      self.upsamplers = [Upsample2D(self.out_channels, dtype=self.dtype)]

  def __call__(self, x):
    for resnet in self.resnets:
      x = resnet(x)
    if self.resample == 'down':
      x = self.downsamplers[0](x)
    elif self.resample == 'up':
      x = self.upsamplers[0](x)
    return x


class Encoder(nn.Module):
  config: AutoencoderKLConfig
  attention_impl: str = 'softmax'
  dtype: Dtype = jnp.float32

  def setup(self):
    c, boc = self.config, self.config.block_out_channels
    self.conv_in = conv(boc[0], 3, self.dtype)
    self.down_blocks = [_Block(boc[max(i - 1, 0)], boc[i], c.layers_per_block, c.norm_num_groups,
                               c.act_fn, 'down' if i < len(boc) - 1 else None, self.dtype)
                        for i in range(len(boc))]
    self.mid_block = _MidBlock(boc[-1], c.norm_num_groups, c.act_fn, c.mid_block_add_attention,
                               self.attention_impl, self.dtype)
    self.conv_norm_out = group_norm(c.norm_num_groups, _EPS, self.dtype)
    self.conv_out = conv(2 * c.latent_channels, 3, self.dtype)  # mean and logvar ("double_z")

  def __call__(self, x):
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(get_activation(self.config.act_fn)(self.conv_norm_out(x)))


class Decoder(nn.Module):
  config: AutoencoderKLConfig
  attention_impl: str = 'softmax'
  dtype: Dtype = jnp.float32

  def setup(self):
    c, rboc = self.config, tuple(reversed(self.config.block_out_channels))
    self.conv_in = conv(rboc[0], 3, self.dtype)
    self.mid_block = _MidBlock(rboc[0], c.norm_num_groups, c.act_fn, c.mid_block_add_attention,
                               self.attention_impl, self.dtype)
    self.up_blocks = [_Block(rboc[max(i - 1, 0)], rboc[i], c.layers_per_block + 1, c.norm_num_groups,
                             c.act_fn, 'up' if i < len(rboc) - 1 else None, self.dtype)
                      for i in range(len(rboc))]
    self.conv_norm_out = group_norm(c.norm_num_groups, _EPS, self.dtype)
    self.conv_out = conv(c.out_channels, 3, self.dtype)

  def __call__(self, z):
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(get_activation(self.config.act_fn)(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
  """diffusers `AutoencoderKL`, NHWC. `dtype` is the activation dtype (params stay float32)."""
  config: AutoencoderKLConfig
  dtype: Dtype = jnp.float32
  attention_impl: str = 'softmax'

  def setup(self):
    c = self.config
    check_attention_impl(self.attention_impl)
    self.encoder = Encoder(c, self.attention_impl, self.dtype)
    self.decoder = Decoder(c, self.attention_impl, self.dtype)
    if c.use_quant_conv:
      self.quant_conv = conv(2 * c.latent_channels, 1, self.dtype)
    if c.use_post_quant_conv:
      self.post_quant_conv = conv(c.latent_channels, 1, self.dtype)

  def _check(self, x, channels: int, name: str):
    factor = 2 ** (len(self.config.block_out_channels) - 1)
    if x.ndim != 4 or x.shape[-1] != channels:
      raise ValueError(f'{name} must be (B, H, W, {channels}) (NHWC), got shape {x.shape}')
    if name == 'img' and (x.shape[1] % factor or x.shape[2] % factor):
      raise ValueError(f'img spatial size {x.shape[1:3]} must be divisible by {factor}')

  def encode(self, img) -> DiagonalGaussian:
    self._check(img, self.config.in_channels, 'img')
    moments = self.encoder(img.astype(self.dtype))
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments.astype(img.dtype), 2, axis=-1)
    return DiagonalGaussian(mean, jnp.clip(logvar, -30.0, 20.0))

  def decode(self, z) -> jax.Array:
    self._check(z, self.config.latent_channels, 'z')
    h = z.astype(self.dtype)
    if self.config.use_post_quant_conv:
      h = self.post_quant_conv(h)
    return self.decoder(h).astype(z.dtype)

  def __call__(self, img, sample_posterior: bool = False, key: jax.Array | None = None):
    post = self.encode(img)
    if sample_posterior:
      if key is None:
        raise ValueError('sample_posterior=True needs a PRNG key')
      z = post.sample(key)
    else:
      z = post.mode()
    return self.decode(z)


def dummy_inputs(config: AutoencoderKLConfig, batch: int = 1) -> tuple:
  size = 2 ** (len(config.block_out_channels) - 1)
  return (jnp.zeros((batch, size, size, config.in_channels), jnp.float32),)


def init_params(model: AutoencoderKL, key: jax.Array) -> dict:
  return model.init(key, *dummy_inputs(model.config))['params']
