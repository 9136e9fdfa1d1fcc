r"""GOAR vs ROAR (arXiv 2407.12401): rank five attribution methods by remove-and-retrain, on
synthetic data with ground-truth feature weights or on the digits.

    python launch/goar.py --config=configs/goar/synthetic.py --workdir=/tmp/goar_synthetic
    python launch/goar.py --config=configs/goar/digits.py --workdir=/tmp/goar_digits

For each method (`xai.attributions`, explaining the true label's logit of the original classifier:
an MLP trained here on the synthetic data, the shipped classifier on the digits):
* ROAR (`xai.roar`): the top `roar.fractions` of each sample's entries by |attribution| replaced
  by the training mean (per channel for images); retrain; test accuracy (lower = better);
* GOAR (`xai.goar`): `goar.levels` steps of length `goar.step_size` against the attribution
  direction, the attribution recomputed at each level, each step projected back onto the data
  (digits: SDEdit with the digits diffusion model, unconditional, `goar.sdedit_strength`;
  synthetic: none, the Gaussian data have full support); retrain; cumulative test error (higher
  = better).
Train and test sets are perturbed alike. Every (method, level, seed) classifier of one metric is
trained in one vmapped, jit-compiled loop (`xai.retrain`); `retrain.seeds` give the error bars.
Synthetic only: the ground-truth score of each method (mean rank correlation of |attribution|
with |m_k * w| on the test set, OpenXAI's ground-truth faithfulness), the Spearman correlation of
each metric's method ranking with it, the spread of each metric's scores, and coordinate
invariance: everything again after a random rotation x -> R x of the data (the original
classifier retrained on the rotated data from the same seed).

Writes to --workdir: `config.json`, `results.json` (curves, scores, rankings) and `curves.png`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import scipy.stats
from absl import app, flags, logging
from ml_collections import config_flags

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

from diffgeo_jax import digits, models  # noqa: E402
from diffgeo_jax.diffusion import pipeline  # noqa: E402
from diffgeo_jax.digits import classifier as classifier_lib, dataset  # noqa: E402
from diffgeo_jax.xai import attributions, goar, retrain, roar, synthetic  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'configs/goar/*.py')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder.', required=True)


@dataclasses.dataclass
class Task:
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  logits_fn: Callable      # the original classifier, (N, ...) -> (N, C)
  model: object            # the architecture retrained by ROAR / GOAR
  fill: np.ndarray         # ROAR's replacement value (per entry or per channel)
  project: Callable | None = None
  weights_test: np.ndarray | None = None  # synthetic ground truth


def synthetic_task(config, rotation: np.ndarray | None = None) -> Task:
  d = config.data
  train = synthetic.gaussian_clusters(d.num_per_cluster, d.dims, d.num_clusters, d.distance,
                                      d.sparsity, seed=d.seed)
  test = synthetic.gaussian_clusters(d.test_per_cluster, d.dims, d.num_clusters, d.distance,
                                     d.sparsity, seed=d.seed + 1, params_seed=d.seed)
  x_train, x_test, w_test = train.x, test.x, test.weights
  if rotation is not None:  # rows x -> R x; the ground truth rotates with the data
    x_train, x_test, w_test = x_train @ rotation.T, x_test @ rotation.T, w_test @ rotation.T
  c = config.classifier
  model = retrain.MLP(hidden=tuple(c.hidden), num_classes=2)
  params = retrain.train_one(model, x_train, train.y, jax.random.key(c.seed), steps=c.steps,
                             batch_size=c.batch_size, learning_rate=c.learning_rate)
  logits_fn = lambda x: model.apply({'params': params}, x)
  acc = float(np.mean(np.asarray(jnp.argmax(logits_fn(x_test), -1)) == test.y))
  logging.info('original classifier test accuracy %.3f', acc)
  rmodel = retrain.MLP(hidden=tuple(config.retrain.hidden), num_classes=2)
  return Task(x_train.astype(np.float32), train.y, x_test.astype(np.float32), test.y, logits_fn,
              rmodel, x_train.mean(axis=0), weights_test=w_test)


def digits_task(config) -> Task:
  d = config.data
  rng = np.random.default_rng(d.seed)

  def take(split, n):
    s = dataset.load(split)
    idx = rng.permutation(len(s))[:n]
    colours = rng.integers(0, len(dataset.COLOURS), n)
    return dataset.render(s.strokes[idx], colours), s.digits[idx].astype(np.int32)

  x_train, y_train = take('train', d.num_train)
  x_test, y_test = take('test', d.num_test)
  model, params = classifier_lib.load(config.classifier_dir or None)
  logits_fn = lambda x: model.apply({'params': params}, x)
  rmodel = retrain.MLP(hidden=tuple(config.retrain.hidden), num_classes=10)
  pipe = models.load_pipeline(config.pipeline_dir or digits.pipeline_dir())
  g = config.goar

  def project(x, level):
    """SDEdit, unconditional: noise to the strength's timestep and denoise (fixed batches)."""
    imgs = np.clip((np.asarray(x) + 1) / 2, 0, 1)
    out, b = [], g.sdedit_batch
    key = jax.random.fold_in(jax.random.key(g.seed), level)
    for i in range(0, len(imgs), b):
      chunk = imgs[i:i + b]
      n = len(chunk)
      if n < b:  # pad: one executable for every batch
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], b - n, axis=0)])
      out.append(np.asarray(pipeline.image_to_image(
          pipe, chunk, [''] * b, jax.random.fold_in(key, i), strength=g.sdedit_strength,
          num_steps=g.sdedit_steps, guidance_scale=1.0))[:n])
    return np.concatenate(out) * 2 - 1

  fill = x_train.reshape(-1, 3).mean(axis=0)  # per channel, as google-research's ROAR
  return Task(x_train, y_train, x_test, y_test, logits_fn, rmodel, fill, project)


