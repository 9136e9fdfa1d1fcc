r"""Evaluate a digits text-to-image pipeline: digit and colour accuracy, Fréchet distance.

    python launch/evaluate.py --config=configs/digits/evaluate.py --workdir=/tmp/digits_eval \
      [--config.pipeline_dir=/tmp/digits_t2i/pipeline] [--config.guidance_scale=5.0]

`get_config('quick')` is the smoke-test setting (3 steps, one sample per prompt).
"""

import ml_collections

from diffgeo_jax.digits import dataset


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.pipeline_dir = ''  # a digits pipeline folder; '' = the shipped one (digits.pipeline_dir())
  config.classifier_dir = ''  # a classifier folder; '' = the shipped one (digits.classifier_dir())
  # Prompts: every (digit, colour) pair, `samples_per_prompt` images each (one grid row a prompt).
  config.digits = tuple(range(10))
  config.colours = dataset.COLOURS
  config.samples_per_prompt = 20
  config.sampler = 'ddim'  # ddim, ddpm, euler, dpmpp_2m
  config.num_steps = 50
  config.guidance_scale = 1.5  # as configs/sample/default.py for the digits model
  # DDIM's eta; unset: each sampler's own (ddim 0, ddpm 1; euler and dpmpp_2m take only 0)
  config.eta = ml_collections.config_dict.placeholder(float)
  config.seed = 0  # image i's initial noise is drawn from fold_in(key(seed), i)
  config.batch_size = 250  # images per compiled sampling call; 0: all at once
  config.classifier_batch_size = 256
  config.split_seed = dataset.SPLIT_SEED
  # Also write results.json into the pipeline folder (with its training.json): the shipped record.
  config.record_in_pipeline = False
  if arg == 'quick':
    config.num_steps = 3
    config.samples_per_prompt = 1
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; supported: quick')
  return config
