r"""Train the digits denoiser: scikit-learn's 8x8 digits as 65 tokens (label, then 64 grey levels).

    python launch/train_discrete.py --config=configs/discrete/digits.py \
      --workdir=/tmp/discrete_digits

Conditional sampling is infilling: all MASK except position 0 = the label token (17 + digit).
The model is the Countdown one (hidden 64, 4 layers, 4 heads, MLP ratio 4, time-condition width
64; ~0.33M parameters, a 1.4 MB folder), for the same reason: steps matter more than width on 2
CPU cores (~0.12 s per step of batch 64). 4000 steps (8.2 min in all) are ~180 epochs of the 1438
train sequences; the random masks keep the train/test gap small: ELBO 1.261 train, 1.282 test
nats/token, masked accuracy 0.576 (an independent-pixel model scores 1.69 on the test split;
diffgeo_jax/discrete/pretrained/digits is this run).
`get_config('tiny')` is the test setting (seconds).
"""

import ml_collections

from diffgeo_jax import config_files

common = config_files.load('../common.py', __file__)


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.export_dir = ''  # if set, the trained model folder is written here

  # Fixed by the data: 17 grey levels + 10 label tokens, 1 + 64 positions; the train/test split
  # is `digits.dataset.split_indices(split_seed)`.
  config.data = ml_collections.ConfigDict(dict(name='digits', length=65, vocab_size=27,
                                               split_seed=0))
  config.model = common.discrete_transformer()
  config.process = common.absorbing_process()

  config.train = common.train(num_steps=4000, batch_size=64, learning_rate=3e-3, warmup_steps=100,
                              ema_decay=0.99, log_every=250, checkpoint_every=1000)
  # Held-out: the test split, each sequence scored under eval.repeats fixed noise draws (the
  # train split is scored the same way, to show the generalisation gap).
  config.eval = ml_collections.ConfigDict(dict(seed=0, repeats=8))
  if arg == 'tiny':  # tests: a tiny model and a few steps
    common.tiny_discrete_transformer(config.model)
    common.tiny_train(config.train)
    config.eval.repeats = 2
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; supported: tiny')
  return config
