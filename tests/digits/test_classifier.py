"""The digits classifier: colour from pixels, files, the training binary and the shipped weights."""

import json
import os
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
import safetensors.numpy

from diffgeo_jax import digits
from diffgeo_jax.digits import classifier, dataset, metrics
from tests import report

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = classifier.ClassifierConfig(channels=(4, 8), features=8)


def test_colour_index_is_exact_on_rendered_data_and_the_palette():
  for split in ('train', 'test'):
    images, _, colours = dataset.load(split).all_colours()
    got = classifier.colour_index(images)
    assert np.array_equal(got, colours), f'{split}: {np.mean(got == colours)}'
  palette = np.asarray(list(dataset.PALETTE.values()), np.float32)
  # Flat images of each palette colour, full and dimmed, and a dim stroke over a noisy background.
  for brightness in (1.0, 0.3):
    flat = np.broadcast_to(palette[:, None, None] * brightness * 2 - 1, (5, 16, 16, 3))
    assert list(classifier.colour_index(flat)) == list(range(5))
  rng = np.random.default_rng(0)
  strokes = dataset.load('test').strokes[:50]
  colours = rng.integers(0, 5, 50)
  images = 0.6 * (dataset.render(strokes, colours) + 1) - 1 + rng.normal(0, 0.05, (50, 16, 16, 3))
  assert np.array_equal(classifier.colour_index(np.clip(images, -1, 1)), colours)
  with pytest.raises(ValueError, match=r'images must have shape \(N, H, W, 3\)'):
    classifier.colour_index(np.zeros((16, 16, 3)))


def test_features_feed_the_head_and_shapes_are_checked():
  model, params = classifier.init(jax.random.key(0), TINY)
  x = dataset.load('test').images(0)[:5]
  feats, logits = model.apply({'params': params}, x, method='features_and_logits')
  chex.assert_shape(feats, (5, TINY.features))
  assert np.all(np.asarray(feats) >= 0)  # after the ReLU
  head = params['head']
  np.testing.assert_allclose(logits, feats @ head['kernel'] + head['bias'], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(model.apply({'params': params}, x), logits)
  with pytest.raises(ValueError, match=r'images must have shape \(N, 16, 16, 3\)'):
    model.apply({'params': params}, np.zeros((2, 32, 32, 3)))


def test_save_load_round_trip_is_exact(tmp_path):
  model, params = classifier.init(jax.random.key(1), TINY)
  classifier.save(str(tmp_path), params, TINY, {'test_accuracy': 0.5})
  loaded_model, loaded = classifier.load(str(tmp_path))
  assert loaded_model.config == TINY
  chex.assert_trees_all_equal(jax.device_get(loaded), jax.device_get(params))
  assert classifier.read_results(str(tmp_path)) == {'test_accuracy': 0.5}
  with open(tmp_path / 'config.json') as f:
    assert json.load(f)['channels'] == [4, 8]
  stored = safetensors.numpy.load_file(str(tmp_path / 'model.safetensors'))
  assert 'conv0_0/kernel' in stored and 'head/bias' in stored


def test_load_lists_missing_unexpected_and_misshaped_keys(tmp_path):
  _, params = classifier.init(jax.random.key(1), TINY)
  classifier.save(str(tmp_path), params, TINY)
  path = str(tmp_path / 'model.safetensors')
  state = safetensors.numpy.load_file(path)
  del state['dense/bias']
  state['extra/kernel'] = np.zeros(3, np.float32)
  state['head/kernel'] = np.zeros((3, 3), np.float32)
  safetensors.numpy.save_file(state, path)
  with pytest.raises(ValueError) as e:
    classifier.load(str(tmp_path))
  msg = str(e.value)
  assert "missing keys ['dense/bias']" in msg and "unexpected keys ['extra/kernel']" in msg
  assert 'head/kernel: stored (3, 3), expected (8, 10)' in msg
  with pytest.raises(FileNotFoundError, match='config.json is missing'):
    classifier.load(str(tmp_path / 'nowhere'))
  with pytest.raises(ValueError, match=r"unknown classifier config fields \['depth'\]"):
    classifier.ClassifierConfig.from_dict({'depth': 3})


def test_tiny_training_run_beats_chance_and_exports(tmp_path):
  export = tmp_path / 'export'
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch', 'train_classifier.py'),
       f'--config={os.path.join(ROOT, "configs", "digits", "classifier.py")}:tiny',
       f'--workdir={tmp_path / "work"}', f'--config.export_dir={export}'],
      capture_output=True, text=True, timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
      cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(tmp_path / 'work' / 'results.json') as f:
    run = json.load(f)
  results = run['metrics']
  report.record('tiny classifier test accuracy', results['test_accuracy'])
  assert results['test_accuracy'] > 0.25  # chance is 0.1
  assert results['training']['steps'] == 100 and results['training']['final_loss'] < 2.2
  assert 'train_classifier.py' in run['command'] and run['binary'] == 'train_classifier'
  assert run['config']['export_dir'] == str(export)
  assert run['wall_s']['training'] + run['wall_s']['evaluation'] <= run['wall_s']['total']
  assert set(results['test_accuracy_per_colour']) == set(dataset.COLOURS)
  # The exported folder is the workdir's (its results.json: the metrics), and its weights give
  # the reported accuracy.
  assert classifier.read_results(str(tmp_path / 'work' / 'classifier')) == results
  assert classifier.read_results(str(export)) == results
  scorer = metrics.Scorer.load(str(export), batch_size=512)
  images, digit_labels, _ = dataset.load('test').all_colours()
  acc = metrics.digit_accuracy(scorer.predict(images), digit_labels)
  np.testing.assert_allclose(acc, results['test_accuracy'], rtol=1e-12)


