"""Distances between linear subspaces (points of a Grassmannian), and the curvedness of a segment.

    theta = grassmann.principal_angles(A, B)    # (min(kA, kB),) ascending, in [0, pi/2]
    d = grassmann.geodesic_distance(A, B)       # ||theta||_2, in [0, (pi/2) sqrt(k)]
    d = grassmann.projection_distance(A, B)     # ||sin theta||_2 = ||P_A - P_B||_F / sqrt(2)
    c = grassmann.curvedness(h_fn, x0, x1, kind='tangent_drift', num_vectors=k, ...)

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
from collections.abc import Callable

import jax
import jax.numpy as jnp

CURVEDNESS_KINDS = ('tangent_drift', 'tangent_tortuosity', 'chord_arc')


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


def curvedness(h_fn: Callable[[jax.Array], jax.Array], x0, x1, *, kind: str = 'tangent_drift',
               num_points: int = 8, num_vectors: int | None = None, num_iters: int = 50,
               key: jax.Array | None = None, basis: str = 'tangent', **basis_kwargs) -> jax.Array:
  """Curvedness of the segment x(s) = (1 - s) x0 + s x1, s in [0, 1], under the map h = h_fn(x).

  OUR DEFINITION, NOT THE PAPER'S. Paper 1 (arXiv 2302.12469) "define[s] the curvedness of a line
  segment between samples to show that X is a curved manifold", but its definition was not
  available to us and the official code has none (notes section 1.7). Three candidates, `kind`:

  - 'tangent_drift' (notes 1.7 (a)): C = sum_j d_geo(T(s_j), T(s_j+1)) over the `num_points`
    equally spaced s_j (ends included), T(s) the top-`num_vectors` local basis at x(s) from
    `pullback.local_basis` ('tangent': the tangent space in H, as in paper 2's analysis;
    basis='latent': the latent basis in X). The length, in radians, of the polygon that the
    tangent space traces in the Grassmannian; 0 when the Jacobian is constant (h affine), in
    [0, (pi/2) sqrt(k) (num_points - 1)]. Converges to the Grassmann arc length as num_points grows.
  - 'tangent_tortuosity': the drift divided by d_geo(T(0), T(1)): >= 1 (triangle inequality), 1
    when the tangent space turns along one Grassmann geodesic; undefined (inf/nan) when the end
    tangent spaces coincide, which includes the flat case.
  - 'chord_arc' (notes 1.7 (b)): C = 1 - ||h(x1) - h(x0)|| / integral_0^1 ||J(x(s)) (x1 - x0)|| ds,
    chord over arc length of the image curve h(x(s)); 0 when h is affine on the segment, in [0, 1).
    The integral is the trapezoid rule on `num_points` points (exact for affine h); no local basis
    is computed, so num_vectors and key are not needed.

  x0, x1: two single samples of the same shape (what h_fn takes). The local bases of the
  'tangent_*' kinds are computed in sequence along the segment, each started from the previous one
  (warm start); `num_iters`, `key` and `basis_kwargs` (chunk_size, tol, ...) go to `local_basis`.
  """
  from diffgeo_jax.geometry import pullback  # pullback imports this module for its stopping rule

  if kind not in CURVEDNESS_KINDS:
    raise ValueError(f'kind must be one of {CURVEDNESS_KINDS}, got {kind!r}')
  if basis not in ('tangent', 'latent'):
    raise ValueError(f"basis must be 'tangent' or 'latent', got {basis!r}")
  x0, x1 = jnp.asarray(x0), jnp.asarray(x1)
  if x0.shape != x1.shape:
    raise ValueError(f'x0 and x1 must have the same shape, got {x0.shape} and {x1.shape}')
  if num_points < 2:
    raise ValueError(f'num_points must be >= 2, got {num_points}')
  s = jnp.linspace(0.0, 1.0, num_points, dtype=x0.dtype)
  delta = x1 - x0

  if kind == 'chord_arc':
    speeds = jax.lax.map(
        lambda si: jnp.linalg.norm(jax.jvp(h_fn, (x0 + si * delta,), (delta,))[1]), s)
    arc = jnp.sum(speeds[1:] + speeds[:-1]) / (2 * (num_points - 1))
    chord = jnp.linalg.norm(h_fn(x1) - h_fn(x0))
    return 1.0 - chord / arc

  if num_vectors is None or key is None:
    raise ValueError(f"kind={kind!r} computes local bases: pass num_vectors and key")
  first = pullback.local_basis(h_fn, x0, num_vectors, num_iters, key, **basis_kwargs)

  def step(prev, si):
    b = pullback.local_basis(h_fn, x0 + si * delta, num_vectors, num_iters, None,
                             init=prev.latent_basis, **basis_kwargs)
    return b, getattr(b, f'{basis}_basis')

  _, rest = jax.lax.scan(step, first, s[1:])
  bases = jnp.concatenate([getattr(first, f'{basis}_basis')[None], rest])
  drift = path_length(bases)
  if kind == 'tangent_drift':
    return drift
  return drift / geodesic_distance(bases[0], bases[-1])
