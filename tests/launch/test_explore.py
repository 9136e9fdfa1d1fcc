"""launch/explore.py on the shipped digits model (quick settings): its reported numbers are the
ones recomputed from the bases it saves, and the bases are local bases of the U-Net's h-space."""

import itertools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from diffgeo_jax import digits, models
from diffgeo_jax.diffusion import guidance, samplers, schedules
from diffgeo_jax.diffusion import pipeline as pl
from diffgeo_jax.geometry import grassmann, pullback, spectra
from tests import compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope='module')
def explored(tmp_path_factory):
  out = tmp_path_factory.mktemp('explore')
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch', 'explore.py'),
       f'--config={os.path.join(ROOT, "configs", "explore", "digits.py")}:quick',
       '--config.seeds=(0, 1)', f'--workdir={out}'],
      capture_output=True, text=True, timeout=600, env=compile_cache.env(),
      cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return out


def test_reported_numbers_are_recomputable_from_the_saved_bases(explored):
  results = json.loads((explored / 'results.json').read_text())
  r = results['metrics']
  b = np.load(explored / 'bases.npz')
  n = len(r['samples'])
  assert n == 4 and b['tangent_basis'].shape[:3] == (2, 4, 3)  # (times, samples, k)
  np.testing.assert_allclose(r['singular_values_mean'], b['singular_values'].mean(1), rtol=1e-6)
  low = np.asarray(spectra.low_frequency_fraction(jnp.asarray(b['latent_basis']), 2.0))
  np.testing.assert_allclose(r['low_frequency_fraction_top'], low[:, :, 0].mean(1), rtol=1e-5)
  prompts = list(b['prompts'])
  for a in range(2):
    diff = [float(grassmann.geodesic_distance(b['tangent_basis'][a, i], b['tangent_basis'][a, j]))
            for i, j in itertools.combinations(range(n), 2) if prompts[i] != prompts[j]]
    np.testing.assert_allclose(r['geodesic_different_prompts'][a], np.mean(diff), rtol=1e-5)
    assert 0 < r['geodesic_different_prompts'][a] < r['geodesic_max']
  assert np.all(np.diff(b['singular_values'], axis=-1) <= 1e-6)  # descending
  # gamma = 0 is no edit; a non-zero gamma along the top direction changes the image.
  edit = r['edit']
  zero = edit['gammas'].index(0.0)
  assert edit['mean_abs_pixel_change_top'][zero] < 1e-5
  assert min(c for g, c in zip(edit['gammas'], edit['mean_abs_pixel_change_top']) if g) > 1e-4
  assert 0.0 <= edit['digit_kept_small_gamma'] <= 1.0
  assert results['config']['num_vectors'] == 3 and results['runtime']['processes'] == 1
  assert r['pipeline_dir'] == digits.pipeline_dir()
  assert 0 < results['wall_s']['bases'] <= results['wall_s']['total']
  for name in ('edits.png', 'directions.png', 'spectra.png', 'frequency.png', 'geodesic.png'):
    assert (explored / name).is_file(), name
  png = np.asarray(Image.open(explored / 'edits.png'))
  assert png.shape == (4 * 48, 3 * 48, 3)  # a row per sample, a column per gamma, scale 3


def test_saved_basis_is_the_local_basis_of_the_unet_h_space(explored):
  """Sample 0's saved basis at the first time: J v_i = sigma_i u_i for the shipped U-Net."""
  b = np.load(explored / 'bases.npz')
  r = json.loads((explored / 'results.json').read_text())['metrics']
  pipe = models.load_pipeline(digits.pipeline_dir())
  s = schedules.from_diffusers_config(pipe.scheduler_config)
  cond = pl.encode_prompts(pipe, [r['samples'][0]['prompt']])
  uncond = pl.encode_prompts(pipe, [''])
  x_T = jax.random.normal(jax.random.key(r['samples'][0]['seed']), (1, 16, 16, 3))
  model_fn = lambda x, t, c: pipe.unet.apply({'params': pipe.unet_params}, x, t, c)
  eps_fn = guidance.cfg_eps_fn(model_fn, cond, uncond, 1.5)
  _, traj = samplers.ddim(eps_fn, x_T, s, 10, return_trajectory=True)
  k = int(np.argmin(np.abs(np.asarray(traj.t) - r['times'][0])))
  h_fn = pullback.unet_h_fn(pipe.unet, pipe.unet_params, r['times'][0], cond)
  jv = pullback.jvp_rows(h_fn, traj.x_t[k][0], jnp.asarray(b['latent_basis'][0, 0]))
  sigma_u = b['singular_values'][0, 0][:, None, None, None] * b['tangent_basis'][0, 0]
  np.testing.assert_allclose(jv, sigma_u, atol=2e-3 * float(np.abs(sigma_u).max()))


def test_runs_on_a_latent_stable_diffusion_folder(tmp_path, diffusers_pipeline_dir):
  """Any diffusers SD folder (here a tiny one written by diffusers): bases live in latent space,
  images are decoded by the VAE, no digits classifier is involved."""
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch', 'explore.py'),
       f'--config={os.path.join(ROOT, "configs", "explore", "digits.py")}:quick',
       f'--config.pipeline_dir={diffusers_pipeline_dir}', "--config.prompts=('a red digit',)",
       '--config.seeds=(0, 1)', f'--workdir={tmp_path}'],
      capture_output=True, text=True, timeout=600, env=compile_cache.env(),
      cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  b = np.load(tmp_path / 'bases.npz')
  assert b['latent_basis'].shape[3:] == (16, 16, 4)  # the UNet's latent, not pixels
  r = json.loads((tmp_path / 'results.json').read_text())['metrics']
  assert 'digit_kept' not in r['edit']
  assert r['geodesic_same_prompt'][0] > 0 and np.isnan(r['geodesic_different_prompts'][0])
  png = np.asarray(Image.open(tmp_path / 'edits.png'))
  assert png.shape == (2 * 32 * 3, 3 * 32 * 3, 3)  # VAE-decoded 32x32 images, scale 3
