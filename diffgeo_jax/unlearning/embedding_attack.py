"""A learned-embedding attack on concept unlearning (Concept Inversion, Pham et al. 2023, as the
DUO paper uses it): optimise one token's row of the text encoder's embedding table so that the
(unlearned) UNet denoises images of the concept well under their prompts, then sample with it.

    token = embedding_attack.concept_token(pipe, 'eight')
    row, log = embedding_attack.learn_embedding(pipe, unet_params, images, prompts, token, key)
    attacked = dataclasses.replace(pipe, unet_params=unet_params,
        text_encoder_params=embedding_attack.with_row(pipe.text_encoder_params, token, row))

Only the row moves; every other parameter, the tokenizer and the prompts stay as they are. The
attack starts from the word's own embedding.

SDXL: the word has a row in each encoder's table (both tokenizers must give it the same single
token id); the attack moves both rows jointly, and `row` is their concatenation (width D1 + D2,
the first encoder's part first, as the UNet's context). The loss sees the whole conditioning: both
encoders' hidden states, the pooled embedding of the second and the time ids of the images' size.

    attacked = embedding_attack.with_concept_row(pipe, token, row)   # SD and SDXL

Defaults: the DUO appendix's Concept Inversion settings as a third party read them (Adam, lr 5e-3,
batch 4); steps are the caller's.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import core, traverse_util

from diffgeo_jax.diffusion import conditioning, pipeline, schedules

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


def _encoders(pipe) -> list[str]:
  """The pipeline fields of the text-encoder parameters a prompt goes through."""
  return ['text_encoder_params'] + (['text_encoder_2_params'] if pipeline.is_sdxl(pipe) else [])


def concept_token(pipe, concept: str) -> int:
  """The token id of a one-token concept word (SDXL: the same id in both tokenizers)."""
  found = []
  for tok in [pipe.tokenizer] + ([pipe.tokenizer_2] if pipeline.is_sdxl(pipe) else []):
    ids = tok([concept]).input_ids[0]
    if len(ids) != 3:  # BOS, the word, EOS
      raise ValueError(f'the concept {concept!r} must be one token of the tokenizer, got {ids}')
    found.append(int(ids[1]))
  if len(set(found)) != 1:
    raise ValueError(f'the two SDXL tokenizers give the concept {concept!r} different token ids '
                     f'{found}; the attack edits one id in both embedding tables')
  return found[0]


def concept_row(pipe, token_id: int) -> jax.Array:
  """The word's own row: its row of the token-embedding table (SDXL: both encoders' rows,
  concatenated)."""
  return jnp.concatenate([embedding_table(getattr(pipe, name))[token_id]
                          for name in _encoders(pipe)])


def with_concept_row(pipe, token_id: int, row):
  """`pipe` with row `token_id` of its token-embedding table(s) replaced by `row` (SDXL: the
  concatenation of both encoders' rows, split by their widths)."""
  names = _encoders(pipe)
  widths = [embedding_table(getattr(pipe, name)).shape[1] for name in names]
  if jnp.shape(row) != (sum(widths),):
    raise ValueError(f'row must have shape ({sum(widths)},) (the embedding width'
                     f'{"s " + " + ".join(map(str, widths)) if len(widths) > 1 else ""}), got '
                     f'{jnp.shape(row)}')
  parts = jnp.split(jnp.asarray(row), np.cumsum(widths)[:-1])
  return dataclasses.replace(pipe, **{name: with_row(getattr(pipe, name), token_id, part)
                                      for name, part in zip(names, parts)})


def learn_embedding(pipe, unet_params, images, prompts, token_id: int, key: jax.Array, *,
                    steps: int = 500, learning_rate: float = 5e-3, batch_size: int = 4):
  """The attack's row and a log {loss_first, loss_last (means of the first/last tenth of the
  steps), moved (|row - row0| / |row0|)}. images (N, H, W, C) in [0, 1] with one prompt each;
  the loss is the UNet's denoising error at t ~ U[0, T) (latent pipelines: on VAE latents)."""
  if len(prompts) != len(images):
    raise ValueError(f'one prompt per image: got {len(prompts)} prompts for {len(images)} images')
  schedule = schedules.from_diffusers_config(pipe.scheduler_config)
  # Each distinct prompt is encoded once a step (the tokens are fixed; the row is traced).
  texts, which = np.unique(np.asarray([str(p) for p in prompts]), return_inverse=True)
  which = jnp.asarray(which.reshape(-1), jnp.int32)
  key, k_enc = jax.random.split(key)
  x0 = pipeline.encode_images(pipe, images, k_enc)
  size = tuple(np.shape(images)[1:3])
  row0 = concept_row(pipe, token_id)
  tx = optax.adam(learning_rate)

  def loss_fn(row, key):
    k_idx, k_t, k_n = jax.random.split(key, 3)
    idx = jax.random.randint(k_idx, (batch_size,), 0, x0.shape[0])
    cond = conditioning.of_prompts(with_concept_row(pipe, token_id, row), list(texts), size)
    ctx = conditioning.rows(cond, which[idx])
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
