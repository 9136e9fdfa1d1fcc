r"""Text-to-image sampling with launch/sample.py: one image per (prompt, seed).

    python launch/sample.py --config=configs/sample/default.py --workdir=/tmp/s   # digits model
    python launch/sample.py --config=configs/sample/default.py \
      --config.pipeline_dir=/path/to/stable-diffusion-v1-5 --config.prompts="('a red apple',)" \
      --config.num_steps=25 --config.guidance_scale=7.5 --workdir=/tmp/s

By default: the embedded digits model, every digit in every colour (one grid row per prompt).

`get_config('quick')` gives a smoke-test setting (3 steps, one seed).
"""

import ml_collections

from diffgeo_jax.digits import dataset


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  # A diffusers pipeline folder; '' means the embedded digits pipeline.
  config.pipeline_dir = ''
  config.prompts = tuple(dataset.caption(d, c) for d in range(10)
                         for c in range(len(dataset.COLOURS)))
  config.seeds = (0, 1, 2, 3)  # one grid column per seed; the seed fixes the initial noise
  # The unconditional prompt of classifier-free guidance; '' = none: the pipeline's unconditional
  # embedding (the empty prompt's; SDXL: zeros, diffusers' force_zeros_for_empty_prompt).
  config.negative_prompt = ''
  config.sampler = 'ddim'  # ddim, ddpm, euler, dpmpp_2m
  config.num_steps = 50
  config.guidance_scale = 1.5  # the digits model's default (README: the trade-off); SD's is 7.5
  config.guidance_rescale = 0.0
  # DDIM's eta; unset: each sampler's own (ddim 0, ddpm 1; euler and dpmpp_2m take only 0)
  config.eta = ml_collections.config_dict.placeholder(float)
  config.height = 0  # 0: the model's default size
  config.width = 0
  config.batch_size = 0  # images per compiled call; 0: all at once
  # Grid layout: this many consecutive prompts share a grid row (each with one column per seed);
  # 5 puts each digit's five colours on one row. 1: one row per prompt.
  config.prompts_per_row = len(dataset.COLOURS)
  config.grid_scale = 2  # pixel repetition, so 16x16 images are visible
  if arg == 'quick':
    config.num_steps = 3
    config.seeds = (0,)
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; supported: quick')
  return config
