r"""Jump Your Steps (arXiv 2410.07761): search KLUB-optimal schedules and compare them with uniform.

    python launch/jys_search.py --config=configs/jys/toys.py --workdir=/tmp/jys_toys
    python launch/jys_search.py --config=configs/jys/countdown.py --workdir=/tmp/jys_countdown
    python launch/jys_search.py --config=configs/jys/digits.py --workdir=/tmp/jys_digits

config.task:
* toys       enumerable toy data with the exact denoiser. For every toy and NFE: the exact
             KL(data || sampled) of the uniform schedule, of JYS (with and without the Girsanov
             compensator) and, at NFE 2, of the best single split by brute force; and the
             chain of Theorem 3.1, KL (from the true q_1) <= sum of exact CDE, per schedule.
* countdown  a trained `discrete.model` Countdown denoiser: the token error rate (the correct
             checker, and the official one that skips transitions) of samples against NFE for
             uniform and JYS with each sampler (euler, tweedie, gillespie).
* digits     a trained 8x8-token digits denoiser, conditioned by infilling the label token: the
             digits classifier's accuracy on the decoded samples against NFE, and the Frechet
             distance of its features to those of the real test-split digits.
One JYS search to the largest power of two in `nfes` yields every smaller power of two as one of
its levels (the hierarchy); other NFE get their own search (greedy split of the last level).
NFE here is the number of denoiser calls: our schedules end at t = 0, where the last log-linear
step unmasks every token, so no extra final call is made (the official code makes N + 1).

Writes to --workdir (a local folder or gs://bucket/path): `config.json`, `schedules.json` (times
per NFE), `results.json` (metrics: toys: per toy, variant and NFE; trained: `samplers`, per sampler,
schedule and NFE, and the `model_dir`), `table.md` (the metric-versus-NFE tables), one plot per
metric (`metric.png` for the toys' KL, `error_rate.png`, `accuracy.png`, `frechet_distance.png`),
`schedules.png` (JYS against uniform). Multi-host (--jax_distributed): the search's grid passes
are split over every process's devices (`jys.search_with_info(mesh=...)`); the rest runs on every
process alike, and process 0 writes.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from diffgeo_jax import distributed, paths, runs
from diffgeo_jax.discrete import jys, processes, samplers, toy

_CONFIG = config_flags.DEFINE_config_file('config', None, 'configs/jys/*.py')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder.', required=True)

TASKS = ('toys', 'countdown', 'digits')


def _first_decides(vocab_size: int, length: int) -> toy.ToyData:
  """The first token decides all others (x^i = x^1): every dependence is there at t = 1."""
  table = np.zeros((vocab_size,) * length)
  for a in range(vocab_size):
    table[(a,) * length] = 1.0 / vocab_size
  return toy.ToyData(table)


def make_toy(name: str, vocab_size: int, length: int) -> toy.ToyData:
  """The toys of the report: countdown, sticky (a Markov chain that mostly copies), first_decides
  and independent (a product distribution, CDE = 0)."""
  v = vocab_size
  if name == 'countdown':
    return toy.countdown(v, length)
  if name == 'sticky':
    return toy.markov(np.full(v, 1.0 / v), 0.9 * np.eye(v) + 0.1 / v, length)
  if name == 'first_decides':
    return _first_decides(v, length)
  if name == 'independent':
    marg = np.random.default_rng(0).dirichlet(np.ones(v), length)
    return toy.independent(marg)
  raise ValueError(f'unknown toy {name!r}; supported: countdown, sticky, first_decides, '
                   'independent')


def jys_schedules(denoiser, process, data_sampler, nfes, key, **kw) -> dict:
  """{nfe: times} for every nfe, from one search to the largest power of two (whose levels are
  the smaller powers) plus one search per other nfe. The grid passes are split over every device."""
  nfes = sorted(set(int(n) for n in nfes))
  powers = [n for n in nfes if n & (n - 1) == 0]
  kw = {'mesh': distributed.make_mesh(), **kw}
  out = {}
  if powers:
    r = jys.search_with_info(denoiser, process, data_sampler, max(powers), key, **kw)
    for n in powers:
      out[n] = r.levels[int(np.log2(n))]
  for n in nfes:
    if n not in out:
      out[n] = jys.search_with_info(denoiser, process, data_sampler, n, key, **kw).times
  return out


# -- toys ------------------------------------------------------------------------------------------

def run_toys(config, run: runs.Run):
  results, schedules = {}, {}
  for name in config.toys:
    d = make_toy(name, config.vocab_size, config.length)
    proc = processes.Absorbing(d.vocab_size)
    den = d.denoiser(proc)
    rows = {}
    variants = {'uniform': {n: samplers.uniform_times(n) for n in config.nfes}}
    for comp in (False, True):
      with run.timed('search'):
        variants['jys_compensator' if comp else 'jys'] = jys_schedules(
            den, proc, d.sample, config.nfes, jax.random.key(config.seed),
            num_samples=config.num_samples, grid_size=config.grid_size, compensator=comp)
    for variant, per_nfe in variants.items():
      for n, times in per_nfe.items():
        q = d.sampled_distribution(proc, times)
        q_true = d.sampled_distribution(proc, times, start='marginal', method='tweedie')
        cde = d.cde(proc, times) if config.cde else np.array([np.nan])
        rows.setdefault(variant, {})[int(n)] = {
            'kl': toy.kl(d.probs, q), 'kl_from_true_start': toy.kl(d.probs, q_true),
            'sum_cde': float(cde.sum()), 'times': [float(t) for t in times]}
    if 2 in config.nfes:  # brute force over the one interior time
      grid = np.linspace(1, 0, config.brute_force_points + 2)[1:-1]
      kls = [toy.kl(d.probs, d.sampled_distribution(proc, [1.0, t, 0.0])) for t in grid]
      rows['brute_force'] = {2: {'kl': float(min(kls)), 'times': [1.0, float(grid[np.argmin(kls)]),
                                                                    0.0]}}
    results[name] = rows
    schedules[name] = {v: {n: r['times'] for n, r in per.items()} for v, per in rows.items()}
    logging.info('%s: %s', name, {v: {n: round(r['kl'], 4) for n, r in per.items()}
                                  for v, per in rows.items()})
  lines = ['| toy | NFE | uniform | JYS | JYS + compensator | best split (brute force) | '
           'sum CDE (JYS) |', '|---|---|---|---|---|---|---|']
  for name, rows in results.items():
    for n in sorted(config.nfes):
      bf = rows.get('brute_force', {}).get(n, {}).get('kl')
      lines.append(f'| {name} | {n} | {rows["uniform"][n]["kl"]:.4f} | {rows["jys"][n]["kl"]:.4f} '
                   f'| {rows["jys_compensator"][n]["kl"]:.4f} | '
                   f'{"" if bf is None else f"{bf:.4f}"} | {rows["jys"][n]["sum_cde"]:.4f} |')
  run.save_figure('metric.png', _plot_metric(
      {name: {v: {n: r['kl'] for n, r in per.items()} for v, per in rows.items()
              if v != 'brute_force'} for name, rows in results.items()},
      'exact KL(data || sampled)', log=True))
  run.save_figure('schedules.png', _plot_schedules(
      {name: s['jys'][max(config.nfes)] for name, s in schedules.items()}))
  return results, schedules, lines


# -- plots -----------------------------------------------------------------------------------------

def _plot_metric(series, ylabel, log=False):
  """series: {panel: {variant: {nfe: value}}}: one panel per key, value against NFE."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # noqa: PLC0415
  fig, axes = plt.subplots(1, len(series), figsize=(3.6 * len(series), 3.2), squeeze=False)
  for ax, (panel, variants) in zip(axes[0], series.items()):
    for variant, per in variants.items():
      n = sorted(per)
      ax.plot(n, [per[k] for k in n], 'o-', label=variant, ms=3)
    ax.set_xscale('log', base=2)
    values = [v for per in variants.values() for v in per.values()]
    if log and min(values) > 1e-6:  # an exact zero (independent tokens) stays linear
      ax.set_yscale('log')
    elif max(abs(v) for v in values) < 1e-4:
      ax.set_ylim(-1e-3, 1e-3)
    ax.set_title(panel)
    ax.set_xlabel('NFE')
    ax.set_ylabel(ylabel)
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  return fig


