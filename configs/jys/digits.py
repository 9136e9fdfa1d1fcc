r"""JYS on the trained 8x8 digits-token model: classifier accuracy against NFE, uniform vs JYS.

    python launch/jys_search.py --config=configs/jys/digits.py --workdir=/tmp/jys_digits

The model is `diffgeo_jax/discrete/pretrained/digits` unless `model_dir` is set (a folder
written by launch/train_discrete.py). The search draws training-split digits (label token + 64
pixels) as the KLUB's data (the label is masked like any token there); sampling infills the
pixels given the label token (labels 0-9 in turn), and the shipped digits classifier reads the
decoded 8x8 images (upsampled to 16x16, white).
`get_config('quick')` is the test setting.
"""

import ml_collections


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.task = 'digits'
  config.model_dir = ''  # '' = the shipped model
  config.process_eps = 1e-3  # the log-linear schedule's eps the model was trained with
  config.nfes = (2, 4, 8, 16, 32)
  config.samplers = ('euler', 'tweedie', 'gillespie')
  config.num_samples = 256  # KLUB Monte Carlo batch (common random numbers)
  config.grid_size = 129  # the parallel search's time grid
  config.compensator = False  # the official estimator: no Girsanov compensator
  config.num_eval_samples = 500  # sequences sampled per (sampler, schedule, NFE)
  config.seed = 0
  if arg == 'quick':
    config.nfes = (2, 4)
    config.samplers = ('euler', 'gillespie')
    config.num_samples = 32
    config.grid_size = 17
    config.num_eval_samples = 64
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; supported: quick')
  return config
