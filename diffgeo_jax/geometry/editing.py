"""Editing along latent directions: x-space guidance, DDIM edits of generated and real samples,
parallel transport of directions between samples, and text-conditioned local bases.

    xs = editing.x_space_guidance(eps_fn, x_t, t, v, gamma=1.0, delta=1.0, num_steps=16)  # (17, *x)
    k = editing.edit_step_index(s, 100, edit_t=0.6)          # the official edit_t -> grid index
    r = editing.edit(eps_fn, x_t, k, v, s, 100, gamma=[-1., 0., 1.])  # r.x0 (3, *x)
    r = editing.edit_real(eps_fn, x_0, s, 100, k, direction_fn, gamma=1.0)   # invert, then edit
    v1 = editing.parallel_transport(b0, b1, 0)   # b0's top tangent vector -> sample 1 (in X)
    c = editing.consistent_directions([b0, b1, b2], num_directions=4)    # c.directions (3, 4, *x)
    b = editing.text_conditioned_basis(h_fn_for, x, emb, num_vectors=2, num_iters=50, key=key)

Papers 1 and 2 (arXiv 2302.12469, 2307.12868; notes sections 1.5-1.6, from the official code
`enkeejunior1/Diffusion-Pullback`): a latent direction v (a row of `LocalBasis.latent_basis` at
x_t) is applied ONCE, at one timestep t, by "x-space guidance",

    x_t <- x_t + gamma * [eps(x_t + delta * v, t) - eps(x_t, t)]      repeated num_steps times,

each time from the latest x_t, with ALL intermediates kept; then each kept state is denoised by DDIM
from the same t to 0 with no further edits. To first order each step moves x_t by
gamma * delta * (d eps / dx) v: along the model's own response to v, not along v itself.
Official defaults (notes 1.5): delta = 1 (`x_space_guidance_edit_step`), unit v, num_steps = 16
(64 for text-conditioned edits); gamma = 0.1 for the pixel CelebA-HQ model, 1 for Stable Diffusion;
edit_t in {1.0, 0.8, 0.6} (pixel), {0.7, 0.6} (SD); 100 DDIM steps. The step is NOT normalised and
the sign of v is the edit's sign (+v and -v are the two edits of one basis vector). Here `eps_fn`
is batched, `eps_fn(x (B, ...), t) -> (B, ...)`, the samplers' interface; the two evaluations are
two calls (the official code batches them as one of size 2B; an eps_fn that closes over a context
of batch B, as the pipelines' do, could not take 2B).

Differences from the official code: the timesteps are diffusers' DDIM grid of `samplers.ddim`
(the official code uses its own float grid linspace(0, 999, N + 1)), so the edit index is that
grid's; the official "quality boosting" (eta = 1 for t <= 0.2 T, pixel models) is not done here —
pass eta/key for a uniform eta. Shapes: arrays are NHWC with a leading batch axis for x.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from diffgeo_jax.diffusion import samplers
from diffgeo_jax.diffusion.schedules import NoiseSchedule
from diffgeo_jax.geometry import pullback
from diffgeo_jax.geometry.pullback import LocalBasis

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]


# -- argument checks -------------------------------------------------------------------------------

def _real(name: str, value, max_ndim: int = 0) -> jax.Array:
  """A real (int or float, not bool) scalar, or up to `max_ndim` axes; works on tracers."""
  try:
    arr = jnp.asarray(value)
  except TypeError as e:
    raise ValueError(f'{name} must be a real number, got {value!r}') from e
  if not (jnp.issubdtype(arr.dtype, jnp.floating) or jnp.issubdtype(arr.dtype, jnp.integer)):
    raise ValueError(f'{name} must be a real (int or float) number, got dtype {arr.dtype}')
  if arr.ndim > max_ndim:
    what = 'a scalar' if max_ndim == 0 else f'a scalar or an array with at most {max_ndim} axes'
    raise ValueError(f'{name} must be {what}, got shape {arr.shape}')
  return arr


def _count(name: str, value, low: int = 0) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(f'{name} must be an int >= {low}, got {value!r}')
  return int(value)


def _direction(direction, x_t: jax.Array) -> jax.Array:
  """One direction for all samples (x_t.shape[1:]) or one per sample (x_t.shape)."""
  direction = jnp.asarray(direction)
  if direction.shape not in (x_t.shape[1:], x_t.shape):
    raise ValueError(f'direction must have the shape of one sample {tuple(x_t.shape[1:])} or of '
                     f'x_t {tuple(x_t.shape)}, got {direction.shape}')
  if not jnp.issubdtype(direction.dtype, jnp.floating):
    raise ValueError(f'direction must be a floating-point array, got dtype {direction.dtype}')
  return direction.astype(x_t.dtype)


def _check_x(x, name: str) -> jax.Array:
  x = jnp.asarray(x)
  if x.ndim < 2 or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f'{name} must be a floating-point batch (B, ...) of samples, got shape '
                     f'{x.shape} and dtype {x.dtype}')
  return x


# -- x-space guidance and edits --------------------------------------------------------------------

def x_space_guidance(eps_fn: EpsFn, x_t, t, direction, *, gamma, delta=1.0,
                     num_steps: int = 16) -> jax.Array:
  """x_{i+1} = x_i + gamma * [eps_fn(x_i + delta * direction, t) - eps_fn(x_i, t)], i < num_steps.

  x_t: (B, ...) samples at timestep t (scalar, int or float; passed to eps_fn as it is).
  direction: (...) shared by all samples, or (B, ...) one per sample; used as given (the official
  code passes unit vectors, as `LocalBasis.latent_basis` rows are), so delta is the length of the
  probe step. gamma: the guidance scale, a real scalar (may be traced; for several at once use
  `edit` or jax.vmap). num_steps: a static int >= 0 (official: 16; 64 with an edit prompt).
  Returns all num_steps + 1 states (num_steps + 1, B, ...), the first one x_t itself. gamma = 0
  returns copies of x_t bit for bit (for a finite eps). One `lax.scan`, jit/vmap-compatible.
  """
  x_t = _check_x(x_t, 'x_t')
  v = _direction(direction, x_t)
  gamma = _real('gamma', gamma).astype(x_t.dtype)
  delta = _real('delta', delta).astype(x_t.dtype)
  num_steps = _count('num_steps', num_steps)
  probe = delta * v

  def step(x, _):
    x_new = x + gamma * (eps_fn(x + probe, t) - eps_fn(x, t))
    return x_new, x_new

  _, xs = jax.lax.scan(step, x_t, None, length=num_steps)
  return jnp.concatenate([x_t[None], xs])


def edit_step_index(schedule: NoiseSchedule, num_steps: int, edit_t: float) -> int:
  """The official code's edit index: argmin_i |t_i - edit_t * T| over the DDIM grid of num_steps
  (edit_t in [0, 1], 1 = the noisiest step; T = num_train_timesteps)."""
  edit_t = float(_real('edit_t', edit_t))
  if not 0.0 <= edit_t <= 1.0:
    raise ValueError(f'edit_t must be in [0, 1], got {edit_t}')
  ts = schedule.inference_timesteps(num_steps)
  return int(np.argmin(np.abs(ts - edit_t * schedule.num_train_timesteps)))


def official_frames(num_guidance_steps: int, vis_num: int) -> list[int]:
  """The guidance steps the official code denoises and shows: xt[::len(xt) // vis_num] over the
  num_guidance_steps + 1 states, e.g. (16, 4) -> [0, 4, 8, 12, 16]."""
  n = _count('num_guidance_steps', num_guidance_steps) + 1
  return list(range(0, n, max(n // _count('vis_num', vis_num, 1), 1)))


@flax.struct.dataclass
class EditResult:
  """Leading axes of x0 / x_t: gamma's axis (if gamma was 1-D), then frames (if frame_steps)."""
  x0: jax.Array  # (*G, *F, B, ...) the edited samples at t = 0
  x_t: jax.Array  # (*G, *F, B, ...) the guided states that were denoised
  x0_reference: jax.Array  # (B, ...) x_start denoised without the edit (reconstruction, if real)
  x_start: jax.Array  # (B, ...) the unedited x_t at the edit timestep (the inverted one, if real)
  t: jax.Array  # () float32: the edit timestep
  trajectory: samplers.Trajectory | None = None  # of the edited runs (leading axes as x0)


def edit(eps_fn: EpsFn, x_t, step_index: int, direction, schedule: NoiseSchedule,
         num_steps: int, *, gamma, delta=1.0, guidance_steps: int = 16,
         frame_steps: Sequence[int] | None = None, guidance_eps_fn: EpsFn | None = None,
         eta: float = 0.0, key=None, return_trajectory: bool = False) -> EditResult:
  """x-space guidance at the DDIM grid's timestep t_k (k = step_index), then DDIM from t_k to 0.

  x_t: (B, ...) samples at t_k = schedule.inference_timesteps(num_steps)[k] (e.g. a
  `ddim(..., return_trajectory=True)` trajectory's x_t[k]). The denoising is
  `samplers.ddim(eps_fn, ., schedule, num_steps, eta, key, first_step=k)`, so it runs exactly the
  timesteps t_k, t_{k+1}, ... that plain DDIM would; the reference is the same call on x_t unedited
  (same key: the same noise when eta > 0). gamma: a real scalar, or a 1-D array of G scales for an
  edit strip (vmapped: eps_fn must be a JAX function). frame_steps: which guidance states to
  denoise (default: only the last; `official_frames(16, 4)` gives the official strip).
  guidance_eps_fn: the model used for the guidance only (official text-conditioned edits: the edit
  prompt's eps, while DDIM keeps eps_fn); default eps_fn. Close over `schedule` under jit.
  """
  x_t = _check_x(x_t, 'x_t')
  ts = schedule.inference_timesteps(num_steps)
  step_index = _count('step_index', step_index)
  if step_index >= num_steps:
    raise ValueError(f'step_index must be in [0, num_steps={num_steps}), got {step_index}')
  gamma = _real('gamma', gamma, max_ndim=1).astype(x_t.dtype)
  direction = _direction(direction, x_t)
  guidance_steps = _count('guidance_steps', guidance_steps)
  frames = None
  if frame_steps is not None:
    frames = np.asarray(frame_steps)
    if frames.ndim != 1 or not np.issubdtype(frames.dtype, np.integer) or frames.size == 0 or (
        frames.min() < 0 or frames.max() > guidance_steps):
      raise ValueError(f'frame_steps must be a non-empty list of ints in [0, guidance_steps='
                       f'{guidance_steps}], got {frame_steps!r}')
  t = jnp.asarray(ts[step_index], jnp.float32)
  g_eps = eps_fn if guidance_eps_fn is None else guidance_eps_fn

  def denoise(x):
    return samplers.ddim(eps_fn, x, schedule, num_steps, eta=eta, key=key,
                         return_trajectory=return_trajectory, first_step=step_index)

  def one(g):
    states = x_space_guidance(g_eps, x_t, t, direction, gamma=g, delta=delta,
                              num_steps=guidance_steps)
    if frames is None:
      xs = states[-1]
      return xs, denoise(xs)
    xs = states[frames]
    return xs, jax.vmap(denoise)(xs)

  xs, out = one(gamma) if gamma.ndim == 0 else jax.vmap(one)(gamma)
  x0, traj = out if return_trajectory else (out, None)
  reference = samplers.ddim(eps_fn, x_t, schedule, num_steps, eta=eta, key=key,
                            first_step=step_index)
  return EditResult(x0=x0, x_t=xs, x0_reference=reference, x_start=x_t, t=t, trajectory=traj)


def invert_to(eps_fn: EpsFn, x_0, schedule: NoiseSchedule, num_steps: int,
              step_index: int) -> jax.Array:
  """DDIM inversion of x_0 (B, ...) up to the DDIM grid's timestep t_k (k = step_index), as
  `samplers.ddim_inversion` (its num_steps - k steps; the remaining k steps are computed and
  dropped, since that sampler has no stopping index)."""
  x_0 = _check_x(x_0, 'x_0')
  step_index = _count('step_index', step_index)
  if step_index >= num_steps:
    raise ValueError(f'step_index must be in [0, num_steps={num_steps}), got {step_index}')
  x_T, traj = samplers.ddim_inversion(eps_fn, x_0, schedule, num_steps, return_trajectory=True)
  # Inversion step j takes x to t_{n-1-j}; traj.x_t[j] is its input, x at t_{n-j}.
  return x_T if step_index == 0 else traj.x_t[num_steps - step_index]


def edit_real(eps_fn: EpsFn, x_0, schedule: NoiseSchedule, num_steps: int, step_index: int,
              direction, *, gamma, **edit_kwargs) -> EditResult:
  """Edits real samples x_0 (B, ...): DDIM inversion to t_k (`invert_to`), then `edit`.

  direction: an array as in `edit`, or a function x_t -> direction called on the inverted x_t
  (B, ...) (e.g. the top `LocalBasis.latent_basis` row of the h-space at x_t[0]); that is how the
  paper edits real images. `x0_reference` is then the inversion round trip (ideally x_0): its
  distance to x_0 is the reconstruction error the edit is judged against. edit_kwargs go to `edit`
  (delta, guidance_steps, frame_steps, guidance_eps_fn, eta, key, return_trajectory).
  """
  x_t = invert_to(eps_fn, x_0, schedule, num_steps, step_index)
  if callable(direction):
    direction = direction(x_t)
  return edit(eps_fn, x_t, step_index, direction, schedule, num_steps, gamma=gamma, **edit_kwargs)


# -- moving directions between samples -------------------------------------------------------------

def _rows(a: jax.Array) -> jax.Array:
  return a.reshape(a.shape[0], -1)


def _normalise(v: jax.Array) -> jax.Array:
  """Rows of v over their norms; zero rows stay zero."""
  n = jnp.linalg.norm(v, axis=-1, keepdims=True)
  return v / jnp.where(n > 0, n, 1)


def _check_bases(a: LocalBasis, b: LocalBasis, names=('basis_from', 'basis_to')) -> None:
  for kind in ('latent_basis', 'tangent_basis'):
    sa, sb = getattr(a, kind).shape[1:], getattr(b, kind).shape[1:]
    if sa != sb:
      raise ValueError(f'{names[0]} and {names[1]} must live in the same spaces: {kind} rows of '
                       f'shape {sa} vs {sb}')


def parallel_transport(basis_from: LocalBasis, basis_to: LocalBasis, tangent) -> jax.Array:
  """Carries tangent vectors u_0 at h_0 = h(x_0) to LATENT directions at sample 1 (notes 1.6):

      v' = normalise(V_1^T (U_1^T u_0))

  with the official code's column notation: U_1 (m, k) the tangent basis at h_1 (H-space, left
  singular vectors of J_1), V_1^T (k, n) the latent basis at x_1 (X-space, right singular vectors);
  here `basis_to.tangent_basis` and `.latent_basis` rows. H is treated as Euclidean: u_0 is
  projected onto T_{h_1} (coefficients U_1^T u_0) and mapped to X with the paired latent basis.
  No Sigma^-1 is applied (it is not J_1^+ u_0), as in the official `run_edit_parallel_transport`.

  tangent: an int or a list of ints, indices into `basis_from.tangent_basis` (the usual use:
  transport u_{0,i}), or tangent vectors of shape h (or (j, *h)). Returns unit latent directions of
  shape x (or (j, *x)) at sample 1, ready for `edit`. A u_0 orthogonal to T_{h_1} gives zeros.
  Indices must be static Python ints. The official code computes both bases at one timestep h_t
  (default 0.8) and edits at another, edit_t (default 1.0); here the caller picks where the bases
  come from.
  """
  _check_bases(basis_from, basis_to)
  h_shape = basis_to.tangent_basis.shape[1:]
  is_int = lambda i: isinstance(i, (int, np.integer))
  if is_int(tangent) or (isinstance(tangent, (list, tuple)) and all(map(is_int, tangent))):
    k = basis_from.tangent_basis.shape[0]
    idx = np.asarray(tangent, dtype=np.int64)
    if idx.size and (idx.min() < -k or idx.max() >= k):
      raise ValueError(f'tangent indices must be in [0, {k}) (basis_from has {k} vectors), got '
                       f'{tangent!r}')
    u0 = basis_from.tangent_basis[idx]
  else:
    u0 = jnp.asarray(tangent)
    if u0.shape != h_shape and u0.shape[1:] != h_shape:
      raise ValueError(f'tangent must be an index, a list of indices, or vectors of shape {h_shape}'
                       f' or (j, *{h_shape}), got shape {u0.shape}')
  single = u0.shape == h_shape
  u0 = u0.reshape(-1, int(np.prod(h_shape)))
  coeff = u0 @ _rows(basis_to.tangent_basis).T  # (j, k): U_1^T u_0
  v = _normalise(coeff @ _rows(basis_to.latent_basis))  # (j, n): V_1^T (U_1^T u_0)
  x_shape = basis_to.latent_basis.shape[1:]
  return v.reshape(x_shape) if single else v.reshape(-1, *x_shape)


def latent_to_tangent(basis: LocalBasis, direction) -> jax.Array:
  """u = normalise(J v) for a latent direction v at the basis' sample, with J replaced by its
  rank-k part sum_i sigma_i u_i v_i^T from the basis (v = v_i gives u_i exactly)."""
  v = jnp.asarray(direction)
  x_shape = basis.latent_basis.shape[1:]
  if v.shape != x_shape:
    raise ValueError(f'direction must have the latent shape {x_shape}, got {v.shape}')
  coeff = basis.singular_values * (_rows(basis.latent_basis) @ v.reshape(-1))  # sigma_i <v_i, v>
  return _normalise(coeff @ _rows(basis.tangent_basis)).reshape(basis.tangent_basis.shape[1:])


def transport_latent_direction(basis_from: LocalBasis, basis_to: LocalBasis,
                               direction) -> jax.Array:
  """A latent direction v_0 of sample 0 -> unit latent direction at sample 1:
  u_0 = normalise(J_0 v_0) (`latent_to_tangent`), then `parallel_transport`."""
  _check_bases(basis_from, basis_to)
  return parallel_transport(basis_from, basis_to, latent_to_tangent(basis_from, direction))


@flax.struct.dataclass
class ConsistentDirections:
  directions: jax.Array  # (S, j, *x) unit latent directions: row i of every sample "means" u_ref,i
  alignment: jax.Array  # (S, j) in [0, 1]: ||U_s u_ref,i|| ('transport') or |<u_s,i, u_ref,i>|
  mean: jax.Array  # (j, *x) normalise(mean over samples of directions): one shared direction


CONSISTENCY_METHODS = ('transport', 'sign')


def consistent_directions(bases, *, reference: int = 0, num_directions: int | None = None,
                          method: str = 'transport') -> ConsistentDirections:
  """Directions that mean the same edit on every sample ("globally consistent directions").

  OUR DEFINITION. Paper 1's abstract claims the directions are globally consistent across samples,
  but its construction was not available: the official code's global bases (Frechet mean over
  SO(n), Hungarian matching) call functions that are not in the repository (notes 1.6). Here the
  reference sample's top tangent vectors u_ref,i (i < j) define the edits, and every sample s gets:

  - 'transport' (default): v_s,i = parallel_transport(b_ref, b_s, i) = normalise(V_s^T U_s^T
    u_ref,i), the official transfer applied to each sample. The reference gets its own v_ref,i;
    it is invariant to sign flips (and rotations) of sample s's basis pairs. alignment: the norm
    of u_ref,i's projection onto T_{h_s} (1 if it lies in it).
  - 'sign': sample s's own v_s,i, sign-flipped so that <u_s,i, u_ref,i> >= 0 (the index i keeps
    the singular-value order; wrong if a near-degenerate pair swaps order between samples).
    alignment = |<u_s,i, u_ref,i>|.

  bases: a list of `LocalBasis` (same spaces and k) or one stacked along a leading sample axis.
  `mean` is the normalised average over samples of each row (all samples share X, so it is one
  direction for all; project it with a sample's V V^T to make it local, as the official
  `local_projection` option does).
  """
  if method not in CONSISTENCY_METHODS:
    raise ValueError(f'method must be one of {CONSISTENCY_METHODS}, got {method!r}')
  if isinstance(bases, (list, tuple)):
    if not bases:
      raise ValueError('bases must not be empty')
    for i, b in enumerate(bases):
      if b.latent_basis.shape != bases[0].latent_basis.shape or (
          b.tangent_basis.shape != bases[0].tangent_basis.shape):
        raise ValueError(f'bases[{i}] has latent/tangent shapes {b.latent_basis.shape}/'
                         f'{b.tangent_basis.shape}, bases[0] {bases[0].latent_basis.shape}/'
                         f'{bases[0].tangent_basis.shape}: all must match')
    bases = jax.tree.map(lambda *a: jnp.stack(a), *bases)
  elif not isinstance(bases, LocalBasis) or bases.singular_values.ndim != 2:
    raise ValueError('bases must be a list of LocalBasis or one LocalBasis stacked along a leading '
                     'sample axis (singular_values (S, k)), got '
                     f'{type(bases).__name__} {getattr(bases, "singular_values", None)!r}')
  num_samples, k = bases.latent_basis.shape[:2]
  if not -num_samples <= reference < num_samples:
    raise ValueError(f'reference must index one of the {num_samples} samples, got {reference}')
  j = k if num_directions is None else _count('num_directions', num_directions, 1)
  if j > k:
    raise ValueError(f'num_directions must be at most k={k}, got {num_directions}')
  x_shape = bases.latent_basis.shape[2:]
  lat = bases.latent_basis.reshape(num_samples, k, -1)
  tan = bases.tangent_basis.reshape(num_samples, k, -1)
  u_ref = tan[reference, :j]  # (j, m)

  if method == 'transport':
    coeff = jnp.einsum('jm,skm->sjk', u_ref, tan)  # (S, j, k)
    dirs = _normalise(jnp.einsum('sjk,skn->sjn', coeff, lat))
    align = jnp.linalg.norm(coeff, axis=-1)
  else:
    cos = jnp.einsum('jm,sjm->sj', u_ref, tan[:, :j])  # (S, j)
    dirs = lat[:, :j] * jnp.where(cos < 0, -1.0, 1.0).astype(lat.dtype)[..., None]
    align = jnp.abs(cos)
  mean = _normalise(jnp.mean(dirs, axis=0))
  return ConsistentDirections(directions=dirs.reshape(num_samples, j, *x_shape),
                              alignment=align, mean=mean.reshape(j, *x_shape))


# -- text-conditioned ("weakly supervised") bases --------------------------------------------------

def text_conditioned_basis(h_fn_for: Callable[[jax.Array], pullback.HFn], x, context,
                           num_vectors: int, num_iters: int, key=None, *, contrast_context=None,
                           **basis_kwargs) -> LocalBasis:
  """The local basis of the h-space map under a prompt (paper 2's text-conditioned edits, notes
  1.5): J = d h(x; c) / dx at the edit prompt's embedding c, so the directions point toward that
  concept (official: edit_prompt in {"sitting dog", "tiger"}, k = 2, 64 guidance steps, and the
  guidance itself with the same prompt: `edit(..., guidance_eps_fn=eps under c)`).

  h_fn_for: context -> h_fn (x -> h, one sample), e.g.
  `functools.partial(pullback.unet_h_fn, unet, params, t)`. x: one sample (no batch axis).
  contrast_context: OUR ADDITION (not in the notes): with a second embedding c', the basis of
  x -> h(x; c) - h(x; c'), i.e. the top singular vectors of J_c - J_c': the directions whose
  h-space response differs most between the two prompts. Other arguments go to `local_basis`.
  """
  h_fn = h_fn_for(context)
  if contrast_context is not None:
    h_other = h_fn_for(contrast_context)
    h_main = h_fn
    h_fn = lambda x_: h_main(x_) - h_other(x_)
  return pullback.local_basis(h_fn, x, num_vectors, num_iters, key, **basis_kwargs)
