"""DUO's training batches (arXiv 2407.21035): the pairs encoded once for the UNet, the text
conditioning of every branch, and the global batch of each step.

    data = batches.Batches(pipe, pairs, config)     # pairs from `unlearning.pairs`
    trainer.Trainer(..., batch_fn=data.batch_fn)

`duo.condition` picks the conditioning of every branch: 'empty' (the official code: prompt-agnostic
unlearning), 'prompt' (every branch of a pair under its unsafe prompt; ours: the official
--given_prompt uses the safe prompt for the safe image and the empty prompt for the prior) or
'mixed' (either, per pair and step). After adversarial
rounds (`unlearning.adversarial`) the prompted branches also see the prompts under attacked
embeddings.

The contexts are the UNet's conditioning (`diffusion.conditioning`): SD's (B, L, D) arrays, or
SDXL's dicts with the pooled embedding and the time ids of the pairs' image size. 'empty' is the
pipeline's unconditional conditioning, that of classifier-free guidance without a negative prompt:
the empty prompt's encoding, zeros on SDXL (`force_zeros_for_empty_prompt`, as diffusers and as
SDXL was trained to drop captions).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffgeo_jax.diffusion import conditioning, pipeline
from diffgeo_jax.unlearning import embedding_attack

CONDITIONS = ('empty', 'prompt', 'mixed')  # duo.condition


def check_condition(condition: str) -> None:
  if condition not in CONDITIONS:
    raise ValueError(f'duo.condition must be one of {CONDITIONS}, got {condition!r}')


class Batches:
  """The UNet's inputs and contexts of one run's pairs; `batch_fn(step)` is the trainer's."""

  def __init__(self, pipe, pairs: dict, config):
    check_condition(config.duo.condition)
    self.pipe, self.pairs, self.config = pipe, pairs, config
    seed = config.data.seed
    # The UNet's inputs, once: 2x - 1 in pixel space; for a latent pipeline one sample of the VAE
    # posterior per image (the official code draws a new one every step).
    k_pos, k_neg = jax.random.split(jax.random.key(seed + 1))
    b = config.data.generation_batch or len(pairs['unsafe'])
    self.x_safe, self.x_unsafe = (
        np.concatenate([np.asarray(pipeline.encode_images(pipe, x[i:i + b],
                                                          jax.random.fold_in(k, i)))
                        for i in range(0, len(x), b)])
        for x, k in ((pairs['safe'], k_pos), (pairs['unsafe'], k_neg)))
    # The UNet's conditioning (SD: (N, L, D) arrays; SDXL: dicts with the pooled embedding and
    # the time ids of the pairs' image size), as numpy on the host.
    self.size = tuple(np.shape(pairs['unsafe'])[1:3])
    # 'empty': the unconditional conditioning of the pipeline's CFG (SD: the empty prompt; SDXL
    # with force_zeros_for_empty_prompt: zeros, as diffusers).
    self.empty = conditioning.rows(conditioning.to_numpy(
        conditioning.unconditional(pipe, 1, self.size)), 0)
    self.prompted = self._encode(pipe, pairs['prompts'])
    self.adversarial: list = []  # the prompts under attacked embeddings (rounds)
    if config.duo.retain_weight > 0:
      self.x_retain = np.asarray(pipeline.encode_images(pipe, pairs['retain'],
                                                        jax.random.key(seed + 3)))
      self.retain_context = self._encode(pipe, pairs['retain_prompts'])

  def _encode(self, pipe, prompts):
    return conditioning.to_numpy(conditioning.of_prompts(pipe, [str(p) for p in prompts],
                                                         self.size))

  def add_adversarial_row(self, row) -> None:
    """The unsafe prompts encoded with the concept token's embedding row(s) replaced by `row`
    (`embedding_attack.with_concept_row`: SDXL edits both encoders' tables)."""
    token = embedding_attack.concept_token(self.pipe, self.config.data.concept)
    pipe = embedding_attack.with_concept_row(self.pipe, token, jnp.asarray(row))
    self.adversarial.append(self._encode(pipe, self.pairs['prompts']))

  def batch_fn(self, step: int) -> dict:
    """The global batch of step `step`, a function of (seed, step) alone (the Trainer feeds each
    process's rows of it)."""
    c = self.config.train
    rows = c.batch_size
    rng = np.random.default_rng([c.seed, step])
    idx = rng.integers(0, len(self.pairs['unsafe']), rows)
    condition = self.config.duo.condition
    prompted = (np.ones(rows, bool) if condition == 'prompt' else
                rng.random(rows) < 0.5 if condition == 'mixed' else np.zeros(rows, bool))
    prompted_ctx = conditioning.rows(self.prompted, idx)
    if self.adversarial:  # clean or one of the attacked embeddings, uniformly
      pick = rng.integers(0, len(self.adversarial) + 1, rows)
      prompted_ctx = conditioning.stack([
          conditioning.rows(prompted_ctx, j) if pick[j] == 0 else
          conditioning.rows(self.adversarial[pick[j] - 1], idx[j]) for j in range(rows)])
    batch = {'positive': self.x_safe[idx], 'negative': self.x_unsafe[idx],
             'context': conditioning.where(prompted, prompted_ctx, self.empty)}
    if self.config.duo.retain_weight > 0:
      r = rng.integers(0, len(self.x_retain), rows)
      batch.update(retain=self.x_retain[r],
                   retain_context=conditioning.rows(self.retain_context, r))
    return batch
