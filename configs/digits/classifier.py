r"""Train the digits evaluator: a small CNN digit classifier (colour-invariant).

    python launch/train_classifier.py --config=configs/digits/classifier.py \
      --workdir=/tmp/digits_classifier

`get_config('tiny')` is the test setting (seconds). The shipped evaluator
(`diffgeo_jax/digits/classifier/`) is this config's output, exported with `--config.export_dir`.
"""

import ml_collections

from diffgeo_jax import config_files

common = config_files.load('../common.py', __file__)


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.export_dir = ''  # if set, the trained classifier folder is written here

  config.model = ml_collections.ConfigDict(dict(channels=(16, 32), features=64, num_classes=10))
  # Augmentation, drawn per step from (seed, step): every batch row gets a palette colour or, with
  # `random_colour_prob`, a random colour (max channel 1, so digits of unseen colours still read);
  # then a brightness factor in [min_brightness, 1], a shift of up to `max_shift` pixels each way
  # (the canvas is padded with background, nothing wraps around) and Gaussian pixel noise of a
  # standard deviation drawn in [0, max_noise_std].
  config.data = ml_collections.ConfigDict(dict(
      split_seed=0, random_colour_prob=0.5, min_brightness=0.6, max_shift=1, max_noise_std=0.1))

  config.train = common.train(num_steps=1500, batch_size=64, learning_rate=3e-3, warmup_steps=50,
                              weight_decay=1e-4, ema_decay=0.99, log_every=100,
                              checkpoint_every=500)
  config.eval = ml_collections.ConfigDict(dict(batch_size=512))
  if arg == 'tiny':  # tests: a tiny model and a few steps
    config.model.channels = (8, 8)
    config.model.features = 16
    common.tiny_train(config.train, num_steps=100, batch_size=32, warmup_steps=10, log_every=25,
                      checkpoint_every=50)
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; supported: tiny')
  return config
