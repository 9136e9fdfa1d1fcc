"""The binaries on a tiny SDXL folder (`diffusers_sdxl_pipeline_dir`: two CLIP encoders, pooled
embedding, size/crop time ids), as a user runs them, with the smallest settings: sample.py,
explore.py (h-space pullback bases), upsample.py (upsample guidance), train_lora.py (DreamBooth
LoRA with prior preservation and DECOR on both encoders, from sample.py's images) and
train_duo.py (configs/duo/sd14.py with the retain term and an adversarial round, whose embedding
attack moves the word's row in both encoders' tables). One workdir per module: sample.py's images
are the LoRA's references. The programs the runs share (the 2-step, 2-prompt 32x32 sampler) come
from the compile cache."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffgeo_jax import models
from diffgeo_jax.diffusion import conditioning, pipeline, resolution
from diffgeo_jax.geometry import grassmann, pullback
from diffgeo_jax.training import lora
from diffgeo_jax.unlearning import embedding_attack
from tests import compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS = ('a red digit', 'digit')
SIZE = (32, 32)  # the tiny folder's images: UNet sample_size 16, VAE factor 2
TIME_IDS = [32, 32, 0, 0, 32, 32]


def _run(script, config, workdir, *flags):
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch', script),
       f'--config={os.path.join(ROOT, "configs", config)}', f'--workdir={workdir}',
       *[f'--config.{f}' for f in flags]],
      capture_output=True, text=True, timeout=600, env=compile_cache.env(), cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((workdir / 'results.json').read_text())
  assert results['binary'] == script[:-3]
  return results['metrics'], proc.stderr


@pytest.fixture(scope='module')
def work(tmp_path_factory):
  return tmp_path_factory.mktemp('sdxl_runs')


@pytest.fixture(scope='module')
def pipe(diffusers_sdxl_pipeline_dir):
  p = models.load_pipeline(diffusers_sdxl_pipeline_dir)
  assert pipeline.is_sdxl(p)
  return p


@pytest.fixture(scope='module')
def sampled(work, diffusers_sdxl_pipeline_dir):
  out = work / 'sample'
  metrics, _ = _run('sample.py', 'sample/default.py', out,
                    f'pipeline_dir={diffusers_sdxl_pipeline_dir}', f'prompts={PROMPTS!r}',
                    'seeds=(0,)', 'num_steps=2', 'guidance_scale=3.0', 'prompts_per_row=1',
                    'grid_scale=1')
  return out, metrics


def test_sample(sampled, pipe):
  out, metrics = sampled
  s = np.load(out / 'samples.npz')
  assert s['images'].shape == (2, *SIZE, 3) and metrics['image_shape'] == [*SIZE, 3]
  # The second image is text_to_image's from seed 0's noise, with diffusers' SDXL default: no
  # negative prompt, so zeros as the unconditional embedding (the config's '' means none).
  noise = jax.random.normal(jax.random.key(0), (1, 16, 16, 4))
  want = np.asarray(pipeline.text_to_image(pipe, 'digit', jax.random.key(0), num_steps=2,
                                           guidance=3.0, latents=noise))
  np.testing.assert_allclose(s['images'][1:], want, atol=1e-5)
  assert np.abs(s['images'][0] - s['images'][1]).max() > 1e-3  # the prompt matters
  # The helper of the binaries that call the UNet themselves gives the same unconditional side.
  u = conditioning.unconditional(pipe, 2, SIZE)
  assert not np.any(u['context']) and not np.any(u['text_embeds'])
  np.testing.assert_array_equal(u['time_ids'], [TIME_IDS] * 2)


def test_explore(work, pipe, diffusers_sdxl_pipeline_dir):
  # Bases at t = 1.0 (the first grid step, where x_t is the seed's noise x_T) and an edit.
  out = work / 'explore'
  r, _ = _run('explore.py', 'explore/digits.py:quick', out,
              f'pipeline_dir={diffusers_sdxl_pipeline_dir}', "prompts=('a red digit',)",
              'seeds=(0, 1)', 'num_steps=4', 'times=(1.0,)', 'num_vectors=2', 'num_iters=2',
              'edit_time=0.5', 'edit_gammas=(0.0, 0.5)', 'edit_guidance_steps=1')
  b = np.load(out / 'bases.npz')
  lat = b['latent_basis']
  assert lat.shape == (1, 2, 2, 16, 16, 4)  # (times, samples, k, latent)
  flat = lat.reshape(2, 2, -1)
  np.testing.assert_allclose(flat @ flat.transpose(0, 2, 1), np.broadcast_to(np.eye(2), (2, 2, 2)),
                             atol=1e-5)
  np.testing.assert_allclose(r['singular_values_mean'], b['singular_values'].mean(1), rtol=1e-6)
  np.testing.assert_allclose(r['geodesic_same_prompt'][0], grassmann.geodesic_distance(
      b['tangent_basis'][0, 0], b['tangent_basis'][0, 1]), rtol=1e-5)
  assert 'digit_kept' not in r['edit']  # no digits classifier for this folder
  edit = r['edit']
  assert edit['mean_abs_pixel_change_top'][0] < 1e-5 < edit['mean_abs_pixel_change_top'][1]
  # Sample 1's basis is the local basis of the U-Net's h-space under the SDXL conditioning
  # (pooled embedding, time ids of 32x32): J v_i = sigma_i u_i at x_T.
  cond = conditioning.of_prompts(pipe, ['a red digit'], SIZE)
  np.testing.assert_array_equal(cond['time_ids'], [TIME_IDS])
  x_T = jax.random.normal(jax.random.key(1), (16, 16, 4))
  jvp = jax.jit(lambda p, c, x, v: pullback.jvp_rows(
      pullback.unet_h_fn(pipe.unet, p, r['times'][0], c), x, v))
  jv = np.asarray(jvp(pipe.unet_params, conditioning.rows(cond, 0), x_T, jnp.asarray(lat[0, 1])))
  sigma_u = b['singular_values'][0, 1][:, None, None, None] * b['tangent_basis'][0, 1]
  np.testing.assert_allclose(jv, sigma_u, atol=2e-3 * float(np.abs(sigma_u).max()))


def test_upsample(work, diffusers_sdxl_pipeline_dir):
  out = work / 'upsample'
  r, _ = _run('upsample.py', 'upsample/digits.py:quick', out,
              f'pipeline_dir={diffusers_sdxl_pipeline_dir}', f'prompts={PROMPTS!r}',
              "variants=('native', 'guided')", 'eta=0.6')
  s = np.load(out / 'samples.npz')
  assert s['native'].shape == (2, *SIZE, 3) and s['guided'].shape == (2, 64, 64, 3)
  assert r['resolution'] == [64, 64] and set(r['variants']) == {'native', 'guided'}
  assert 'digit_accuracy' not in r['variants']['guided']  # no classifier for this folder
  low = np.asarray(resolution.avg_pool(jnp.asarray(s['guided']), 2))
  diff = r['variants']['guided']['mean_abs_diff_to_native']
  np.testing.assert_allclose(diff, np.mean(np.abs(low - s['native'])), rtol=1e-5)
  assert r['variants']['guided']['guidance']['eta'] == 0.6 and 0 < diff < 1
  assert not (out / 'accuracy.png').exists() and (out / 'comparison.png').is_file()


def test_train_lora_with_prior_and_decor(work, sampled, pipe, diffusers_sdxl_pipeline_dir):
  # configs/decor/sd15.py on SDXL, the references being sample.py's images.
  out = work / 'lora'
  r, _ = _run('train_lora.py', 'decor/sd15.py', out, f'pipeline_dir={diffusers_sdxl_pipeline_dir}',
              f'data.images={sampled[0] / "samples.npz"}', 'data.instance_prompt=a sks digit',
              'prior.weight=1.0', "prior.class_prompts=('a red digit', 'digit')",
              'prior.num_images=2', 'prior.num_steps=2', 'prior.generation_batch=2',
              'decor.undesired=a red digit', 'decor.train_strength=1.0', 'lora.rank=2',
              'lora.alpha=2.0', 'train.num_steps=2', 'train.batch_size=2', 'train.log_every=1',
              'train.checkpoint_every=2')
  assert r['references'] == 2 and r['prior_images'] == 2
  assert r['training']['steps'] == 2 and np.isfinite(r['training']['final_loss'])
  lp = lora.load(out / 'lora', pipe.unet_params)
  flat = lora.flatten(lp)
  assert sum(np.size(x) for x in flat.values() for x in (x.a, x.b)) == r['lora_parameters']
  assert any('attn2' in '/'.join(k) for k in flat)  # cross-attention to the SDXL context too
  # Trained: the LoRA changes the SDXL UNet's prediction.
  cond = conditioning.of_prompts(pipe, ['a sks digit'], SIZE)
  x = jax.random.normal(jax.random.key(2), (1, 16, 16, 4))
  eps = jax.jit(lambda p: pipe.unet.apply({'params': p}, x, 500, cond))
  change = np.abs(np.asarray(eps(lora.merge(pipe.unet_params, lp)) - eps(pipe.unet_params)))
  assert change.max() > 1e-6


def test_train_duo_with_retain_and_an_adversarial_round(work, pipe, diffusers_sdxl_pipeline_dir):
  # configs/duo/sd14.py on SDXL (as tests/launch/test_train_duo.py on SD), the concept 'red'.
  out = work / 'duo'
  r, log = _run('train_duo.py', 'duo/sd14.py', out, f'pipeline_dir={diffusers_sdxl_pipeline_dir}',
                'data.concept=red', "data.prompts=('a red digit',)", "data.safe_prompts=('digit',)",
                "data.retain_prompts=('digit',)", 'data.num_pairs=2', 'data.num_steps=2',
                'data.image_size=0', 'data.generation_batch=2', 'data.num_retain=2',
                'duo.retain_weight=1.0', 'duo.condition=mixed', 'duo.adversarial.every=1',
                'duo.adversarial.steps=2', 'duo.adversarial.batch_size=1', 'lora.rank=2',
                'lora.alpha=2.0', 'train.num_steps=2', 'train.batch_size=2', 'train.log_every=1',
                'train.checkpoint_every=1')
  assert 'base' not in r  # no detector, no digits evaluation
  assert r['training']['steps'] == 2 and np.isfinite(r['training']['final_loss'])
  assert 'adversarial round at step 1' in log
  # Step 1 trains from B = 0, policy = reference: the DUO loss is ln 2, the prior and retain
  # terms 0, whatever the SDXL conditioning of the branches.
  first = float(re.search(r'step 1/2\s+loss ([0-9.]+)', log).group(1))
  np.testing.assert_allclose(first, np.log(2), atol=1e-4)
  pairs = np.load(out / 'pairs.npz')
  assert pairs['unsafe'].shape == pairs['retain'].shape == (2, *SIZE, 3)
  assert np.mean(np.abs(pairs['safe'] - pairs['unsafe'])) > 1e-3  # SDEdit changed the image
  # The attack's row spans both encoders' tables (24 + 24) and moved from the word's own rows.
  token = embedding_attack.concept_token(pipe, 'red')
  row0 = np.concatenate([embedding_attack.embedding_table(p)[token]
                         for p in (pipe.text_encoder_params, pipe.text_encoder_2_params)])
  row = np.load(out / 'adversarial_rows.npz')['1']
  assert row.shape == (48,)
  assert np.linalg.norm(row[:24] - row0[:24]) > 1e-5 and np.linalg.norm(row[24:] - row0[24:]) > 1e-5
  np.testing.assert_array_equal(embedding_attack.concept_row(pipe, token), row0)
  attacked = embedding_attack.with_concept_row(pipe, token, row)  # what the rounds encode with
  for name, part in (('text_encoder_params', row[:24]), ('text_encoder_2_params', row[24:])):
    new = np.asarray(embedding_attack.embedding_table(getattr(attacked, name)))
    old = np.asarray(embedding_attack.embedding_table(getattr(pipe, name)))
    np.testing.assert_array_equal(new[token], part)
    np.testing.assert_array_equal(np.delete(new, token, 0), np.delete(old, token, 0))
  lp = lora.load(out / 'lora', pipe.unet_params)
  assert sum(np.size(x) for x in lora.flatten(lp).values() for x in (x.a, x.b)) == \
      r['lora_parameters']


def test_digits_classifier_binaries_refuse_the_folder_clearly(tmp_path,
                                                            diffusers_sdxl_pipeline_dir):
  # launch/chromatography.py (like evaluate.py, evaluate_customization.py and goar.py) measures
  # with the digits classifier: it names what it needs before any sampling.
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch', 'chromatography.py'),
       f'--config={os.path.join(ROOT, "configs", "chromatography", "digits.py")}:quick',
       f'--config.pipeline_dir={diffusers_sdxl_pipeline_dir}', f'--workdir={tmp_path}'],
      capture_output=True, text=True, timeout=300, env=compile_cache.env(), cwd=ROOT)
  assert proc.returncode != 0
  assert 'needs the digits model' in proc.stderr and 'StableDiffusionXLPipeline' in proc.stderr
