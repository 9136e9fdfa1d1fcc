r"""Ahead-of-time TPU compilation of the library's jobs (launch/tpu_compile.py).

    python launch/tpu_compile.py --config=configs/tpu_compile/default.py \
      --config.topology=v5e:2x4 --config.model=sd15 --config.job=duo --workdir=/tmp/aot
    python launch/tpu_compile.py --config=configs/tpu_compile/default.py:tiny --workdir=/tmp/t

`topology`, `model`, `job`, `dtype`, `remat` and `attention` take comma-separated lists (every
combination is compiled); `job=all` is every job. Models: tiny, digits, sd15, sd21, sdxl (shapes
only, no weights).
Topologies: '<chip>:<shape>' for chip v4, v5e, v5p, v6e (e.g. v5e:2x2, v5e:4x4, v4:2x2x2,
v5p:2x2x1, v6e:2x4). The training jobs' settings are their binaries' configs (the paper's batch,
LoRA rank and targets), per model: `duo.sd` is configs/duo/sd14.py, `lora.sd`
configs/decor/sd15.py, `train_t2i.<digits|tiny>` configs/digits/t2i.py.
Arguments: `tiny` (the test setting: the tiny model, small JYS/GOAR sizes).
"""

import ml_collections

from diffgeo_jax import config_files

common = config_files.load('../common.py', __file__)


def _config(relative: str, arg=None) -> ml_collections.ConfigDict:
  return config_files.get_config(f'../{relative}', __file__, arg)


def get_config(arg=None):
  if arg not in (None, '', 'tiny'):
    raise ValueError(f'unknown config argument {arg!r}; supported: tiny')
  config = ml_collections.ConfigDict()
  config.topology = 'v5e:2x4'
  config.model = 'sd15'
  config.job = 'all'
  config.dtype = 'bfloat16'  # activations ('float32' | 'bfloat16'; frozen weights follow)
  config.remat = 'false'  # 'false' | 'true' | 'false,true'
  # 'softmax' (the library's default) | 'flash' (the Pallas TPU kernel for SD's self-attention)
  config.attention = 'softmax'
  config.model_axis = 1  # FSDP axis size for the training jobs (more where the batch needs it)
  # XLA's effort in [-1, 1] (0: the default a TPU job compiles with). -1 compiles 1.6-16x faster
  # in a third of the host memory, for estimates of a less optimised program (HBM 1-29% lower on
  # SD-1.5; the table marks such rows).
  config.exec_time_optimization_effort = 0.0

  config.sample = ml_collections.ConfigDict(dict(batch_per_chip=1, num_steps=50, sampler='ddim'))
  # One pullback iteration with k = 10 (the directions in chunks of chunk_size; 0 = all).
  config.explore = ml_collections.ConfigDict(dict(num_vectors=10, chunk_size=0,
                                                  samples_per_chip=1))
  config.train_t2i_batch_per_chip = 1
  sd_train = ml_collections.ConfigDict()
  # diffusers' train_text_to_image.py
  sd_train.train = common.train(learning_rate=1e-5, ema_decay=0.9999)
  config.train_t2i = ml_collections.ConfigDict(dict(
      sd=sd_train, digits=_config('digits/t2i.py'), tiny=_config('digits/t2i.py', 'tiny')))
  config.duo = ml_collections.ConfigDict(dict(
      sd=_config('duo/sd14.py'), digits=_config('duo/digits.py'),
      tiny=_config('duo/digits.py', 'tiny')))
  config.lora = ml_collections.ConfigDict(dict(
      sd=_config('decor/sd15.py'), digits=_config('decor/digits.py'),
      tiny=_config('decor/digits.py', 'tiny')))
  jys = _config('jys/countdown.py')
  config.jys = ml_collections.ConfigDict(dict(num_samples=jys.num_samples,
                                              grid_size=jys.grid_size, max_rows=1024,
                                              process_eps=jys.process_eps))
  goar = _config('goar/digits.py')
  config.goar = ml_collections.ConfigDict(dict(
      hidden=tuple(goar.retrain.hidden), steps=goar.retrain.steps,
      batch_size=goar.retrain.batch_size, learning_rate=goar.retrain.learning_rate,
      seeds=len(goar.retrain.seeds), levels=len(goar.roar.fractions),
      num_train=goar.data.num_train, num_test=goar.data.num_test))
  if arg == 'tiny':
    config.topology = 'v5e:2x2'
    config.model = 'tiny'
    config.dtype = 'float32'
    config.sample.num_steps = 4
    config.explore.num_vectors = 3
    config.jys.num_samples = 16
    config.jys.grid_size = 9
    config.jys.max_rows = 64
    config.goar.hidden = (16,)
    config.goar.steps = 4
    config.goar.seeds = 1
    config.goar.levels = 1
    config.goar.num_train = 32
    config.goar.num_test = 8
  return config
