"""A learned-embedding attack on concept unlearning (Concept Inversion, Pham et al. 2023, as the
DUO paper uses it): optimise one token's row of the text encoder's embedding table so that the
(unlearned) UNet denoises images of the concept well under their prompts, then sample with it.

    token = embedding_attack.concept_token(pipe, 'eight')
    row, log = embedding_attack.learn_embedding(pipe, unet_params, images, prompts, token, key)
    attacked = dataclasses.replace(pipe, unet_params=unet_params,
        text_encoder_params=embedding_attack.with_row(pipe.text_encoder_params, token, row))

Only the row moves; every other parameter, the tokenizer and the prompts stay as they are. The
attack starts from the word's own embedding. Defaults: the DUO appendix's Concept Inversion
settings as a third party read them (Adam, lr 5e-3, batch 4); steps are the caller's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import core, traverse_util

from diffgeo_jax.diffusion import pipeline, schedules

EMBEDDING = ('text_model', 'embeddings', 'token_embedding', 'embedding')


def embedding_table(text_params) -> jax.Array:
  """The (vocab, width) token-embedding table of a CLIP text encoder's parameters."""
  return traverse_util.flatten_dict(core.unfreeze(text_params))[EMBEDDING]


def with_row(text_params, token_id: int, row):
  """The text-encoder parameters with row `token_id` of the token-embedding table replaced."""
  flat = traverse_util.flatten_dict(core.unfreeze(text_params))
  table = flat[EMBEDDING]
  if not 0 <= token_id < table.shape[0] or jnp.shape(row) != table.shape[1:]:
    raise ValueError(f'token_id must be in [0, {table.shape[0]}) and row of shape '
                     f'{table.shape[1:]}, got {token_id} and {jnp.shape(row)}')
  flat[EMBEDDING] = table.at[token_id].set(row)
  return traverse_util.unflatten_dict(flat)


def concept_token(pipe, concept: str) -> int:
  """The token id of a one-token concept word."""
  ids = pipe.tokenizer([concept]).input_ids[0]
  if len(ids) != 3:  # BOS, the word, EOS
    raise ValueError(f'the concept {concept!r} must be one token of the tokenizer, got {ids}')
  return int(ids[1])


def learn_embedding(pipe, unet_params, images, prompts, token_id: int, key: jax.Array, *,
                    steps: int = 500, learning_rate: float = 5e-3, batch_size: int = 4):
  """The attack's row and a log {loss_first, loss_last (means of the first/last tenth of the
  steps), moved (|row - row0| / |row0|)}. images (N, H, W, C) in [0, 1] with one prompt each;
  the loss is the UNet's denoising error at t ~ U[0, T) (latent pipelines: on VAE latents)."""
  if len(prompts) != len(images):
    raise ValueError(f'one prompt per image: got {len(prompts)} prompts for {len(images)} images')
  schedule = schedules.from_diffusers_config(pipe.scheduler_config)
  limit = pipeline.max_prompt_tokens(pipe)
  ids = jnp.asarray(pipe.tokenizer([str(p) for p in prompts], padding='max_length',
                                   max_length=limit, return_tensors='np').input_ids, jnp.int32)
  key, k_enc = jax.random.split(key)
  x0 = pipeline.encode_images(pipe, images, k_enc)
  text_params = pipe.text_encoder_params
  row0 = embedding_table(text_params)[token_id]
  tx = optax.adam(learning_rate)

  def loss_fn(row, key):
    k_idx, k_t, k_n = jax.random.split(key, 3)
    idx = jax.random.randint(k_idx, (batch_size,), 0, x0.shape[0])
    ctx = pipe.text_encoder.apply({'params': with_row(text_params, token_id, row)},
                                  ids[idx]).last_hidden_state
    t = jax.random.randint(k_t, (batch_size,), 0, schedule.num_train_timesteps)
    noise = jax.random.normal(k_n, x0[idx].shape, x0.dtype)
    eps = pipe.unet.apply({'params': unet_params}, schedule.add_noise(x0[idx], noise, t), t, ctx)
    return jnp.mean((eps - noise) ** 2)

  @jax.jit
  def step(row, opt_state, key):
    loss, g = jax.value_and_grad(loss_fn)(row, key)
    updates, opt_state = tx.update(g, opt_state, row)
    return optax.apply_updates(row, updates), opt_state, loss

  row, opt_state = row0, tx.init(row0)
  losses = []
  for i in range(steps):
    row, opt_state, loss = step(row, opt_state, jax.random.fold_in(key, i))
    losses.append(float(loss))
  k = max(1, steps // 10)
  return row, {'loss_first': float(np.mean(losses[:k])), 'loss_last': float(np.mean(losses[-k:])),
               'moved': float(jnp.linalg.norm(row - row0) / jnp.linalg.norm(row0))}
