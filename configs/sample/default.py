r"""Text-to-image sampling with launch/sample.py: one image per (prompt, seed).

    python launch/sample.py --config=configs/sample/default.py \
      --config.pipeline_dir=/path/to/stable-diffusion-v1-5 --config.num_steps=25 --workdir=/tmp/s

`get_config('quick')` gives a smoke-test setting (3 steps, one seed).
"""

import ml_collections


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  # A diffusers pipeline folder; '' means the embedded digits pipeline (not available yet).
  config.pipeline_dir = ''
  config.prompts = ('a handwritten digit 3', 'a handwritten digit 7')
  config.seeds = (0, 1, 2, 3)  # one grid column per seed; the seed fixes the initial noise
  config.negative_prompt = ''  # the unconditional prompt of classifier-free guidance
  config.sampler = 'ddim'  # ddim, ddpm, euler, dpmpp_2m
  config.num_steps = 50
  config.guidance_scale = 7.5
  config.guidance_rescale = 0.0
  config.eta = 0.0  # DDIM only
  config.height = 0  # 0: the model's default size
  config.width = 0
  config.batch_size = 0  # images per compiled call; 0: all at once
  if arg == 'quick':
    config.num_steps = 3
    config.seeds = (0,)
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; supported: quick')
  return config
