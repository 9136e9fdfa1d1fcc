r"""JYS schedule search: the parallel (vmapped, jit-compiled grid) search against the sequential
golden-section search of the official code, on the same objective, data and NFE.

    python benchmarks/jys_search.py --nfes=8,16,32,64     # the shipped Countdown model
    python benchmarks/jys_search.py --nfes=8 --num_samples=128 --model_dir=/path/to/model

Both searches maximise the same per-interval KLUB gain, KLUB(Q^{s->t->u} || Q^{s->u}), with the
same data batch and per-token uniforms (common random numbers) and the same trained denoiser:
* golden: per interval, one after the other, golden-section search on [u + 1e-3, s - 1e-3] to a
  bracket of one grid spacing (at most 32 shrinking probes); each evaluation is one jit call with
  both forward passes (at (x_s, s) and (x_t, t)), as `sony/jys` `jys.py` / `main.py`;
* parallel: the denoiser passes at all `grid_size` times in one jit call, then per level the gains
  of every grid time inside every interval in one vmapped jit call, argmax per interval.
Timings exclude compilation: each search runs once at NFE 2 to compile (its shapes do not depend
on NFE), then the timed runs. Reported: wall seconds of each, their ratio, evaluations and
denoiser rows, and the quality of both schedules: the schedule KLUB (`jys.schedule_klub`, the
path-KL bound without the single-transition approximation, midpoint rule, on a separate held-out
batch) and, for Countdown, nothing more: sampling quality is `launch/jys_search.py`'s job.
"""

from __future__ import annotations

import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from diffgeo_jax.discrete import data, jys, processes
from diffgeo_jax.discrete import model as model_lib

_MODEL = flags.DEFINE_string('model_dir', '', "Countdown model folder; '' = the shipped one.")
_NFES = flags.DEFINE_list('nfes', ['8', '16', '32', '64'],
                          'NFE budgets to search (the official Countdown search goes to 64).')
_SAMPLES = flags.DEFINE_integer('num_samples', 256, 'KLUB Monte Carlo batch.')
_GRID = flags.DEFINE_integer('grid_size', 129, "The parallel search's grid.")
_ROWS = flags.DEFINE_integer('max_rows', 256, 'Sequences per denoiser call in the parallel '
                             "search's grid passes (256 is fastest on 2 CPU cores; golden's "
                             'calls are num_samples rows each).')
_POINTS = flags.DEFINE_integer('points_per_step', 4, 'Midpoint-rule points of schedule_klub.')
_OUT = flags.DEFINE_string('out', '', 'Write the results here as JSON.')


def main(argv):
  del argv
  folder = _MODEL.value or os.path.join(os.path.dirname(model_lib.__file__), 'pretrained',
                                        'countdown')
  net, params, cfg = model_lib.load(folder)
  proc = processes.Absorbing(cfg.vocab_size)
  den = jax.jit(model_lib.denoiser(net, params))

  def sampler(key, n):
    seed = int(jax.random.randint(key, (), 0, 2 ** 31 - 1))
    return jnp.asarray(data.countdown(np.random.default_rng(seed), n, cfg.length,
                                      cfg.vocab_size))

  kw = dict(num_samples=_SAMPLES.value, grid_size=_GRID.value, max_rows=_ROWS.value)
  key = jax.random.key(0)
  compile_s = {}
  for method in ('parallel', 'golden'):  # compile (NFE 2 has every shape the searches use)
    t0 = time.time()
    jys.search_with_info(den, proc, sampler, 2, key, method=method, **kw)
    compile_s[method] = round(time.time() - t0, 2)
  held_out = sampler(jax.random.key(123), _SAMPLES.value)
  noise = jax.random.uniform(jax.random.key(124), held_out.shape)
  rows = []
  for nfe in (int(n) for n in _NFES.value):
    res = {m: jys.search_with_info(den, proc, sampler, nfe, key, method=m, **kw)
           for m in ('parallel', 'golden')}
    klub = lambda times: jys.schedule_klub(den, proc, held_out, noise, times,
                                           points_per_step=_POINTS.value, max_rows=_ROWS.value)
    klubs = {m: klub(r.times) for m, r in res.items()}
    uniform = klub(np.linspace(1, 0, nfe + 1))
    row = {'nfe': nfe,
           'wall_s': {m: round(r.wall_s, 2) for m, r in res.items()},
           'ratio_golden_over_parallel': round(res['golden'].wall_s / res['parallel'].wall_s, 2),
           'evaluations': {m: r.evaluations for m, r in res.items()},
           'denoiser_rows': {m: r.denoiser_rows for m, r in res.items()},
           'schedule_klub': {**{m: round(v, 5) for m, v in klubs.items()},
                             'uniform': round(uniform, 5)},
           'max_time_difference': float(np.max(np.abs(res['parallel'].times -
                                                      res['golden'].times))),
           'times': {m: [round(float(t), 5) for t in r.times] for m, r in res.items()}}
    rows.append(row)
    print(json.dumps({k: v for k, v in row.items() if k != 'times'}))
  out = {'model_dir': folder, 'model': cfg.to_dict(), 'num_samples': _SAMPLES.value,
         'grid_size': _GRID.value, 'max_rows': _ROWS.value, 'compile_s': compile_s, 'rows': rows,
         'jax': jax.__version__, 'backend': jax.default_backend(),
         'cpu': platform.processor() or platform.machine(), 'cores': os.cpu_count()}
  print('| NFE | golden s | parallel s | ratio | evaluations (golden / parallel) | '
        'schedule KLUB golden / parallel / uniform |')
  print('|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['nfe']} | {r['wall_s']['golden']} | {r['wall_s']['parallel']} | "
          f"{r['ratio_golden_over_parallel']}x | {r['evaluations']['golden']} / "
          f"{r['evaluations']['parallel']} | {r['schedule_klub']['golden']} / "
          f"{r['schedule_klub']['parallel']} / {r['schedule_klub']['uniform']} |")
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(out, f, indent=2)


if __name__ == '__main__':
  app.run(main)
