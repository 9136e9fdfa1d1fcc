"""The down, mid and up blocks of diffusers' `UNet2DConditionModel`.

One class per role: a block with `num_attention_heads=None` is diffusers' `DownBlock2D` /
`UpBlock2D`; with heads it is the `CrossAttn*` variant (a `Transformer2DModel` after each resnet).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from diffgeo_jax.models.attention import Transformer2DModel
from diffgeo_jax.models.layers import Downsample2D, Dtype, ResnetBlock2D, Upsample2D


class _BlockBase(nn.Module):
  """Fields every block shares."""
  out_channels: int
  temb_channels: int
  num_layers: int = 1
  transformer_layers: int = 1
  num_attention_heads: int | None = None
  cross_attention_dim: int | None = None
  resnet_eps: float = 1e-5
  resnet_act_fn: str = 'silu'
  resnet_groups: int = 32
  resnet_time_scale_shift: str = 'default'
  resnet_skip_time_act: bool = False
  output_scale_factor: float = 1.0
  use_linear_projection: bool = False
  only_cross_attention: bool = False
  upcast_attention: bool = False
  attention_impl: str = 'softmax'
  remat: bool = False  # rematerialise each resnet and transformer in the backward pass
  dtype: Dtype = jnp.float32

  def _resnet(self, cin: int, cout: int) -> ResnetBlock2D:
    cls = nn.remat(ResnetBlock2D) if self.remat else ResnetBlock2D
    return cls(cin, cout, temb_channels=self.temb_channels, groups=self.resnet_groups,
                         eps=self.resnet_eps, act_fn=self.resnet_act_fn,
                         output_scale_factor=self.output_scale_factor,
                         time_embedding_norm=self.resnet_time_scale_shift,
                         skip_time_act=self.resnet_skip_time_act, dtype=self.dtype)

  def _transformer(self, channels: int) -> Transformer2DModel:
    heads = self.num_attention_heads
    cls = nn.remat(Transformer2DModel) if self.remat else Transformer2DModel
    return cls(heads, channels // heads, channels, num_layers=self.transformer_layers,
                              cross_attention_dim=self.cross_attention_dim,
                              norm_num_groups=self.resnet_groups,
                              use_linear_projection=self.use_linear_projection,
                              only_cross_attention=self.only_cross_attention,
                              upcast_attention=self.upcast_attention,
                              attention_impl=self.attention_impl, dtype=self.dtype)


class DownBlock(_BlockBase):
  """Resnets (each followed by a transformer when it has heads), then an optional stride-2 conv.
  Returns the output and the skip activations the up path consumes."""
  in_channels: int = 0
  add_downsample: bool = True
  downsample_padding: int = 1

  def setup(self):
    self.resnets = [self._resnet(self.in_channels if i == 0 else self.out_channels, self.out_channels)
                    for i in range(self.num_layers)]
    if self.num_attention_heads is not None:
      self.attentions = [self._transformer(self.out_channels) for _ in range(self.num_layers)]
    if self.add_downsample:
      self.downsamplers = [Downsample2D(self.out_channels, padding=self.downsample_padding,
                                        dtype=self.dtype)]

  def __call__(self, x, temb, context):
    skips = []
    for i, resnet in enumerate(self.resnets):
      x = resnet(x, temb)
      if self.num_attention_heads is not None:
        x = self.attentions[i](x, context)
      skips.append(x)
    if self.add_downsample:
      x = self.downsamplers[0](x)
      skips.append(x)
    return x, tuple(skips)


class UpBlock(_BlockBase):
  """Resnets over [x, skip] concatenated on channels (skips taken from the end), each followed by a
  transformer when it has heads, then an optional nearest-2x upsample + conv."""
  in_channels: int = 0
  prev_output_channel: int = 0
  add_upsample: bool = True

  def setup(self):
    resnets = []
    for i in range(self.num_layers):
      skip_channels = self.in_channels if i == self.num_layers - 1 else self.out_channels
      cin = self.prev_output_channel if i == 0 else self.out_channels
      resnets.append(self._resnet(cin + skip_channels, self.out_channels))
    self.resnets = resnets
    if self.num_attention_heads is not None:
      self.attentions = [self._transformer(self.out_channels) for _ in range(self.num_layers)]
    if self.add_upsample:
      self.upsamplers = [Upsample2D(self.out_channels, dtype=self.dtype)]

  def __call__(self, x, skips, temb, context):
    for i, resnet in enumerate(self.resnets):
      x = resnet(jnp.concatenate([x, skips[-1 - i]], axis=-1), temb)
      if self.num_attention_heads is not None:
        x = self.attentions[i](x, context)
    if self.add_upsample:
      x = self.upsamplers[0](x)
    return x


class MidBlock(_BlockBase):
  """`UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) x num_layers. Its output is the
  U-Net's h-space (arXiv 2210.10960, used by the latent-geometry papers)."""

  def setup(self):
    c = self.out_channels
    self.resnets = [self._resnet(c, c) for _ in range(self.num_layers + 1)]
    self.attentions = [self._transformer(c) for _ in range(self.num_layers)]

  def __call__(self, x, temb, context):
    x = self.resnets[0](x, temb)
    for attn, resnet in zip(self.attentions, self.resnets[1:]):
      x = resnet(attn(x, context), temb)
    return x
