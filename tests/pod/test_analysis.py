"""The analysis binaries on several hosts: launch/goar.py and launch/jys_search.py as 2 processes x
2 CPU devices finish and write the metrics that one process on one device writes (the JYS pod run
writes to gs://, a local GCS emulator, as on a real pod).

Their parallel work is split over all 4 devices (GOAR: attributions over samples and the
retrained classifiers over models; JYS: the search's grid passes over grid times), so these
runs check that every device's share comes back to every process in order, padding dropped.
"""

import json
import os
import sys

import numpy as np

from diffgeo_jax import paths
from tests import gcs, multihost, report

ROOT = multihost.ROOT


def _numbers(a, b, where=''):
  """The largest |a - b| over two results trees, which must have the same keys, lengths and
  non-numeric leaves."""
  if isinstance(a, dict):
    assert isinstance(b, dict) and set(a) == set(b), (where, sorted(a), sorted(b))
    return max([_numbers(a[k], b[k], f'{where}/{k}') for k in a], default=0.0)
  if isinstance(a, list):
    assert isinstance(b, list) and len(a) == len(b), (where, a, b)
    return max([_numbers(x, y, f'{where}[{i}]') for i, (x, y) in enumerate(zip(a, b))],
               default=0.0)
  if isinstance(a, (int, float)) and not isinstance(a, bool):
    assert isinstance(b, (int, float)), (where, a, b)
    return 0.0 if a == b else float(abs(a - b))  # also equal infinities
  assert a == b, (where, a, b)
  return 0.0


def _one_and_two(argv, tmp_path, workdir_2=None, env=None, timeout=240):
  """results.json of one process x 1 device and of 2 processes x 2 devices (one workdir for the
  two processes, default tmp_path/p2: only process 0 writes), and the two workdirs."""
  env = env or {}  # multihost.launch adds the run's compilation cache
  workdirs = {1: tmp_path / 'p1', 2: paths.resolve(workdir_2 or tmp_path / 'p2')}
  out = {}
  for n, per in ((1, 1), (2, 2)):
    procs = multihost.launch([*argv, f'--workdir={workdirs[n]}'], n, flags=n > 1,
                             devices_per_process=per, timeout=timeout, env=env)
    assert all(p.returncode == 0 for p in procs), multihost.report(procs)
    report.record(f'wall_s_{n}_process', round(max(p.seconds for p in procs), 1))
    out[n] = json.loads((workdirs[n] / 'results.json').read_text())
    assert out[n]['runtime']['processes'] == n and out[n]['runtime']['devices'] == n * per
  return out[1], out[2], workdirs[1], workdirs[2]


def test_goar_on_two_processes_matches_one(tmp_path):
  argv = [sys.executable, os.path.join(ROOT, 'launch', 'goar.py'),
          f'--config={os.path.join(ROOT, "configs", "goar", "synthetic.py")}:tiny',
          '--config.rotation=False', "--config.methods=('gradient', 'smoothgrad', 'random')"]
  one, two, _, work2 = _one_and_two(argv, tmp_path)
  # 3 methods x 2 levels x 2 seeds = 12 classifiers per metric, split over 4 devices (3 each),
  # and the attributions of 80 training and 40 test samples (smoothgrad and random: a key per
  # sample) split over them too: the same accuracies, ground-truth scores and rankings.
  # Measured: bit-identical on XLA:CPU; allowed: 1e-6 (float reassociation).
  diff = _numbers(one['metrics'], two['metrics'])
  report.record('goar_max_abs_diff', diff)
  assert diff <= 1e-6, diff
  acc = np.asarray(two['metrics']['original']['goar']['accuracy'])
  assert acc.shape == (3, 2, 2) and 0 < acc.mean() < 1
  assert (work2 / 'curves.png').is_file()


def test_jys_search_on_two_processes_matches_one(tmp_path):
  argv = [sys.executable, os.path.join(ROOT, 'launch', 'jys_search.py'),
          f'--config={os.path.join(ROOT, "configs", "jys", "toys.py")}:quick']
  with gcs.Emulator(buckets=('diffgeo-test',)) as emulator:
    one, two, work1, work2 = _one_and_two(argv, tmp_path, 'gs://diffgeo-test/jys',
                                          env=emulator.env({}))
    assert emulator.ls('diffgeo-test/jys') == [
        'config.json', 'metric.png', 'results.json', 'schedules.json', 'schedules.png',
        'table.md']
    s1, s2 = (json.loads((w / 'schedules.json').read_text()) for w in (work1, work2))
  # 33 grid times split 9 + 9 + 9 + 6 (+ 3 padding) over the 4 devices: the same schedules
  # (grid points: exactly) and the same exact KL of each. Measured: bit-identical; allowed 1e-6.
  diff = _numbers(one['metrics'], two['metrics'])
  report.record('jys_max_abs_diff', diff)
  assert diff <= 1e-6, diff
  assert s1 == s2
  times = np.asarray(two['metrics']['first_decides']['jys']['4']['times'])
  assert len(times) == 5 and np.all(np.diff(times) < 0)
  np.testing.assert_allclose(times * 32, np.round(times * 32))  # points of the 33-point grid
  assert two['metrics']['first_decides']['uniform']['4']['kl'] > 0.01  # nonzero numbers compared
  for folder in (tmp_path, ROOT):  # the processes ran in ROOT: no local folder named 'gs:'
    assert not any(name.lower().startswith('gs:') for name in os.listdir(folder)), folder
