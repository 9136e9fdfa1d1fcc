"""The DreamBooth LoRA objective (diffusers' `train_dreambooth_lora.py`) as the trainer consumes
it: LoRA initialisation and the denoising loss on instance rows (+ prior preservation on class
rows). DECOR (arXiv 2412.09169) at fine-tuning acts on the instance prompt's embeddings before
they enter the batch (`launch/train_lora.py`), so the step is the same with or without it.

A batch (`batch_shapes`): 'x' (B, h, w, C) in the UNet's space, 'context' (B, L, D) (or SDXL's
conditioning dict), 'instance' (B,) 1 for instance rows, 0 for class rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffgeo_jax.training import lora, lora_objective, losses


@dataclasses.dataclass(frozen=True)
class Objective(lora_objective.LoRAObjective):
  prior_weight: float = 0.0

  @classmethod
  def from_config(cls, config, unet, schedule, base_params) -> 'Objective':
    c = config.lora
    return cls(unet, schedule, base_params, rank=c.rank, alpha=c.alpha, targets=c.targets,
               prior_weight=float(config.prior.weight))

  def loss_fn(self, lora_params, batch, key, base_params):
    """Mean denoising error on the instance rows (+ prior_weight x that on the class rows)."""
    params = lora.merge(base_params, lora_params)
    x0, ctx = batch['x'], batch['context']
    k_t, k_eps = jax.random.split(key)
    t = jax.random.randint(k_t, (x0.shape[0],), 0, self.schedule.num_train_timesteps)
    eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
    pred = self.eps_fn(params, self.schedule.add_noise(x0, eps, t), t, ctx)
    err = losses.denoising_error(pred, eps)
    instance = jnp.sum(err * batch['instance']) / jnp.maximum(jnp.sum(batch['instance']), 1)
    metrics = {'instance_loss': instance}
    loss = instance
    if self.prior_weight > 0:
      n_cls = jnp.sum(1 - batch['instance'])
      prior = jnp.sum(err * (1 - batch['instance'])) / jnp.maximum(n_cls, 1)
      loss = loss + self.prior_weight * prior
      metrics['prior_loss'] = prior
    return loss, {'loss': loss, **metrics}


def batch_shapes(config, sample_shape: tuple[int, ...], context: Any) -> dict:
  """The global batch of one step as `jax.ShapeDtypeStruct`s (see the module doc); `context` is
  one sample's conditioning (ShapeDtypeStructs without the batch axis)."""
  b = config.train.batch_size
  return {'x': lora_objective.sample_batch(b, sample_shape),
          'context': lora_objective.batched(context, b),
          'instance': jax.ShapeDtypeStruct((b,), np.float32)}
