r"""Compile the library's jobs for a TPU slice without a TPU, and report per-chip memory,
FLOPs and a roofline bound (compiler estimates, not measured TPU times).

    pip install -e '.[tpu]'    # libtpu matching the installed jax
    python launch/tpu_compile.py --config=configs/tpu_compile/default.py \
      --config.topology=v5e:2x4,v5p:2x2x1 --config.model=sd15,sdxl --config.job=duo,sample \
      --config.dtype=float32,bfloat16 --config.remat=false,true --config.attention=softmax,flash \
      --workdir=/tmp/aot

`--config.exec_time_optimization_effort=-1` compiles 1.6-16x faster with a third of the host
memory (estimates of a less optimised program, per-chip HBM 1-29% below the default's on SD-1.5;
the table marks such rows): for a small host.

For every combination of topology x model x job x dtype x remat x attention,
`diffgeo_jax.aot.jobs` builds the jitted function the job's binary runs (from the same library code), with its production
shardings over the topology's devices (the `data` axis, and the FSDP `model` axis where a
training batch needs it), lowers it on abstract inputs (`jax.eval_shape`: no weights), compiles
it with libtpu and reads `memory_analysis()` and `cost_analysis()`.

Writes to --workdir (local or gs://): `results.json` (metrics.programs: one record per program,
see `aot.analysis`; metrics.chips: the peak/bandwidth table used), `table.md`, and while it runs
`programs_so_far.json` (an SD-scale program takes minutes to compile on a few cores).
A program the compiler rejects is recorded with its error (out-of-memory as `fits: false` with the
compiler's figure) and the run goes on.
"""

from __future__ import annotations

import itertools
import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # the host compiles; the TPU is only described
# libtpu takes a lockfile so that one process owns a real TPU; compiling needs no TPU, and several
# compiling processes (pytest workers) must not block each other.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

