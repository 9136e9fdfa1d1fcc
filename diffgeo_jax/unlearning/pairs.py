"""DUO's training data (arXiv 2407.21035, the official `naver-ai/DUO` pipeline): (unsafe, safe)
image pairs, each side gated by a concept detector.

    pairs = pairs_lib.make_pairs(pipe, detector, config.data, key)   # images in [0, 1]
    retain = pairs_lib.make_retain(pipe, config.data, key)           # `duo.retain_weight` > 0

Unsafe images: the pipeline samples `data.prompts` (in turn) and the detector keeps those that show
the concept, resampling the rest. Safe counterparts: SDEdit of each unsafe image
(`data.safe_strength`) with `data.safe_prompts` (in turn) and the unsafe prompt as the negative
prompt, kept when the detector no longer sees the concept. A detector is any object with
`shows_concept(images in [0, 1]) -> (N,) bool or None` (None: no gating, as the official violence
data); the binaries use the digits classifier.

Multi-host: every process runs the same sampling calls (each batch sharded over all devices, the
images returned to every process); a detector must return the same verdicts on every process
(process 0's: rule 4 of `distributed`), so all hold the same pairs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import jax
import numpy as np

from diffgeo_jax.diffusion import guidance, pipeline


class Detector(Protocol):

  def shows_concept(self, images) -> np.ndarray | None:
    """(N,) booleans for images (N, H, W, 3) in [0, 1], the same on every process; None when
    there is no detector (every image passes)."""


class NoDetector:
  """Every image passes (`detector='none'`)."""

  def shows_concept(self, images) -> None:
    del images
    return None


def cycled(prompts: Sequence[str], n: int) -> list[str]:
  """n prompts: `prompts` (a list from the config) in turn."""
  prompts = list(prompts)
  if not prompts:
    raise ValueError('the config lists no prompts (data.prompts and data.safe_prompts)')
  return [str(prompts[i % len(prompts)]) for i in range(n)]


def image_size(pipe, data) -> tuple[int, int]:
  """`data.image_size` (square), or the pipeline's default size when it is 0."""
  return pipeline.default_image_size(pipe) if not data.image_size else (data.image_size,) * 2


def make_pairs(pipe, detector: Detector, data, key: jax.Array) -> dict[str, np.ndarray]:
  """(unsafe, safe) image pairs in [0, 1] with their prompts, from the config's `data` block
  (prompts, safe_prompts, num_pairs, num_steps, guidance_scale, safe_strength, max_attempts,
  generation_batch, image_size, concept). Call it on every process."""
  prompts, safe_texts = cycled(data.prompts, data.num_pairs), cycled(data.safe_prompts,
                                                                     data.num_pairs)
  h, w = image_size(pipe, data)
  unsafe = np.zeros((data.num_pairs, h, w, 3), np.float32)
  safe = np.zeros_like(unsafe)
  kw = dict(num_steps=data.num_steps, guidance=guidance.CFG(data.guidance_scale))
  key, unsafe, left = until_accepted(
      lambda idx, kk: pipeline.text_to_image(pipe, [prompts[i] for i in idx], kk, height=h,
                                             width=w, **kw),
      lambda hit: hit, detector, data, key, unsafe)
  if left:
    raise RuntimeError(f'{left} of {data.num_pairs} unsafe images were never read as '
                       f'{data.concept!r} in {data.max_attempts} attempts')
  key, safe, left = until_accepted(
      lambda idx, kk: pipeline.image_to_image(
          pipe, unsafe[idx], [safe_texts[i] for i in idx], kk, strength=data.safe_strength,
          negative_prompts=[prompts[i] for i in idx], **kw),
      lambda hit: ~hit, detector, data, key, safe)
  if left:
    raise RuntimeError(f'{left} of {data.num_pairs} SDEdit images kept the concept in '
                       f'{data.max_attempts} attempts; raise data.safe_strength')
  return {'unsafe': unsafe, 'safe': safe, 'prompts': np.array(prompts),
          'safe_prompts': np.array(safe_texts)}


def until_accepted(generate: Callable, accept: Callable, detector: Detector, data, key: jax.Array,
                   out: np.ndarray) -> tuple[jax.Array, np.ndarray, int]:
  """Fills `out` (N, ...) with generate(indices, key) images, resampling the rows the detector
  gate `accept(shows_concept)` refuses, at most `data.max_attempts` times (every row passes
  without a detector). Returns the advanced key, `out` and the number of rows never accepted."""
  todo = np.arange(len(out))
  for _ in range(data.max_attempts):
    if not len(todo):
      break
    key, k = jax.random.split(key)
    imgs = batched(generate, todo, k, data.generation_batch)
    hit = detector.shows_concept(imgs)
    ok = np.ones(len(todo), bool) if hit is None else accept(hit)
    out[todo[ok]] = imgs[ok]
    todo = todo[~ok]
  return key, out, len(todo)


def make_retain(pipe, data, key: jax.Array) -> dict[str, np.ndarray]:
  """The retain set of `duo.retain_weight`: the base model's own samples of `data.retain_prompts`
  (in turn, `data.num_retain` of them), images in [0, 1]."""
  if data.num_retain <= 0:
    raise ValueError(f'duo.retain_weight > 0 needs data.num_retain > 0, got {data.num_retain}')
  prompts = cycled(data.retain_prompts, data.num_retain)
  h, w = image_size(pipe, data)
  imgs = batched(lambda idx, kk: pipeline.text_to_image(
      pipe, [prompts[i] for i in idx], kk, height=h, width=w, num_steps=data.num_steps,
      guidance=guidance.CFG(data.guidance_scale)), np.arange(data.num_retain), key,
      data.generation_batch)
  return {'retain': imgs.astype(np.float32), 'retain_prompts': np.array(prompts)}


def batched(generate: Callable, idx: np.ndarray, key: jax.Array, batch: int) -> np.ndarray:
  """generate(indices, key) over `idx` in slices of at most `batch` (0 = all at once). `generate`
  returns arrays replicated on every device (the pipeline's), so numpy reads them anywhere."""
  batch = batch or len(idx)
  return np.concatenate([np.asarray(generate(idx[i:i + batch], jax.random.fold_in(key, i)))
                         for i in range(0, len(idx), batch)])
