"""launch/sample.py and launch/explore.py on the shipped digits model as the hosts of a pod: N JAX
processes on 127.0.0.1 (`tests/multihost.py`, CPU devices) compute what one process on one device
computes, and only process 0 writes.

Every process gets its own --workdir, so a write from any process but 0 would show.
Tolerances: the runs differ only in how the batch is split over devices, i.e. in XLA:CPU's
float32 rounding for other batch shapes. Measured (recorded in the test report): images 2.3e-6
(2 x 2 and 4 x 1), latent and tangent bases 1.1e-6 and 1.0e-6, singular values 7.6e-6 on values
up to 18, x_0 2.8e-6; the asserted tolerances are 1e-5 (relative for singular values and x_0).
"""

import json
import os
import sys

import numpy as np
import pytest

from tests import multihost, report

ROOT = multihost.ROOT

# Three prompts x two seeds in batches of 4: on 4 devices the second batch (2 images) is padded.
SAMPLE = [sys.executable, os.path.join(ROOT, 'launch', 'sample.py'),
          f'--config={os.path.join(ROOT, "configs", "sample", "default.py")}:quick',
          "--config.prompts=('a red digit three', 'a green digit seven', 'a blue digit one')",
          '--config.seeds=(0, 1)', '--config.batch_size=4', '--config.prompts_per_row=1']
# One prompt, three seeds (padded to four on four devices), two basis times, k = 2, 3 iterations,
# edits of one guidance step at gamma 0 and 0.3.
EXPLORE = [sys.executable, os.path.join(ROOT, 'launch', 'explore.py'),
           f'--config={os.path.join(ROOT, "configs", "explore", "digits.py")}:quick',
           "--config.prompts=('a red digit three',)", '--config.seeds=(0, 1, 2)',
           '--config.num_steps=4', '--config.num_vectors=2', '--config.num_iters=3',
           '--config.edit_gammas=(0.0, 0.3)', '--config.edit_guidance_steps=1']


def _run(argv, tmp_path, name, num_processes, devices_per_process, timeout=240):
  """Runs `argv` as `num_processes` processes, process i writing to tmp_path/name/p<i>; returns
  the workdirs. One process runs without --jax_distributed, as a user runs it."""
  workdirs = [tmp_path / name / f'p{i}' for i in range(num_processes)]
  procs = multihost.launch(argv, num_processes, devices_per_process=devices_per_process,
                           timeout=timeout, flags=num_processes > 1,
                           argv_for=lambda i: [f'--workdir={workdirs[i]}'],
                           log_dir=str(tmp_path / name / 'logs'))
  assert all(p.returncode == 0 for p in procs), multihost.report(procs)
  report.record(f'{name}: wall s', max(p.seconds for p in procs))
  for other in workdirs[1:]:  # only process 0 writes
    assert not other.exists() or not any(other.iterdir()), sorted(os.listdir(other))
  return workdirs


def _results(workdir) -> dict:
  return json.loads((workdir / 'results.json').read_text())


@pytest.fixture(scope='module')
def one_device_samples(tmp_path_factory):
  workdir, = _run(SAMPLE, tmp_path_factory.mktemp('sample'), 'one_device', 1, 1)
  return np.load(workdir / 'samples.npz')


@pytest.mark.parametrize('num_processes,devices_per_process', [(2, 2), (4, 1)])
def test_sample_on_several_processes_gives_the_one_device_images(
    tmp_path, one_device_samples, num_processes, devices_per_process):
  name = f'{num_processes}x{devices_per_process}'
  main, *_ = _run(SAMPLE, tmp_path, name, num_processes, devices_per_process)
  got, want = np.load(main / 'samples.npz'), one_device_samples
  assert got['images'].shape == (6, 16, 16, 3)
  np.testing.assert_array_equal(got['prompts'], want['prompts'])
  np.testing.assert_array_equal(got['seeds'], want['seeds'])
  err = float(np.abs(got['images'] - want['images']).max())
  report.record(f'sample {name} vs 1 device: max |image difference|', err)
  assert err <= 1e-5, err
  # Not a trivial match: different prompts and seeds give different images.
  assert np.abs(got['images'][0] - got['images'][1]).mean() > 1e-2
  results = _results(main)
  assert results['runtime']['processes'] == num_processes
  assert results['runtime']['devices'] == 4
  assert results['runtime']['local_devices'] == devices_per_process
  assert results['metrics']['num_images'] == 6
  assert {'config.json', 'samples.png', 'samples.npz', 'results.json'} <= set(os.listdir(main))


def test_explore_on_two_processes_gives_the_one_device_bases(tmp_path):
  main, _ = _run(EXPLORE, tmp_path, '2x2', 2, 2)
  ref, = _run(EXPLORE, tmp_path, 'one_device', 1, 1)
  got, want = np.load(main / 'bases.npz'), np.load(ref / 'bases.npz')
  assert got['latent_basis'].shape == (2, 3, 2, 16, 16, 3)  # (times, samples, k, H, W, C)
  np.testing.assert_array_equal(got['times'], want['times'])
  np.testing.assert_array_equal(got['num_iters'], want['num_iters'])
  errors = {k: float(np.abs(got[k] - want[k]).max())
            for k in ('singular_values', 'latent_basis', 'tangent_basis', 'x0')}
  for k, err in errors.items():
    report.record(f'explore 2x2 vs 1 device: max |{k} difference|', err)
  np.testing.assert_allclose(got['singular_values'], want['singular_values'], rtol=1e-5)
  # Unit basis vectors (entries up to ~0.6): the same signs and directions to 1e-5.
  for k in ('latent_basis', 'tangent_basis'):
    assert errors[k] <= 1e-5, (k, errors[k])
  assert errors['x0'] <= 1e-5 * float(np.abs(want['x0']).max())
  # The three samples have different bases (each device's slice is its own sample, not a copy).
  assert np.abs(got['singular_values'][:, 0] - got['singular_values'][:, 1]).max() > 1e-3
  r, r_ref = _results(main), _results(ref)
  assert (r['runtime']['processes'], r['runtime']['devices']) == (2, 4)
  np.testing.assert_allclose(r['metrics']['geodesic_same_prompt'],
                             r_ref['metrics']['geodesic_same_prompt'], atol=1e-4)
  np.testing.assert_allclose(r['metrics']['edit']['mean_abs_pixel_change_top'],
                             r_ref['metrics']['edit']['mean_abs_pixel_change_top'], atol=1e-5)