def attribute(task: Task, method: str, x, y, key, config) -> np.ndarray:
  a = config.attribution
  opts = {'integrated_gradients': dict(steps=a.ig_steps),
          'smoothgrad': dict(samples=a.smoothgrad_samples, noise=a.smoothgrad_noise)}
  out = []
  for i in range(0, len(x), a.batch):  # bounded memory (IG and SmoothGrad multiply the batch)
    out.append(np.asarray(attributions.attribute(
        method, task.logits_fn, x[i:i + a.batch], y[i:i + a.batch], jax.random.fold_in(key, i),
        **opts.get(method, {}))))
  return np.concatenate(out)


def metrics_of(task: Task, config, label: str) -> dict:
  """ROAR and GOAR curves (method, level, seed) and per-seed scores of every method."""
  methods, r = list(config.methods), config.retrain
  key = jax.random.key(config.attribution.seed)
  roar_train, roar_test, goar_train, goar_test, gt = [], [], [], [], {}
  t0 = time.time()
  for j, m in enumerate(methods):
    km = jax.random.fold_in(key, j)
    a_train = attribute(task, m, task.x_train, task.y_train, jax.random.fold_in(km, 0), config)
    a_test = attribute(task, m, task.x_test, task.y_test, jax.random.fold_in(km, 1), config)
    roar_train.append(roar.removal_sets(task.x_train, a_train, config.roar.fractions, task.fill))
    roar_test.append(roar.removal_sets(task.x_test, a_test, config.roar.fractions, task.fill))
    if task.weights_test is not None:
      flat = a_test.reshape(len(a_test), -1)
      gt[m] = float(np.mean(synthetic.rank_correlation(flat, task.weights_test)))
    for split, x, y, out in (('train', task.x_train, task.y_train, goar_train),
                             ('test', task.x_test, task.y_test, goar_test)):
      ks = jax.random.fold_in(km, 2 if split == 'train' else 3)
      direction = (lambda xx, yy, k, ks=ks, m=m:
                   attribute(task, m, xx, yy, jax.random.fold_in(ks, k), config))
      out.append(goar.perturbation_sets(x, y, direction, config.goar.step_size,
                                        config.goar.levels, task.project))
    logging.info('[%s] %s: attributions and perturbations done (%.0f s)', label, m,
                 time.time() - t0)
  perturb_s = time.time() - t0
  out = {}
  for name, train_sets, test_sets, fn in (('roar', roar_train, roar_test, roar.score),
                                          ('goar', goar_train, goar_test, goar.score)):
    tr, te = np.concatenate(train_sets), np.concatenate(test_sets)
    t1 = time.time()
    acc = np.asarray(retrain.retrain_and_test(
        task.model, tr, task.y_train, te, task.y_test, tuple(r.seeds), steps=r.steps,
        batch_size=r.batch_size, learning_rate=r.learning_rate))
    acc = acc.reshape(len(methods), -1, len(r.seeds))  # (method, level, seed)
    per_seed = np.array([[fn(acc[i, :, s]) for s in range(len(r.seeds))]
                         for i in range(len(methods))])
    out[name] = {'accuracy': acc.tolist(), 'score_per_seed': per_seed.tolist(),
                 'score_mean': per_seed.mean(axis=1).tolist(),
                 'score_std': per_seed.std(axis=1).tolist(),
                 'retrained_models': int(acc.size), 'retrain_s': round(time.time() - t1, 1)}
    logging.info('[%s] %s scores: %s', label, name,
                 dict(zip(methods, np.round(per_seed.mean(axis=1), 4))))
  clean = np.asarray(retrain.retrain_and_test(
      task.model, task.x_train[None], task.y_train, task.x_test[None], task.y_test,
      tuple(r.seeds), steps=r.steps, batch_size=r.batch_size, learning_rate=r.learning_rate))
  out['clean_accuracy'] = clean[0].tolist()
  out['perturb_s'] = round(perturb_s, 1)
  if gt:
    out['ground_truth'] = [gt[m] for m in methods]
  return out


def ranking(scores, higher_is_better: bool) -> list[float]:
  """Rank of each method (1 = best; ties share the mean rank)."""
  s = np.asarray(scores) * (1 if higher_is_better else -1)
  return (scipy.stats.rankdata(-s, method='average')).tolist()


