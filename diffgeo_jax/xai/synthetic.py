"""Gaussian-cluster data with known ground-truth feature weights, after OpenXAI's synthetic
generator (`AI4LIFE-GROUP/OpenXAI`, `openxai/dgp_synthetic.py`, `generate_gaussians`).

    data = synthetic.gaussian_clusters(num_per_cluster=200, dims=20, num_clusters=10, seed=0)
    data.x (N, d), data.y (N,), data.weights (N, d) ground truth, data.cluster (N,)

Cluster k has a centre mu_k on a coordinate axis (axis k mod d, at `distance` x (1 + k // d), as
OpenXAI's axis-aligned `_get_mus`), a feature mask m_k ~ Bernoulli(`sparsity`)^d, and samples
x ~ N(mu_k, I). One weight vector w ~ U(-1, 1)^d is shared. The label is
y = 1[(x - mu_k) . (m_k * w) > 0] and the ground-truth attribution of every sample of cluster k
is m_k * w. One change from OpenXAI: the label reads the offset from the cluster centre, not x
itself, so that each cluster is split 50/50 and the features with m_k = 0 play no part at all
(OpenXAI thresholds sigma(x . (m_k * w)) globally, where the centre alone can fix a cluster's
label).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Synthetic:
  x: np.ndarray        # (N, d) float32
  y: np.ndarray        # (N,) int32 in {0, 1}
  weights: np.ndarray  # (N, d) float32: m_k * w of each sample's cluster (ground truth)
  cluster: np.ndarray  # (N,) int32
  centres: np.ndarray  # (K, d) float32

  def __len__(self) -> int:
    return len(self.y)


def centres(num_clusters: int, dims: int, distance: float) -> np.ndarray:
  """(K, d) axis-aligned cluster centres: axis k mod d at distance * (1 + k // d)."""
  mu = np.zeros((num_clusters, dims), np.float32)
  k = np.arange(num_clusters)
  mu[k, k % dims] = distance * (1 + k // dims)
  return mu


def gaussian_clusters(num_per_cluster: int, dims: int = 20, num_clusters: int = 10,
                      distance: float = 5.0, sparsity: float = 0.5, seed: int = 0,
                      params_seed: int | None = None) -> Synthetic:
  """Samples of the generator (see the module doc). `params_seed` fixes w and the masks (default
  `seed`), so a train and a test split share them: draw both with one params_seed."""
  if num_per_cluster < 1 or dims < 1 or num_clusters < 1:
    raise ValueError(f'num_per_cluster, dims and num_clusters must be >= 1, got '
                     f'{num_per_cluster}, {dims}, {num_clusters}')
  if not 0 < sparsity <= 1:
    raise ValueError(f'sparsity must be in (0, 1], got {sparsity}')
  prng = np.random.default_rng(seed if params_seed is None else params_seed)
  w = prng.uniform(-1, 1, dims).astype(np.float32)
  masks = (prng.random((num_clusters, dims)) < sparsity).astype(np.float32)
  masks[masks.sum(axis=1) == 0, 0] = 1  # every cluster's label depends on something
  mu = centres(num_clusters, dims, distance)
  rng = np.random.default_rng([seed, 1])
  cluster = np.repeat(np.arange(num_clusters, dtype=np.int32), num_per_cluster)
  offset = rng.standard_normal((len(cluster), dims)).astype(np.float32)
  weights = masks[cluster] * w
  y = (np.sum(offset * weights, axis=1) > 0).astype(np.int32)
  return Synthetic(mu[cluster] + offset, y, weights, cluster, mu)


def rank_correlation(attributions, weights) -> np.ndarray:
  """(N,) Spearman correlation between |attribution| and |ground-truth weight| over the features
  of each sample (OpenXAI's rank-correlation faithfulness to the ground truth); ties take their
  mean rank."""
  a, g = np.abs(np.asarray(attributions, np.float64)), np.abs(np.asarray(weights, np.float64))
  if a.shape != g.shape or a.ndim != 2:
    raise ValueError(f'attributions and weights must both be (N, d), got {a.shape}, {g.shape}')
  ra, rg = _ranks(a), _ranks(g)
  ra -= ra.mean(axis=1, keepdims=True)
  rg -= rg.mean(axis=1, keepdims=True)
  den = np.sqrt((ra ** 2).sum(axis=1) * (rg ** 2).sum(axis=1))
  return np.where(den > 0, (ra * rg).sum(axis=1) / np.maximum(den, 1e-300), 0.0)


def _ranks(v: np.ndarray) -> np.ndarray:
  """Row-wise ranks with ties averaged."""
  out = np.empty_like(v)
  for i, row in enumerate(v):
    order = np.argsort(row, kind='stable')
    r = np.empty(len(row))
    r[order] = np.arange(len(row), dtype=np.float64)
    _, inv, counts = np.unique(row, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=r)
    out[i] = sums[inv] / counts[inv]
  return out