def test_augmentation_shifts_without_wrapping_and_keeps_max_channel_one():
  strokes = dataset.load('test').strokes[:20]
  kw = dict(random_colour_prob=0.0, min_brightness=1.0, max_shift=1, max_noise_std=0.0)
  a = classifier.augmented_images(np.random.default_rng(5), strokes, **kw)
  np.testing.assert_array_equal(a, classifier.augmented_images(np.random.default_rng(5), strokes,
                                                               **kw))
  padded = np.pad(strokes, ((0, 0), (1, 1), (1, 1)))
  palette = np.asarray(list(dataset.PALETTE.values()), np.float32)
  shifted = 0
  for img, pad in zip(a, padded):  # some palette colour and shift in {-1, 0, 1}^2 reproduce it
    candidates = [(pad[dy:dy + 16, dx:dx + 16, None] * rgb * 2 - 1, (dy, dx))
                  for dy in range(3) for dx in range(3) for rgb in palette]
    errors = [np.abs(img - c).max() for c, _ in candidates]
    assert min(errors) < 1e-6
    shifted += candidates[int(np.argmin(errors))][1] != (1, 1)
  assert shifted >= 10  # most images moved (8 of 9 shifts do)
  # Random colours: the largest channel of every colour is 1, so max over channels = the stroke.
  b = classifier.augmented_images(np.random.default_rng(6), strokes, random_colour_prob=1.0,
                                  min_brightness=1.0, max_shift=0, max_noise_std=0.0)
  np.testing.assert_allclose((b.max(axis=-1) + 1) / 2, strokes, atol=1e-6)
  assert len(np.unique(classifier.colour_index(b))) > 1


def test_shipped_classifier_reads_the_test_split():
  model, params = classifier.load()  # digits.classifier_dir()
  results = classifier.read_results()
  images, digit_labels, colours = dataset.load('test').all_colours()
  pred = metrics.Scorer(model, params, batch_size=512).predict(images)
  acc = metrics.digit_accuracy(pred, digit_labels)
  report.record('shipped classifier test accuracy', acc)
  np.testing.assert_allclose(acc, results['test_accuracy'], rtol=1e-12)
  assert acc >= 0.97
  for k in range(len(dataset.COLOURS)):  # colour-invariant: every colour reads as well
    assert np.mean(pred[colours == k] == digit_labels[colours == k]) >= 0.97
  for name in ('config.json', 'model.safetensors', 'results.json'):
    assert os.path.isfile(os.path.join(digits.classifier_dir(), name))
  assert 'train_classifier.py' in results['command'] and results['training']['wall_s'] > 0
