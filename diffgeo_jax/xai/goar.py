"""GOAR (arXiv 2407.12401): geometric remove-and-retrain. Samples move along their attribution
direction, are projected back onto the data manifold, and classifiers are retrained on them; the
score counts the misclassifications cumulated over the perturbation levels.

    sets = goar.perturbation_sets(x, y, direction_fn, step_size=0.5, levels=5, project=sdedit)
    # (K, N, ...): x_k = project(x_{k-1} - step_size * a / |a|), a = direction_fn(x_{k-1}, y)

The official code is not public; this follows the paper's summary (`shared/papers`, section 3.2),
with these choices where it is silent:
* the attribution is recomputed at every level on the current sample, with the classifier
  trained on clean data, for the true label; the step removes evidence for it (x - eta a/|a|);
* eta is a Euclidean step (the same for every method: only the direction differs), K levels;
* the projection is SDEdit with a diffusion model of the data (`project`, e.g. the digits model
  at a small strength, unconditional); on the synthetic Gaussian data, whose density is positive
  everywhere, it is the identity;
* the score is the test error cumulated over the levels, as a rate: sum_k m_k / (K N_test)
  (higher is better: the attribution found what the classes hinge on).
Only the direction a/|a| and Euclidean lengths enter, so an orthogonal change of coordinates
x -> R x with covariant attributions (gradients: a -> R a) leaves the score unchanged.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import numpy as np

DirectionFn = Callable[[np.ndarray, np.ndarray, int], np.ndarray]  # (x, y, level) -> attributions
ProjectFn = Callable[[np.ndarray, int], np.ndarray]                # (x, level) -> x on the manifold


def step(x, attributions, step_size: float) -> np.ndarray:
  """x - step_size * a / |a| per sample (|.| the Euclidean norm over all entries; a zero
  attribution leaves its sample where it is)."""
  x, a = np.asarray(x), np.asarray(attributions)
  if a.shape != x.shape or x.ndim < 2:
    raise ValueError(f'x and attributions must have the same shape (N, ...), got {x.shape} and '
                     f'{a.shape}')
  norm = np.sqrt(np.sum(a.reshape(len(a), -1).astype(np.float64) ** 2, axis=1))
  unit = a / np.where(norm > 0, norm, 1.0).reshape((-1,) + (1,) * (a.ndim - 1))
  return (x - step_size * unit).astype(x.dtype)


def perturbation_sets(x, y, direction_fn: DirectionFn, step_size: float, levels: int,
                      project: ProjectFn | None = None) -> np.ndarray:
  """(K, N, ...): the samples after 1..K steps, each projected (see the module doc)."""
  if levels < 1 or step_size <= 0:
    raise ValueError(f'levels must be >= 1 and step_size > 0, got {levels} and {step_size}')
  out, cur = [], np.asarray(x)
  for k in range(1, levels + 1):
    cur = step(cur, direction_fn(cur, y, k), step_size)
    if project is not None:
      cur = np.asarray(project(cur, k), cur.dtype)
    out.append(cur)
  return np.stack(out)


def score(accuracy) -> float:
  """GOAR's summary of an accuracy curve (levels, seeds): the cumulative misclassification rate,
  the mean over levels of the test error (higher is better)."""
  return float(jnp.mean(1.0 - jnp.asarray(accuracy)))
