"""launch/goar.py: the tiny synthetic config end to end (both metrics, ground truth, rotation)
with its numbers checked for consistency (rankings follow the scores, the ground-truth score
recomputed from scratch, accuracies in range), and the tiny digits config with the SDEdit
projection."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import scipy.stats

from diffgeo_jax.xai import attributions, synthetic
from tests import compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = compile_cache.env()


def _run(config, workdir):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'launch', 'goar.py'),
                         f'--config={os.path.join(ROOT, "configs", "goar", config)}',
                         f'--workdir={workdir}'], capture_output=True, text=True, timeout=900,
                        cwd=ROOT, env=ENV)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads((workdir / 'results.json').read_text())
  assert res['binary'] == 'goar' and set(res['wall_s']) >= {'total', 'perturb', 'retrain'}
  return res


def _check_metrics(res, methods, levels_roar, levels_goar, seeds):
  for name, levels in (('roar', levels_roar), ('goar', levels_goar)):
    acc = np.asarray(res[name]['accuracy'])
    assert acc.shape == (len(methods), levels, seeds) and np.all((acc >= 0) & (acc <= 1))
    per_seed = np.asarray(res[name]['score_per_seed'])
    want = acc.mean(axis=1) if name == 'roar' else (1 - acc).mean(axis=1)
    np.testing.assert_allclose(per_seed, want, atol=1e-6)
    assert res[name]['retrained_models'] == len(methods) * levels * seeds


def test_tiny_synthetic(tmp_path):
  from configs.goar import synthetic as cfg
  config = cfg.get_config('tiny')
  res = _run('synthetic.py:tiny', tmp_path)
  methods = list(attributions.METHODS)
  assert res['config']['methods'] == methods and res['config']['task'] == 'synthetic'
  res = res['metrics']
  for key in ('original', 'rotated'):
    _check_metrics(res[key], methods, 2, 2, 2)
  s = res['summary']
  # Rankings follow the scores (ROAR: lower accuracy is better; GOAR: higher error is better).
  roar_scores = np.asarray(res['original']['roar']['score_mean'])
  goar_scores = np.asarray(res['original']['goar']['score_mean'])
  assert [s['ranking_roar'][m] for m in methods] == list(scipy.stats.rankdata(roar_scores))
  assert [s['ranking_goar'][m] for m in methods] == list(scipy.stats.rankdata(-goar_scores))
  np.testing.assert_allclose(
      s['spearman_goar_vs_ground_truth'],
      scipy.stats.spearmanr(goar_scores, res['original']['ground_truth']).statistic)
  # The ground-truth score of the random method recomputed: the same key path as the launcher.
  d = config.data
  test = synthetic.gaussian_clusters(d.test_per_cluster, d.dims, d.num_clusters, d.distance,
                                     d.sparsity, seed=d.seed + 1, params_seed=d.seed)
  j = methods.index('random')
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), j), 1)
  a = attributions.attribute('random', None, test.x, test.y, jax.random.fold_in(key, 0))
  np.testing.assert_allclose(res['original']['ground_truth'][j],
                             np.mean(synthetic.rank_correlation(np.asarray(a), test.weights)),
                             atol=1e-9)
  inv = res['invariance']
  for name in ('roar', 'goar'):
    np.testing.assert_allclose(inv[name]['mean_abs_change'], np.mean(np.abs(
        np.asarray(inv[name]['score_after']) - np.asarray(inv[name]['score_before']))))
  assert (tmp_path / 'curves.png').is_file()


def test_tiny_digits_with_sdedit_projection(tmp_path):
  res = _run('digits.py:tiny', tmp_path)['metrics']
  methods = list(attributions.METHODS)
  _check_metrics(res['original'], methods, 1, 1, 2)
  assert 'ground_truth' not in res['original'] and 'rotated' not in res
  assert set(res['summary']['ranking_goar']) == set(methods)
  assert (tmp_path / 'curves.png').is_file()

