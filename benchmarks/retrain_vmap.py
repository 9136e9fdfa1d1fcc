r"""Retraining many classifiers (ROAR / GOAR): one vmapped, jit-compiled loop over stacked
parameters (`xai.retrain.train_many`) against the same training run model by model
(`xai.retrain.train_one`, jit-compiled once, called M times), on the same data and keys.

    python benchmarks/retrain_vmap.py                       # every task, M = 15 and 75
    python benchmarks/retrain_vmap.py --task=digits_cnn --models=4,15

Tasks: `synthetic` (the GOAR synthetic config's MLP (64, 64) on 2000 x 20 samples, 500 steps of
batch 64), `digits` (the digits config's MLP (256, 128) on 1000 flattened 16x16x3 images, 500
steps of batch 64) and `digits_cnn` (a small CNN of the digits classifier's family, channels
(8, 16), 32 features, 50 steps of batch 64: why the digits config retrains an MLP). Timings exclude compilation (each path runs once first;
its compile + first-run time is reported separately). The vmapped and sequential parameters are
compared (max abs difference) so the two do the same work.
"""

from __future__ import annotations

import json
import platform
import time

import jax
import numpy as np
from absl import app, flags

from diffgeo_jax.digits import classifier as classifier_lib
from diffgeo_jax.xai import retrain

_TASK = flags.DEFINE_enum('task', 'all', ['all', 'synthetic', 'digits', 'digits_cnn'],
                          'Which task.')
_MODELS = flags.DEFINE_list('models', ['15', '75'], 'Numbers of models M.')


def setup(task: str, m: int):
  rng = np.random.default_rng(0)
  if task == 'synthetic':
    model = retrain.MLP(hidden=(64, 64), num_classes=2)
    x = rng.standard_normal((m, 2000, 20)).astype(np.float32)
    y = (x[..., 0] > 0).astype(np.int32)
    kw = dict(steps=500, batch_size=64, learning_rate=3e-3)
  else:
    x = rng.uniform(-1, 1, (m, 1000, 16, 16, 3)).astype(np.float32)
    y = rng.integers(0, 10, (m, 1000)).astype(np.int32)
    if task == 'digits':
      model = retrain.MLP(hidden=(256, 128), num_classes=10)
      kw = dict(steps=500, batch_size=64, learning_rate=1e-3)
    else:
      model = classifier_lib.Classifier(classifier_lib.ClassifierConfig(channels=(8, 16),
                                                                        features=32))
      kw = dict(steps=50, batch_size=64, learning_rate=1e-3)
  return model, x, y, jax.random.split(jax.random.key(0), m), kw


def timed(fn):
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - t0


def run(task: str, m: int) -> dict:
  model, x, y, keys, kw = setup(task, m)
  _, first_many = timed(lambda: retrain.train_many(model, x, y, keys, **kw))
  many, t_many = timed(lambda: retrain.train_many(model, x, y, keys, **kw))
  _, first_one = timed(lambda: retrain.train_one(model, x[0], y[0], keys[0], **kw))
  seq, t_seq = timed(lambda: [retrain.train_one(model, x[i], y[i], keys[i], **kw)
                              for i in range(m)])
  diff = max(float(np.max(np.abs(np.asarray(a)[i] - np.asarray(b))))
             for i in range(m)
             for a, b in zip(jax.tree.leaves(many), jax.tree.leaves(seq[i])))
  return {'task': task, 'models': m, 'vmapped_s': round(t_many, 3),
          'sequential_s': round(t_seq, 3), 'speedup': round(t_seq / t_many, 2),
          'vmapped_compile_and_first_s': round(first_many, 2),
          'sequential_compile_and_first_s': round(first_one, 2),
          'max_abs_param_diff': diff}


def main(argv):
  del argv
  tasks = ['synthetic', 'digits', 'digits_cnn'] if _TASK.value == 'all' else [_TASK.value]
  print(json.dumps({'jax': jax.__version__, 'backend': jax.default_backend(),
                    'devices': str(jax.devices()), 'cpu_count': __import__('os').cpu_count(),
                    'machine': platform.machine()}))
  for task in tasks:
    for m in (int(v) for v in _MODELS.value):
      print(json.dumps(run(task, m)), flush=True)


if __name__ == '__main__':
  app.run(main)
