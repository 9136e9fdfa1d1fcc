"""Local latent basis: the top right singular vectors of the Jacobian J = dh/dx of h = h_fn(x).

    b = pullback.local_basis(h_fn, x, num_vectors=k, num_iters=n, key=key)
    b.singular_values (k,) descending; b.latent_basis (k, *x.shape); b.tangent_basis (k, *h.shape)
    h_fn = pullback.unet_h_fn(unet, params, t, context)   # a U-Net's h-space at one (t, context)

Papers 1 and 2 (arXiv 2302.12469, 2307.12868; notes section 1.2) pull the Euclidean metric of the
U-Net's h-space H back to the latent space X: <v, v'>_pb = <J v, J v'>, so ||v||_pb = ||J v||. The
unit directions of largest pullback norm, orthogonal to each other, are the right singular vectors
v_i of J = U S V^T (the "local latent basis"); u_i = J v_i / sigma_i are the left ones (the "local
tangent basis" in H). Paper equation numbers were not available to us; we cite the notes' sections
(/work/shared/papers/latent_geometry_chromatography_upsample.md).

Algorithm (notes 1.3: "Jacobian subspace iteration", Haas et al.'s Algorithm 1, which the
official code `enkeejunior1/Diffusion-Pullback` follows step for step): V <- orthonormal random
(k, n); repeat U <- J V (k forward-mode JVPs), W <- J^T U (k reverse-mode VJPs), V <- right
singular vectors of W (an SVD, which also re-orders the directions by sigma^2 every step). JVP
first, then VJP, as in the official code. Ours differs in:
- h_fn is linearised ONCE at x (`jax.linearize`); the JVPs are the linear map vmapped over the
  directions, the VJPs its `jax.linear_transpose`. The official code re-runs the forward pass for
  every direction. The directions go through in chunks of `chunk_size` (`lax.map`) to bound memory.
- The stopping rule compares SUBSPACES: the Grassmann geodesic distance between successive V is
  below `tol` (the official code uses an element-wise allclose(v_prev, v, atol=thr), which SVD sign
  flips defeat). The loop is a `lax.while_loop`, so it stops early under jit too. Defaults:
  tol=1e-3 rad and min_iters=1 (official: thr=1e-4 element-wise, which for unit vectors of 16k
  entries allows changes of ~1e-2 in norm, and min_iter=10).
- The result is, by default, a Rayleigh-Ritz step on the final subspace: the SVD of J V gives
  singular values (Ritz values, accurate to second order in the subspace error), latent rows exactly
  paired with orthonormal tangent rows, J v_i = sigma_i u_i. `rayleigh_ritz=False` returns what the
  official code returns instead: sigma = sqrt of the singular values of J^T J V_prev, v = the last
  SVD's rows, u = J V_prev normalised (one iteration behind v; we flip u_i's sign to match v_i).
- Signs are fixed: each latent row's entry of largest magnitude is positive (u_i flips with v_i).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp

from diffgeo_jax.geometry import grassmann

HFn = Callable[[jax.Array], jax.Array]


@flax.struct.dataclass
class LocalBasis:
  singular_values: jax.Array  # (k,) descending: sigma_i = ||J v_i||
  latent_basis: jax.Array  # (k, *x.shape) orthonormal rows v_i (right singular vectors of J)
  tangent_basis: jax.Array  # (k, *h.shape) unit rows u_i (left singular vectors; orthonormal)
  num_iters_run: jax.Array  # () int32: subspace iterations done (each k JVPs + k VJPs + an SVD)
  converged: jax.Array  # () bool: residual < tol
  residual: jax.Array  # () Grassmann geodesic distance between the last two iterates of span(V)


def _batched(fn: Callable[[jax.Array], jax.Array], rows: jax.Array,
             chunk_size: int | None) -> jax.Array:
  """fn mapped over the leading axis of rows, `chunk_size` rows at a time (all at once if None)."""
  if chunk_size is None or chunk_size >= rows.shape[0]:
    return jax.vmap(fn)(rows)
  return jax.lax.map(fn, rows, batch_size=chunk_size)


def _sign_fix(v: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Flips (v_i, u_i) together so that v_i's largest-magnitude entry is positive. v (k, n)."""
  big = jnp.take_along_axis(v, jnp.argmax(jnp.abs(v), axis=1)[:, None], axis=1)  # (k, 1)
  sign = jnp.where(big < 0, -1.0, 1.0).astype(v.dtype)
  return v * sign, u * sign.astype(u.dtype)


