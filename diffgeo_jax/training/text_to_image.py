"""The text-to-image denoising objective as the trainer consumes it: DDPM's epsilon-prediction
MSE at uniformly drawn integer timesteps.

    obj = text_to_image.Objective(unet, schedule, text_encoder)   # text encoder trained too
    obj = text_to_image.Objective(unet, schedule)                 # the UNet alone

With a `text_encoder` the parameters are {'unet', 'text_encoder'} and a batch holds 'images'
(B, H, W, C) and 'input_ids' (B, L): both are trained jointly (`launch/train_t2i.py`, the digits
model from scratch). Without one, the parameters are {'unet'} and a batch holds 'images' and
'context' (B, L, D) (or SDXL's conditioning dict): a full UNet fine-tune on conditioning computed
once outside the step, as diffusers' SDXL fine-tuning script precomputes it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffgeo_jax.diffusion import schedules
from diffgeo_jax.models import unet as unet_lib


@dataclasses.dataclass(frozen=True)
class Objective:
  unet: Any  # a models.UNet2DConditionModel
  schedule: schedules.NoiseSchedule
  text_encoder: Any = None  # a models.CLIPTextModel trained with the UNet, or None
  max_length: int = 77  # token ids per caption (the text encoder's input length)

  def init_fn(self, key: jax.Array) -> dict:
    k_text, k_unet = jax.random.split(key)
    x, t, context, added = unet_lib.dummy_inputs(self.unet.config, batch=1)
    out = {'unet': self.unet.init(k_unet, x, t, context, added)['params']}
    if self.text_encoder is not None:
      ids = jnp.zeros((1, self.max_length), jnp.int32)
      out['text_encoder'] = self.text_encoder.init(k_text, ids)['params']
    return out

  def loss_fn(self, params: dict, batch: dict, key: jax.Array):
    x0 = batch['images']
    k_t, k_noise = jax.random.split(key)
    t = jax.random.randint(k_t, (x0.shape[0],), 0, self.schedule.num_train_timesteps)
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    x_t = self.schedule.add_noise(x0, noise, t)
    if self.text_encoder is not None:
      context = self.text_encoder.apply({'params': params['text_encoder']},
                                        batch['input_ids']).last_hidden_state
    else:
      context = batch['context']
    eps = self.unet.apply({'params': params['unet']}, x_t, t, context)
    err = jnp.square(eps.astype(jnp.float32) - noise.astype(jnp.float32))
    return jnp.mean(err), {}


def batch_shapes(batch_size: int, sample_shape: tuple[int, ...], context: Any = None,
                 max_length: int = 77) -> dict:
  """The global batch of one step as `jax.ShapeDtypeStruct`s: with `context` (one sample's
  conditioning, no batch axis) the UNet-only batch, else the joint one with token ids."""
  out = {'images': jax.ShapeDtypeStruct((batch_size, *sample_shape), np.float32)}
  if context is None:
    out['input_ids'] = jax.ShapeDtypeStruct((batch_size, max_length), np.int32)
  else:
    out['context'] = jax.tree.map(
        lambda c: jax.ShapeDtypeStruct((batch_size, *c.shape), c.dtype), context)
  return out
