"""The curvedness of a segment of latents under a map h (arXiv 2302.12469 states that X is
curved through "the curvedness of a line segment between samples"; its definition was not
available, so the three candidates here are ours):

    c = curvedness.segment(h_fn, x0, x1, kind='tangent_drift', num_vectors=k, key=key)

It walks local bases (`pullback.local_basis`) along the segment and measures their Grassmann path
(`grassmann`), or compares chord and arc length of the image curve.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from diffgeo_jax.geometry import grassmann, pullback

KINDS = ('tangent_drift', 'tangent_tortuosity', 'chord_arc')


def segment(h_fn: Callable[[jax.Array], jax.Array], x0, x1, *, kind: str = 'tangent_drift',
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
  if kind not in KINDS:
    raise ValueError(f'kind must be one of {KINDS}, got {kind!r}')
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
  drift = grassmann.path_length(bases)
  if kind == 'tangent_drift':
    return drift
  return drift / grassmann.geodesic_distance(bases[0], bases[-1])
