"""Building blocks shared by the UNet and the VAE, mirroring diffusers' PyTorch modules.

Attribute names equal the PyTorch ones (see `convert.py`); arrays are NHWC. Norm statistics are
always computed in float32 (flax promotes them) and with the two-pass variance, which is what
float32 parity with PyTorch needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = jnp.dtype


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'silu': nn.silu,
    'swish': nn.silu,
    'relu': nn.relu,
    'mish': lambda x: x * jnp.tanh(nn.softplus(x)),
    'gelu': lambda x: nn.gelu(x, approximate=False),
    'gelu_new': lambda x: nn.gelu(x, approximate=True),
    'gelu_pytorch_tanh': lambda x: nn.gelu(x, approximate=True),
    'quick_gelu': quick_gelu,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """Activation by its diffusers / transformers config name."""
  if name not in _ACTIVATIONS:
    raise ValueError(f'activation {name!r} is not supported; expected one of {sorted(_ACTIVATIONS)}')
  return _ACTIVATIONS[name]


def group_norm(num_groups: int, eps: float, dtype: Dtype, name: str | None = None) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=num_groups, epsilon=eps, dtype=dtype, use_fast_variance=False,
                      name=name)


def layer_norm(eps: float, dtype: Dtype, use_scale: bool = True, use_bias: bool = True,
               name: str | None = None) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=eps, dtype=dtype, use_scale=use_scale, use_bias=use_bias,
                      use_fast_variance=False, name=name)


def conv(features: int, kernel: int, dtype: Dtype, stride: int = 1, padding: int | str | None = None,
         name: str | None = None) -> nn.Conv:
  """PyTorch `Conv2d(k, stride, padding=(k-1)//2)` by default."""
  if padding is None:
    padding = (kernel - 1) // 2
  if isinstance(padding, int):
    padding = ((padding, padding), (padding, padding))
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype,
                 name=name)


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool = False,
                       downscale_freq_shift: float = 1.0, scale: float = 1.0,
                       max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of (possibly fractional) timesteps, (B,) -> (B, dim), as diffusers'
  `get_timestep_embedding`."""
  if timesteps.ndim != 1:
    raise ValueError(f'timesteps must be 1-D, got shape {timesteps.shape}')
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
  args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :] * scale
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2 == 1:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nn.Module):
  """linear_1 -> act -> linear_2 (diffusers `TimestepEmbedding`)."""
  time_embed_dim: int
  out_dim: int | None = None
  act_fn: str = 'silu'
  cond_proj_dim: int | None = None
  post_act_fn: str | None = None
  dtype: Dtype = jnp.float32

  def setup(self):
    self.linear_1 = nn.Dense(self.time_embed_dim, dtype=self.dtype)
    self.linear_2 = nn.Dense(self.out_dim or self.time_embed_dim, dtype=self.dtype)
    if self.cond_proj_dim is not None:
      self.cond_proj = nn.Dense(self.time_embed_dim, use_bias=False, dtype=self.dtype)

  def __call__(self, sample, condition=None):
    if condition is not None:
      sample = sample + self.cond_proj(condition)
    sample = self.linear_2(get_activation(self.act_fn)(self.linear_1(sample)))
    if self.post_act_fn is not None:
      sample = get_activation(self.post_act_fn)(sample)
    return sample


class ResnetBlock2D(nn.Module):
  """diffusers `ResnetBlock2D` (pre-norm; `time_embedding_norm` 'default' or 'scale_shift')."""
  in_channels: int
  out_channels: int
  temb_channels: int | None = 512
  groups: int = 32
  groups_out: int | None = None
  eps: float = 1e-6
  act_fn: str = 'silu'
  output_scale_factor: float = 1.0
  time_embedding_norm: str = 'default'
  skip_time_act: bool = False
  dtype: Dtype = jnp.float32

  def setup(self):
    if self.time_embedding_norm not in ('default', 'scale_shift'):
      raise NotImplementedError(f'resnet_time_scale_shift={self.time_embedding_norm!r} is not supported')
    self.norm1 = group_norm(self.groups, self.eps, self.dtype)
    self.conv1 = conv(self.out_channels, 3, self.dtype)
    if self.temb_channels is not None:
      mult = 2 if self.time_embedding_norm == 'scale_shift' else 1
      self.time_emb_proj = nn.Dense(mult * self.out_channels, dtype=self.dtype)
    self.norm2 = group_norm(self.groups_out or self.groups, self.eps, self.dtype)
    self.conv2 = conv(self.out_channels, 3, self.dtype)
    if self.in_channels != self.out_channels:
      self.conv_shortcut = conv(self.out_channels, 1, self.dtype)

  def __call__(self, x, temb=None):
    act = get_activation(self.act_fn)
    h = self.conv1(act(self.norm1(x)))
    use_temb = temb is not None and self.temb_channels is not None
    if use_temb:
      temb = self.time_emb_proj(temb if self.skip_time_act else act(temb))[:, None, None, :]
      if self.time_embedding_norm == 'default':
        h = h + temb
    h = self.norm2(h)
    if use_temb and self.time_embedding_norm == 'scale_shift':
      scale, shift = jnp.split(temb, 2, axis=-1)
      h = h * (1 + scale) + shift
    h = self.conv2(act(h))
    if self.in_channels != self.out_channels:
      x = self.conv_shortcut(x)
    return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
  """Stride-2 3x3 conv. `padding=0` is the VAE's variant: pad right/bottom by one, then VALID."""
  out_channels: int
  padding: int = 1
  dtype: Dtype = jnp.float32

  def setup(self):
    self.conv = conv(self.out_channels, 3, self.dtype, stride=2, padding=self.padding)

  def __call__(self, x):
    if self.padding == 0:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return self.conv(x)


class Upsample2D(nn.Module):
  """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""
  out_channels: int
  dtype: Dtype = jnp.float32

  def setup(self):
    self.conv = conv(self.out_channels, 3, self.dtype)

  def __call__(self, x):
    # Exact nearest 2x (what torch's F.interpolate(scale_factor=2) does), as a repeat.
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return self.conv(x)
