"""launch/jys_search.py on the quick toy config: its table and results agree with a direct
exact computation, and the schedules it writes are valid."""

import json
import os
import subprocess
import sys

import numpy as np

from configs.jys import toys
from diffgeo_jax.discrete import processes, samplers, toy
from tests import compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_quick_toys(tmp_path):
  workdir = str(tmp_path)
  config = toys.get_config('quick')
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch', 'jys_search.py'),
       f'--config={os.path.join(ROOT, "configs", "jys", "toys.py")}:quick',
       f'--workdir={workdir}'], capture_output=True, text=True, timeout=600, cwd=ROOT,
      env=compile_cache.env())
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in ('config.json', 'results.json', 'schedules.json', 'table.md', 'metric.png',
               'schedules.png'):
    assert os.path.exists(os.path.join(workdir, name)), name
  with open(os.path.join(workdir, 'results.json')) as f:
    full = json.load(f)
  res = full['metrics']
  assert full['config']['toys'] == list(config.toys) and 'search' in full['wall_s']
  v, length = config.vocab_size, config.length
  table = np.zeros((v,) * length)  # first_decides: x^i = x^1 for all i
  for a in range(v):
    table[(a,) * length] = 1.0 / v
  d = toy.ToyData(table)
  proc = processes.Absorbing(v)
  for n in config.nfes:
    uni = res['first_decides']['uniform'][str(n)]
    np.testing.assert_allclose(uni['kl'], toy.kl(d.probs, d.sampled_distribution(
        proc, samplers.uniform_times(n))), atol=1e-6)
    jys = res['first_decides']['jys'][str(n)]
    times = np.array(jys['times'])
    assert len(times) == n + 1 and np.all(np.diff(times) < 0)
    np.testing.assert_allclose(jys['kl'], toy.kl(d.probs, d.sampled_distribution(proc, times)),
                               atol=1e-6)
    for variant in ('uniform', 'jys', 'jys_compensator'):  # Theorem 3.1, exactly
      row = res['first_decides'][variant][str(n)]
      assert row['kl_from_true_start'] <= row['sum_cde'] + 1e-6, (variant, n, row)
    assert abs(res['independent']['jys'][str(n)]['kl']) < 1e-5
  bf = res['first_decides']['brute_force']['2']
  assert bf['kl'] <= res['first_decides']['uniform']['2']['kl'] + 1e-9
  with open(os.path.join(workdir, 'table.md')) as f:
    assert '| first_decides | 2 |' in f.read()


def _run_trained(task, tmp_path):
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch', 'jys_search.py'),
       f'--config={os.path.join(ROOT, "configs", "jys", task + ".py")}:quick',
       f'--workdir={tmp_path}'], capture_output=True, text=True, timeout=600, cwd=ROOT,
      env=compile_cache.env())
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(tmp_path, 'results.json')) as f:
    res = json.load(f)['metrics']
  with open(os.path.join(tmp_path, 'schedules.json')) as f:
    sched = json.load(f)['jys']
  return res, sched


def test_quick_countdown_on_the_shipped_model(tmp_path):
  res, sched = _run_trained('countdown', tmp_path)
  for n in ('2', '4'):
    times = np.array(sched[n])
    assert len(times) == int(n) + 1 and times[0] == 1.0 and times[-1] == 0.0
    assert np.all(np.diff(times) < 0)
  assert set(sched['2']) <= set(sched['4'])  # the hierarchy: NFE 2 is a level of NFE 4
  for method in ('euler', 'gillespie'):
    for variant in ('uniform', 'jys'):
      for n in ('2', '4'):
        row = res['samplers'][method][variant][n]
        assert row['nfe'] == int(n)  # schedules end at t = 0: no extra denoising call
        # the official checker skips about every other transition: it reports less
        assert 0 < row['error_rate_official_checker'] < row['error_rate'] <= 1
  # Even at quick settings (64 samples) the trained model makes fewer errors with more steps.
  assert (res['samplers']['euler']['uniform']['4']['error_rate'] <
          res['samplers']['euler']['uniform']['2']['error_rate'])


def test_quick_digits_on_the_shipped_model(tmp_path):
  res, sched = _run_trained('digits', tmp_path)
  for method in ('euler', 'gillespie'):
    for variant in ('uniform', 'jys'):
      for n in ('2', '4'):
        row = res['samplers'][method][variant][n]
        assert 0 <= row['accuracy'] <= 1 and 0 <= row['invalid_rate'] <= 1
        assert 0 < row['frechet_distance'] < np.inf
  assert len(sched['4']) == 5
  # Samples from the trained model read as their label far above chance (0.1), even at NFE 2.
  assert res['samplers']['euler']['uniform']['4']['accuracy'] > 0.4
  for name in ('accuracy.png', 'frechet_distance.png', 'schedules.png', 'table.md'):
    assert os.path.exists(os.path.join(tmp_path, name)), name
