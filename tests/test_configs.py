"""The config files: every one reads (with each argument it documents) without importing optax,
orbax or the trainer; the shared blocks of configs/common.py refuse a field they do not have."""

import glob
import json
import os
import subprocess
import sys

import pytest

from diffgeo_jax import config_files
from diffgeo_jax.training import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, 'configs', '*', '*.py'))
                 if not p.endswith('__init__.py'))
common = config_files.load('configs/common.py', os.path.join(ROOT, 'x'))

_READ_ALL = r'''
import json, os, sys
from diffgeo_jax import config_files
read = {}
for p in sys.argv[1:]:
  module = config_files.load(os.path.basename(p), p)
  read[p] = module.get_config().to_json_best_effort() is not None
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('optax', 'orbax')
               or m == 'diffgeo_jax.training.trainer')
print(json.dumps({'read': read, 'heavy': heavy}))
'''


def test_every_config_reads_without_the_training_stack():
  proc = subprocess.run([sys.executable, '-c', _READ_ALL, *CONFIGS], capture_output=True,
                        text=True, timeout=300, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert len(out['read']) == len(CONFIGS) >= 20 and all(out['read'].values())
  assert out['heavy'] == []


def test_common_blocks_are_the_library_defaults_with_overrides():
  block = common.train(num_steps=7, learning_rate=2e-3)
  want = trainer.default_train_config()
  want.update(num_steps=7, learning_rate=2e-3)
  assert block.to_dict() == want.to_dict()
  lora = common.lora_train(num_steps=3)
  assert (lora.schedule, lora.warmup_steps, lora.ema_decay, lora.batch_size, lora.num_steps) == (
      'constant', 0, 0.0, 4, 3)
  with pytest.raises(ValueError, match=r"train has no fields \['num_step'\]"):
    common.train(num_step=7)


def test_a_missing_config_file_names_the_path():
  with pytest.raises(FileNotFoundError, match='no config file .*nothing.py'):
    config_files.load('nothing.py', os.path.join(ROOT, 'configs', 'x.py'))
