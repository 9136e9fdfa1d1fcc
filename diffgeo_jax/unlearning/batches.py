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
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from diffgeo_jax.diffusion import pipeline
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
    self.empty = np.asarray(pipeline.encode_prompts(pipe, ['']))[0]
    self.prompted = np.asarray(pipeline.encode_prompts(pipe, [str(p) for p in pairs['prompts']]))
    self.adversarial: list[np.ndarray] = []  # the prompts under attacked embeddings (rounds)
    if config.duo.retain_weight > 0:
      self.x_retain = np.asarray(pipeline.encode_images(pipe, pairs['retain'],
                                                        jax.random.key(seed + 3)))
      self.retain_context = np.asarray(pipeline.encode_prompts(
          pipe, [str(p) for p in pairs['retain_prompts']]))

  def add_adversarial_row(self, row) -> None:
    """The unsafe prompts encoded with the concept token's embedding row replaced by `row`."""
    token = embedding_attack.concept_token(self.pipe, self.config.data.concept)
    pipe = dataclasses.replace(self.pipe, text_encoder_params=embedding_attack.with_row(
        self.pipe.text_encoder_params, token, jnp.asarray(row)))
    self.adversarial.append(np.asarray(pipeline.encode_prompts(
        pipe, [str(p) for p in self.pairs['prompts']])))

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
    prompted_ctx = self.prompted[idx]
    if self.adversarial:  # clean or one of the attacked embeddings, uniformly
      pick = rng.integers(0, len(self.adversarial) + 1, rows)
      prompted_ctx = np.stack([prompted_ctx[j] if pick[j] == 0 else
                               self.adversarial[pick[j] - 1][idx[j]] for j in range(rows)])
    context = np.where(prompted[:, None, None], prompted_ctx, self.empty[None])
    batch = {'positive': self.x_safe[idx], 'negative': self.x_unsafe[idx],
             'context': context.astype(self.empty.dtype)}
    if self.config.duo.retain_weight > 0:
      r = rng.integers(0, len(self.x_retain), rows)
      batch.update(retain=self.x_retain[r], retain_context=self.retain_context[r])
    return batch
