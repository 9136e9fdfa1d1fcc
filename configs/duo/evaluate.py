r"""Evaluate DUO runs on the digits model (defence, attack, preservation; a beta sweep as a plot).

    python launch/evaluate_unlearning.py --config=configs/duo/evaluate.py \
      --config.runs=/tmp/duo_b100,/tmp/duo_b250 --workdir=/tmp/duo_eval

`runs`: comma-separated `launch/train_duo.py` workdirs. The attack follows the third-party reading
of Concept Inversion's settings in the DUO appendix (Adam lr 5e-3, batch 4), with fewer steps.
`get_config('quick')` is the test setting.
"""

import ml_collections


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.runs = ''
  config.pipeline_dir = ''
  config.classifier_dir = ''
  config.concept = 'eight'
  config.eval = ml_collections.ConfigDict(dict(
      concept_samples=50, samples_per_digit=10, num_steps=30, guidance_scale=1.5, seed=0))
  config.attack = ml_collections.ConfigDict(dict(steps=500, learning_rate=5e-3, batch_size=4,
                                                 seed=1))
  if arg == 'quick':
    config.eval.concept_samples = 4
    config.eval.samples_per_digit = 1
    config.eval.num_steps = 10  # as configs/duo/digits.py:tiny's evaluation
    config.attack.steps = 5
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; supported: quick')
  return config
