r"""JYS on the trained Countdown model: token error rate against NFE, uniform vs JYS, per sampler.

    python launch/jys_search.py --config=configs/jys/countdown.py --workdir=/tmp/jys_countdown

The model is `diffgeo_jax/discrete/pretrained/countdown` unless `model_dir` is set (a folder
written by launch/train_discrete.py). The search draws Countdown sequences as the KLUB's data.
`get_config('quick')` is the test setting.
"""

from diffgeo_jax import config_files

common = config_files.load('../common.py', __file__)


def get_config(arg=None):
  return common.jys_search('countdown', num_eval_samples=1024, arg=arg)
