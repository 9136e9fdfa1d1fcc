"""The learned-embedding attack: only one row of the embedding table moves, the concept word maps
to its token, and the optimised row lowers the attack's objective on held-fixed noise."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffgeo_jax import digits, models
from diffgeo_jax.diffusion import pipeline, schedules
from diffgeo_jax.digits import dataset
from diffgeo_jax.unlearning import embedding_attack


@pytest.fixture(scope='module')
def pipe():
  return models.load_pipeline(digits.pipeline_dir())


def test_with_row_replaces_one_row(pipe):
  table = embedding_attack.embedding_table(pipe.text_encoder_params)
  row = jnp.arange(table.shape[1], dtype=table.dtype)
  new = embedding_attack.embedding_table(
      embedding_attack.with_row(pipe.text_encoder_params, 5, row))
  chex.assert_trees_all_equal(new[5], row)
  chex.assert_trees_all_equal(np.delete(np.asarray(new), 5, 0), np.delete(np.asarray(table), 5, 0))
  with pytest.raises(ValueError, match='row of shape'):
    embedding_attack.with_row(pipe.text_encoder_params, 5, row[:-1])


def test_concept_token(pipe):
  token = embedding_attack.concept_token(pipe, 'eight')
  assert pipe.tokenizer.decode([token]).strip() == 'eight'
  with pytest.raises(ValueError, match='one token'):
    embedding_attack.concept_token(pipe, 'digit eight')


def test_attack_lowers_its_objective(pipe):
  # Real eights under the prompt "a <colour> digit three": the "three" row is pulled toward what
  # makes the UNet denoise eights. Objective on fixed noise and timesteps, before and after.
  test = dataset.load('test')
  eights = np.flatnonzero(test.digits == 8)[:16]
  colours = np.arange(16) % len(dataset.COLOURS)
  images = (dataset.render(test.strokes[eights], colours) + 1) / 2
  prompts = [f'a {dataset.COLOURS[c]} digit three' for c in colours]
  token = embedding_attack.concept_token(pipe, 'three')
  row, log = embedding_attack.learn_embedding(pipe, pipe.unet_params, images, prompts, token,
                                              jax.random.key(0), steps=60, learning_rate=2e-2,
                                              batch_size=8)
  sched = schedules.from_diffusers_config(pipe.scheduler_config)
  x0 = jnp.asarray(images) * 2 - 1
  t = jnp.tile(jnp.array([100, 300, 500, 700]), 4)
  noise = jax.random.normal(jax.random.key(1), x0.shape)

  def objective(r):
    p = embedding_attack.with_row(pipe.text_encoder_params, token, r)
    ids = pipe.tokenizer(prompts, padding='max_length', max_length=pipeline.max_prompt_tokens(pipe),
                         return_tensors='np').input_ids
    ctx = pipe.text_encoder.apply({'params': p}, jnp.asarray(ids)).last_hidden_state
    eps = pipe.unet.apply({'params': pipe.unet_params}, sched.add_noise(x0, noise, t), t, ctx)
    return float(jnp.mean((eps - noise) ** 2))

  row0 = embedding_attack.embedding_table(pipe.text_encoder_params)[token]
  before, after = objective(row0), objective(row)
  assert after < 0.95 * before, (before, after, log)
  assert log['moved'] > 0
