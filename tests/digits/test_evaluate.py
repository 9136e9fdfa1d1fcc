"""launch/evaluate.py on a tiny random digits pipeline with the shipped classifier: its numbers are
a recomputation from what it saved."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from diffgeo_jax import digits, models
from diffgeo_jax.diffusion import pipeline
from diffgeo_jax.digits import classifier, dataset, metrics
from diffgeo_jax.training import summary

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EVALUATE = [sys.executable, os.path.join(ROOT, 'launch', 'evaluate.py'),
            f'--config={os.path.join(ROOT, "configs", "digits", "evaluate.py")}:quick']


def _run(args, timeout=300):
  return subprocess.run(EVALUATE + args, capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, cwd=ROOT)


@pytest.fixture(scope='module')
def evaluation(tmp_path_factory, tiny_digits_pipeline_dir):
  out = tmp_path_factory.mktemp('evaluate')
  # A copy of the pipeline: record_in_pipeline writes its results.json there.
  pipeline_dir = out / 'pipeline'
  shutil.copytree(tiny_digits_pipeline_dir, pipeline_dir)
  (pipeline_dir / 'training.json').write_text(json.dumps({'wall_s': 1.0}))
  proc = _run([f'--config.pipeline_dir={pipeline_dir}', '--config.batch_size=32',
               '--config.record_in_pipeline=True', f'--workdir={out / "work"}'])
  # classifier_dir '': the shipped one; 50 images, 2 batches
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = out / 'work'
  with open(out / 'results.json') as f:
    return out, json.load(f), np.load(out / 'samples.npz')


def test_results_are_a_recomputation_from_the_samples(evaluation):
  out, results, saved = evaluation
  n = 10 * len(dataset.COLOURS)
  images = saved['images']
  assert images.shape == (n, 16, 16, 3) and images.min() >= 0 and images.max() <= 1
  prompts = list(saved['prompts'])
  assert prompts == [dataset.caption(d, c) for d in range(10) for c in range(5)]
  assert [dataset.parse_caption(p) for p in prompts] == list(zip(saved['digits'],
                                                                   saved['colours']))
  m = results['metrics']
  assert m['num_images'] == m['num_prompts'] == n

  scorer = metrics.Scorer.load(batch_size=256)
  x = images * 2.0 - 1.0
  feats, logits = scorer.features_and_logits(x)
  np.testing.assert_array_equal(logits.argmax(-1), saved['predicted_digits'])
  np.testing.assert_array_equal(classifier.colour_index(x), saved['predicted_colours'])
  test_images, _, _ = dataset.load('test').all_colours()
  train_images, _, _ = dataset.load('train').all_colours()
  ref = scorer.features(test_images)
  idx = saved['real_baseline_indices']
  assert len(idx) == n and len(np.unique(idx)) == n
  want = {
      'digit_accuracy': metrics.digit_accuracy(logits, saved['digits']),
      'colour_accuracy': metrics.colour_accuracy(x, saved['colours']),
      'joint_accuracy': float(np.mean((logits.argmax(-1) == saved['digits'])
                                      & (saved['predicted_colours'] == saved['colours']))),
      'frechet_distance': metrics.frechet_distance(feats, ref),
      'frechet_distance_real': metrics.frechet_distance(scorer.features(train_images[idx]), ref),
  }
  for k, v in want.items():
    np.testing.assert_allclose(m[k], v, rtol=1e-6, atol=1e-12, err_msg=k)
  # Random weights: noise, far from real digits, and the baseline says how far real data is.
  assert m['frechet_distance'] > 3 * m['frechet_distance_real']

  ok = saved['predicted_digits'] == saved['digits']
  for d, word in enumerate(dataset.DIGIT_WORDS):
    np.testing.assert_allclose(m['per_digit'][word]['digit_accuracy'],
                               ok[saved['digits'] == d].mean())
  for c, name in enumerate(dataset.COLOURS):
    np.testing.assert_allclose(m['per_colour'][name]['colour_accuracy'],
                               np.mean(saved['predicted_colours'][saved['colours'] == c] == c))
  assert list(m['per_prompt']) == prompts
  assert m['classifier']['test_accuracy'] == classifier.read_results()['test_accuracy']
  assert m['classifier']['dir'] == digits.classifier_dir()
  pipeline_dir = out.parent / 'pipeline'
  assert m['pipeline_dir'] == str(pipeline_dir)
  record = json.loads((pipeline_dir / 'results.json').read_text())
  assert record['evaluation'] == results and record['training'] == {'wall_s': 1.0}
  assert m['reference'] == {'split': 'test', 'images': len(test_images),
                                  'colours': list(dataset.COLOURS), 'real_baseline_split': 'train',
                                  'real_baseline_images': n}
  s = results['config']
  assert (s['sampler'], s['num_steps'], s['guidance_scale'], s['samples_per_prompt']) == (
      'ddim', 3, 1.5, 1)
  assert m['sampling_s'] > 0 and m['compile_s'] >= 0
  assert results['binary'] == 'evaluate' and results['runtime']['processes'] == 1
  assert 0 < results['wall_s']['sampling'] <= results['wall_s']['total']
  assert 0 < results['wall_s']['scoring'] <= results['wall_s']['total']
  scalars = summary.read_scalars(str(out / 'tensorboard'))
  np.testing.assert_allclose(scalars['eval/digit_accuracy'][0][1], want['digit_accuracy'],
                             rtol=1e-6)


def test_grid_and_initial_noise(evaluation, tiny_digits_pipeline_dir):
  out, results, saved = evaluation
  png = np.asarray(Image.open(out / 'samples.png'))
  assert png.shape == (50 * 16, 16, 3)  # one row per prompt, one column per sample
  np.testing.assert_array_equal(png[7 * 16:8 * 16], np.round(saved['images'][7] * 255))
  # Image i starts from fold_in(split(key(seed))[0], i), whatever batch it ran in (here the 1st
  # of 2 batches of 32; alone it is a batch of one).
  pipe = models.load_pipeline(tiny_digits_pipeline_dir)
  noise_key = jax.random.split(jax.random.key(0))[0]
  latents = jax.random.normal(jax.random.fold_in(noise_key, 7), (1, 16, 16, 3))
  want = pipeline.text_to_image(pipe, [str(saved['prompts'][7])], jax.random.key(1), num_steps=3,
                                guidance=1.5, latents=latents)
  np.testing.assert_allclose(saved['images'][7:8], np.asarray(want), atol=1e-4)


def test_unknown_colour_fails_clearly(tmp_path):
  proc = _run(["--config.colours=('purple',)", f'--workdir={tmp_path}'], timeout=120)
  assert proc.returncode != 0
  assert "colour must be one of ('red', 'green', 'blue', 'yellow', 'white')" in proc.stderr
