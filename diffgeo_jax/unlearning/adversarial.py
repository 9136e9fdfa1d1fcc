"""Adversarial DUO rounds (beyond the paper, as adversarial unlearning does): training in rounds of
`duo.adversarial.every` steps; after each, the learned-embedding attack
(`unlearning.embedding_attack`, from the concept word's own row) against the current LoRA, and the
prompted branches go on under the clean or any attacked embedding so far.

    state, result = adversarial.rounds(data, train, run)   # data: `batches.Batches`
"""

from __future__ import annotations

import jax
import numpy as np
from absl import logging

from diffgeo_jax import distributed, paths, runs
from diffgeo_jax.training import lora, trainer
from diffgeo_jax.unlearning import batches, embedding_attack

ROWS = 'adversarial_rows.npz'


def rounds(data: batches.Batches, train: trainer.Trainer, run: runs.Run):
  """Runs `train` to its end in rounds and returns its (state, result). The attacked rows are kept
  in `workdir/adversarial_rows.npz` (a resumed run reuses them). Multi-host: every process runs
  the (unsharded) attack and takes process 0's row, so all batches agree."""
  config = data.config
  a, c = config.duo.adversarial, config.train
  if config.duo.condition == 'empty':
    raise ValueError("duo.adversarial needs prompted branches: duo.condition 'prompt' or 'mixed'")
  path = run.path(ROWS)
  rows = paths.load_npz(path) if distributed.exists_on_every_host(path) else {}
  for r in sorted(rows, key=int):
    data.add_adversarial_row(rows[r])
  token = embedding_attack.concept_token(data.pipe, config.data.concept)
  for end in range(a.every, c.num_steps, a.every):
    state, _ = train.run(until=end)
    if str(end) in rows:
      continue
    unet = lora.merge(data.pipe.unet_params, distributed.to_host(state.params))
    row, log = embedding_attack.learn_embedding(
        data.pipe, unet, data.pairs['unsafe'], data.pairs['prompts'], token,
        jax.random.key(c.seed + end), steps=a.steps, learning_rate=a.learning_rate,
        batch_size=a.batch_size)
    logging.info('adversarial round at step %d: %s', end, log)
    rows[str(end)] = distributed.same_on_all_hosts(np.asarray(row))
    data.add_adversarial_row(rows[str(end)])
    run.save_npz(ROWS, **rows)
  return train.run()
