"""launch/train_discrete.py with the tiny configs (Countdown and digits), as a user runs it: the
results it reports are recomputed from the model folder it wrote."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs.discrete import countdown as countdown_config
from configs.discrete import digits as digits_config
from diffgeo_jax.digits import digit_tokens
from diffgeo_jax.discrete import data, processes
from diffgeo_jax.discrete import model as model_lib
from tests import compile_cache
from launch import train_discrete

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = {'countdown': countdown_config, 'digits': digits_config}


def _train(tmp_path, name, *flags):
  work = tmp_path / 'work'
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch', 'train_discrete.py'),
       f'--config={os.path.join(ROOT, "configs", "discrete", name + ".py")}:tiny',
       f'--workdir={work}', *flags],
      capture_output=True, text=True, timeout=300, env=compile_cache.env(),
      cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return work, json.loads((work / 'results.json').read_text())['metrics']


@pytest.mark.parametrize('name', ['countdown', 'digits'])
def test_tiny_run_writes_a_model_that_reproduces_its_results(tmp_path, name):
  export = tmp_path / 'export'
  work, results = _train(tmp_path, name, f'--config.export_dir={export}')
  config = CONFIGS[name].get_config('tiny')
  run = json.loads((work / 'results.json').read_text())
  assert results['data'] == name and 'train_discrete.py' in run['command']
  assert run['config']['data']['name'] == name and run['runtime']['processes'] == 1
  assert results['training']['steps'] == 20 and np.isfinite(results['training']['final_loss'])
  assert results['process'] == {'name': 'absorbing', 'schedule': 'loglinear', 'eps': 1e-3,
                                't_min': 1e-3}
  held = results['heldout']
  assert held['repeats'] == 2 and 0.3 < held['masked_fraction'] < 0.7
  v = config.data.vocab_size
  assert 0 < held['elbo'] < 2 * np.log(v) and 0 <= held['masked_accuracy'] <= 1
  # The folder in the workdir and its export are the same, and carry the metrics.
  for folder in (work / 'model', export):
    for f in ('config.json', 'model.safetensors', 'results.json'):
      assert (folder / f).is_file(), (folder, f)
    assert model_lib.read_results(str(folder)) == results
  model, params, mconfig = model_lib.load(str(export))
  assert (mconfig.vocab_size, mconfig.length) == (v, config.data.length)
  assert mconfig.hidden == config.model.hidden and results['parameters'] == (
      model_lib.num_parameters(params))
  # The saved weights give the reported held-out numbers exactly (same data, same noise draws).
  job = train_discrete.Job(config)
  tokens = job.heldout_tokens()
  process = processes.Absorbing(v, processes.LogLinear(1e-3))
  again = train_discrete.evaluate(model, params, tokens, process, 1e-3, config.eval.seed,
                                  config.eval.repeats, bayes=name == 'countdown')
  for k in ('elbo', 'masked_ce', 'masked_accuracy', 'masked_fraction'):
    np.testing.assert_allclose(again[k], held[k], rtol=1e-6, err_msg=k)
  if name == 'countdown':
    assert len(tokens) == config.eval.num_sequences == held['sequences']
    bayes = held['bayes']
    assert bayes['masked_accuracy'] > held['masked_accuracy']  # 20 steps are far from Bayes
    assert results['entropy_per_token'] == pytest.approx(
        data.countdown_entropy(config.data.length, v) / config.data.length)
    assert abs(bayes['elbo'] - results['entropy_per_token']) < 0.25  # ELBO of the truth ~ H
  else:
    assert len(tokens) == held['sequences'] == len(digit_tokens.load('test')[0])
    assert results['train']['sequences'] == len(digit_tokens.load('train')[0])


def test_batches_are_deterministic_and_digits_use_the_train_split():
  job = train_discrete.Job(digits_config.get_config('tiny'))
  a, b = job.batch_fn(3), job.batch_fn(3)
  np.testing.assert_array_equal(a['tokens'], b['tokens'])
  assert not np.array_equal(a['tokens'], job.batch_fn(4)['tokens'])
  train = {r.tobytes() for r in digit_tokens.load('train')[0]}
  assert all(r.tobytes() in train for r in a['tokens'])
  cd = train_discrete.Job(countdown_config.get_config('tiny'))
  x = cd.batch_fn(0)['tokens']
  assert x.shape == (16, 16) and data.countdown_errors(x) == 0.0
  # The held-out set is no training batch's.
  assert not any(np.array_equal(cd.heldout_tokens()[:16], cd.batch_fn(i)['tokens'])
                 for i in range(5))


def test_wrong_digits_sizes_are_refused():
  config = digits_config.get_config('tiny')
  config.data.length = 64
  with pytest.raises(ValueError, match='digits sequences have config.data.length=65'):
    train_discrete.Job(config)
  config = countdown_config.get_config('tiny')
  config.data.name = 'text'
  with pytest.raises(ValueError, match="config.data.name must be one of"):
    train_discrete.Job(config)


@pytest.mark.parametrize('name', model_lib.PRETRAINED)
def test_shipped_models_load_and_match_their_reported_heldout_numbers(name):
  folder = model_lib.pretrained_dir(name)
  model, params, mconfig = model_lib.load(folder)
  results = model_lib.read_results(folder)
  config = CONFIGS[name].get_config()
  assert results['data'] == name and results['training']['steps'] == config.train.num_steps
  assert results['training']['resumed_from_step'] == 0
  assert (mconfig.vocab_size, mconfig.length, mconfig.hidden) == (
      config.data.vocab_size, config.data.length, config.model.hidden)
  # A quarter of the held-out set under 2 of the 8 noise draws (the exact reproduction by a saved
  # folder is the tiny run's test): the same numbers up to Monte Carlo error.
  tokens = train_discrete.Job(config).heldout_tokens()[::4]
  process = processes.Absorbing(mconfig.vocab_size, processes.LogLinear(results['process']['eps']))
  held = results['heldout']
  again = train_discrete.evaluate(model, params, tokens, process, results['process']['t_min'],
                                  config.eval.seed, 2)
  assert abs(again['elbo'] - held['elbo']) < 0.1 * held['elbo']
  assert abs(again['masked_accuracy'] - held['masked_accuracy']) < 0.03
  if name == 'countdown':  # near the Bayes limit of the same noisy batches
    assert held['elbo'] < held['bayes']['elbo'] + 0.03
    assert held['masked_accuracy'] > held['bayes']['masked_accuracy'] - 0.015
  else:  # far better than independent pixels (1.69 nats/token), small generalisation gap
    assert held['elbo'] < 1.35 and held['elbo'] - results['train']['elbo'] < 0.05
  with pytest.raises(ValueError, match=r"name must be one of \('countdown', 'digits'\)"):
    model_lib.pretrained_dir('text')
