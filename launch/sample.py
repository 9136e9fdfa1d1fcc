r"""Sample images from a text-to-image pipeline: one image per (prompt, seed).

    python launch/sample.py --config=configs/sample/default.py \
      --config.pipeline_dir=/path/to/stable-diffusion-v1-5 \
      --config.prompts="('a red apple', 'a blue car')" --config.seeds="(0, 1, 2)" --workdir=/tmp/s

Writes to --workdir: `config.json` (the resolved config), `samples.png` (a grid: one row per
prompt, one column per seed), `samples.npz` (images (N, H, W, C) in [0, 1], and each image's prompt
and seed) and `results.json` (timings and settings).

The seed fixes an image's initial noise, so an image depends only on its prompt, its seed and the
settings, not on which batch it ran in (the step noise of stochastic samplers does depend on the
batch). Timing: the first batch runs once untimed to compile (`compile_s` is that call's time
minus the same batch's steady-state time); `sampling_s` then covers every batch.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from PIL import Image

from diffgeo_jax import models
from diffgeo_jax.diffusion import pipeline

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Sampling config (configs/sample/*.py).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder.', required=True)


def load(config) -> models.Pipeline:
  if not config.pipeline_dir:
    raise ValueError('config.pipeline_dir is empty, which means the embedded digits pipeline, and '
                     'that does not exist yet: pass --config.pipeline_dir=<a diffusers pipeline '
                     'folder>')
  logging.info('loading %s', config.pipeline_dir)
  return models.load_pipeline(config.pipeline_dir)


def initial_noise(pipe, seed: int, height: int, width: int) -> jax.Array:
  """(1, H/f, W/f, C) unit Gaussian noise for one image, from its seed alone."""
  f = pipeline.latent_factor(pipe)
  shape = (1, height // f, width // f, pipe.unet.config.in_channels)
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def grid(images: np.ndarray, rows: int, cols: int) -> Image.Image:
  """A rows x cols PIL grid of (rows * cols, H, W, C) images in [0, 1], row-major."""
  n, h, w, c = images.shape
  if c not in (1, 3):
    raise ValueError(f'cannot write {c}-channel images as PNG (need 1 or 3 channels)')
  pixels = np.round(np.clip(images, 0, 1) * 255).astype(np.uint8)
  tiled = pixels.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4)
  tiled = tiled.reshape(rows * h, cols * w, c)
  return Image.fromarray(tiled[..., 0] if c == 1 else tiled, mode='L' if c == 1 else 'RGB')


def _batches(n: int, batch_size: int) -> list[np.ndarray]:
  """Index batches of one size: the last is padded with its last index (dropped afterwards), so
  that a single executable serves them all."""
  starts = range(0, n, batch_size)
  return [np.minimum(np.arange(s, s + batch_size), n - 1) for s in starts]


def main(argv):
  del argv
  config, workdir = _CONFIG.value, _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json(indent=2))
  pipe = pipeline.replicate(load(config))  # params on every device once, not per batch
  dh, dw = pipeline.default_image_size(pipe) if not (config.height and config.width) else (0, 0)
  height, width = config.height or dh, config.width or dw
  prompts, seeds = list(config.prompts), [int(s) for s in config.seeds]
  if not prompts or not seeds:
    raise ValueError('config.prompts and config.seeds must both be non-empty')
  jobs = [(p, s) for p in prompts for s in seeds]  # row-major: one row per prompt
  noise = {s: initial_noise(pipe, s, height, width) for s in seeds}
  batch_size = min(config.batch_size or len(jobs), len(jobs))
  batches = _batches(len(jobs), batch_size)

  def run(i, idx):
    return np.asarray(pipeline.text_to_image(
        pipe, [jobs[j][0] for j in idx], jax.random.fold_in(jax.random.key(0), i),
        num_steps=config.num_steps, guidance_scale=config.guidance_scale,
        negative_prompts=config.negative_prompt, sampler=config.sampler, eta=config.eta,
        height=height, width=width, guidance_rescale=config.guidance_rescale,
        latents=jnp.concatenate([noise[jobs[j][1]] for j in idx])))

  logging.info('%d images (%d prompts x %d seeds) of %dx%d in %d batches of %d on %d device(s)',
               len(jobs), len(prompts), len(seeds), height, width, len(batches), batch_size,
               jax.device_count())
  start = time.perf_counter()
  run(0, batches[0])
  first_call_s = time.perf_counter() - start
  logging.info('compiled and ran the first batch in %.1f s', first_call_s)

  outputs, batch_s = [], []
  start = time.perf_counter()
  for i, idx in enumerate(batches):
    t0 = time.perf_counter()
    outputs.append(run(i, idx))
    batch_s.append(time.perf_counter() - t0)
    done = min((i + 1) * batch_size, len(jobs))
    rate = done / (time.perf_counter() - start)
    logging.info('batch %d/%d: %d/%d images, %.2f images/s, ETA %.0f s', i + 1, len(batches),
                 done, len(jobs), rate, (len(jobs) - done) / rate)
  sampling_s = time.perf_counter() - start
  images = np.concatenate(outputs)[:len(jobs)]

  grid(images, len(prompts), len(seeds)).save(os.path.join(workdir, 'samples.png'))
  np.savez(os.path.join(workdir, 'samples.npz'), images=images,
           prompts=np.array([p for p, _ in jobs]), seeds=np.array([s for _, s in jobs]))
  results = {
      'compile_s': max(first_call_s - batch_s[0], 0.0), 'first_call_s': first_call_s,
      'sampling_s': sampling_s, 'images_per_s': len(jobs) / sampling_s,
      'num_images': len(jobs), 'image_shape': list(images.shape[1:]),
      'devices': jax.device_count(), 'device_kind': jax.devices()[0].device_kind,
      'settings': {k: config[k] for k in (
          'pipeline_dir', 'sampler', 'num_steps', 'guidance_scale', 'guidance_rescale', 'eta',
          'negative_prompt', 'batch_size')} | {'height': height, 'width': width},
  }
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2)
  logging.info('wrote %s: %s', workdir, json.dumps(results))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
