"""ROAR (Hooker et al. 2019, "A Benchmark for Interpretability Methods in Deep Neural Networks"):
remove the inputs' most attributed entries, retrain, and measure the accuracy.

    x_f = roar.remove(x, a, fraction=0.3, fill=train_mean)      # (N, ...) one level
    sets = roar.removal_sets(x, a, (0.1, 0.3, 0.5, 0.7, 0.9), train_mean)   # (F, N, ...)

As google-research's `interpretability_benchmark` (`compute_feature_ranking`): every scalar entry
of a sample (pixel channel, tabular feature) is ranked by |attribution| and the top
round(fraction * D) are replaced by the per-entry mean of the training set (the per-channel mean
for images: pass `fill` of shape (C,)). A better attribution makes the retrained model's accuracy
fall faster; the score is the mean accuracy over the fractions (lower is better). The ranking is
per coordinate: ROAR sees only which entries matter, in the input's basis.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def remove(x, attributions, fraction: float, fill) -> np.ndarray:
  """x (N, ...) with each sample's top round(fraction * D) entries by |attributions| replaced by
  `fill` (broadcast to one sample's shape). Ties keep the lower index first."""
  x = np.asarray(x)
  a = np.abs(np.asarray(attributions))
  if a.shape != x.shape or x.ndim < 2:
    raise ValueError(f'x and attributions must have the same shape (N, ...), got {x.shape} and '
                     f'{a.shape}')
  if not 0 <= fraction <= 1:
    raise ValueError(f'fraction must be in [0, 1], got {fraction}')
  n = x.shape[0]
  flat, score = x.reshape(n, -1), a.reshape(n, -1)
  k = int(round(fraction * flat.shape[1]))
  fill_flat = np.broadcast_to(np.asarray(fill, x.dtype), x.shape[1:]).reshape(-1)
  top = np.argsort(-score, axis=1, kind='stable')[:, :k]
  mask = np.zeros(flat.shape, bool)
  np.put_along_axis(mask, top, True, axis=1)
  return np.where(mask, fill_flat[None], flat).reshape(x.shape)


def removal_sets(x, attributions, fractions, fill) -> np.ndarray:
  """(F, N, ...): `remove` at every fraction."""
  return np.stack([remove(x, attributions, f, fill) for f in fractions])


def score(accuracy) -> float:
  """ROAR's summary of an accuracy curve (levels, seeds): the mean accuracy (lower is better)."""
  return float(jnp.mean(jnp.asarray(accuracy)))
