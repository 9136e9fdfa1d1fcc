r"""Upsample guidance on the digits model: sample at twice its training resolution.

    python launch/upsample.py --config=configs/upsample/digits.py --workdir=/tmp/upsample

The digits model is trained at 16x16; this samples 32x32 (factor 2) every way in `variants` from
the same initial noise, and reads each 2x-downsampled sample with the digits classifier.
`get_config('quick')` is the smoke-test setting (2 steps, one prompt per digit).

Another pipeline folder (SD, SDXL; no classifier, no accuracies):

    python launch/upsample.py --config=configs/upsample/digits.py \
      --config.pipeline_dir=/ckpt/stable-diffusion-xl-base-1.0 \
      --config.prompts="('a photo of a cat',)" --config.eta=0.6 --config.guidance_scale=5.0 \
      --config.variants="('native', 'plain', 'guided')" --workdir=/tmp/upsample_sdxl
"""

import ml_collections

from diffgeo_jax.digits import dataset


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.pipeline_dir = ''  # a digits pipeline folder; '' = the shipped one
  config.classifier_dir = ''  # '' = the shipped classifier
  config.factor = 2  # sample at factor x the model's resolution
  # Another pipeline (SD, SDXL): its prompts here ('' / () = the digits grid below, digits model
  # only); eta 0.6 is the paper's setting for latent models.
  config.prompts = ()
  config.digits = tuple(range(10))
  config.colours = dataset.COLOURS
  config.samples_per_prompt = 2  # 100 images per variant
  config.sampler = 'ddim'
  config.num_steps = 50
  config.guidance_scale = 1.5  # classifier-free guidance, as the digits model's default
  config.seed = 0
  # Upsample guidance (arXiv 2404.01709): w_t = weight * H(t - (1 - eta) T); order relative to CFG.
  config.weight = 1.0
  config.eta = 1.0  # pixel models: the whole trajectory
  config.order = 'after'
  # Which runs to compare. native: the model at its own resolution from noise factor * D(x_T)
  # (the low-resolution view of the same x_T); plain: 32x32 without guidance; guided: with it;
  # no_time / no_power: guided without the time (tau = t) / power (P_t = 1) adjustment.
  config.variants = ('native', 'plain', 'guided', 'no_time', 'no_power')
  config.grid_prompts = 10  # rows of comparison.png: digit d in colour d mod 5, first sample
  config.grid_scale = 3
  if arg == 'quick':
    config.num_steps = 2
    config.samples_per_prompt = 1
    config.colours = ('red',)
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; supported: quick')
  return config
