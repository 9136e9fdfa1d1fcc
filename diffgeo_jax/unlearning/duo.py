"""The DUO training objective (arXiv 2407.21035) as the trainer consumes it: the LoRA's
initialisation, the loss over a batch of (safe, unsafe) pairs, and the FSDP rules.

    obj = duo.Objective.from_config(config, unet, schedule, base_params)
    trainer.Trainer(config, workdir, obj.init_fn, obj.loss_fn, batch_fn, rules=duo.rules(config),
                    frozen=base_params)

A batch (`batch_shapes`): 'positive' and 'negative' (B, h, w, C) in the UNet's space, 'context'
(B, L, D) (or SDXL's conditioning dict), and with `duo.retain_weight` > 0 'retain' and
'retain_context'. The loss is `training.losses.duo_loss`; `launch/train_duo.py` makes the pairs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from diffgeo_jax.training import losses, lora_objective, sharding


@dataclasses.dataclass(frozen=True)
class Objective(lora_objective.LoRAObjective):
  beta: float
  prior_weight: float
  t_min: int
  t_max: int
  retain_weight: float = 0.0

  @classmethod
  def from_config(cls, config, unet, schedule, base_params) -> 'Objective':
    """From a DUO config's `lora` and `duo` blocks; the prior weight follows beta as in the
    official scripts (`losses.duo_hyperparameters`)."""
    c, lc = config.duo, config.lora
    _, prior_weight = losses.duo_hyperparameters(c.base_learning_rate, c.base_prior_weight,
                                                 c.beta)
    return cls(unet, schedule, base_params, rank=lc.rank, alpha=lc.alpha, targets=lc.targets,
               beta=c.beta, prior_weight=prior_weight, t_min=c.t_min, t_max=c.t_max,
               retain_weight=c.retain_weight)

  def loss_fn(self, lora_params, batch, key, base_params):
    return losses.duo_loss(self.eps_fn, base_params, lora_params, batch, key, self.schedule,
                           beta=self.beta, prior_weight=self.prior_weight, t_min=self.t_min,
                           t_max=self.t_max, retain_weight=self.retain_weight)


def rules(config) -> tuple:
  """FSDP over the `model` axis for every large leaf (LoRA factors and frozen base alike) when
  `mesh.model` > 1; data parallelism only otherwise."""
  if config.mesh.model > 1:
    return (('.*', sharding.fsdp('model', config.mesh.model)),)
  return ()


def batch_shapes(config, sample_shape: tuple[int, ...], context: Any) -> dict:
  """The global batch of one step as `jax.ShapeDtypeStruct`s: `sample_shape` (h, w, C) of the
  UNet's input, `context` one sample's conditioning (ShapeDtypeStructs without the batch axis)."""
  b = config.train.batch_size
  x = lora_objective.sample_batch(b, sample_shape)
  ctx = lora_objective.batched(context, b)
  out = {'positive': x, 'negative': x, 'context': ctx}
  if config.duo.retain_weight > 0:
    out.update(retain=x, retain_context=ctx)
  return out
