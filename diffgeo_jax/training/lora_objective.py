"""What every LoRA objective on a frozen UNet shares (DreamBooth/DECOR in `training.dreambooth`,
DUO in `unlearning.duo`): the model, its noise schedule, the frozen base, the LoRA's rank, alpha
and targets, and the LoRA initialisation the trainer calls. Subclasses add their loss."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from diffgeo_jax.diffusion import schedules
from diffgeo_jax.training import lora


@dataclasses.dataclass(frozen=True)
class LoRAObjective:
  unet: Any  # a models.UNet2DConditionModel (with the run's dtype and remat)
  schedule: schedules.NoiseSchedule
  base_params: Any  # the frozen UNet's parameters (or ShapeDtypeStructs: init reads shapes only)
  rank: int
  alpha: float
  targets: str

  def init_fn(self, key: jax.Array):
    """B = 0: the step-0 model is the base."""
    return lora.init(key, self.base_params, rank=self.rank, targets=self.targets,
                     alpha=self.alpha)

  def eps_fn(self, params, x_t, t, context):
    return self.unet.apply({'params': params}, x_t, t, context)


def batched(tree: Any, batch_size: int) -> Any:
  """`jax.ShapeDtypeStruct`s of one sample (a conditioning array or SDXL's dict) with a leading
  batch axis."""
  return jax.tree.map(
      lambda c: jax.ShapeDtypeStruct((batch_size, *c.shape), c.dtype), tree)


def sample_batch(batch_size: int, sample_shape: tuple[int, ...]) -> jax.ShapeDtypeStruct:
  """(B, h, w, C) float32 inputs in the UNet's space."""
  return jax.ShapeDtypeStruct((batch_size, *sample_shape), np.float32)