def summarize(res: dict, methods: list[str]) -> dict:
  """Rankings, and with a ground truth their Spearman correlation with it and the spread."""
  roar_good = -np.asarray(res['roar']['score_mean'])  # lower accuracy = better attribution
  goar_good = np.asarray(res['goar']['score_mean'])
  out = {'ranking_roar': dict(zip(methods, ranking(roar_good, True))),
         'ranking_goar': dict(zip(methods, ranking(goar_good, True)))}
  for name, good in (('roar', roar_good), ('goar', goar_good)):
    seed_std = float(np.mean(res[name]['score_std']))
    out[f'spread_{name}'] = {'range': float(good.max() - good.min()),
                             'std_between_methods': float(good.std()),
                             'mean_seed_std': seed_std,
                             'range_over_seed_std': float((good.max() - good.min()) /
                                                          max(seed_std, 1e-12))}
  if 'ground_truth' in res:
    gt = np.asarray(res['ground_truth'])
    out['ranking_ground_truth'] = dict(zip(methods, ranking(gt, True)))
    for name, good in (('roar', roar_good), ('goar', goar_good)):
      out[f'spearman_{name}_vs_ground_truth'] = float(scipy.stats.spearmanr(good, gt).statistic)
  return out


def invariance(before: dict, after: dict, methods: list[str]) -> dict:
  out = {}
  for name in ('roar', 'goar'):
    b, a = np.asarray(before[name]['score_mean']), np.asarray(after[name]['score_mean'])
    out[name] = {'score_before': b.tolist(), 'score_after': a.tolist(),
                 'mean_abs_change': float(np.mean(np.abs(a - b))),
                 'max_abs_change': float(np.max(np.abs(a - b))),
                 'mean_seed_std': float(np.mean(before[name]['score_std'])),
                 'ranking_spearman': float(scipy.stats.spearmanr(b, a).statistic)}
  return out


def figure(path: str, results: dict, config, title: str) -> None:
  methods = list(config.methods)
  runs = [('', results['metrics'])]
  if 'rotated' in results:
    runs.append((' (rotated data)', results['rotated']))
  fig, axes = plt.subplots(len(runs), 2, figsize=(11, 3.8 * len(runs)), squeeze=False)
  for row, (suffix, res) in enumerate(runs):
    for col, (name, xs, xlabel, ylabel) in enumerate((
        ('roar', list(config.roar.fractions), 'fraction of entries removed', 'test accuracy'),
        ('goar', list(range(1, config.goar.levels + 1)),
         f'level (steps of {config.goar.step_size:g})', 'test error'))):
      ax = axes[row, col]
      acc = np.asarray(res[name]['accuracy'])  # (method, level, seed)
      vals = acc if name == 'roar' else 1 - acc
      for i, m in enumerate(methods):
        s = res[name]['score_mean'][i]
        ax.errorbar(xs, vals[i].mean(-1), yerr=vals[i].std(-1), marker='o', capsize=2,
                    label=f'{m} ({s:.3f})')
      ax.set_xlabel(xlabel)
      ax.set_ylabel(ylabel)
      ax.set_title(f'{name.upper()}{suffix}: score = mean '
                   f'{"accuracy (lower better)" if name == "roar" else "error (higher better)"}',
                   fontsize=9)
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config, workdir = _CONFIG.value, _WORKDIR.value
  unknown = [m for m in config.methods if m not in attributions.METHODS]
  if unknown:
    raise ValueError(f'config.methods has unknown methods {unknown}; known: '
                     f'{attributions.METHODS}')
  if config.task not in ('synthetic', 'digits'):
    raise ValueError(f"config.task must be 'synthetic' or 'digits', got {config.task!r}")
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  methods = list(config.methods)
  t0 = time.time()
  task = synthetic_task(config) if config.task == 'synthetic' else digits_task(config)
  results = {'task': config.task, 'methods': methods}
  results['metrics'] = metrics_of(task, config, 'original')
  results['summary'] = summarize(results['metrics'], methods)
  if config.task == 'synthetic' and config.rotation:
    d = config.data.dims
    q = np.linalg.qr(np.random.default_rng(config.rotation_seed).standard_normal((d, d)))[0]
    rotated = synthetic_task(config, rotation=q.astype(np.float32))
    results['rotated'] = metrics_of(rotated, config, 'rotated')
    results['summary_rotated'] = summarize(results['rotated'], methods)
    results['invariance'] = invariance(results['metrics'], results['rotated'], methods)
  results['wall_s'] = round(time.time() - t0, 1)
  results['jax'], results['backend'] = jax.__version__, jax.default_backend()
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2)
  figure(os.path.join(workdir, 'curves.png'), results, config,
         f'ROAR vs GOAR on the {config.task} task ({len(config.retrain.seeds)} seeds)')
  logging.info('summary: %s', json.dumps(results['summary']))
  if 'invariance' in results:
    logging.info('invariance: %s', json.dumps(results['invariance']))


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
