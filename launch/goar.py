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

Writes to --workdir (a local folder or gs://bucket/path): `config.json`, `results.json` (metrics:
`original` and, synthetic, `rotated` curves and scores, their `summary` / `summary_rotated`
rankings and the `invariance`) and `curves.png`. Multi-host (--jax_distributed): the attributions
(over samples) and the retrained classifiers (over models) are split over every process's devices
(`distributed.data_parallel`), every process gets every number, and process 0 writes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
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

from diffgeo_jax import digits, distributed, models, runs  # noqa: E402
from diffgeo_jax.diffusion import guidance, pipeline  # noqa: E402
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
  apply: Callable          # the original classifier, (params, x (N, ...)) -> logits (N, C)
  params: object
  model: object            # the architecture retrained by ROAR / GOAR
  fill: np.ndarray         # ROAR's replacement value (per entry or per channel)
  project: Callable | None = None
  weights_test: np.ndarray | None = None  # synthetic ground truth
  attributors: dict = dataclasses.field(default_factory=dict)  # method -> data-parallel fn


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
  apply = lambda p, x: model.apply({'params': p}, x)
  acc = float(np.mean(np.asarray(jnp.argmax(apply(params, x_test), -1)) == test.y))
  logging.info('original classifier test accuracy %.3f', acc)
  rmodel = retrain.MLP(hidden=tuple(config.retrain.hidden), num_classes=2)
  return Task(x_train.astype(np.float32), train.y, x_test.astype(np.float32), test.y, apply,
              params, rmodel, x_train.mean(axis=0), weights_test=w_test)


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
  apply = lambda p, x: model.apply({'params': p}, x)
  rmodel = retrain.MLP(hidden=tuple(config.retrain.hidden), num_classes=10)
  pipe = pipeline.replicate(models.load_pipeline(digits.pipeline_dir(config.pipeline_dir)))
  digits.require_pipeline(pipe, 'launch/goar.py')
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
          num_steps=g.sdedit_steps, guidance=guidance.Unguided()))[:n])
    return np.concatenate(out) * 2 - 1

  fill = x_train.reshape(-1, 3).mean(axis=0)  # per channel, as google-research's ROAR
  return Task(x_train, y_train, x_test, y_test, apply, params, rmodel, fill, project)


def attribute(task: Task, method: str, x, y, key, config) -> np.ndarray:
  """Attributions of x (N, ...) for labels y, in chunks of `attribution.batch` samples, each chunk
  split over every device. Sample i's key is `split(key, rows)[i]`, which does not depend on
  `rows` (threefry's partitionable mode, jax's default), so padding and the number of devices
  leave the maps unchanged."""
  a = config.attribution
  if method not in task.attributors:
    opts = {'integrated_gradients': dict(steps=a.ig_steps),
            'smoothgrad': dict(samples=a.smoothgrad_samples, noise=a.smoothgrad_noise)}
    fn = lambda xb, yb, k, params: attributions.attribute(
        method, functools.partial(task.apply, params), xb, yb, k, **opts.get(method, {}))
    task.attributors[method] = distributed.data_parallel(fn, num_batched=2)
  # Bounded memory (IG and SmoothGrad multiply the batch); every chunk padded to one size, so
  # that the training and test sets share one executable.
  size = min(a.batch, max(len(task.x_train), len(task.x_test)))
  out = []
  for i in range(0, len(x), size):
    n = len(x[i:i + size])
    pad = lambda v: np.concatenate([v, np.repeat(v[-1:], size - n, axis=0)])
    out.append(task.attributors[method](pad(x[i:i + size]), pad(y[i:i + size]),
                                        jax.random.fold_in(key, i), task.params)[:n])
  return np.concatenate(out)


def perturbation_sets(task: Task, config, label: str):
  """Per method: ROAR's removal sets and GOAR's perturbation sets of the training and test data,
  and (synthetic) the ground-truth score of its test attributions."""
  key = jax.random.key(config.attribution.seed)
  sets = {'roar': ([], []), 'goar': ([], [])}
  gt, t0 = {}, time.time()
  for j, m in enumerate(config.methods):
    km = jax.random.fold_in(key, j)
    a_train = attribute(task, m, task.x_train, task.y_train, jax.random.fold_in(km, 0), config)
    a_test = attribute(task, m, task.x_test, task.y_test, jax.random.fold_in(km, 1), config)
    sets['roar'][0].append(roar.removal_sets(task.x_train, a_train, config.roar.fractions,
                                             task.fill))
    sets['roar'][1].append(roar.removal_sets(task.x_test, a_test, config.roar.fractions,
                                             task.fill))
    if task.weights_test is not None:
      flat = a_test.reshape(len(a_test), -1)
      gt[m] = float(np.mean(synthetic.rank_correlation(flat, task.weights_test)))
    for i, (x, y) in enumerate(((task.x_train, task.y_train), (task.x_test, task.y_test))):
      ks = jax.random.fold_in(km, 2 + i)
      direction = (lambda xx, yy, k, ks=ks, m=m:
                   attribute(task, m, xx, yy, jax.random.fold_in(ks, k), config))
      sets['goar'][i].append(goar.perturbation_sets(x, y, direction, config.goar.step_size,
                                                    config.goar.levels, task.project))
    logging.info('[%s] %s: attributions and perturbations done (%.0f s)', label, m,
                 time.time() - t0)
  return sets, gt


