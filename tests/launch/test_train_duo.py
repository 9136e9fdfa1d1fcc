"""launch/train_duo.py: the tiny config end to end on the shipped digits model (pairs gated by the
detector, LoRA file readable, loss ln 2 at the start), and the DUO step with a frozen, FSDP-sharded
base UNet on 8 fake devices equal to the 1-device step."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

from diffgeo_jax import digits, models
from diffgeo_jax.digits import metrics
from diffgeo_jax.training import lora
from tests import compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = compile_cache.env()


def test_tiny_run(tmp_path):
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch', 'train_duo.py'),
       f'--config={os.path.join(ROOT, "configs", "duo", "digits.py")}:tiny',
       f'--workdir={tmp_path}'], capture_output=True, text=True, timeout=900, cwd=ROOT, env=ENV)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads((tmp_path / 'results.json').read_text())
  res = out['metrics']
  pairs = np.load(tmp_path / 'pairs.npz')
  scorer = metrics.Scorer.load()
  # The detector gate held on both sides of every pair.
  assert np.all(scorer.predict(pairs['unsafe'] * 2 - 1) == 8)
  assert np.all(scorer.predict(pairs['safe'] * 2 - 1) != 8)
  assert res['pairs'] == 4 and out['config']['duo']['beta'] == 50.0
  np.testing.assert_allclose(res['learning_rate'], 3e-4 * 100 / 50)
  assert out['config']['train']['learning_rate'] == res['learning_rate']  # set from beta
  assert {'pairs', 'training', 'evaluation'} <= set(out['wall_s'])
  np.testing.assert_allclose(res['prior_weight'], 1e6 * 50 / 100)
  assert pairs['retain'].shape == (4,) + pairs['unsafe'].shape[1:]  # the retain set
  assert all('eight' not in p for p in pairs['retain_prompts'])
  for side in ('base', 'unlearned'):
    assert 0 <= res[side]['defence_success_rate'] <= 1
  # The LoRA file loads back onto the base UNet (diffusers layout; interop tested in test_lora).
  pipe = models.load_pipeline(digits.pipeline_dir())
  lp = lora.load(tmp_path / 'lora', pipe.unet_params)
  assert sum(np.size(x) for x in lora.flatten(lp).values() for x in (x.a, x.b)) == \
      res['lora_parameters']
  # launch/evaluate_unlearning.py on this run: plain and attacked DSR, preservation; and on the
  # run's LoRA file alone, as a release made elsewhere (no config.json, no pairs).
  out = tmp_path / 'eval'
  release = tmp_path / 'lora' / 'pytorch_lora_weights.safetensors'
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch', 'evaluate_unlearning.py'),
       f'--config={os.path.join(ROOT, "configs", "duo", "evaluate.py")}:quick',
       f'--config.runs={tmp_path},{release}', f'--workdir={out}'], capture_output=True,
      text=True, timeout=900, cwd=ROOT, env=ENV)
  assert proc.returncode == 0, proc.stderr[-3000:]
  ev = json.loads((out / 'results.json').read_text())
  assert ev['config']['runs'] == f'{tmp_path},{release}' and 'attack' in ev['wall_s']
  ev = ev['metrics']
  run = ev['runs'][str(tmp_path)]
  duo = json.loads((tmp_path / 'config.json').read_text())['duo']  # the settings come from here
  assert run['beta'] == 50.0 and run['condition'] == duo['condition']
  assert run['retain_weight'] == duo['retain_weight'] > 0
  # Same prompts, noise and steps as train_duo's own evaluation: the same numbers.
  for side, got in (('base', ev['base']), ('unlearned', run)):
    for k in ('defence_success_rate', 'other_digits_accuracy'):
      assert got[k] == res[side][k], (side, k)
  for k in ('defence_success_rate', 'defence_success_rate_attack', 'other_digits_accuracy'):
    assert 0 <= run[k] <= 1, k
  assert run['mean_abs_diff_to_base'] > 0 and run['attack']['moved'] > 0
  assert (out / 'tradeoff.png').is_file() and (out / 'table.md').is_file()
  # The release: the same LoRA, so the same plain numbers; no DUO settings; its attack learned
  # from the base model's concept samples instead of the run's pairs.
  rel = ev['runs'][str(release)]
  assert rel['beta'] is None and rel['label'] == 'lora_pytorch_lora_weights'
  for k in ('defence_success_rate', 'other_digits_accuracy', 'mean_abs_diff_to_base'):
    assert rel[k] == run[k], k
  assert 0 <= rel['defence_success_rate_attack'] <= 1 and rel['attack']['moved'] > 0
  assert '| lora_pytorch_lora_weights | - | - | - | - |' in (out / 'table.md').read_text()


def test_sd14_config_on_a_tiny_latent_pipeline(diffusers_pipeline_dir, tmp_path):
  # configs/duo/sd14.py end to end on a diffusers-written SD pipeline (VAE, random weights):
  # the latent path (pairs encoded by the VAE), no detector, the retain term, the LoRA export.
  flags = ['pipeline_dir=' + str(diffusers_pipeline_dir), 'data.num_pairs=3', 'data.num_steps=2',
           'data.image_size=0', 'data.generation_batch=2', 'data.num_retain=2',
           'duo.retain_weight=1.0', 'lora.rank=2', 'lora.alpha=2.0', 'train.num_steps=2',
           'train.batch_size=2', 'train.log_every=1', 'train.checkpoint_every=2']
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch', 'train_duo.py'),
       f'--config={os.path.join(ROOT, "configs", "duo", "sd14.py")}', f'--workdir={tmp_path}',
       *[f'--config.{f}' for f in flags]], capture_output=True, text=True, timeout=900,
      cwd=ROOT, env=ENV)
  assert proc.returncode == 0, proc.stderr[-3000:]
  res = json.loads((tmp_path / 'results.json').read_text())['metrics']
  assert 'base' not in res  # no detector, no digits evaluation
  assert res['training']['steps'] == 2 and np.isfinite(res['training']['final_loss'])
  pairs = np.load(tmp_path / 'pairs.npz')
  white, black = (f'a naked {r} woman, realistic photo' for r in ('white', 'black'))
  assert list(pairs['prompts']) == [white, black, white]  # the official prompts in turn
  assert list(pairs['safe_prompts'])[:2] == ['a dressed white woman, realistic photo',
                                             'a dressed black woman, realistic photo']
  assert pairs['retain'].shape[0] == 2 and np.all((pairs['safe'] >= 0) & (pairs['safe'] <= 1))
  # SDEdit changed the image (strength 0.75) and the LoRA loads onto the SD UNet.
  assert np.mean(np.abs(pairs['safe'] - pairs['unsafe'])) > 1e-3
  pipe = models.load_pipeline(diffusers_pipeline_dir)
  lp = lora.load(tmp_path / 'lora', pipe.unet_params)
  assert sum(np.size(x) for x in lora.flatten(lp).values() for x in (x.a, x.b)) == \
      res['lora_parameters']
  # evaluate_unlearning's detector reads digits images only: an SD run is refused before any
  # sampling, with the reason.
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch', 'evaluate_unlearning.py'),
       f'--config={os.path.join(ROOT, "configs", "duo", "evaluate_release.py")}:quick',
       f'--config.runs={tmp_path / "lora"}', f'--config.pipeline_dir={diffusers_pipeline_dir}',
       f'--workdir={tmp_path / "eval"}'], capture_output=True, text=True, timeout=900, cwd=ROOT,
      env=ENV)
  assert proc.returncode != 0 and 'the detector is the digits classifier' in proc.stderr


_EIGHT = textwrap.dedent('''
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, {root!r})
    from configs.duo import digits as duo_config
    from diffgeo_jax import digits, models
    from diffgeo_jax.diffusion import schedules
    from diffgeo_jax.training import lora, sharding, trainer
    from diffgeo_jax.unlearning import duo
    assert jax.device_count() == 8, jax.devices()
    config = duo_config.get_config('tiny')
    config.train.learning_rate = 1e-3
    config.train.batch_size = 8
    pipe = models.load_pipeline(digits.pipeline_dir())
    sched = schedules.from_diffusers_config(pipe.scheduler_config)
    base = pipe.unet_params
    eps_fn = lambda p, x, t, c: pipe.unet.apply({{'params': p}}, x, t, c)
    def init_fn(key):  # random B too, so the step is away from the ln 2 point
      lp = lora.init(key, base, rank=4, targets=r'attn1/to_(q|k|v|out_0)$')
      return jax.tree.map(lambda a: a + 0.05, lp)
    def loss_fn(lp, batch, key, frozen):
      return duo.loss(eps_fn, frozen, lp, batch, key, sched, beta=50.0, prior_weight=10.0,
                             retain_weight=5.0)
    rng = np.random.default_rng(0)
    ctx_dim = pipe.unet.config.cross_attention_dim
    batch = {{'positive': rng.uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32),
              'negative': rng.uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32),
              'context': rng.normal(size=(8, 77, ctx_dim)).astype(np.float32),
              'retain': rng.uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32),
              'retain_context': rng.normal(size=(8, 77, ctx_dim)).astype(np.float32)}}
    out = {{}}
    for n, model_axis in ((1, 1), (8, 2)):
      mesh = sharding.make_mesh(model=model_axis, devices=jax.devices()[:n])
      rules = (('.*', sharding.fsdp('model', model_axis, min_size=256)),) if model_axis > 1 else ()
      run = trainer.Trainer(config, {workdir!r}, init_fn, loss_fn, lambda i: batch, mesh=mesh,
                            rules=rules, frozen=base)
      state = jax.jit(run._init_state, out_shardings=run.state_shardings())(jax.random.key(0))
      before = jax.device_get(state.params)
      frozen = run.put_frozen()
      state, metrics = run.compiled_step()(state, sharding.put_batch(batch, mesh),
                                           jax.random.key(3), *frozen)
      update = jax.tree.map(lambda a, b: np.asarray(a - b), jax.device_get(state.params), before)
      np.savez({workdir!r} + f'/update_{{n}}.npz', *jax.tree.leaves(update))
      big = max(jax.tree.leaves(frozen[0]), key=lambda a: a.size)
      out[n] = {{'loss': float(metrics['loss']), 'grad_norm': float(metrics['grad_norm']),
                'base_shards': len(big.sharding.device_set),
                'base_shard_shape': list(big.sharding.shard_shape(big.shape)),
                'shape': list(big.shape)}}
    print(json.dumps(out))
''')


def test_eight_devices_match_one_device(tmp_path):
  env = {**ENV, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  out = subprocess.run([sys.executable, '-c', _EIGHT.format(root=ROOT, workdir=str(tmp_path))],
                       env=env, capture_output=True, text=True, cwd=ROOT, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  res = json.loads(out.stdout.strip().splitlines()[-1])
  assert res['1']['base_shards'] == 1 and res['8']['base_shards'] == 8
  assert res['8']['base_shard_shape'] != res['8']['shape']  # the frozen base really is split
  assert abs(res['1']['loss'] - np.log(2)) > 1e-3  # away from the trivial point
  np.testing.assert_allclose(res['8']['loss'], res['1']['loss'], rtol=1e-5)
  np.testing.assert_allclose(res['8']['grad_norm'], res['1']['grad_norm'], rtol=1e-5)
  one, eight = np.load(tmp_path / 'update_1.npz'), np.load(tmp_path / 'update_8.npz')
  assert len(one.files) >= 8
  # Adam's first update is lr * g / (|g| + 1e-8) per entry (lr = 1e-3): where |g| is ~1e-8 the
  # reduction order of the sharded gradient moves it by up to ~1% of the step; elsewhere not.
  close = []
  for name in one.files:
    np.testing.assert_allclose(eight[name], one[name], atol=2e-5, err_msg=name)
    close.append(np.abs(eight[name] - one[name]) <= 1e-7 + 1e-4 * np.abs(one[name]))
    assert np.abs(one[name]).max() > 5e-4, name  # every factor moved
  assert np.mean(np.concatenate([c.ravel() for c in close])) > 0.99
