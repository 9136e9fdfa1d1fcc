r"""GOAR vs ROAR on OpenXAI-style synthetic data (Gaussian clusters with known feature weights).

    python launch/goar.py --config=configs/goar/synthetic.py --workdir=/tmp/goar_synthetic

Data: 20 features, 10 clusters of 200 training and 50 test samples, centres 5 apart on the axes,
masks Bernoulli(0.5) (`xai.synthetic`). The original classifier and every retrained one: a ReLU
MLP (64, 64), Adam lr 3e-3, batch 64 (the original: 2000 steps; retrained: 500). ROAR removes
10-90% of the features (training mean); GOAR takes 5 steps of 0.1 with no projection (the data
have full support). The step matters: the steps are label-dependent (each sample loses evidence
for its own class), so once the total displacement passes the class margin the two classes swap
sides and the retrained model learns the swapped rule (measured in README: steps of 0.25 and 0.75
peak and fall again). 3 seeds; then the same after a random rotation.
Arguments: `tiny` (the test setting: seconds).
"""

import ml_collections

from diffgeo_jax import config_files
from diffgeo_jax.xai import attributions

common = config_files.load('../common.py', __file__)


def get_config(arg=None):
  if arg not in (None, '', 'tiny'):
    raise ValueError(f'unknown config argument {arg!r}; supported: tiny')
  config = ml_collections.ConfigDict()
  config.task = 'synthetic'
  config.methods = attributions.METHODS
  config.data = ml_collections.ConfigDict(dict(
      num_per_cluster=200, test_per_cluster=50, dims=20, num_clusters=10, distance=5.0,
      sparsity=0.5, seed=0))
  config.classifier = ml_collections.ConfigDict(dict(hidden=(64, 64), steps=2000, batch_size=64,
                                                     learning_rate=3e-3, seed=0))
  config.attribution = common.attribution(batch=1024)
  config.retrain = ml_collections.ConfigDict(dict(hidden=(64, 64), steps=500, batch_size=64,
                                                  learning_rate=3e-3, seeds=(0, 1, 2)))
  config.roar = common.roar()
  config.goar = ml_collections.ConfigDict(dict(step_size=0.1, levels=5))
  config.rotation = True
  config.rotation_seed = 0
  if arg == 'tiny':
    config.data.num_per_cluster = 20
    config.data.test_per_cluster = 10
    config.data.num_clusters = 4
    config.data.dims = 6
    config.classifier.steps = 50
    config.retrain.steps = 20
    config.retrain.seeds = (0, 1)
    common.tiny_attribution(config.attribution)
    config.roar.fractions = (0.3, 0.7)
    config.goar.levels = 2
  return config
