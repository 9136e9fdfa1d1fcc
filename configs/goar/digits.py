r"""GOAR vs ROAR on the digits: the shipped classifier's attributions, SDEdit with the digits
diffusion model as GOAR's manifold projection.

    python launch/goar.py --config=configs/goar/digits.py --workdir=/tmp/goar_digits

Data: 1000 training and 300 test digits (random palette colours). Attributions explain the
shipped classifier (a CNN). Retrained: a ReLU MLP (256, 128) on the flattened pixels, Adam lr
1e-3, batch 64, 500 steps, 3 seeds (a CNN vmapped over parameters is slow on XLA:CPU:
`benchmarks/retrain_vmap.py`). ROAR removes 10-90% of the pixel channels
(per-channel mean); GOAR takes 4 steps of 4.0 in [-1, 1] pixel space (an image's norm is about
12) against the attribution, each followed by SDEdit (unconditional, strength 0.3, 20 DDIM steps:
6 denoising steps).
Arguments: `tiny` (the test setting).
"""

import ml_collections

from diffgeo_jax import config_files
from diffgeo_jax.xai import attributions

common = config_files.load('../common.py', __file__)


def get_config(arg=None):
  if arg not in (None, '', 'tiny'):
    raise ValueError(f'unknown config argument {arg!r}; supported: tiny')
  config = ml_collections.ConfigDict()
  config.task = 'digits'
  config.methods = attributions.METHODS
  config.pipeline_dir = ''    # '' = the shipped digits pipeline (the manifold projection)
  config.classifier_dir = ''  # '' = the shipped digits classifier (explained)
  config.data = ml_collections.ConfigDict(dict(num_train=1000, num_test=300, seed=0))
  config.attribution = common.attribution(batch=250)
  config.retrain = ml_collections.ConfigDict(dict(hidden=(256, 128), steps=500, batch_size=64,
                                                  learning_rate=1e-3, seeds=(0, 1, 2)))
  config.roar = common.roar()
  config.goar = ml_collections.ConfigDict(dict(step_size=4.0, levels=4, sdedit_strength=0.3,
                                               sdedit_steps=20, sdedit_batch=250, seed=0))
  config.rotation = False  # an image rotation would leave the diffusion model's manifold
  if arg == 'tiny':
    config.data.num_train = 40
    config.data.num_test = 20
    common.tiny_attribution(config.attribution)
    config.retrain.steps = 10
    config.retrain.seeds = (0, 1)
    config.roar.fractions = (0.5,)
    config.goar.levels = 1
    config.goar.sdedit_steps = 4
    config.goar.sdedit_strength = 0.5
    config.goar.sdedit_batch = 30
  return config