def metrics_of(run: runs.Run, task: Task, config, label: str) -> dict:
  """ROAR and GOAR curves (method, level, seed) and per-seed scores of every method."""
  methods, r = list(config.methods), config.retrain
  with run.timed('perturb'):
    sets, gt = perturbation_sets(task, config, label)
  mesh = distributed.make_mesh()  # the retrained models split over every device
  retrain_and_test = functools.partial(
      retrain.retrain_and_test, task.model, y_train=task.y_train, y_test=task.y_test,
      seeds=tuple(r.seeds), steps=r.steps, batch_size=r.batch_size,
      learning_rate=r.learning_rate, mesh=mesh)
  out = {}
  with run.timed('retrain'):
    for name, fn in (('roar', roar.score), ('goar', goar.score)):
      train_sets, test_sets = sets[name]
      acc = retrain_and_test(np.concatenate(train_sets), x_test=np.concatenate(test_sets))
      acc = acc.reshape(len(methods), -1, len(r.seeds))  # (method, level, seed)
      per_seed = np.array([[fn(acc[i, :, s]) for s in range(len(r.seeds))]
                           for i in range(len(methods))])
      out[name] = {'accuracy': acc.tolist(), 'score_per_seed': per_seed.tolist(),
                   'score_mean': per_seed.mean(axis=1).tolist(),
                   'score_std': per_seed.std(axis=1).tolist(), 'retrained_models': int(acc.size)}
      logging.info('[%s] %s scores: %s', label, name,
                   dict(zip(methods, np.round(per_seed.mean(axis=1), 4))))
    clean = retrain_and_test(task.x_train[None], x_test=task.x_test[None])
  out['clean_accuracy'] = clean[0].tolist()
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


def figure(metrics: dict, config, title: str):
  methods = list(config.methods)
  panels = [('', metrics['original'])]
  if 'rotated' in metrics:
    panels.append((' (rotated data)', metrics['rotated']))
  fig, axes = plt.subplots(len(panels), 2, figsize=(11, 3.8 * len(panels)), squeeze=False)
  for row, (suffix, res) in enumerate(panels):
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
  return fig


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  unknown = [m for m in config.methods if m not in attributions.METHODS]
  if unknown:
    raise ValueError(f'config.methods has unknown methods {unknown}; known: '
                     f'{attributions.METHODS}')
  if config.task not in ('synthetic', 'digits'):
    raise ValueError(f"config.task must be 'synthetic' or 'digits', got {config.task!r}")
  run = runs.start(config, _WORKDIR.value)
  methods = list(config.methods)
  with run.timed('setup'):
    task = synthetic_task(config) if config.task == 'synthetic' else digits_task(config)
  metrics = {'original': metrics_of(run, task, config, 'original')}
  metrics['summary'] = summarize(metrics['original'], methods)
  if config.task == 'synthetic' and config.rotation:
    d = config.data.dims
    q = np.linalg.qr(np.random.default_rng(config.rotation_seed).standard_normal((d, d)))[0]
    with run.timed('setup'):
      rotated = synthetic_task(config, rotation=q.astype(np.float32))
    metrics['rotated'] = metrics_of(run, rotated, config, 'rotated')
    metrics['summary_rotated'] = summarize(metrics['rotated'], methods)
    metrics['invariance'] = invariance(metrics['original'], metrics['rotated'], methods)
  run.save_figure('curves.png', figure(
      metrics, config, f'ROAR vs GOAR on the {config.task} task ({len(config.retrain.seeds)} '
      'seeds)'), dpi=120)
  logging.info('summary: %s', json.dumps(metrics['summary']))
  if 'invariance' in metrics:
    logging.info('invariance: %s', json.dumps(metrics['invariance']))
  run.finish(metrics)


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
