"""Tiny random PyTorch reference models (diffusers / transformers) and their Flax twins.

The references get random, non-zero weights everywhere (not the library's zero-initialised
layers), so a wrong transpose or a missing term cannot hide behind a zero.
"""

from __future__ import annotations

import contextlib
import functools
from unittest import mock

import jax
import numpy as np
import torch

from diffgeo_jax.models import convert, unet, vae

# Shaped like the real families, shrunk: SD 1.x (conv projection, int head count), SD 2.x (linear
# projection, per-block heads, upcast attention) and SDXL (text_time embedding, several transformer
# layers per block, no attention at the highest resolution).
UNET_CONFIGS = {
    'sd1': dict(block_out_channels=(32, 32, 64), layers_per_block=1, norm_num_groups=8,
                down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'),
                up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'),
                cross_attention_dim=24, attention_head_dim=4, sample_size=16),
    'sd2': dict(block_out_channels=(32, 32, 64), layers_per_block=(1, 2, 1), norm_num_groups=8,
                down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'),
                up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'),
                cross_attention_dim=24, attention_head_dim=(2, 4, 8), use_linear_projection=True,
                upcast_attention=True, only_cross_attention=(True, False, False), norm_eps=1e-6,
                flip_sin_to_cos=False, freq_shift=1, sample_size=16),
    'sdxl': dict(block_out_channels=(32, 32, 64), layers_per_block=1, norm_num_groups=8,
                 down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'),
                 up_block_types=('CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'),
                 transformer_layers_per_block=(1, 1, 2), cross_attention_dim=24,
                 attention_head_dim=(2, 4, 4), use_linear_projection=True,
                 addition_embed_type='text_time', addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=16 + 6 * 8, sample_size=16),
}

VAE_CONFIG = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                  down_block_types=('DownEncoderBlock2D',) * 2,
                  up_block_types=('UpDecoderBlock2D',) * 2, latent_channels=4, sample_size=16)


