"""The UNet's conditioning of prompts at an image size, for code that calls the UNet itself (the
bases and edits of `launch/explore.py`, the DreamBooth and DUO batches) instead of going through
`pipeline.text_to_image`, which builds the same conditioning internally.

    cond = conditioning.of_prompts(pipe, prompts, size)        # SD: (B, L, D); SDXL: a dict
    uncond = conditioning.unconditional(pipe, len(prompts), size)
    ctx = conditioning.at_size(pipe, pipeline.decor_prompts(pipe, prompts, settings), size)
    eps = pipe.unet.apply({'params': pipe.unet_params}, x, t, cond)

SD: the text encoder's hidden states (B, L, D), as `pipeline.encode_prompts`. SDXL: the dict
{'context', 'text_embeds', 'time_ids'} the UNet takes (`models.unet.split_conditioning`), with the
size/crop ids of an image of `size` (`pipeline.add_time_ids`: original = target = size, no crop).
Every result is a pytree whose leaves share the batch axis: slice, stack or select its rows with
`jax.tree.map` (`rows`, `stack`, `where`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffgeo_jax.diffusion import pipeline


def _size(pipe, size) -> tuple[int, int]:
  if size is None:
    return pipeline.default_image_size(pipe)
  h, w = (int(size), int(size)) if np.ndim(size) == 0 else (int(size[0]), int(size[1]))
  return h, w


def at_size(pipe, embeds: Any, size: tuple[int, int] | int | None = None) -> Any:
  """`embeds` (what `pipeline.encode_prompts` or `pipeline.decor_prompts` returns) as the UNet's
  conditioning of images of `size` (height, width) (default: the pipeline's size): SDXL's dict
  with its time ids added; SD's array unchanged."""
  if not pipeline.is_sdxl(pipe):
    return embeds
  if not isinstance(embeds, dict) or 'context' not in embeds or 'text_embeds' not in embeds:
    raise ValueError("an SDXL pipeline's embeddings are a dict with 'context' and 'text_embeds' "
                     f'(pipeline.encode_prompts), got {type(embeds).__name__}')
  n = np.shape(embeds['context'])[0]
  return {**embeds, 'time_ids': pipeline.add_time_ids(n, *_size(pipe, size))}


def of_prompts(pipe, prompts: Sequence[str], size: tuple[int, int] | int | None = None) -> Any:
  """The UNet's conditioning of `prompts` for images of `size` (default: the pipeline's size)."""
  return at_size(pipe, pipeline.encode_prompts(pipe, list(prompts)), size)


def unconditional(pipe, n: int, size: tuple[int, int] | int | None = None) -> Any:
  """The conditioning classifier-free guidance pairs with when there is no negative prompt, for
  `n` images of `size`, as `pipeline.text_to_image`: the empty prompt's encoding (SD), zeros in
  place of the text embeddings (SDXL with `force_zeros_for_empty_prompt`; the time ids stay)."""
  embeds = pipeline.encode_prompts(pipe, [''] * n)
  if pipeline.zeros_for_empty_prompt(pipe):
    embeds = jax.tree.map(jnp.zeros_like, embeds)
  return at_size(pipe, embeds, size)


# -- rows of a conditioning pytree (numpy, on the host) -------------------------------------------

def to_numpy(tree: Any) -> Any:
  """Every leaf as a float32 numpy array."""
  return jax.tree.map(lambda a: np.asarray(a, np.float32), tree)


def rows(tree: Any, idx) -> Any:
  """The rows `idx` (an index array, a slice or an int) of every leaf."""
  return jax.tree.map(lambda a: a[idx], tree)


def stack(trees: Sequence[Any]) -> Any:
  """One-sample conditionings (leaves without the batch axis) -> a batch."""
  return jax.tree.map(lambda *a: np.stack(a), *trees)


def concatenate(trees: Sequence[Any]) -> Any:
  """Batches of one structure joined along the batch axis."""
  return jax.tree.map(lambda *a: np.concatenate(a), *trees)


def broadcast(tree: Any, n: int) -> Any:
  """One sample's conditioning (leaves without the batch axis) repeated as a batch of `n`."""
  return jax.tree.map(lambda a: np.broadcast_to(a, (n,) + np.shape(a)), tree)


def where(mask, a: Any, b: Any) -> Any:
  """Row i from `a` where mask[i], else from `b` (batches of one structure; `b` may be one
  sample's conditioning, broadcast)."""
  mask = np.asarray(mask, bool)

  def one(x, y):
    x, y = np.asarray(x), np.asarray(y)
    m = mask.reshape(mask.shape + (1,) * (x.ndim - 1))
    return np.where(m, x, y).astype(x.dtype)
  return jax.tree.map(one, a, b)
