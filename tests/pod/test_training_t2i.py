"""Training on several hosts: N processes compute what one process computes, and a dead host
stops the others with an error instead of a hang."""

import json
import os
import sys

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from tests import multihost, report

ROOT = multihost.ROOT
T2I = [sys.executable, os.path.join(ROOT, 'launch', 'train_t2i.py'),
       f'--config={os.path.join(ROOT, "configs", "digits", "t2i.py")}:tiny',
       '--config.train.batch_size=8', '--config.train.log_every=2']


def _final_params(workdir):
  """The latest checkpoint, restored onto this process's first device (whatever saved it)."""
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.CheckpointManager(epath.Path(workdir, 'checkpoints'),
                             item_handlers=ocp.StandardCheckpointHandler()) as manager:
    step = manager.latest_step()
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                          manager.item_metadata(step))
    return step, manager.restore(step, args=ocp.args.StandardRestore(target))


def test_two_processes_end_with_the_parameters_of_one(tmp_path):
  """The same global batch on 2 devices: 1 process x 2 devices, then 2 processes x 1 device.

  Two devices, so that the all-reduce of the gradient adds exactly two partial sums, which
  floating point adds the same way in any order: gloo (across processes) and XLA's in-process
  all-reduce then agree to the bit. (Over 4 devices their summation orders differ, the gradients
  by ~1e-7 relative, and Adam's normalised step turns that into a different sign for the few
  gradients that are below the rounding: measured 16 of 48,603 parameters beyond 1e-6 after 4
  steps; losses equal to 1e-7.)"""
  steps = ['--config.train.num_steps=4', '--config.train.checkpoint_every=4']
  runs = {}
  for n in (1, 2):
    workdir = runs[n] = tmp_path / f'p{n}'
    procs = multihost.launch(T2I + steps + [f'--workdir={workdir}'], n, flags=n > 1,
                             devices_per_process=2 // n, timeout=400,
                             log_dir=str(tmp_path / f'logs{n}'))
    assert all(p.returncode == 0 for p in procs), multihost.report(procs)
  results = {n: json.loads((w / 'results.json').read_text()) for n, w in runs.items()}
  for n, r in results.items():
    assert r['runtime']['processes'] == n and r['runtime']['devices'] == 2
    assert r['metrics']['devices'] == 2 and r['metrics']['steps'] == 4
  (step_1, one), (step_2, two) = _final_params(runs[1]), _final_params(runs[2])
  assert step_1 == step_2 == 4
  chex.assert_trees_all_close(two, one, rtol=1e-5, atol=0)
  diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(two),
                                                          jax.tree.leaves(one)))
  report.record('train_t2i 2 processes vs 1: max abs parameter difference after 4 steps', diff)
  np.testing.assert_allclose(results[2]['metrics']['final_loss'],
                             results[1]['metrics']['final_loss'], rtol=1e-6)
  # Process 0 alone wrote the exported pipeline and the results.
  assert (runs[2] / 'pipeline' / 'model_index.json').is_file()


def test_a_killed_process_stops_the_others_with_an_error(tmp_path):
  workdir = tmp_path / 'killed'
  steps = ['--config.train.num_steps=100000', '--config.train.checkpoint_every=2']
  ckpts = workdir / 'checkpoints'
  ready = lambda: ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())
  procs = multihost.launch(T2I + steps + [f'--workdir={workdir}'], 2, timeout=300,
                           heartbeat_timeout_s=10, kill=(1, ready))
  survivor, killed = procs
  assert killed.killed, multihost.report(procs)
  assert not survivor.timed_out, multihost.report(procs)
  assert survivor.returncode != 0, multihost.report(procs)
  report.record('seconds from the kill to the survivor\'s exit (heartbeat timeout 10 s)',
                survivor.seconds - survivor.killed_at)
  # It says why it stopped.
  print(survivor.tail(3000))
  text = survivor.output.lower()
  assert any(w in text for w in ('heartbeat', 'task', 'unavailable', 'connection', 'peer')), (
      survivor.tail())
