r"""Resolution chromatography and time-dependent prompt composition on the digits model.

    python launch/chromatography.py --config=configs/chromatography/digits.py --workdir=/tmp/chrom

`get_config('quick')` is the smoke-test setting (3 steps, few samples and switch times).
"""

import ml_collections


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.pipeline_dir = ''  # a digits pipeline folder; '' = the shipped one
  config.classifier_dir = ''  # '' = the shipped classifier
  config.factors = (1, 2, 4, 8, 16)  # resolution factors m of the chromatograms
  config.plot_sd_schedule = True  # also the SD scaled-linear schedule (beta 0.00085 -> 0.012)
  # Prompt switching: sample with the first prompt while t > t_s, the second after.
  # colour: "a <c1> digit d" -> "a <c2> digit d"; digit: "a <c> digit d1" -> "a <c> digit d2".
  config.experiments = ('colour', 'digit')
  config.colour_pairs = (('red', 'blue'), ('green', 'yellow'), ('blue', 'white'),
                         ('yellow', 'red'), ('white', 'green'))
  config.digit_shift = 5  # digit d -> (d + shift) mod 10
  config.samples_per_case = 2  # per (digit, pair) and switch time
  # t_s: above the first grid timestep (981 for 50 DDIM steps) = only the second prompt; 0 = only
  # the first.
  config.switch_times = (995, 900, 800, 700, 600, 520, 460, 420, 380, 340, 300, 260, 220, 180,
                         140, 100, 50, 0)
  config.sampler = 'ddim'
  config.num_steps = 50
  config.guidance_scale = 1.5
  config.seed = 0
  config.grid_samples = 8  # columns of switch_<experiment>.png
  if arg == 'quick':
    config.num_steps = 3
    config.samples_per_case = 1
    config.colour_pairs = (('red', 'blue'),)
    config.switch_times = (995, 500, 0)
    config.grid_samples = 2
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; supported: quick')
  return config