def _plot_schedules(schedules):
  """Each JYS schedule's times against step index, with the uniform schedule dashed."""
  import matplotlib  # noqa: PLC0415
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # noqa: PLC0415
  fig, ax = plt.subplots(figsize=(4.5, 3.4))
  n = None
  for name, times in schedules.items():
    n = len(times) - 1
    ax.plot(np.arange(n + 1), times, 'o-', ms=3, label=f'JYS {name}')
  ax.plot(np.arange(n + 1), samplers.uniform_times(n), 'k--', label='uniform')
  ax.set_xlabel('step')
  ax.set_ylabel('t')
  ax.set_title(f'schedules, NFE {n}')
  ax.legend(fontsize=7)
  fig.tight_layout()
  return fig


# -- trained models ---------------------------------------------------------------------------------

def _evaluate(task, tokens, labels=None) -> dict:
  from diffgeo_jax.discrete import data  # noqa: PLC0415
  tokens = np.asarray(tokens)
  if task == 'countdown':
    return {'error_rate': data.countdown_errors(tokens),
            'error_rate_official_checker': data.countdown_errors_official(tokens)}
  from diffgeo_jax.digits import digit_tokens, metrics  # noqa: PLC0415
  strokes, _, invalid = digit_tokens.decode(tokens)
  scorer, reference = _scorer()
  feats, logits = scorer.features_and_logits(digit_tokens.render(strokes))
  pred = np.argmax(logits, -1)
  return {'accuracy': float(np.mean(pred == labels)), 'invalid_rate': float(np.mean(invalid)),
          'frechet_distance': metrics.frechet_distance(feats, reference),
          'per_digit': metrics.grouped_accuracy(pred == labels, labels, 10)}


