r"""JYS on the trained Countdown model: token error rate against NFE, uniform vs JYS, per sampler.

    python launch/jys_search.py --config=configs/jys/countdown.py --workdir=/tmp/jys_countdown

The model is `diffgeo_jax/discrete/pretrained/countdown` unless `model_dir` is set (a folder
written by launch/train_discrete.py). The search draws Countdown sequences as the KLUB's data.
`get_config('quick')` is the test setting.
"""

import ml_collections


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.task = 'countdown'
  config.model_dir = ''  # '' = the shipped model
  config.process_eps = 1e-3  # the log-linear schedule's eps the model was trained with
  config.nfes = (2, 4, 8, 16, 32)
  config.samplers = ('euler', 'tweedie', 'gillespie')
  config.num_samples = 256  # KLUB Monte Carlo batch (common random numbers)
  config.grid_size = 129  # the parallel search's time grid
  config.compensator = False  # the official estimator: no Girsanov compensator
  config.num_eval_samples = 1024  # sequences sampled per (sampler, schedule, NFE)
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