import dataclasses  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from diffgeo_jax import runs  # noqa: E402
from diffgeo_jax.aot import analysis, chips, jobs  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'configs/tpu_compile/default.py')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder (local or gs://).', required=True)


def _list(value, name: str, allowed=None) -> list[str]:
  items = [v.strip() for v in str(value).split(',') if v.strip()]
  if not items:
    raise ValueError(f'config.{name} is empty')
  if allowed is not None:
    bad = [v for v in items if v not in allowed]
    if bad:
      raise ValueError(f'config.{name} has unknown entries {bad}; supported: {list(allowed)}')
  return items


def combinations(config) -> list[tuple]:
  topologies = _list(config.topology, 'topology')
  for t in topologies:
    chips.chip_of(t)
  models = _list(config.model, 'model', jobs.shapes.MODELS)
  job_names = (list(jobs.JOBS) if config.job == 'all'
               else _list(config.job, 'job', jobs.JOBS))
  dtypes = _list(config.dtype, 'dtype', ('float32', 'bfloat16'))
  remats = [r == 'true' for r in _list(config.remat, 'remat', ('false', 'true'))]
  impls = _list(config.attention, 'attention', ('softmax', 'flash'))
  if not -1.0 <= float(config.exec_time_optimization_effort) <= 1.0:
    raise ValueError('config.exec_time_optimization_effort must be in [-1, 1], got '
                     f'{config.exec_time_optimization_effort!r}')
  out = []
  for t, job, dtype, remat, impl in itertools.product(topologies, job_names, dtypes, remats,
                                                      impls):
    for model in ([jobs.OWN_MODELS[job]] if job in jobs.OWN_MODELS else models):
      if job in jobs.OWN_MODELS and (dtype, remat, impl) != (dtypes[0], remats[0], impls[0]):
        continue  # their own model and precision: once per topology
      if remat and job in ('sample', 'jys', 'goar'):
        continue  # nothing is differentiated: remat changes nothing
      if impl == 'flash' and job in ('explore', 'jys', 'goar'):
        continue  # explore needs forward-mode AD; jys and goar have no UNet attention
      out.append((t, model, job, dtype, remat, impl))
  return out


def compile_all(config, on_record=lambda records: None) -> list[dict]:
  """Every combination's records; `on_record(records)` after each (long runs keep what is done)."""
  records = []
  todo = combinations(config)
  for i, (topology, model, job, dtype, remat, impl) in enumerate(todo):
    devices = chips.topology_devices(topology)
    per_chip = len(devices) // chips.chip_count(topology)  # v4: one device per TensorCore
    chip = chips.per_device(chips.chip_of(topology), per_chip)
    c = config.copy_and_resolve_references()
    c.unlock()
    del c['remat']
    c.dtype, c.remat, c.attention = dtype, remat, impl
    base = {'topology': topology, 'chips': chips.chip_count(topology), 'devices': len(devices),
            'hosts': len({d.process_index for d in devices}), 'model': model, 'job': job,
            'dtype': dtype, 'remat': remat, 'attention': impl}
    effort = float(c.exec_time_optimization_effort)
    try:
      programs = jobs.programs(job, model, devices, c)
    except Exception as e:  # a job that cannot be built for these shapes: say why, go on
      logging.exception('building %s', base)
      records.append({**base, 'program': None, 'compiled': False,
                      'error': f'{type(e).__name__}: {e}'})
      continue
    done = {}
    for p in programs:
      logging.info('[%d/%d] compiling %s/%s for %s (%s, %s, remat %s, %s attention) ...', i + 1,
                   len(todo), job, p.name, topology, model, dtype, remat, impl)
      r = {**base, 'program': p.name, 'mesh': p.mesh, 'steps_per_call': p.steps,
           'notes': p.notes, **analysis.compile_program(p.lower, chip, effort)}
      done[p.name] = r
      records.append(r)
      on_record(records)
      logging.info('  %s', summary_line(r))
    step, loop = done.get('cfg_step', {}), done.get('loop', {})
    if step.get('compiled') and loop.get('compiled'):
      # The loop's cost analysis counts its body (one step) once: add the other N - 1 steps.
      n = loop['steps_per_call']
      loop['flops_per_call_estimate'] = loop['flops_per_chip'] + (n - 1) * step['flops_per_chip']
      loop['roofline_seconds_estimate'] = (loop['roofline_seconds']
                                           + (n - 1) * step['roofline_seconds'])
  return records


def _gib(x) -> str:
  return '-' if x is None else f'{x / 2 ** 30:.2f}'


def summary_line(r: dict) -> str:
  if not r.get('compiled'):
    return (f'NOT COMPILED ({r.get("error", "")[:200]})' if 'fits' not in r else
            f'does not fit: {_gib(r["hbm_bytes"]["total"])} GiB per chip')
  return (f'{r["compile_seconds"]:.1f} s, {_gib(r["hbm_bytes"]["total"])} GiB per chip '
          f'({"fits" if r["fits"] else "does NOT fit"} {_gib(r["hbm_per_chip"])}), '
          f'{r["flops_per_chip"] / 1e12:.3f} TFLOP, roofline {r["roofline_seconds"] * 1e3:.2f} '
          f'ms ({r["roofline_bound"]})')


def table(records: list[dict]) -> str:
  head = ['topology (hosts)', 'model', 'job', 'program', 'dtype', 'remat', 'attention',
          'mesh (data, model)', 'compiled', 'HBM/chip GiB (args, temp)', 'fits', 'TFLOP/chip',
          'GB/chip', 'roofline ms', 'compile s (XLA effort)']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in records:
    mem, mesh, ok = r.get('hbm_bytes', {}), r.get('mesh') or {}, r.get('compiled')
    fits = '-' if 'fits' not in r else ('yes' if r['fits'] else '**no**')
    cells = [f'{r["topology"]} ({r.get("hosts", "-")})', r['model'], r['job'], r.get('program'), r['dtype'],
             'yes' if r['remat'] else 'no', r['attention'],
             f'{mesh.get("data", "-")}, {mesh.get("model", "-")}', 'yes' if ok else 'no',
             f'{_gib(mem.get("total"))} ({_gib(mem.get("arguments"))}, {_gib(mem.get("temp"))})',
             fits]
    if ok:
      # * : a loop program, whose body the compiler counts once; the figure adds the other steps.
      star = '*' if 'flops_per_call_estimate' in r else ''
      flops = r.get('flops_per_call_estimate', r['flops_per_chip'])
      roof = r.get('roofline_seconds_estimate', r['roofline_seconds'])
      cells += [f'{flops / 1e12:.3f}{star}', f'{r["bytes_accessed_per_chip"] / 1e9:.2f}',
                f'{roof * 1e3:.2f}{star}']
    else:
      cells += ['-', '-', '-']
    effort = r.get('exec_time_optimization_effort', 0.0)
    cells.append(f'{r.get("compile_seconds", "-")}' + (f' ({effort:g})' if effort else ''))
    lines.append('| ' + ' | '.join(str(c) for c in cells) + ' |')
  return '\n'.join(lines) + '\n'


def main(argv):
  config, run = runs.start_main(argv, _CONFIG, _WORKDIR)
  if not chips.libtpu_available():
    raise RuntimeError("libtpu is not installed: pip install -e '.[tpu]' (the jax[tpu] extra "
                       'matching the installed jax)')
  with run.timed('compile'):
    records = compile_all(config, lambda rs: run.write_json('programs_so_far.json', rs))
  run.write_text('table.md', table(records))
  run.finish({'programs': records,
              'chips': {k: dataclasses.asdict(v) for k, v in chips.CHIPS.items()},
              'note': 'compiler estimates for the named topology, not measured TPU times'})


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
