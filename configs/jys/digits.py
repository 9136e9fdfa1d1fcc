r"""JYS on the trained 8x8 digits-token model: classifier accuracy against NFE, uniform vs JYS.

    python launch/jys_search.py --config=configs/jys/digits.py --workdir=/tmp/jys_digits

The model is `diffgeo_jax/discrete/pretrained/digits` unless `model_dir` is set (a folder
written by launch/train_discrete.py). The search draws training-split digits (label token + 64
pixels) as the KLUB's data (the label is masked like any token there); sampling infills the
pixels given the label token (labels 0-9 in turn), and the shipped digits classifier reads the
decoded 8x8 images (upsampled to 16x16, white).
`get_config('quick')` is the test setting.
"""

from diffgeo_jax import config_files

common = config_files.load('../common.py', __file__)


def get_config(arg=None):
  return common.jys_search('digits', num_eval_samples=500, arg=arg)
