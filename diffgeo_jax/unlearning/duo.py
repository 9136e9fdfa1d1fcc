"""The DUO training objective (arXiv 2407.21035): the loss over a batch of (safe, unsafe) pairs,
and the same as the trainer consumes it (the LoRA's initialisation, the loss, the FSDP rules).

    loss, m = duo.loss(eps_fn, params, lora_params, batch, key, schedule, beta=500.0)

    obj = duo.Objective.from_config(config, unet, schedule, base_params)
    trainer.Trainer(config, workdir, obj.init_fn, obj.loss_fn, batch_fn, rules=duo.rules(config),
                    frozen=base_params)

A batch (`batch_shapes`): 'positive' and 'negative' (B, h, w, C) in the UNet's space, 'context'
(B, L, D) (or SDXL's conditioning dict), and with `duo.retain_weight` > 0 'retain' and
'retain_context'; `unlearning.pairs` makes the pairs and `unlearning.batches` the batches.

DUO (Direct Unlearning Optimization) as its official code (`naver-ai/DUO`,
`train/unlearn-sd.py`) runs it, which differs from a textbook Diffusion-DPO in three ways:
  * the pair (x+ = the safe SDEdit counterpart, preferred; x- = the unsafe image) shares one noise
    eps but draws its two timesteps independently, t ~ U{t_min - 1, ..., t_max - 1};
  * with e(x, t) = mean_{C,H,W} (eps_model(x_t, t) - eps)^2, delta+- = e_policy - e_reference and
        L_DUO = mean_batch softplus(beta (delta+ - delta-))  ( = -log sigmoid(-beta (delta+ - delta-)) )
    which is ln 2 exactly while the policy equals the reference (LoRA B = 0);
  * a data-free output-preserving term at t = T - 1 on pure noise x_T = eps:
        L_prior = mean (eps_policy(eps, T - 1) - eps_reference(eps, T - 1))^2,
    and the total is L_DUO + prior_weight * L_prior.
Optional, beyond the paper: a retain term on images of what must not change (batch 'retain',
e.g. the base model's own samples of other concepts, with 'retain_context'), noised at t ~ U[0, T):
        L_retain = mean (eps_policy(x_t, t, c) - eps_reference(x_t, t, c))^2,
added as retain_weight * L_retain. The data-free prior only pins pure noise at t = T; this pins
the outputs on the retained concepts at every noise level.
The reference model is the base parameters with the LoRA off -- no second copy of the weights:
the policy is `lora.merge(params, lora_params)`, and the reference pass sees `params` under
stop_gradient. The official scripts couple the learning rate and the prior weight to beta
(`hyperparameters`).

Precision: delta+- are differences of two passes of the same network, and beta (500) multiplies
them. Float32 matrix products at the accelerators' default precision (TF32 on GPUs, bf16 passes on
TPUs) round the policy and the reference pass apart by ~1e-3, enough to move the loss at
initialisation from ln 2 to 0.99 (measured on an H100, BENCHMARKS.md). So both passes run at
`matmul_precision='highest'` by default (plain float32; no effect on a CPU or bf16 operands).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from diffgeo_jax.diffusion import schedules
from diffgeo_jax.training import lora, lora_objective, losses, sharding


def preference_loss(delta_pos, delta_neg, beta) -> jax.Array:
  """mean softplus(beta (delta+ - delta-)) = mean -log sigmoid(-beta (delta+ - delta-)): low when
  the policy's error falls on the preferred sample and rises on the dispreferred one, relative to
  the reference."""
  return jnp.mean(jax.nn.softplus(beta * (delta_pos - delta_neg)))


def hyperparameters(base_learning_rate: float, base_prior_weight: float,
                    beta: float) -> tuple[float, float]:
  """The official scripts' coupling: lr = base_lr * 100 / beta, lambda = base_lambda * beta / 100,
  so lr * beta and lr * lambda are constant across a beta sweep."""
  if beta <= 0:
    raise ValueError(f'beta must be > 0, got {beta!r}')
  return base_learning_rate * 100.0 / beta, base_prior_weight * beta / 100.0


EpsFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


def loss(eps_fn: EpsFn, params, lora_params, batch: dict, key: jax.Array,
         schedule: schedules.NoiseSchedule, *, beta: float, prior_weight: float = 0.0,
         t_min: int = 1, t_max: int = 750, lora_scale: float = 1.0,
         matmul_precision: str | None = 'highest',
         retain_weight: float = 0.0) -> tuple[jax.Array, dict]:
  """The DUO objective and its logged parts, differentiable in `lora_params`.

  eps_fn(params, x_t, t (N,), context) -> eps (N, ...): the model (a UNet's apply).
  batch: 'positive' (B, ...) safe images (x+), 'negative' (B, ...) unsafe images (x-), 'context'
  (B, ...) the text conditioning of every branch (the official code: the empty prompt), or a pytree
  of such leaves (SDXL's dict);
  optionally 'retain' (R, ...) and 'retain_context' (R, ...) for the retain term (used when
  retain_weight > 0; its draws come from fold_in(key, 2), so the DUO draws do not move).
  Timesteps: independent per sample of the pair in {t_min - 1, ..., min(t_max, T) - 1}.
  matmul_precision: for both model passes (`jax.default_matmul_precision`; None = the backend's
  default), see the module doc."""
  for name in ('positive', 'negative', 'context'):
    if name not in batch:
      raise ValueError(f'batch must have keys positive, negative and context; missing {name!r}')
  x_pos, x_neg, ctx = batch['positive'], batch['negative'], batch['context']
  if x_pos.shape != x_neg.shape:
    raise ValueError(f'batch positive and negative must have the same shape, got {x_pos.shape} '
                     f'and {x_neg.shape}')
  num_t = schedule.num_train_timesteps
  if not 1 <= t_min < t_max:
    raise ValueError(f'need 1 <= t_min < t_max, got t_min={t_min}, t_max={t_max}')
  b = x_pos.shape[0]
  k_noise, k_t = jax.random.split(key)
  eps = jax.random.normal(k_noise, x_pos.shape, jnp.promote_types(x_pos.dtype, jnp.float32))
  # (one noise, shared by the pair)
  t_pair = jax.random.randint(k_t, (2 * b,), t_min - 1, min(t_max, num_t))
  x_t = jnp.concatenate([schedule.add_noise(x_pos, eps, t_pair[:b]),
                         schedule.add_noise(x_neg, eps, t_pair[b:]),
                         eps])  # the prior branch: pure noise at t = T - 1
  t_all = jnp.concatenate([t_pair, jnp.full((b,), num_t - 1, t_pair.dtype)])
  cat = lambda *trees: jax.tree.map(lambda *a: jnp.concatenate(a), *trees)  # ctx may be a pytree
  ctx_all = cat(ctx, ctx, ctx)
  retain = retain_weight > 0
  if retain:
    if 'retain' not in batch or 'retain_context' not in batch:
      raise ValueError('retain_weight > 0 needs batch keys retain and retain_context')
    x_r, c_r = batch['retain'], batch['retain_context']
    if x_r.shape[1:] != x_pos.shape[1:] or any(c.shape[0] != x_r.shape[0]
                                                for c in jax.tree.leaves(c_r)):
      raise ValueError(f'batch retain must be (R,) + {x_pos.shape[1:]} with retain_context '
                       f'(R, ...), got {x_r.shape} and {jax.tree.map(jnp.shape, c_r)}')
    k_rn, k_rt = jax.random.split(jax.random.fold_in(key, 2))
    t_r = jax.random.randint(k_rt, (x_r.shape[0],), 0, num_t)
    x_t = jnp.concatenate([x_t, schedule.add_noise(
        x_r, jax.random.normal(k_rn, x_r.shape, eps.dtype), t_r)])
    t_all = jnp.concatenate([t_all, t_r.astype(t_all.dtype)])
    ctx_all = cat(ctx_all, jax.tree.map(lambda c, a: c.astype(a.dtype), c_r, ctx_all))
  with jax.default_matmul_precision(matmul_precision):
    policy = eps_fn(lora.merge(params, lora_params, lora_scale), x_t, t_all, ctx_all)
    reference = jax.lax.stop_gradient(eps_fn(params, x_t, t_all, ctx_all))
  target = jnp.concatenate([eps, eps])
  e_policy = losses.denoising_error(policy[:2 * b], target)
  e_ref = losses.denoising_error(reference[:2 * b], target)
  delta_pos = e_policy[:b] - e_ref[:b]
  delta_neg = e_policy[b:] - e_ref[b:]
  l_duo = preference_loss(delta_pos, delta_neg, beta)
  l_prior = jnp.mean(losses.denoising_error(policy[2 * b:3 * b], reference[2 * b:3 * b]))
  total = l_duo + prior_weight * l_prior
  metrics = {'loss_duo': l_duo, 'loss_prior': l_prior, 'delta_pos': jnp.mean(delta_pos),
             'delta_neg': jnp.mean(delta_neg), 'diff': jnp.mean(delta_pos - delta_neg)}
  if retain:
    metrics['loss_retain'] = jnp.mean(losses.denoising_error(policy[3 * b:], reference[3 * b:]))
    total = total + retain_weight * metrics['loss_retain']
  return total, metrics


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
    _, prior_weight = hyperparameters(c.base_learning_rate, c.base_prior_weight, c.beta)
    return cls(unet, schedule, base_params, rank=lc.rank, alpha=lc.alpha, targets=lc.targets,
               beta=c.beta, prior_weight=prior_weight, t_min=c.t_min, t_max=c.t_max,
               retain_weight=c.retain_weight)

  def loss_fn(self, lora_params, batch, key, base_params):
    return loss(self.eps_fn, base_params, lora_params, batch, key, self.schedule,
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