_SCORER = []


def _scorer():
  """The shipped digits classifier and its features of the real test-split tokens (rendered the
  same way), the reference of the Frechet distance."""
  if not _SCORER:
    from diffgeo_jax.digits import digit_tokens, metrics  # noqa: PLC0415
    scorer = metrics.Scorer.load()
    strokes, _, _ = digit_tokens.decode(digit_tokens.load('test')[0])
    _SCORER.append((scorer, scorer.features(digit_tokens.render(strokes))))
  return _SCORER[0]


def run_trained(config, run: runs.Run):
  from diffgeo_jax.digits import digit_tokens  # noqa: PLC0415
  from diffgeo_jax.discrete import data, model as model_lib  # noqa: PLC0415
  folder = config.model_dir or os.path.join(os.path.dirname(model_lib.__file__), 'pretrained',
                                            config.task)
  # A model folder on gs:// (a train_discrete export) is staged once per host.
  net, params, mcfg = model_lib.load(paths.local_folder(folder, 'config.model_dir'))
  proc = processes.Absorbing(mcfg.vocab_size, processes.LogLinear(config.process_eps))
  den = jax.jit(model_lib.denoiser(net, params))
  length = mcfg.length

  if config.task == 'countdown':
    def data_sampler(key, n):
      seed = int(jax.random.randint(key, (), 0, 2 ** 31 - 1))
      return jnp.asarray(data.countdown(np.random.default_rng(seed), n, length, mcfg.vocab_size))
    labels = None
  else:
    train_tokens, _ = digit_tokens.load('train')

    def data_sampler(key, n):
      return jnp.asarray(train_tokens)[jax.random.randint(key, (n,), 0, len(train_tokens))]
    labels = np.arange(config.num_eval_samples) % 10

  with run.timed('search'):
    jys_sched = jys_schedules(
        den, proc, data_sampler, config.nfes, jax.random.key(config.seed),
        num_samples=config.num_samples, grid_size=config.grid_size,
        compensator=config.compensator)
  logging.info('JYS search: %.1f s', run.wall_s['search'])
  variants = {'uniform': {n: samplers.uniform_times(n) for n in config.nfes}, 'jys': jys_sched}
  results = {}
  key = jax.random.key(config.seed + 1)
  for method in config.samplers:
    for variant, per_nfe in variants.items():
      for n in sorted(per_nfe):
        if labels is None:
          kw = dict(shape=(config.num_eval_samples, length))
        else:  # infilling: the label token given, every pixel masked
          x = np.full((config.num_eval_samples, length), proc.mask_id, np.int32)
          x[:, 0] = digit_tokens.LABEL_OFFSET + labels
          kw = dict(x_init=jnp.asarray(x))
        with run.timed('sampling'):
          r = samplers.sample(jax.random.fold_in(key, n), den, proc, per_nfe[n], method=method,
                              **kw)
          scores = _evaluate(config.task, r.tokens, labels)
        results.setdefault(method, {}).setdefault(variant, {})[n] = {**scores, 'nfe': r.nfe}
        logging.info('%s %s NFE %d: %s', method, variant, n,
                     {k: v for k, v in scores.items() if k != 'per_digit'})
  metrics = ['error_rate'] if config.task == 'countdown' else ['accuracy', 'frechet_distance']
  lines = []
  for metric in metrics:
    lines += [f'{metric}:', '', '| sampler | schedule | ' +
              ' | '.join(f'NFE {n}' for n in sorted(config.nfes)) + ' |',
              '|---|---|' + '---|' * len(config.nfes)]
    for method, per in results.items():
      for variant, rows in per.items():
        lines.append(f'| {method} | {variant} | ' +
                     ' | '.join(f'{rows[n][metric]:.4f}' for n in sorted(rows)) + ' |')
    lines.append('')
    run.save_figure(f'{metric}.png', _plot_metric(
        {m: {v: {n: r[metric] for n, r in rows.items()} for v, rows in per.items()}
         for m, per in results.items()}, metric.replace('_', ' '), log=metric != 'accuracy'))
  run.save_figure('schedules.png', _plot_schedules({config.task: jys_sched[max(jys_sched)]}))
  schedules = {'jys': {n: [float(t) for t in s] for n, s in jys_sched.items()}}
  return {'samplers': results, 'model_dir': folder}, schedules, lines


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  if config.task not in TASKS:
    raise ValueError(f'config.task must be one of {TASKS}, got {config.task!r}')
  if not config.nfes or any(int(n) < 1 for n in config.nfes):
    raise ValueError(f'config.nfes must be positive integers, got {config.nfes}')
  run = runs.start(config, _WORKDIR.value)
  if config.task == 'toys':
    results, schedules, lines = run_toys(config, run)
  else:
    results, schedules, lines = run_trained(config, run)
  run.write_json('schedules.json', schedules)
  run.write_text('table.md', '\n'.join(lines) + '\n')
  logging.info('tables:\n%s', '\n'.join(lines))
  run.finish(results)


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
