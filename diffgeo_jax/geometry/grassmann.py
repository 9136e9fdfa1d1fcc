"""Distances between linear subspaces (points of a Grassmannian). A leaf of `geometry`: the
stopping rule of `pullback` uses it, and `curvedness` builds on both.

    theta = grassmann.principal_angles(A, B)    # (min(kA, kB),) ascending, in [0, pi/2]
    d = grassmann.geodesic_distance(A, B)       # ||theta||_2, in [0, (pi/2) sqrt(k)]
    d = grassmann.projection_distance(A, B)     # ||sin theta||_2 = ||P_A - P_B||_F / sqrt(2)
    L = grassmann.path_length(bases)            # sum of d between consecutive bases

A subspace is given by a basis stored as ROWS: A has shape (k, *feature_shape); each row A[i] is
flattened to a vector of D = prod(feature_shape) numbers, so `LocalBasis.tangent_basis`
(k, h, w, C) and `.latent_basis` (k, H, W, C) from `pullback.local_basis` go in as they are.
The rows need not be orthonormal: they are orthonormalised inside by a reduced QR unless
`orthonormalize=False` is passed (then they must already be orthonormal, e.g. the output of an SVD).
The rows must be linearly independent either way.

Paper 2 (arXiv 2307.12868) compares local tangent spaces with the Grassmann geodesic metric
d_geo = ||theta||_2 over the principal angles theta_i = arccos sigma_i(A B^T) (notes section 1.8;
paper equation numbers were not available). arccos loses half the digits for small angles in
float32 (arccos(1 - 6e-8) ~ 3.5e-4), so, like scipy.linalg.subspace_angles (Bjorck & Golub 1973),
angles below pi/4 are taken from the sines instead: the singular values of the part of one basis
orthogonal to the other.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

def _as_rows(name: str, a) -> jax.Array:
  a = jnp.asarray(a)
  if a.ndim < 2:
    raise ValueError(f'{name} must be a basis of shape (k, *feature_shape) with one basis vector '
                     f'per row, got shape {a.shape}')
  if not jnp.issubdtype(a.dtype, jnp.floating):
    a = a.astype(jnp.float32)
  return a.reshape(a.shape[0], -1)


def _check_pair(A, B, same_k: bool) -> tuple[jax.Array, jax.Array]:
  a, b = _as_rows('A', A), _as_rows('B', B)
  if jnp.shape(A)[1:] != jnp.shape(B)[1:]:
    raise ValueError(f'A and B must have the same feature shape (all axes after the first), got '
                     f'A {jnp.shape(A)} and B {jnp.shape(B)}')
  if same_k and a.shape[0] != b.shape[0]:
    raise ValueError(f'A and B must span subspaces of the same dimension (same number of rows), '
                     f'got A {a.shape[0]} rows and B {b.shape[0]} rows')
  d = a.shape[1]
  for name, m in (('A', a), ('B', b)):
    if m.shape[0] > d:
      raise ValueError(f'{name} has {m.shape[0]} rows of length {d}: more than {d} vectors cannot '
                       f'be linearly independent')
  return a, b


def orthonormal_rows(rows: jax.Array) -> jax.Array:
  """(k, D) -> (k, D) orthonormal rows spanning the same subspace (reduced QR of rows^T)."""
  q, _ = jnp.linalg.qr(rows.T, mode='reduced')
  return q.T


def _angles(a: jax.Array, b: jax.Array) -> jax.Array:
  """Principal angles (ascending) between the row spaces of orthonormal a (ka, D), b (kb, D)."""
  if a.shape[0] < b.shape[0]:  # let a be the larger space: b's directions all get an angle
    a, b = b, a
  c = b @ a.T  # (kb, ka)
  cos = jnp.linalg.svd(c, compute_uv=False)  # (kb,) descending
  sin = jnp.linalg.svd(b - c @ a, compute_uv=False)  # (kb,) descending: sines of the kb angles
  theta_cos = jnp.arccos(jnp.clip(cos, -1.0, 1.0))  # ascending
  theta_sin = jnp.arcsin(jnp.clip(sin[::-1], -1.0, 1.0))  # ascending
  return jnp.where(theta_cos < math.pi / 4, theta_sin, theta_cos)


def principal_angles(A, B, *, orthonormalize: bool = True) -> jax.Array:
  """Principal angles between span(rows of A) and span(rows of B), in ASCENDING order, in radians.

  A (kA, *feature_shape), B (kB, *feature_shape); returns (min(kA, kB),). The angles do not depend
  on the choice of basis: rotating, permuting or negating rows leaves them unchanged. (scipy's
  `subspace_angles` takes column bases and returns the angles in descending order.)
  """
  a, b = _check_pair(A, B, same_k=False)
  if orthonormalize:
    a, b = orthonormal_rows(a), orthonormal_rows(b)
  return _angles(a, b)



def geodesic_distance(A, B, *, orthonormalize: bool = True) -> jax.Array:
  """Grassmann geodesic (arc length) distance ||theta||_2 between two k-dimensional subspaces.

  A, B (k, *feature_shape), rows spanning the subspaces. 0 for the same subspace; (pi/2) sqrt(k)
  for orthogonal ones (the maximum). This is the d_geo of paper 2's tangent-space analysis.
  """
  a, b = _check_pair(A, B, same_k=True)
  if orthonormalize:
    a, b = orthonormal_rows(a), orthonormal_rows(b)
  return jnp.linalg.norm(_angles(a, b))


def projection_distance(A, B, *, orthonormalize: bool = True) -> jax.Array:
  """Projection (chordal Frobenius) distance ||sin theta||_2 = ||P_A - P_B||_F / sqrt(2).

  A, B (k, *feature_shape). In [0, sqrt(k)]; agrees with `geodesic_distance` to first order."""
  a, b = _check_pair(A, B, same_k=True)
  if orthonormalize:
    a, b = orthonormal_rows(a), orthonormal_rows(b)
  return jnp.linalg.norm(jnp.sin(_angles(a, b)))


def path_length(bases, *, orthonormalize: bool = True) -> jax.Array:
  """sum_j d_geo(bases[j], bases[j+1]) for bases (P, k, *feature_shape), P >= 2: the length of the
  polygon through P points of the Grassmannian (a lower bound of the length of any curve through
  them, reached in the limit of fine sampling of a smooth curve)."""
  bases = jnp.asarray(bases)
  if bases.ndim < 3 or bases.shape[0] < 2:
    raise ValueError(f'bases must be (P, k, *feature_shape) with P >= 2, got shape {bases.shape}')
  step = lambda a, b: geodesic_distance(a, b, orthonormalize=orthonormalize)
  return jnp.sum(jax.vmap(step)(bases[:-1], bases[1:]))
