"""Metrics of generated digits: digit accuracy, colour accuracy, Fréchet distance.

    scorer = metrics.Scorer.load()                      # the shipped classifier
    ref = scorer.features(dataset.load('test').all_colours()[0])
    scores = scorer.score(images, digits, colours, ref) # images (N, 16, 16, 3) in [-1, 1]
    # {'digit_accuracy': ..., 'colour_accuracy': ..., 'frechet_distance': ...}

The Fréchet distance is that of FID (Heusel et al. 2017) in the classifier's penultimate feature
space: Gaussians fitted to two feature sets,
d = |mu_a - mu_b|^2 + tr(A + B - 2 (A^1/2 B A^1/2)^1/2), computed in float64 numpy with symmetric eigen-decompositions (no scipy needed). It is biased
upwards at small sample sizes, so compare it only with a distance of the same sample sizes (the
evaluate binary reports real-vs-real next to it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffgeo_jax.digits import classifier as classifier_lib


def digit_accuracy(logits_or_predictions, digits) -> float:
  """Fraction of rows whose predicted digit equals `digits`: (N, C) logits (argmax) or (N,)
  predicted labels."""
  p = np.asarray(logits_or_predictions)
  d = np.asarray(digits)
  if p.ndim == 2:
    p = p.argmax(axis=-1)
  if p.ndim != 1 or d.shape != p.shape:
    raise ValueError(f'logits_or_predictions must be (N, C) logits or (N,) labels matching digits '
                     f'{d.shape}, got {np.shape(logits_or_predictions)}')
  if not len(d):
    raise ValueError('cannot compute the accuracy of zero images')
  return float(np.mean(p == d))


def colour_accuracy(images, colours) -> float:
  """Fraction of images (N, H, W, 3) in [-1, 1] whose colour read from the pixels
  (`classifier.colour_index`) is the requested palette index `colours` (N,)."""
  c = np.asarray(colours)
  got = classifier_lib.colour_index(images)
  if c.shape != got.shape:
    raise ValueError(f'colours must have shape {got.shape} (one per image), got {c.shape}')
  return float(np.mean(got == c))


def colour_distance(images, rgb) -> np.ndarray:
  """(N,) distance of each image's stroke colour to the colour `rgb` (3 numbers in [0, 1], largest
  channel 1 as the palette's): both scaled to a largest channel of 1, so brightness does not count,
  then Euclidean in RGB (0: the same hue and saturation; red to orange 0.5, red to yellow 1)."""
  target = np.asarray(rgb, np.float64)
  if target.shape != (3,) or target.max() <= 0:
    raise ValueError(f'rgb must be 3 numbers in [0, 1] with a positive channel, got {rgb!r}')
  got = classifier_lib.stroke_rgb(images)
  got = got / np.maximum(got.max(axis=-1, keepdims=True), 1e-12)
  return np.linalg.norm(got - target / target.max(), axis=-1)


def grouped_accuracy(correct, groups, num_groups: int) -> list[float | None]:
  """Mean of boolean `correct` (N,) within each group 0..num_groups-1 (None for an empty group)."""
  correct, groups = np.asarray(correct, np.float64), np.asarray(groups)
  return [float(correct[groups == g].mean()) if np.any(groups == g) else None
          for g in range(num_groups)]


# -- Fréchet distance ------------------------------------------------------------------------------

def gaussian_fit(feats) -> tuple[np.ndarray, np.ndarray]:
  """(mean (D,), covariance (D, D)) of feature rows (N, D), in float64 (unbiased covariance)."""
  f = np.asarray(feats, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f'features must be (N, D) with N >= 2, got shape {f.shape}')
  return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric positive semi-definite matrix (negative round-off
  eigenvalues clipped to zero)."""
  w, v = np.linalg.eigh((a + a.T) / 2)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance_gaussians(mu_a, cov_a, mu_b, cov_b) -> float:
  """Squared 2-Wasserstein (Fréchet) distance between N(mu_a, cov_a) and N(mu_b, cov_b).

  tr((A^1/2 B A^1/2)^1/2) is the sum of square roots of the eigenvalues of the symmetric PSD
  matrix A^1/2 B A^1/2 (it equals tr((AB)^1/2) without the non-symmetric square root)."""
  mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
  cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
  d = mu_a.shape[0]
  for name, m in (('cov_a', cov_a), ('cov_b', cov_b)):
    if m.shape != (d, d):
      raise ValueError(f'{name} must be ({d}, {d}) for means of size {d}, got {m.shape}')
  if mu_b.shape != (d,):
    raise ValueError(f'mu_b must have shape ({d},), got {mu_b.shape}')
  root_a = _sqrtm_psd(cov_a)
  middle = root_a @ cov_b @ root_a
  eig = np.linalg.eigvalsh((middle + middle.T) / 2)
  cross = np.sqrt(np.clip(eig, 0, None)).sum()
  value = np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * cross
  return float(max(value, 0.0))  # >= 0 in exact arithmetic; clip round-off


