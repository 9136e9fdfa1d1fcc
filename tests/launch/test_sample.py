"""launch/sample.py on a diffusers-written pipeline folder, as a user runs it."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
from PIL import Image

from diffgeo_jax import models
from diffgeo_jax.diffusion import pipeline
from tests import compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_sample_writes_grid_npz_and_results(tmp_path, diffusers_pipeline_dir):
  prompts, seeds = ('a red digit', 'digit'), (0, 1)
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch', 'sample.py'),
       f'--config={os.path.join(ROOT, "configs", "sample", "default.py")}',
       f'--config.pipeline_dir={diffusers_pipeline_dir}', f'--config.prompts={prompts!r}',
       f'--config.seeds={seeds!r}', '--config.num_steps=3', '--config.guidance_scale=3.0',
       '--config.batch_size=3',  # 4 images: a full batch and a padded one
       '--config.prompts_per_row=1', '--config.grid_scale=1',
       f'--workdir={tmp_path}'],
      capture_output=True, text=True, timeout=300, env=compile_cache.env(),
      cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in ('config.json', 'results.json', 'samples.png', 'samples.npz'):
    assert (tmp_path / name).is_file(), name

  config = json.loads((tmp_path / 'config.json').read_text())
  assert config['num_steps'] == 3 and tuple(config['prompts']) == prompts

  out = np.load(tmp_path / 'samples.npz')
  images, h, w = out['images'], 32, 32  # the tiny pipeline: UNet sample_size 16, VAE factor 2
  assert images.shape == (4, h, w, 3) and images.dtype == np.float32
  assert images.min() >= 0 and images.max() <= 1
  assert list(out['prompts']) == ['a red digit', 'a red digit', 'digit', 'digit']
  assert list(out['seeds']) == [0, 1, 0, 1]
  assert np.abs(images[0] - images[1]).max() > 0.05  # seeds give different images

  # The last image ran in the padded second batch; it must be what a batch of one gives.
  pipe = models.load_pipeline(diffusers_pipeline_dir)
  noise = jax.random.normal(jax.random.key(1), (1, h // 2, w // 2, 4))
  want = np.asarray(pipeline.text_to_image(pipe, 'digit', jax.random.key(0), num_steps=3,
                                           guidance=3.0, latents=noise))
  np.testing.assert_allclose(images[3:], want, atol=1e-5)

  results = json.loads((tmp_path / 'results.json').read_text())
  metrics = results['metrics']
  assert metrics['num_images'] == 4 and metrics['image_shape'] == [h, w, 3]
  assert metrics['compile_s'] >= 0 and metrics['sampling_s'] > 0
  np.testing.assert_allclose(metrics['images_per_s'], 4 / metrics['sampling_s'], rtol=1e-6)
  assert results['config']['sampler'] == 'ddim' and results['config']['num_steps'] == 3
  assert results['binary'] == 'sample' and results['runtime']['processes'] == 1
  assert results['wall_s']['sampling'] <= results['wall_s']['total']

  png = np.asarray(Image.open(tmp_path / 'samples.png'))
  assert png.shape == (2 * h, 2 * w, 3)  # 2 rows (prompts) x 2 columns (seeds)
  tile = png[h:, w:]  # row 'digit', column seed 1
  assert np.abs(tile.astype(int) - np.round(images[3] * 255)).max() <= 1


def test_missing_pipeline_dir_fails_naming_the_file(tmp_path):
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch', 'sample.py'),
       f'--config={os.path.join(ROOT, "configs", "sample", "default.py")}:quick',
       f'--config.pipeline_dir={tmp_path / "nowhere"}', f'--workdir={tmp_path}'],
      capture_output=True, text=True, timeout=120, env=compile_cache.env(),
      cwd=ROOT)
  assert proc.returncode != 0
  assert str(tmp_path / 'nowhere' / 'model_index.json') in proc.stderr


def test_unknown_word_for_the_digits_model_names_the_vocabulary(tmp_path, tiny_digits_pipeline_dir):
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch', 'sample.py'),
       f'--config={os.path.join(ROOT, "configs", "sample", "default.py")}:quick',
       f'--config.pipeline_dir={tiny_digits_pipeline_dir}',
       "--config.prompts=('a red digit three', 'a purple digit three')", f'--workdir={tmp_path}'],
      capture_output=True, text=True, timeout=300, env=compile_cache.env(),
      cwd=ROOT)
  assert proc.returncode != 0
  assert "words outside the digits vocabulary: ['purple']" in proc.stderr
  assert "Colours: ['red', 'green', 'blue', 'yellow', 'white']" in proc.stderr


def test_default_config_is_every_digit_in_every_colour_on_the_shipped_model(tmp_path):
  from diffgeo_jax.digits import dataset
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch', 'sample.py'),
       f'--config={os.path.join(ROOT, "configs", "sample", "default.py")}:quick',
       f'--workdir={tmp_path}'],
      capture_output=True, text=True, timeout=300, env=compile_cache.env(),
      cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = np.load(tmp_path / 'samples.npz')
  want = [dataset.caption(d, c) for d in range(10) for c in range(len(dataset.COLOURS))]
  assert list(out['prompts']) == want
  assert out['images'].shape == (50, 16, 16, 3)
  png = np.asarray(Image.open(tmp_path / 'samples.png'))
  assert png.shape == (10 * 32, 5 * 32, 3)  # a row per digit, a column per colour, scale 2
  tile = png[3 * 32:4 * 32:2, 2 * 32:3 * 32:2]  # 'a blue digit three'
  assert np.abs(tile.astype(int) - np.round(out['images'][3 * 5 + 2] * 255)).max() <= 1
