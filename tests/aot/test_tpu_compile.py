"""Ahead-of-time TPU compilation (diffgeo_jax.aot, launch/tpu_compile.py) with libtpu, no TPU:
the memory figures against arrays of known size, a program too large for a chip, and every job of
the tiny model compiled for a one-host and a four-host v5e slice by the binary."""

import json
import os
import subprocess
import sys


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from diffgeo_jax import distributed
from diffgeo_jax.aot import analysis, chips, jobs
from diffgeo_jax.models import attention
from tests import report

pytest.importorskip('libtpu', reason='libtpu (pip install .[tpu]) compiles for TPU topologies')

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _sds(shape, mesh, spec, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def test_matmul_memory_and_flops_are_the_arrays_it_holds_and_2mnk():
  devices = chips.topology_devices('v5e:2x2')
  mesh = distributed.make_mesh(devices=devices)
  m, k, n = 1024, 2048, 512
  a = _sds((m, k), mesh, P('data'))  # rows over the 4 chips
  b = _sds((k, n), mesh, P())  # replicated
  lower = lambda: jax.jit(jnp.matmul, out_shardings=NamedSharding(mesh, P('data'))).lower(a, b)
  r = analysis.compile_program(lower, chips.chip_of('v5e:2x2'))
  mem = r['hbm_bytes']
  assert r['compiled'] and r['fits']
  assert mem['arguments'] == (m // 4) * k * 4 + k * n * 4  # a quarter of a, all of b
  assert mem['outputs'] == (m // 4) * n * 4
  assert mem['temp'] == 0 and mem['alias'] == 0
  assert mem['total'] == mem['arguments'] + mem['outputs'] + mem['code']
  assert r['flops_per_chip'] == 2 * (m // 4) * n * k
  chip = chips.CHIPS['v5e']
  want = max(2 * (m // 4) * n * k / chip.peak_flops,
             r['bytes_accessed_per_chip'] / chip.hbm_bandwidth)
  assert r['roofline_seconds'] == pytest.approx(want)
  # Every byte of the arrays is read or written at least once.
  assert r['bytes_accessed_per_chip'] >= mem['arguments'] + mem['outputs']
  report.record('aot matmul per-chip HBM (args, out, code)',
                f'{mem["arguments"]}, {mem["outputs"]}, {mem["code"]}')


def test_a_program_larger_than_the_chip_is_reported_as_not_fitting():
  # Two 12 GiB operands on one 16 GiB v5e chip.
  devices = chips.topology_devices('v5e:1x1')
  mesh = distributed.make_mesh(devices=devices)
  a = _sds((49152, 65536), mesh, P())
  lower = lambda: jax.jit(lambda x, y: x + y).lower(a, a)
  r = analysis.compile_program(lower, chips.chip_of('v5e:1x1'))
  report.record('aot too-large case', {k: r.get(k) for k in ('compiled', 'fits', 'hbm_bytes')})
  assert r['fits'] is False
  # Whether the compiler refuses it or compiles it, the figure is at least the three arrays.
  assert r['hbm_bytes']['total'] >= 3 * 49152 * 65536 * 4 * 0.99
  assert r['hbm_bytes']['total'] > chips.CHIPS['v5e'].hbm_bytes


def test_the_effort_reaches_the_compiler_and_is_recorded():
  devices = chips.topology_devices('v5e:2x2')
  mesh = distributed.make_mesh(devices=devices)
  a = _sds((512, 512), mesh, P('data'))

  def layers(x):
    for _ in range(20):
      x = jnp.tanh(x @ x.T) * 0.5 + jnp.sin(x)
    return x

  lower = lambda: jax.jit(layers).lower(a)
  chip = chips.chip_of('v5e:2x2')
  low, default = (analysis.compile_program(lower, chip, e) for e in (-1.0, 0.0))
  assert low['compiled'] and default['compiled']
  assert (low['exec_time_optimization_effort'], default['exec_time_optimization_effort']) == (
      -1.0, 0.0)
  # Less optimisation, another program: libtpu fuses less at -1 (more code, more bytes moved).
  assert low['hbm_bytes']['code'] != default['hbm_bytes']['code']
  assert low['bytes_accessed_per_chip'] != default['bytes_accessed_per_chip']
  report.record('aot effort -1 vs 0 (code bytes, GB accessed)',
                f'{low["hbm_bytes"]["code"]} vs {default["hbm_bytes"]["code"]}, '
                f'{low["bytes_accessed_per_chip"] / 1e9:.3f} vs '
                f'{default["bytes_accessed_per_chip"] / 1e9:.3f}')
  with pytest.raises(ValueError, match='exec_time_optimization_effort'):
    analysis.compile_program(lower, chip, 2.0)


def test_attention_is_traced_with_the_target_platforms_chunks():
  b, lq, h, lk = 2, 4096, 8, 4096
  cpu = attention.forward_chunks(b, lq, h, lk)
  with attention.compiling_for('tpu'):
    tpu = attention.forward_chunks(b, lq, h, lk)
  assert cpu[1] < lq  # cache-sized query chunks on this CPU host
  assert tpu == (h, lq)  # one chunk on an accelerator (2^28 scores)
  with pytest.raises(ValueError, match='platform'):
    with attention.compiling_for('ipu'):
      pass


@pytest.fixture(scope='module')
def tiny_results(tmp_path_factory):
  work = tmp_path_factory.mktemp('aot')
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch', 'tpu_compile.py'),
       '--config=' + os.path.join(ROOT, 'configs', 'tpu_compile', 'default.py') + ':tiny',
       '--config.topology=v5e:2x2,v5e:4x4', f'--workdir={work}',
       # the compiler's least optimisation: the same lowering and SPMD partitioning for both
       # slices (what can fail), 45 s less of CI's time than the default effort
       '--config.exec_time_optimization_effort=-1'],
      capture_output=True, text=True, timeout=900, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads((work / 'results.json').read_text()), (work / 'table.md').read_text()


def test_a_bad_effort_is_refused_before_compiling(tmp_path):
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch', 'tpu_compile.py'),
       '--config=' + os.path.join(ROOT, 'configs', 'tpu_compile', 'default.py') + ':tiny',
       '--config.exec_time_optimization_effort=3', f'--workdir={tmp_path}'],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert proc.returncode != 0
  assert 'config.exec_time_optimization_effort must be in [-1, 1], got 3' in proc.stderr
  assert not (tmp_path / 'results.json').exists()


def test_every_tiny_job_compiles_for_one_and_four_host_v5e_slices(tiny_results):
  results, table = tiny_results
  records = results['metrics']['programs']
  want = {('sample', 'cfg_step'), ('sample', 'loop'), ('explore', 'pullback_iteration'),
          ('train_t2i', 'train_step'), ('duo', 'train_step'), ('lora', 'train_step'),
          ('jys', 'grid_pass'), ('goar', 'retrain')}
  for topology, hosts, n in (('v5e:2x2', 1, 4), ('v5e:4x4', 4, 16)):
    got = [r for r in records if r['topology'] == topology]
    assert {(r['job'], r['program']) for r in got} == want
    for r in got:
      assert r['compiled'], r.get('error')
      assert r['fits'] and r['hosts'] == hosts and r['chips'] == r['devices'] == n
      assert r['mesh']['data'] * r['mesh']['model'] == n
      assert r['flops_per_chip'] > 0 and r['hbm_bytes']['total'] > 0
  assert table.count('| yes |') >= 2 * len(want)
  # DUO's paper batch (tiny: 2 pairs) cannot split over 16 chips: the rest goes to FSDP.
  duo = next(r for r in records if r['topology'] == 'v5e:4x4' and r['job'] == 'duo')
  assert duo['mesh'] == {'data': 2, 'model': 8}


def test_the_sampling_step_holds_its_replicated_parameters_and_its_rows(tiny_results):
  records = tiny_results[0]['metrics']['programs']
  m = jobs.shapes.abstract_model('tiny')
  params = sum(np.prod(x.shape) * 4 for x in jax.tree.leaves(m.unet_params))
  rows = np.prod(m.sample_shape) * 4 + 2 * np.prod(m.context.shape) * 4
  step = {r['topology']: r for r in records if r['program'] == 'cfg_step'}
  # One sample per chip: 4 chips or 16, each holds all the parameters (replicated) and one row
  # of x, cond and uncond (sharded), so the same bytes; TPU tiles pad small arrays, so at least
  # the unpadded sizes.
  assert step['v5e:2x2']['hbm_bytes']['arguments'] == step['v5e:4x4']['hbm_bytes']['arguments']
  assert step['v5e:2x2']['hbm_bytes']['arguments'] >= params + rows
  for topology, r in step.items():
    loop = next(x for x in records if x['topology'] == topology and x['program'] == 'loop')
    # XLA counts the loop's body once: the estimate adds the other steps.
    assert loop['has_while_loop'] and not r['has_while_loop']
    assert loop['flops_per_call_estimate'] == pytest.approx(
        loop['flops_per_chip'] + (loop['steps_per_call'] - 1) * r['flops_per_chip'])


@pytest.mark.parametrize('topology, chips_, devices, hosts, hbm_gib', [
    ('v5e:1x1', 1, 1, 1, 16), ('v5e:2x2', 4, 4, 1, 16), ('v5e:2x4', 8, 8, 1, 16),
    ('v5e:4x4', 16, 16, 4, 16), ('v4:2x2x2', 8, 16, 2, 16), ('v5p:2x2x1', 4, 4, 1, 95),
    ('v6e:2x4', 8, 8, 1, 32)])
def test_topologies_as_cloud_tpu_slices(topology, chips_, devices, hosts, hbm_gib):
  """Chips, JAX devices (v4: one per TensorCore, each half a chip) and hosts (v5e/v6e slices of
  up to 8 chips are one VM) of the slices the tool compiles for."""
  d = chips.topology_devices(topology)
  assert chips.chip_count(topology) == chips_
  assert len(d) == devices and len({x.process_index for x in d}) == hosts
  chip = chips.per_device(chips.chip_of(topology), devices // chips_)
  assert chip.hbm_bytes == hbm_gib * 2 ** 30
  with pytest.raises(ValueError, match='topology'):
    chips.chip_of('v9:2x2')