def local_basis(h_fn: HFn, x, num_vectors: int, num_iters: int, key: jax.Array | None = None, *,
                chunk_size: int | None = None, tol: float = 1e-3, min_iters: int = 1,
                init=None, rayleigh_ritz: bool = True) -> LocalBasis:
  """Top-`num_vectors` singular triplets of J = dh/dx at x by Jacobian subspace iteration.

  Args:
    h_fn: x -> h, any differentiable function of ONE sample (no batch axis); h of any shape.
      For a U-Net's h-space use `unet_h_fn`. Its arrays (parameters, t, context) are closed over.
    x: the sample, any shape (e.g. (H, W, C)); float. The basis is computed at this single point;
      for a batch, `jax.vmap` (or `lax.map`) over x and key.
    num_vectors: k, at most min(x.size, h.size).
    num_iters: the most iterations (official code: 50). At least 1.
    key: PRNG key of the random orthonormal start. Not needed when `init` is given.
    chunk_size: directions per JVP/VJP batch (official: 5 for SD, 25 pixel models); None: all k.
    tol: stop when the geodesic distance between successive span(V) (radians, at most
      (pi/2) sqrt(k)) falls below tol. The error of the subspace is then about
      tol * rho / (1 - rho), rho = (sigma_{k+1} / sigma_k)^2: a near-degenerate sigma_k needs a
      smaller tol or more iterations. tol=0 runs all num_iters. float32 resolves distances down to
      about 1e-6.
    min_iters: iterations always run before the stopping rule applies (official: 10).
    init: optional start (k, *x.shape), e.g. the basis at a nearby x or t (orthonormalised here).
    rayleigh_ritz: see the module docstring; False reproduces the official code's outputs.

  Returns a `LocalBasis`. Under jit, wrap a closure:
  jax.jit(lambda x, key: local_basis(h_fn, x, ...)); eager calls run the forward pass op by op.
  """
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f'x must be a floating-point array, got dtype {x.dtype}')
  if num_iters < 1:
    raise ValueError(f'num_iters must be >= 1, got {num_iters}')
  if chunk_size is not None and chunk_size < 1:
    raise ValueError(f'chunk_size must be a positive int or None, got {chunk_size}')
  k, n = int(num_vectors), x.size

  h, h_lin = jax.linearize(h_fn, x)  # one forward pass; h_lin: dx -> J dx
  m = h.size
  if not 1 <= k <= min(n, m):
    raise ValueError(f'num_vectors must be in [1, min(x.size, h.size)] = [1, {min(n, m)}] '
                     f'(x {x.shape}, h {h.shape}), got {num_vectors}')
  h_lin_t = jax.linear_transpose(h_lin, x)  # dh -> J^T dh

  def jvp_rows(v):  # (k, n) -> (k, m)
    return _batched(lambda r: h_lin(r.reshape(x.shape)).reshape(-1), v, chunk_size)

  def vjp_rows(u):  # (k, m) -> (k, n)
    return _batched(lambda r: h_lin_t(r.reshape(h.shape).astype(h.dtype))[0].reshape(-1), u,
                    chunk_size)

  if init is not None:
    init = jnp.asarray(init, x.dtype)
    if init.shape != (k, *x.shape):
      raise ValueError(f'init must be (num_vectors, *x.shape) = {(k, *x.shape)}, got {init.shape}')
    v0 = grassmann.orthonormal_rows(init.reshape(k, n))
  elif key is None:
    raise ValueError('key is required when init is not given (it draws the random start)')
  else:
    v0 = grassmann.orthonormal_rows(jax.random.normal(key, (k, n), x.dtype))

  def body(state):
    i, v = state[:2]
    u = jvp_rows(v)  # rows J v_i
    w = vjp_rows(u)  # rows J^T J v_i
    p, s2, v_new = jnp.linalg.svd(w, full_matrices=False)  # s2 ~ sigma^2 at convergence
    res = grassmann.geodesic_distance(v, v_new, orthonormalize=False)
    # <J v_i, J v_new_i> = <w_i, v_new_i> = p_ii s2_i: its sign pairs u_i with v_new_i
    return i + 1, v_new, u, s2, jnp.diagonal(p), res

  def cond(state):
    i, res = state[0], state[-1]
    return (i < num_iters) & ((i < min_iters) | (res >= tol))

  init_state = (jnp.int32(0), v0, jnp.zeros((k, m), h.dtype), jnp.zeros((k,), x.dtype),
                jnp.zeros((k,), x.dtype), jnp.array(jnp.inf, x.dtype))
  i, v, u_prev, s2, p_diag, res = jax.lax.while_loop(cond, body, init_state)

  if rayleigh_ritz:
    ju = jvp_rows(v)  # (k, m) rows J v_i
    p, sigma, tangent = jnp.linalg.svd(ju, full_matrices=False)  # J (p^T V)^T = tangent^T diag(s)
    latent = p.T @ v
  else:  # the official outputs; u_prev = J V_prev pairs with v up to the sign the SVD chose
    sigma = jnp.sqrt(s2)
    norms = jnp.linalg.norm(u_prev, axis=1, keepdims=True)
    tangent = u_prev / jnp.where(norms > 0, norms, 1)
    latent = v
    tangent = tangent * jnp.where(p_diag < 0, -1.0, 1.0).astype(tangent.dtype)[:, None]
  latent, tangent = _sign_fix(latent, tangent)
  return LocalBasis(singular_values=sigma, latent_basis=latent.reshape(k, *x.shape),
                    tangent_basis=tangent.reshape(k, *h.shape), num_iters_run=i,
                    converged=res < tol, residual=res)


