"""launch/train_lora.py, launch/evaluate_customization.py and launch/decor_components.py: the
tiny digits config end to end (prior preservation and DECOR at fine-tuning on), the training loss
against a hand-computed denoising error, the latent (SD-shaped) path from an image folder, and the
component analysis against numpy's SVD."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from diffgeo_jax import digits, models
from diffgeo_jax.diffusion import pipeline
from diffgeo_jax.training import lora
from tests import compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = compile_cache.env()
CONFIG = os.path.join(ROOT, 'configs', 'decor', 'digits.py')


def _run(script, *args, timeout=900):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'launch', script), *args],
                        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=ENV)
  return proc


def test_tiny_train_and_evaluate(tmp_path):
  flags = ['--config.prior.weight=1.0', '--config.decor.train_strength=0.5']
  proc = _run('train_lora.py', f'--config={CONFIG}:tiny', f'--workdir={tmp_path}', *flags)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads((tmp_path / 'results.json').read_text())
  res = out['metrics']
  assert res['references'] == 4 and res['prior_images'] == 2
  assert out['config']['data']['instance_prompt'] == 'a sks digit'
  assert res['training']['steps'] == 4 and np.isfinite(res['training']['final_loss'])
  cls = np.load(tmp_path / 'class_images.npz')  # the prior set: base samples of the class prompts
  assert list(cls['prompts']) == ['a red digit zero', 'a green digit zero']
  pipe = models.load_pipeline(digits.pipeline_dir())
  lp = lora.load(tmp_path / 'lora', pipe.unet_params)
  assert sum(np.size(x) for x in lora.flatten(lp).values() for x in (x.a, x.b)) == \
      res['lora_parameters']
  assert (tmp_path / 'references.png').is_file()

  proc = _run('evaluate_customization.py', f'--config={CONFIG}:tiny', f'--workdir={tmp_path}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  ev = json.loads((tmp_path / 'evaluation' / 'results.json').read_text())
  assert ev['binary'] == 'evaluate_customization' and ev['config']['eval']['samples_per_digit'] == 1
  ev = ev['metrics']
  rows = ev['variants']
  assert list(rows) == ['base', 'lora x 0.5', 'lora x 1', 'decor 0', 'decor 1',
                        'decor rank all']
  assert ev['samples'] == 9  # one sample of each of the nine other digits
  # DECOR at strength 0 is plain LoRA (same noise): the same numbers.
  for k in ('leakage_rate', 'digit_accuracy', 'colour_distance', 'colour_match'):
    assert rows['decor 0'][k] == rows['lora x 1'][k], k
  for r in rows.values():
    assert 0 <= r['leakage_rate'] + r['digit_accuracy'] <= 1  # disjoint events
  assert set(ev['comparison']) == {'decor 1'}
  for name in ('pareto.png', 'samples.png', 'table.md'):
    assert (tmp_path / 'evaluation' / name).is_file(), name


_LOSS = textwrap.dedent('''
    import sys
    import jax, jax.numpy as jnp, numpy as np
    sys.path.insert(0, {root!r})
    from configs.decor import digits as decor_config
    from diffgeo_jax import runs
    from diffgeo_jax.diffusion import pipeline
    from diffgeo_jax.text import decor
    from diffgeo_jax.training import lora
    from launch import train_lora
    config = decor_config.get_config('tiny')
    config.prior.weight = 0.5
    config.decor.train_strength = 0.75
    config.train.batch_size = 4
    run = runs.start(config, {workdir!r}, config_file=None)
    job = train_lora.Job(config, run)
    # The class images are cached in the workdir and read back by the next Job.
    cached = np.load({workdir!r} + '/class_images.npz')
    np.testing.assert_array_equal(train_lora.Job(config, run).x_class, job.x_class)
    np.testing.assert_allclose(cached['images'] * 2 - 1, job.x_class, atol=1e-6)
    # The instance context is DECOR's projection of the instance prompt.
    x = pipeline.encode_prompts(job.pipe, ['a sks digit'])
    xu = pipeline.encode_prompts(job.pipe, ['a digit three'])
    np.testing.assert_allclose(job.c_instance, decor.project(x, xu, 0.75, 2)[0], atol=1e-6)
    assert np.abs(job.c_instance - np.asarray(x[0])).max() > 1e-3
    # Half instance rows, half class rows with their own prompts' embeddings.
    batch = job.batch_fn(0)
    assert batch['instance'].tolist() == [1, 1, 0, 0]
    np.testing.assert_array_equal(batch['context'][0], job.c_instance)
    assert any(np.array_equal(batch['context'][2], c) for c in job.c_class)
    # The references: training threes in orange, exactly.
    assert np.allclose(job.references[..., 2], 0) and np.allclose(
        job.references[..., 1], 0.5 * job.references[..., 0])
    # The loss at a random LoRA = the hand-computed weighted denoising error.
    objective = job.objective()
    lp = objective.init_fn(jax.random.key(0))
    lp = jax.tree.map(lambda a: a + 0.01 * jax.random.normal(jax.random.key(1), a.shape), lp)
    key = jax.random.key(5)
    loss, m = objective.loss_fn(lp, {{k: jnp.asarray(v) for k, v in batch.items()}}, key,
                          job.pipe.unet_params)
    k_t, k_eps = jax.random.split(key)
    t = jax.random.randint(k_t, (4,), 0, job.schedule.num_train_timesteps)
    eps = jax.random.normal(k_eps, batch['x'].shape)
    params = lora.merge(job.pipe.unet_params, lp)
    pred = job.pipe.unet.apply({{'params': params}}, job.schedule.add_noise(batch['x'], eps, t), t,
                               batch['context'])
    err = np.mean((np.asarray(pred, np.float64) - np.asarray(eps, np.float64)) ** 2,
                  axis=(1, 2, 3))
    want = err[:2].mean() + 0.5 * err[2:].mean()
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(float(m['prior_loss']), err[2:].mean(), rtol=1e-5)
    print('OK')
''')


def test_loss_batches_and_training_decor(tmp_path):
  proc = subprocess.run([sys.executable, '-c', _LOSS.format(root=ROOT, workdir=str(tmp_path))],
                        capture_output=True, text=True, timeout=900, cwd=ROOT, env=ENV)
  assert proc.returncode == 0 and 'OK' in proc.stdout, proc.stderr[-3000:]


def test_latent_pipeline_from_an_image_folder(diffusers_pipeline_dir, tmp_path):
  # An SD-shaped pipeline (VAE, random weights) customized from PNG files: the latent path.
  pipe = models.load_pipeline(diffusers_pipeline_dir)
  h, w = pipeline.default_image_size(pipe)
  refs = tmp_path / 'refs'
  refs.mkdir()
  rng = np.random.default_rng(0)
  for i in range(3):
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(refs / f'{i}.png')
  # configs/decor/sd15.py (diffusers' DreamBooth LoRA defaults) scaled down to seconds.
  sd15 = os.path.join(ROOT, 'configs', 'decor', 'sd15.py')
  proc = _run('train_lora.py', f'--config={sd15}', f'--workdir={tmp_path / "none"}',
              f'--config.pipeline_dir={diffusers_pipeline_dir}')
  assert proc.returncode != 0 and 'data.images must name the reference images' in proc.stderr
  flags = [f'pipeline_dir={diffusers_pipeline_dir}', f'data.images={refs}', 'prior.weight=1.0',
           'prior.num_images=2', 'prior.num_steps=2', 'prior.generation_batch=2',
           'decor.train_strength=1.0', 'decor.rank=1', 'lora.rank=2', 'lora.alpha=2.0',
           'train.num_steps=2', 'train.batch_size=2', 'train.log_every=1',
           'train.checkpoint_every=2']
  work = tmp_path / 'work'
  proc = _run('train_lora.py', f'--config={sd15}', f'--workdir={work}',
              *[f'--config.{f}' for f in flags])
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads((work / 'results.json').read_text())
  res = out['metrics']
  assert res['references'] == 3 and res['prior_images'] == 2
  assert out['config']['data']['instance_prompt'] == 'a photo of sks dog'
  lp = lora.load(work / 'lora', pipe.unet_params)
  assert sum(np.size(x) for x in lora.flatten(lp).values() for x in (x.a, x.b)) == \
      res['lora_parameters']
  # A reference of another size is refused, naming both sizes (nothing is resized).
  Image.fromarray(rng.integers(0, 256, (h + 8, w, 3), dtype=np.uint8)).save(refs / 'big.png')
  proc = _run('train_lora.py', f'--config={sd15}', f'--workdir={tmp_path / "bad"}',
              *[f'--config.{f}' for f in flags])
  assert proc.returncode != 0 and 'different sizes' in proc.stderr
  # The component analysis of this SD text encoder folder.
  out = tmp_path / 'components'
  proc = _run('decor_components.py', f'--pipeline_dir={diffusers_pipeline_dir}',
              f'--workdir={out}', '--reconstruct_samples=1', '--num_steps=2')
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads((out / 'components.json').read_text())
  assert [p['prompt'] for p in summary['prompts']] == ['a photo of a cat',
                                                      'a dog in the style of van gogh']
  assert (out / 'components.png').is_file() and (out / 'reconstructions.png').is_file()


def test_component_analysis_of_the_digits_encoder(tmp_path):
  proc = _run('decor_components.py', f'--workdir={tmp_path}', '--reconstruct_samples=2',
              '--num_steps=3')
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads((tmp_path / 'components.json').read_text())
  pipe = models.load_pipeline(digits.pipeline_dir())
  for p in summary['prompts']:
    x = np.asarray(pipeline.encode_prompts(pipe, [p['prompt']])[0], np.float64)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    np.testing.assert_allclose(p['energy'], s ** 2 / np.sum(s ** 2), rtol=1e-3, atol=1e-6)
    n_tokens = len(p['prompt'].split()) + 2  # one token per word, BOS, EOS
    pad = np.arange(x.shape[0]) >= n_tokens
    assert p['padding_fraction'] == pytest.approx(pad.mean())
    assert p['tokens'][n_tokens:] == ['[PAD]'] * int(pad.sum())
    # Component 1's share on the PAD rows: the sum of U[:, 0]^2 over them (up to the sign of U).
    assert p['padding_share'][0] == pytest.approx(np.sum(u[pad, 0] ** 2), abs=1e-3)
  assert summary['reconstruction_ks'] == [1, 2, 3, 4, 8, 12]
  assert (tmp_path / 'reconstructions.png').is_file()
