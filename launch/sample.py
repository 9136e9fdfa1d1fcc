r"""Sample images from a text-to-image pipeline: one image per (prompt, seed).

    python launch/sample.py --config=configs/sample/default.py \
      --config.pipeline_dir=/path/to/stable-diffusion-v1-5 \
      --config.prompts="('a red apple', 'a blue car')" --config.seeds="(0, 1, 2)" --workdir=/tmp/s

Writes to --workdir (a local folder or gs://bucket/path): `config.json` (the resolved config),
`samples.png` (a grid: `prompts_per_row` consecutive prompts per row, each with one column per
seed), `samples.npz` (images (N, H, W, C) in [0, 1], and each image's prompt and seed) and
`results.json` (metrics: timings, image count and size). Multi-host (--jax_distributed): every
process runs the same batches, each sharded over all devices; process 0 writes.

Any diffusers folder the pipeline loads: SD 1.x/2.x, SDXL (conditioned with the time ids of the
sampled size; with no negative prompt the unconditional embedding is zeros, as diffusers), the
digits model.

The seed fixes an image's initial noise, so an image depends only on its prompt, its seed and the
settings, not on which batch it ran in (the step noise of stochastic samplers does depend on the
batch). Timing: the first batch runs once untimed to compile (`compile_s` is that call's time
minus the same batch's steady-state time); `sampling_s` then covers every batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from diffgeo_jax import digits, models, runs
from diffgeo_jax.images import grid
from diffgeo_jax.diffusion import guidance, pipeline
from diffgeo_jax.digits import dataset

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Sampling config (configs/sample/*.py).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder.', required=True)



def load(config) -> models.Pipeline:
  """The configured pipeline ('' = the embedded digits model)."""
  folder = digits.pipeline_dir(config.pipeline_dir)
  logging.info('loading %s', folder)
  return models.load_pipeline(folder)


def check_prompts(pipe: models.Pipeline, prompts) -> None:
  """The digits model knows a closed vocabulary: an unknown word is an error, not noise."""
  if pipe.class_name == digits.PIPELINE_CLASS:
    for prompt in prompts:
      if prompt:
        dataset.check_prompt(prompt)


def initial_noise(pipe, seed: int, height: int, width: int) -> jax.Array:
  """(1, H/f, W/f, C) unit Gaussian noise for one image, from its seed alone."""
  f = pipeline.latent_factor(pipe)
  shape = (1, height // f, width // f, pipe.unet.config.in_channels)
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def main(argv):
  del argv
  config = _CONFIG.value
  run = runs.start(config, _WORKDIR.value)
  with run.timed('load'):
    pipe = pipeline.replicate(load(config))  # params on every device once, not per batch
  dh, dw = pipeline.default_image_size(pipe) if not (config.height and config.width) else (0, 0)
  height, width = config.height or dh, config.width or dw
  prompts, seeds = list(config.prompts), [int(s) for s in config.seeds]
  if not prompts or not seeds:
    raise ValueError('config.prompts and config.seeds must both be non-empty')
  check_prompts(pipe, prompts + [config.negative_prompt])
  jobs = [(p, s) for p in prompts for s in seeds]  # row-major: one row per prompt
  noise = {s: initial_noise(pipe, s, height, width) for s in seeds}
  batch_size = min(config.batch_size or len(jobs), len(jobs))
  logging.info('%d images (%d prompts x %d seeds) of %dx%d in batches of %d on %d device(s)',
               len(jobs), len(prompts), len(seeds), height, width, batch_size, jax.device_count())
  with run.timed('sampling'):
    images, timing = pipeline.generate(
        pipe, [p for p, _ in jobs], jnp.concatenate([noise[s] for _, s in jobs]),
        jax.random.key(0), batch_size, num_steps=config.num_steps,
        guidance=guidance.CFG(config.guidance_scale, config.guidance_rescale),
        # '' = no negative prompt: the pipeline's unconditional embedding (SDXL: zeros, as
        # diffusers' force_zeros_for_empty_prompt; SD: the empty prompt's, the same as '')
        negative_prompts=config.negative_prompt or None, sampler=config.sampler, eta=config.eta,
        height=height, width=width)

  per_row = config.prompts_per_row if len(prompts) % max(config.prompts_per_row, 1) == 0 else 1
  if per_row != config.prompts_per_row:
    logging.info('%d prompts do not split into rows of %d: one grid row per prompt', len(prompts),
                 config.prompts_per_row)
  per_row = max(per_row, 1)
  run.save_image('samples.png', grid(images, len(prompts) // per_row, per_row * len(seeds),
                                     config.grid_scale))
  run.save_npz('samples.npz', images=images, prompts=np.array([p for p, _ in jobs]),
               seeds=np.array([s for _, s in jobs]))
  run.finish({**timing, 'num_images': len(jobs), 'image_shape': list(images.shape[1:]),
              'height': height, 'width': width})


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
