"""Digits metrics: Fréchet distance against closed forms and scipy, accuracies by counting, the
batched scorer, and the real-vs-real baseline against noise."""

import jax
import numpy as np
import pytest
import scipy.linalg

from diffgeo_jax.digits import classifier, dataset, metrics
from tests import report


def _random_spd(rng, d):
  a = rng.normal(size=(d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_of_diagonal_gaussians_is_closed_form():
  rng = np.random.default_rng(0)
  mu_a, mu_b = rng.normal(size=6), rng.normal(size=6)
  a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
  want = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = metrics.frechet_distance_gaussians(mu_a, np.diag(a), mu_b, np.diag(b))
  np.testing.assert_allclose(got, want, rtol=1e-12)
  # A common rotation changes nothing (the covariances no longer diagonal).
  q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  got = metrics.frechet_distance_gaussians(q @ mu_a, q @ np.diag(a) @ q.T, q @ mu_b,
                                           q @ np.diag(b) @ q.T)
  np.testing.assert_allclose(got, want, rtol=1e-10)


def test_frechet_distance_matches_scipy_sqrtm_formula():
  rng = np.random.default_rng(1)
  for d in (1, 5, 64):
    mu_a, mu_b = rng.normal(size=d), rng.normal(size=d)
    cov_a, cov_b = _random_spd(rng, d), _random_spd(rng, d)  # they do not commute
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b).real
    want = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * covmean)
    got = metrics.frechet_distance_gaussians(mu_a, cov_a, mu_b, cov_b)
    report.record(f'FD vs scipy sqrtm rel error (d={d})', abs(got - want) / want)
    np.testing.assert_allclose(got, want, rtol=1e-8)
    np.testing.assert_allclose(metrics.frechet_distance_gaussians(mu_b, cov_b, mu_a, cov_a), got,
                               rtol=1e-8)


def test_frechet_distance_of_feature_sets():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8))
  y = rng.normal(size=(200, 8)) + 0.5
  assert metrics.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)
  want = metrics.frechet_distance_gaussians(x.mean(0), np.cov(x.T), y.mean(0), np.cov(y.T))
  np.testing.assert_allclose(metrics.frechet_distance(x, y), want, rtol=1e-12)
  # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with the unbiased standard deviations.
  u, v = rng.normal(1, 2, (50, 1)), rng.normal(-1, 0.5, (70, 1))
  want = (u.mean() - v.mean()) ** 2 + (u.std(ddof=1) - v.std(ddof=1)) ** 2
  np.testing.assert_allclose(metrics.frechet_distance(u, v), want, rtol=1e-12)
  # A shift of both sets changes nothing; a shift of one adds its squared length.
  np.testing.assert_allclose(metrics.frechet_distance(x + 3, y + 3), metrics.frechet_distance(x, y),
                             rtol=1e-9)
  np.testing.assert_allclose(metrics.frechet_distance(x + 2, x), 8 * 4, rtol=1e-9)
  with pytest.raises(ValueError, match='same D'):
    metrics.frechet_distance(x, y[:, :4])
  with pytest.raises(ValueError, match='N >= 2'):
    metrics.frechet_distance(x[:1], x)


def test_accuracies_count():
  digits = np.array([0, 1, 2, 3, 4, 5, 6, 7])
  pred = np.array([0, 1, 2, 9, 4, 5, 9, 7])
  assert metrics.digit_accuracy(pred, digits) == 6 / 8
  logits = np.full((8, 10), -1.0)
  logits[np.arange(8), pred] = 2.0
  assert metrics.digit_accuracy(logits, digits) == 6 / 8
  with pytest.raises(ValueError, match='matching digits'):
    metrics.digit_accuracy(pred[:5], digits)
  assert metrics.grouped_accuracy(pred == digits, digits % 3, 4) == [1 / 3, 1.0, 1.0, None]

  strokes = dataset.load('test').strokes[:10]
  colours = np.arange(10) % 5
  asked = colours.copy()
  asked[[2, 7]] = (asked[[2, 7]] + 1) % 5  # two images are not in the asked colour
  assert metrics.colour_accuracy(dataset.render(strokes, colours), asked) == 0.8
  with pytest.raises(ValueError, match='one per image'):
    metrics.colour_accuracy(dataset.render(strokes, colours), asked[:3])


def test_scorer_batches_pad_and_score_consistently():
  model, params = classifier.init(jax.random.key(0), classifier.ClassifierConfig((4, 8), 8))
  images, digits, colours = dataset.load('test').all_colours()
  images, digits, colours = images[:23], digits[:23], colours[:23]
  f1, l1 = metrics.Scorer(model, params, batch_size=5).features_and_logits(images)  # 5 batches
  f2, l2 = metrics.Scorer(model, params, batch_size=64).features_and_logits(images)
  direct = model.apply({'params': params}, images, method='features_and_logits')
  for f, l in ((f1, l1), (f2, l2)):
    np.testing.assert_allclose(f, direct[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(l, direct[1], rtol=1e-5, atol=1e-6)
  scorer = metrics.Scorer(model, params, batch_size=64)
  ref = f2[::-1] + 0.1
  s = scorer.score(images, digits, colours, ref)
  assert s == {'digit_accuracy': metrics.digit_accuracy(l2, digits), 'colour_accuracy': 1.0,
               'frechet_distance': metrics.frechet_distance(f2, ref)}
  with pytest.raises(ValueError, match=r'images must have shape \(N, 16, 16, 3\)'):
    scorer.features(images[..., :1])


def test_real_vs_real_is_far_below_noise():
  scorer = metrics.Scorer.load(batch_size=512)  # the shipped classifier
  test_images, _, _ = dataset.load('test').all_colours()
  train_images, _, _ = dataset.load('train').all_colours()
  rng = np.random.default_rng(0)
  ref = scorer.features(test_images)
  real = scorer.features(train_images[rng.choice(len(train_images), 500, replace=False)])
  noise = scorer.features(rng.uniform(-1, 1, (500, 16, 16, 3)).astype(np.float32))
  blank = scorer.features(np.full((500, 16, 16, 3), -1, np.float32) +
                          rng.normal(0, 0.1, (500, 16, 16, 3)).astype(np.float32))
  fd_real = metrics.frechet_distance(real, ref)
  fd_noise = metrics.frechet_distance(noise, ref)
  fd_blank = metrics.frechet_distance(blank, ref)
  report.record('FD real-vs-real (500 vs test)', fd_real)
  report.record('FD uniform noise (500 vs test)', fd_noise)
  assert fd_real * 20 < fd_noise and fd_real * 20 < fd_blank


def test_colour_distance_of_rendered_digits_is_exact():
  split = dataset.load('test')
  red = split.images(dataset.COLOURS.index('red'))[:5]
  np.testing.assert_allclose(metrics.colour_distance(red, (1.0, 0.0, 0.0)), 0.0, atol=1e-12)
  np.testing.assert_allclose(metrics.colour_distance(red, (1.0, 0.5, 0.0)), 0.5, atol=1e-12)
  np.testing.assert_allclose(metrics.colour_distance(red, (1.0, 1.0, 0.0)), 1.0, atol=1e-12)
  # Brightness does not count: a stroke at 40% intensity in orange is still orange.
  dim = split.strokes[:5, ..., None] * np.array([0.4, 0.2, 0.0]) * 2 - 1
  np.testing.assert_allclose(metrics.colour_distance(dim, (1.0, 0.5, 0.0)), 0.0, atol=1e-12)
  with pytest.raises(ValueError, match='rgb'):
    metrics.colour_distance(red, (0.0, 0.0))