def randomize_(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
  """Adds noise to every parameter (norm scales stay near 1, zero-initialised layers wake up)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(scale * torch.randn(p.shape, generator=gen))
  return module.eval()


def state_dict_numpy(module: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


@functools.cache
def torch_unet(name: str):
  from diffusers import UNet2DConditionModel
  torch.manual_seed(0)
  return randomize_(UNet2DConditionModel(**UNET_CONFIGS[name]), seed=1)


@functools.cache
def flax_unet(name: str):
  tm = torch_unet(name)
  cfg = unet.UNet2DConditionConfig.from_dict(dict(tm.config), source=f'{name} test config')
  model = unet.UNet2DConditionModel(cfg)
  target = convert.abstract_params(model.init, jax.random.key(0), *unet.dummy_inputs(cfg))
  return model, convert.torch_to_flax(state_dict_numpy(tm), target)


@functools.cache
def torch_vae():
  from diffusers import AutoencoderKL
  torch.manual_seed(0)
  return randomize_(AutoencoderKL(**VAE_CONFIG), seed=2)


@functools.cache
def flax_vae():
  tm = torch_vae()
  cfg = vae.AutoencoderKLConfig.from_dict(dict(tm.config))
  model = vae.AutoencoderKL(cfg)
  target = convert.abstract_params(model.init, jax.random.key(0), *vae.dummy_inputs(cfg))
  return model, convert.torch_to_flax(state_dict_numpy(tm), target)


def unet_inputs(name: str, batch: int = 2, seed: int = 0):
  """(x NHWC, t, context, added_cond_kwargs) as numpy, with a fractional timestep."""
  rng = np.random.RandomState(seed)
  x = rng.randn(batch, 16, 16, 4).astype(np.float32)
  t = np.array([999.0, 10.5, 500.0, 0.0][:batch], np.float32)
  context = rng.randn(batch, 7, 24).astype(np.float32)
  added = None
  if name == 'sdxl':
    added = {'text_embeds': rng.randn(batch, 16).astype(np.float32),
             'time_ids': np.tile(np.array([16, 16, 0, 0, 16, 16], np.float32), (batch, 1))}
  return x, t, context, added


def nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def nhwc(x: torch.Tensor) -> np.ndarray:
  return x.detach().numpy().transpose(0, 2, 3, 1)


def torch_unet_outputs(name: str, x, t, context, added):
  """(eps, h) from diffusers, h captured by a hook on mid_block."""
  tm = torch_unet(name)
  captured = {}
  hook = tm.mid_block.register_forward_hook(lambda m, i, o: captured.setdefault('h', o))
  try:
    with torch.no_grad():
      kwargs = {}
      if added is not None:
        kwargs['added_cond_kwargs'] = {k: torch.from_numpy(v) for k, v in added.items()}
      eps = tm(nchw(x), torch.from_numpy(t), torch.from_numpy(context), **kwargs).sample
  finally:
    hook.remove()
  return nhwc(eps), nhwc(captured['h'])


def assert_close_to_reference(ours, ref, rel: float = 1e-4, what: str = 'output'):
  """max |ours - ref| <= rel * max(1, max |ref|): the issue's parity criterion."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, f'{what}: shape {ours.shape} != reference {ref.shape}'
  scale = max(1.0, float(np.abs(ref).max()))
  err = float(np.abs(ours - ref).max())
  assert err <= rel * scale, f'{what}: max abs error {err:.3g} > {rel} * scale {scale:.3g}'
  return err, scale


def write_tiny_clip_tokenizer(folder: str) -> None:
  """A valid CLIP BPE vocabulary: the 256 byte symbols, their end-of-word forms, a few merges and
  the two special tokens (what `transformers.CLIPTokenizer` needs)."""
  import json
  import os

  os.makedirs(folder, exist_ok=True)
  # GPT-2 / CLIP byte-level alphabet: printable bytes stand for themselves, the rest are shifted
  # past 255 so every byte has a visible symbol.
  printable = [*range(ord('!'), ord('~') + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
  shifted = [b for b in range(256) if b not in printable]
  symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(shifted))]
  merges = [('d', 'i'), ('di', 'g'), ('dig', 'i'), ('digi', 't</w>'), ('r', 'e'), ('re', 'd</w>')]
  vocab = symbols + [s + '</w>' for s in symbols] + [a + b for a, b in merges]
  vocab += ['<|startoftext|>', '<|endoftext|>']
  with open(os.path.join(folder, 'vocab.json'), 'w') as f:
    json.dump({tok: i for i, tok in enumerate(vocab)}, f)
  with open(os.path.join(folder, 'merges.txt'), 'w') as f:
    f.write('#version: 0.2\n' + '\n'.join(f'{a} {b}' for a, b in merges) + '\n')


TINY_CLIP_VOCAB = 256 * 2 + 6 + 2  # as written by write_tiny_clip_tokenizer


@functools.cache
def torch_clip(with_projection: bool = False):
  from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
  cfg = CLIPTextConfig(vocab_size=TINY_CLIP_VOCAB, hidden_size=24, intermediate_size=37,
                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                       projection_dim=16, bos_token_id=TINY_CLIP_VOCAB - 2,
                       eos_token_id=TINY_CLIP_VOCAB - 1, pad_token_id=TINY_CLIP_VOCAB - 1)
  torch.manual_seed(0)
  cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
  return randomize_(cls(cfg), seed=3)


@contextlib.contextmanager
def one_torch_thread():
  """torch's spinning intra-op threads slow down 10x when another process holds a core (2-core
  CI); these tiny models gain nothing from them."""
  old = torch.get_num_threads()
  torch.set_num_threads(1)
  try:
    yield
  finally:
    torch.set_num_threads(old)


@contextlib.contextmanager
def img2img_noise(module, key, noise: np.ndarray):
  """diffusers' img2img `module` draws the VAE posterior sample and the noise from a torch
  generator: patched here to use ours (`pipeline.image_to_image` splits `key` into posterior,
  noise and step keys, in that order; `noise` is what it was given)."""
  eps_post = np.asarray(jax.random.normal(jax.random.split(key, 3)[0], noise.shape))

  def retrieve_latents(out, generator=None, sample_mode='sample'):
    return out.latent_dist.mean + out.latent_dist.std * nchw(eps_post)

  with mock.patch.object(module, 'retrieve_latents', retrieve_latents), \
       mock.patch.object(module, 'randn_tensor', lambda *a, **k: nchw(noise)):
    yield