def frechet_distance(feats_a, feats_b) -> float:
  """Fréchet distance between Gaussian fits of two feature sets (N_a, D) and (N_b, D)."""
  a, b = np.asarray(feats_a), np.asarray(feats_b)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
    raise ValueError(f'feature sets must be (N, D) with the same D, got {a.shape} and {b.shape}')
  return frechet_distance_gaussians(*gaussian_fit(a), *gaussian_fit(b))


# -- the scorer ------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=0)
def _features_and_logits(model, params, x):
  return model.apply({'params': params}, x, method='features_and_logits')


class Scorer:
  """A classifier with a jitted (features, logits) pass in fixed-size batches (one compile; the
  last batch is padded), and the metrics of a set of images against what was asked for."""

  def __init__(self, model: classifier_lib.Classifier, params, batch_size: int = 256):
    if batch_size < 1:
      raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    self.model, self.params, self.batch_size = model, params, int(batch_size)

  @classmethod
  def load(cls, folder: str | None = None, batch_size: int = 256) -> Scorer:
    """The classifier of `folder` (None: the shipped one)."""
    model, params = classifier_lib.load(folder)
    return cls(model, params, batch_size)

  def features_and_logits(self, images) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features and (N, 10) logits of images (N, 16, 16, 3) in [-1, 1]."""
    x = np.asarray(images, np.float32)
    s = self.model.config.image_size
    if x.ndim != 4 or x.shape[1:] != (s, s, 3) or not len(x):
      raise ValueError(f'images must have shape (N, {s}, {s}, 3) with N >= 1, in [-1, 1]; got '
                       f'{x.shape}')
    feats, logits = [], []
    for start in range(0, len(x), self.batch_size):
      chunk = x[start:start + self.batch_size]
      n = len(chunk)
      if n < self.batch_size:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - n, axis=0)])
      f, l = _features_and_logits(self.model, self.params, jnp.asarray(chunk))
      feats.append(np.asarray(f)[:n])
      logits.append(np.asarray(l)[:n])
    return np.concatenate(feats), np.concatenate(logits)

  def features(self, images) -> np.ndarray:
    return self.features_and_logits(images)[0]

  def predict(self, images) -> np.ndarray:
    """(N,) predicted digits."""
    return self.features_and_logits(images)[1].argmax(axis=-1).astype(np.int32)

  def score(self, images, digits, colours, reference_features) -> dict[str, float]:
    """Digit accuracy against `digits`, colour accuracy against `colours` (palette indices) and
    the Fréchet distance of the images' features to `reference_features` (M, D)."""
    feats, logits = self.features_and_logits(images)
    return {'digit_accuracy': digit_accuracy(logits, digits),
            'colour_accuracy': colour_accuracy(images, colours),
            'frechet_distance': frechet_distance(feats, reference_features)}
