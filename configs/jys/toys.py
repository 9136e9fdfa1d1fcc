r"""JYS on enumerable toys: exact KL(data || sampled) of JYS and uniform schedules.

    python launch/jys_search.py --config=configs/jys/toys.py --workdir=/tmp/jys_toys

Sequences of `length` tokens over `vocab_size` values with the exact denoiser (no model error), so
the only error is the compounding decoding error of parallel steps. (V + 1)^L must stay <= 5000
(dense exact propagation). `get_config('quick')` is the test setting.
"""

import ml_collections


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.task = 'toys'
  config.toys = ('countdown', 'sticky', 'first_decides', 'independent')
  config.vocab_size = 4
  config.length = 5
  config.nfes = (2, 4, 8, 16)
  config.num_samples = 512  # KLUB Monte Carlo batch (common random numbers)
  config.grid_size = 129  # the parallel search's time grid
  config.brute_force_points = 63  # NFE 2: exact KL over this many interior times
  config.cde = True  # exact CDE per step (Theorem 3.1 check)
  config.seed = 0
  if arg == 'quick':
    config.toys = ('first_decides', 'independent')
    config.vocab_size = 3
    config.length = 3
    config.nfes = (2, 4)
    config.num_samples = 128
    config.grid_size = 33
    config.brute_force_points = 7
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; supported: quick')
  return config