def jvp_rows(h_fn: HFn, x, directions, *, chunk_size: int | None = None) -> jax.Array:
  """J v for each direction: directions (k, *x.shape) -> (k, *h.shape), one linearisation."""
  x, directions = jnp.asarray(x), jnp.asarray(directions)
  if directions.shape[1:] != x.shape:
    raise ValueError(f'directions must be (k, *x.shape) = (k, {", ".join(map(str, x.shape))}), '
                     f'got {directions.shape}')
  _, h_lin = jax.linearize(h_fn, x)
  return _batched(h_lin, directions, chunk_size)


def jvp_norms(h_fn: HFn, x, directions, *, chunk_size: int | None = None) -> jax.Array:
  """Pullback norms ||v||_pb = ||J v|| of directions (k, *x.shape) -> (k,) (notes 1.2)."""
  jv = jvp_rows(h_fn, x, directions, chunk_size=chunk_size)
  return jnp.linalg.norm(jv.reshape(jv.shape[0], -1), axis=1)


def pullback_metric(h_fn: HFn, x, directions, others=None, *,
                    chunk_size: int | None = None) -> jax.Array:
  """Gram matrix of the pullback metric, G_ij = <J v_i, J w_j> = v_i^T J^T J w_j (notes 1.2).

  directions (k, *x.shape), others (l, *x.shape) or None (then w = v, G symmetric). Returns (k, l).
  """
  jv = jvp_rows(h_fn, x, directions, chunk_size=chunk_size)
  jv = jv.reshape(jv.shape[0], -1)
  if others is None:
    return jv @ jv.T
  jw = jvp_rows(h_fn, x, others, chunk_size=chunk_size)
  return jv @ jw.reshape(jw.shape[0], -1).T


def unet_h_fn(unet, params, t, context, *, added_cond_kwargs=None) -> HFn:
  """h_fn(x) = the U-Net's h-space (mid-block output) at one sample, for `local_basis`.

  unet: a `models.UNet2DConditionModel`; params its parameter tree (without {'params': ...}).
  t: the timestep, int or float (fractional timesteps are fine: the official code evaluates the
  U-Net at float t such as 988.9). context: (L, D) text embedding of this sample, or (1, L, D),
  or SDXL's dict {'context': (L, D), 'text_embeds': (P,), 'time_ids': (6,)}.
  added_cond_kwargs: SDXL's extra conditioning, batched with batch 1, if the U-Net needs it.
  The returned h_fn maps x (H, W, C) -> h (H / 2**(n-1), W / 2**(n-1), C_mid), no batch axis.
  """
  if isinstance(context, dict):  # SDXL's conditioning dict of one sample (see models.unet)
    if added_cond_kwargs is not None:
      raise ValueError('give the added conditioning in the context dict or as added_cond_kwargs')
    added_cond_kwargs = {k: jnp.asarray(v).reshape((1, -1)) for k, v in context.items()
                         if k != 'context'}
    context = context['context']
  context = jnp.asarray(context)
  if context.ndim == 2:
    context = context[None]
  if context.ndim != 3 or context.shape[0] != 1:
    raise ValueError(f'context must be (L, D) or (1, L, D) for one sample, got {context.shape}')
  t = jnp.asarray(t, jnp.float32)
  if t.ndim != 0:
    raise ValueError(f't must be a scalar timestep, got shape {t.shape}')

  def h_fn(x):
    if x.ndim != 3:
      raise ValueError(f'x must be one sample (H, W, C), got shape {x.shape}')
    return unet.apply({'params': params}, x[None], t, context, added_cond_kwargs,
                      method='hspace')[0]

  return h_fn



def unet_bases_fn(unet, mesh=None, *, num_vectors: int, num_iters: int,
                  chunk_size: int | None = None, tol: float = 1e-3):
  """(x_t (N, H, W, C), context (N, ...), key data (N, 2), t, unet params) -> the `LocalBasis` of
  each sample's h-space Jacobian at timestep t, the N samples split over the `data` axis of `mesh`
  (`distributed.data_parallel`: every process gets every basis; `.lower(...)` compiles it ahead
  of time). t is traced: one executable serves every timestep. `launch/explore.py` runs it."""
  from diffgeo_jax import distributed  # noqa: PLC0415 (the geometry core needs no mesh)

  def one(x, ctx, key, t, params):
    h_fn = unet_h_fn(unet, params, t, ctx)
    return local_basis(h_fn, x, num_vectors, num_iters, jax.random.wrap_key_data(key),
                       chunk_size=chunk_size, tol=tol)
  return distributed.data_parallel(jax.vmap(one, in_axes=(0, 0, 0, None, None)), mesh,
                                   num_batched=3)
