"""The shared training loop: exact resumption after SIGKILL, 1 vs 8 devices (the t2i binary's job
with its tiny config), NaN stop, config mismatch refusal."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from diffgeo_jax.training import trainer
from tests import compile_cache  # the run's cache: a resumed subprocess reuses programs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
T2I = [sys.executable, os.path.join(ROOT, 'launch', 'train_t2i.py'),
       f'--config={os.path.join(ROOT, "configs", "digits", "t2i.py")}:tiny']


def _final_params(workdir):
  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'))
  step = manager.latest_step()
  return step, manager.restore(step, args=ocp.args.StandardRestore())


# The least-squares toy below as a process to kill: the loop's checkpointing (async, as in the
# binaries) and resumption are what is under test; the t2i binary itself is killed and resumed on
# gs:// in tests/pod/test_gcs.py. Each batch sleeps so that the kill lands mid-run.
_TOY_RUN = textwrap.dedent('''
    import sys, time
    import jax.numpy as jnp, numpy as np
    from diffgeo_jax.training import trainer
    config = trainer.default_train_config()
    config.update(dict(num_steps=40, batch_size=4, warmup_steps=1, log_every=5, checkpoint_every=5,
                       ema_decay=0.5, schedule='constant', learning_rate=0.05))
    import ml_collections
    full = ml_collections.ConfigDict(dict(train=config, model=dict(width=3)))
    def batch_fn(step):
      time.sleep(0.05)
      x = np.random.default_rng(step).normal(size=(4, 3)).astype(np.float32)
      return {'x': x, 'y': x @ np.array([1.0, -2.0, 0.5], np.float32)}
    def loss_fn(params, batch, key):
      noise = 1e-3 * jax.random.normal(key, batch['y'].shape)  # the step keys must resume too
      return jnp.mean((batch['x'] @ params['w'] - batch['y'] - noise) ** 2), {}
    import jax, json
    _, result = trainer.Trainer(full, sys.argv[1], lambda key: {'w': jax.random.normal(key, (3,))},
                                loss_fn, batch_fn).run()
    print(json.dumps(result))
''')


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
  run = lambda workdir: [sys.executable, '-c', _TOY_RUN, str(workdir)]
  env = compile_cache.env()
  full, cut = tmp_path / 'full', tmp_path / 'cut'
  subprocess.run(run(full), env=env, check=True, capture_output=True, cwd=ROOT)

  proc = subprocess.Popen(run(cut), env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, cwd=ROOT)
  ckpts = cut / 'checkpoints'
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    # A finalized orbax step is a directory named by the step number alone.
    if ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()):
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, 'the run finished before it could be killed'
  killed_at = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
  assert killed_at < 40

  out = subprocess.run(run(cut), env=env, check=True, capture_output=True, text=True, cwd=ROOT)
  resumed = json.loads(out.stdout.strip().splitlines()[-1])
  assert resumed['resumed_from_step'] >= killed_at > 0, out.stderr[-2000:]
  step_a, a = _final_params(full)
  step_b, b = _final_params(cut)
  assert step_a == step_b == 40
  chex.assert_trees_all_equal(a, b)  # bit-exact: same batches, same keys, same computations
  assert len(jax.tree.leaves(a)) > 3  # params, EMA, optimizer state, step


_EIGHT_DEVICES = textwrap.dedent('''
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {root!r})
    from configs.digits import t2i
    from launch import train_t2i
    from diffgeo_jax.training import sharding, trainer
    assert jax.device_count() == 8, jax.devices()
    config = t2i.get_config('tiny')
    job = train_t2i.Job(config)
    batch, key = job.batch_fn(3), jax.random.key(7)
    out = {{}}
    for n in (1, 8):
      mesh = sharding.make_mesh(devices=jax.devices()[:n])
      run = trainer.Trainer(config, {workdir!r}, job.init_fn, job.loss_fn, job.batch_fn, mesh=mesh)
      state = jax.jit(run._init_state, out_shardings=run.state_shardings())(jax.random.key(0))
      before = jax.device_get(state.params)
      state, metrics = run.compiled_step()(state, sharding.put_batch(batch, mesh), key)
      after = jax.device_get(state.params)
      update = jax.tree.map(lambda a, b: a - b, after, before)
      leaves = jax.tree.leaves(update)
      np.savez({workdir!r} + f'/update_{{n}}.npz', *leaves)
      out[n] = {{'loss': float(metrics['loss']),
                'shards': len(state.params['unet']['conv_in']['kernel'].sharding.device_set)}}
    print(json.dumps(out))
''')


def test_eight_devices_match_one_device(tmp_path):
  env = {**compile_cache.env(), 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  script = _EIGHT_DEVICES.format(root=ROOT, workdir=str(tmp_path))
  out = subprocess.run([sys.executable, '-c', script], env=env, check=True, capture_output=True,
                       text=True, cwd=ROOT)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result['8']['shards'] == 8 and result['1']['shards'] == 1
  np.testing.assert_allclose(result['8']['loss'], result['1']['loss'], rtol=1e-5)
  one, eight = np.load(tmp_path / 'update_1.npz'), np.load(tmp_path / 'update_8.npz')
  assert len(one.files) > 10
  for name in one.files:  # same update (the reduction order of the gradient differs slightly)
    np.testing.assert_allclose(eight[name], one[name], rtol=1e-4, atol=1e-7, err_msg=name)


# -- the loop itself, on a least-squares toy ---------------------------------------------------------

def _toy_config(**train):
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict({'width': 3})
  config.train = trainer.default_train_config()
  config.train.update(dict(num_steps=12, batch_size=4, warmup_steps=1, log_every=1,
                           checkpoint_every=5, async_checkpoints=False, ema_decay=0.0,
                           schedule='constant'), **train)
  return config


def _toy(config, workdir, nan_at=None):
  w_true = np.array([1.0, -2.0, 0.5], np.float32)

  def batch_fn(step):
    x = np.random.default_rng(step).normal(size=(4, 3)).astype(np.float32)
    y = x @ w_true
    if step == nan_at:
      y[0] = np.nan
    return {'x': x, 'y': y}

  def loss_fn(params, batch, key):
    del key
    return jnp.mean((batch['x'] @ params['w'] - batch['y']) ** 2), {}

  return trainer.Trainer(config, str(workdir), lambda key: {'w': jnp.zeros(3)}, loss_fn, batch_fn)


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
  run = _toy(_toy_config(), tmp_path, nan_at=6)  # the batch of update 7
  with pytest.raises(trainer.NonFiniteLossError, match='nan at step 7'):
    run.run()
  manager = run.manager()
  assert manager.all_steps() == [5]
  state = run.restore(manager)
  assert int(state.step) == 5
  assert np.all(np.isfinite(state.params['w']))
  # The same five updates from scratch give the same parameters.
  clean, _ = _toy(_toy_config(num_steps=5), tmp_path / 'clean').run()
  chex.assert_trees_all_equal(state.params, clean.params)


def test_workdir_with_other_config_is_refused_listing_fields(tmp_path):
  _toy(_toy_config(num_steps=5), tmp_path).run()
  changed = _toy_config(num_steps=10, learning_rate=0.5)
  changed.model.width = 4
  with pytest.raises(ValueError, match='different config') as err:
    _toy(changed, tmp_path).run()
  assert 'model.width: 3 -> 4' in str(err.value)
  assert 'train.learning_rate: 0.001 -> 0.5' in str(err.value)
  assert 'num_steps' not in str(err.value)  # running longer is allowed
  # Extending the run (a resumable field) continues from step 5.
  state, result = _toy(_toy_config(num_steps=10), tmp_path).run()
  assert result['resumed_from_step'] == 5 and int(state.step) == 10


def test_training_reduces_the_loss_and_logs_scalars(tmp_path):
  from diffgeo_jax.training import summary
  state, result = _toy(_toy_config(num_steps=200, learning_rate=0.1, checkpoint_every=200,
                                   schedule='cosine', end_learning_rate=1e-4),
                       tmp_path).run()
  np.testing.assert_allclose(state.params['w'], [1.0, -2.0, 0.5], atol=0.05)
  scalars = summary.read_scalars(str(tmp_path / 'tensorboard'))
  assert [s for s, _ in scalars['train/loss']] == list(range(1, 201))
  assert scalars['train/loss'][-1][1] < 1e-2 * scalars['train/loss'][0][1]


def test_ema_with_warmup_matches_closed_form():
  params = {'w': jnp.zeros(())}
  tx = trainer.make_optimizer(_toy_config(grad_clip=0.0, schedule='constant', warmup_steps=0,
                                          learning_rate=0.0).train)
  # Zero learning rate: params stay 0, so feed the EMA by hand through a loss-free step.
  step = trainer.make_train_step(lambda p, b, k: (jnp.sum(p['w'] * 0.0), {}), tx, ema_decay=0.9)
  state = trainer.TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), {'w': jnp.ones(())})
  expected = 1.0
  for i in range(4):
    state, _ = step(state, {}, jax.random.key(0))
    d = min(0.9, (1 + i) / (10 + i))
    expected = d * expected
    np.testing.assert_allclose(state.ema_params['w'], expected, rtol=1e-6)


def test_rounds_equal_one_run_and_compile_once(tmp_path):
  # run(until=...) in rounds (the adversarial DUO loop) reaches the same state as one run, and the
  # Trainer builds its jitted step once.
  whole, _ = _toy(_toy_config(num_steps=9, learning_rate=0.1), tmp_path / 'a').run()
  t = _toy(_toy_config(num_steps=9, learning_rate=0.1), tmp_path / 'b')
  state, result = t.run(until=4)
  assert int(state.step) == 4 and result['steps'] == 4
  first = t.compiled_step()
  state, result = t.run()
  assert t.compiled_step() is first
  assert result['resumed_from_step'] == 4 and int(state.step) == 9
  chex.assert_trees_all_close(state.params, whole.params, rtol=1e-6)
  with pytest.raises(ValueError, match='until must be'):
    t.run(until=10)
