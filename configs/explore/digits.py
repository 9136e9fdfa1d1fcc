r"""Latent geometry of a text-to-image model with launch/explore.py (default: the digits model).

    python launch/explore.py --config=configs/explore/digits.py --workdir=/tmp/explore
    python launch/explore.py --config=configs/explore/digits.py \
      --config.pipeline_dir=/path/to/sd-folder --config.prompts="('a photo of a dog',)" \
      --config.num_vectors=5 --workdir=/tmp/explore_sd

`get_config('quick')` is the test setting (few steps, two samples).
"""

import ml_collections


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.pipeline_dir = ''  # a diffusers pipeline folder; '' = the embedded digits model
  config.classifier_dir = ''  # digits only: the classifier that checks edits keep the digit
  # Samples: every prompt with every seed (the seed fixes x_T).
  config.prompts = ('a red digit three', 'a green digit seven')
  config.seeds = (0, 1, 2, 3)
  config.num_steps = 50  # DDIM steps of the generating trajectory
  config.guidance_scale = 1.5
  # Timesteps (fractions of T, official `edit_t` convention) where bases are computed.
  config.times = (0.9, 0.7, 0.5, 0.3, 0.1)
  # Local basis (Jacobian subspace iteration of d h / d x_t, h = U-Net mid-block output).
  config.num_vectors = 8
  config.num_iters = 30
  config.tol = 1e-3
  config.chunk_size = 0  # directions per JVP/VJP batch; 0 = all at once
  config.psd_cutoff = 2.0  # low-frequency = radius < cutoff (cycles per image)
  # x-space guidance edits along the top latent direction at `edit_time`.
  config.edit_time = 0.7
  config.edit_gammas = (-0.6, -0.2, 0.0, 0.2, 0.6)
  config.edit_guidance_steps = 16
  config.small_gamma = 0.2  # |gamma| at which the edited digit should still read as the prompt's
  if arg == 'quick':
    config.seeds = (0,)
    config.num_steps = 10
    config.times = (0.9, 0.3)
    config.num_vectors = 3
    config.num_iters = 5
    config.edit_guidance_steps = 2
    config.edit_gammas = (-0.2, 0.0, 0.2)
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; supported: quick')
  return config
