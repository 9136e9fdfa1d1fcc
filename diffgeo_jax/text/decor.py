"""DECOR (arXiv 2412.09169): decomposition and projection of text embeddings.

A prompt's text-encoder output X (l tokens x d) feeds cross-attention. DECOR's analysis takes its
SVD X = U S V^T; its remedy removes from every token row the part that lies in the row space of an
undesired text's embeddings X~ = U~ S~ V~^T:

    X' = X - strength * X V~ V~^T       (strength 1: every row orthogonal to the rows of X~)

V~ is an orthonormal basis of that row space (its right singular vectors with non-negligible
singular values), so V~ V~^T is the orthogonal projector onto it and the edit has rank <= m, the
undesired text's token count. The official code is not public; the debias_vl projection
(I - V (V^T V)^-1 V^T, applied to all 77 tokens) is the same algebra at strength 1.

    X2 = decor.project(X, X_undesired, strength=0.5)          # (..., l, d), batched over ...
    dec = decor.decompose(X, padding=pad_mask)                  # SVD + component analysis
    decor.reconstruct(dec, k=3)                                 # X from its top-3 components
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Singular values below this fraction of the largest are numerical zeros of the row space.
RANK_RTOL = 1e-5


def _check_matrix(name: str, x) -> jax.Array:
  x = jnp.asarray(x)
  if x.ndim < 2:
    raise ValueError(f'{name} must be (..., tokens, width), got shape {x.shape}')
  return x


def undesired_basis(x_undesired, rank: int | None = None) -> tuple[jax.Array, jax.Array]:
  """(V, keep): right singular vectors of X~ (..., m, d) as columns (..., d, min(m, d)) and a
  boolean (..., min(m, d)) of those kept: singular value > RANK_RTOL * the largest, and among the
  top `rank` when given. Columns not kept must be ignored (they are zeroed in `projector`)."""
  xu = _check_matrix('x_undesired', x_undesired)
  _, s, vt = jnp.linalg.svd(xu, full_matrices=False)
  keep = s > RANK_RTOL * s[..., :1]
  if rank is not None:
    if rank < 1:
      raise ValueError(f'rank must be >= 1 or None, got {rank}')
    keep = keep & (jnp.arange(s.shape[-1]) < rank)
  return jnp.swapaxes(vt, -1, -2), keep


def projector(x_undesired, rank: int | None = None) -> jax.Array:
  """V~ V~^T (..., d, d): the orthogonal projector onto the row space of X~ (top `rank`)."""
  v, keep = undesired_basis(x_undesired, rank)
  v = v * keep[..., None, :].astype(v.dtype)
  return v @ jnp.swapaxes(v, -1, -2)


def project(x, x_undesired, strength=1.0, rank: int | None = None) -> jax.Array:
  """X - strength * X P, P the projector onto the row space of X~ (see the module doc).

  x (..., l, d) and x_undesired (..., m, d) broadcast over their leading dims (one undesired text
  for a batch, or one per prompt); strength a scalar or an array broadcasting against the leading
  dims (e.g. (B,) for a sweep). Applied to every token row, PAD rows included."""
  x = _check_matrix('x', x)
  xu = _check_matrix('x_undesired', x_undesired)
  if x.shape[-1] != xu.shape[-1]:
    raise ValueError(f'x and x_undesired must have the same width d, got {x.shape} and '
                     f'{xu.shape}')
  strength = jnp.asarray(strength, x.dtype)
  lead = jnp.broadcast_shapes(x.shape[:-2], xu.shape[:-2])
  try:
    ok = strength.ndim <= len(lead) and jnp.broadcast_shapes(strength.shape, lead) == lead
  except ValueError:
    ok = False
  if not ok:
    raise ValueError(f'strength of shape {strength.shape} must broadcast against the leading '
                     f'dims {lead} of x and x_undesired')
  removed = x @ projector(xu, rank).astype(x.dtype)
  return x - strength[..., None, None] * removed


class Settings(NamedTuple):
  """DECOR at sampling time (`pipeline.decor_prompts(pipe, prompts, Settings(...))`): the prompts'
  embeddings lose `strength` times their projection on the row space of `undesired`'s embeddings
  (top `rank` components, None = all). `undesired`: one text for every prompt, or one per prompt;
  `strength`: a number, or one per prompt (a sweep in one batch). The unconditional (negative)
  embeddings are not touched, as in debias_vl's generative code."""
  undesired: str | Sequence[str]
  strength: float | Sequence[float] = 1.0
  rank: int | None = None

  def checked(self, num_prompts: int) -> tuple[list[str], np.ndarray]:
    """(undesired texts, 1 or num_prompts of them; strengths, () or (num_prompts,)), with
    errors naming the field."""
    texts = [self.undesired] if isinstance(self.undesired, str) else list(self.undesired)
    if not texts or not all(isinstance(t, str) for t in texts) or len(texts) not in (
        1, num_prompts):
      raise ValueError(f'decor.undesired must be a str or one str per prompt ({num_prompts}), '
                       f'got {self.undesired!r}')
    strength = np.asarray(self.strength, np.float32)
    if strength.shape not in ((), (num_prompts,)) or not np.all(np.isfinite(strength)):
      raise ValueError(f'decor.strength must be a finite number or one per prompt '
                       f'({num_prompts}), got {self.strength!r}')
    if self.rank is not None and (isinstance(self.rank, bool) or int(self.rank) != self.rank
                                  or self.rank < 1):
      raise ValueError(f'decor.rank must be None or an integer >= 1, got {self.rank!r}')
    return texts, strength


class Decomposition(NamedTuple):
  """The SVD X = U diag(S) V^T of one (l, d) embedding matrix (batched: leading dims) and its
  component analysis:
  energy: (k,) S_i^2 / sum S^2, each component's share of ||X||_F^2;
  token_energy: (l,) each token row's share of ||X||_F^2;
  component_token_share: (k, l) U[:, i]^2, how component i's energy splits over token positions;
  padding_share: (k,) the part of each component's energy on padding rows (NaN without a mask)."""
  u: jax.Array
  s: jax.Array
  vt: jax.Array
  energy: jax.Array
  token_energy: jax.Array
  component_token_share: jax.Array
  padding_share: jax.Array


def decompose(x, padding=None) -> Decomposition:
  """SVD of x (..., l, d) and its component analysis; `padding` (..., l) boolean marks PAD rows
  (the positions after the end-of-text token)."""
  x = _check_matrix('x', x)
  u, s, vt = jnp.linalg.svd(x, full_matrices=False)
  total = jnp.sum(s ** 2, axis=-1, keepdims=True)
  share = jnp.swapaxes(u ** 2, -1, -2)  # (..., k, l)
  if padding is None:
    pad = jnp.full(s.shape, jnp.nan, s.dtype)
  else:
    padding = jnp.asarray(padding, bool)
    if padding.shape != x.shape[:-1]:
      raise ValueError(f'padding must be (..., tokens) = {x.shape[:-1]}, got {padding.shape}')
    pad = jnp.sum(share * padding[..., None, :], axis=-1)
  return Decomposition(u, s, vt, s ** 2 / total,
                       jnp.sum(x ** 2, axis=-1) / total, share, pad)


def reconstruct(dec: Decomposition, k: int) -> jax.Array:
  """X from its top-k components: U[:, :k] diag(S[:k]) V^T[:k]."""
  if not 1 <= k <= dec.s.shape[-1]:
    raise ValueError(f'k must be in [1, {dec.s.shape[-1]}], got {k}')
  return (dec.u[..., :k] * dec.s[..., None, :k]) @ dec.vt[..., :k, :]
