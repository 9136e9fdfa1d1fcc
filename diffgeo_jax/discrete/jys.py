"""Jump Your Steps (arXiv 2410.07761): sampling schedules that minimise the KL upper bound (KLUB)
of parallel (tau-leaping) sampling, found by hierarchical breakdown.

    times = jys.search(denoiser, proc, data_sampler, nfe=N, key=key)   # (N+1,) from 1.0 down

The search starts from the one-step schedule {t_max -> t_min} and splits every interval (s, u) at
    t* = argmax_t KLUB(Q^{s->t->u} || Q^{s->u}),
the KL gained by inserting t (the fine and the coarse schedule differ only on [t, u]: rates frozen at
(x_t, t) against rates frozen at (x_s, s)). Each level doubles the step count: 1, 2, 4, ... The
estimator is the official code's (paper Sec. 3.5, `klub_algorithm1_t_q_data`):
  * forward states instead of sampled paths: x_0 from the data, x_s and x_t from q(. | x_0) with
    the SAME per-token uniforms (coupled: the masks at t are a subset of those at s);
  * the single-transition approximation: a token jumps at most once in [t, u], with probability
    (t - u) R~_t(x_t)_j, so the path KL is (t - u) sum_j R2_j log(R2_j / R1_j) per masked token
    (R2 = rates at (x_t, t), R1 at (x_s, s));
  * optionally the Girsanov compensator (t - u) sum_j (R1_j - R2_j), which the paper's eq. (8)
    and the official code leave out (`compensator=True`);
  * common random numbers: one data batch and one set of uniforms for every candidate t, so the
    objective is a smooth function of t.
Two searches over the same objective:
  * `method='golden'`: per interval, golden-section search on [u + min_gap, s - min_gap] to the
    tolerance `tol` (at most `max_iter` shrinking probes), one interval after the other, each
    evaluation a separate jit call with both forward passes (as the official `main.py`);
  * `method='parallel'` (default): the denoiser passes at every time of a fixed grid (as the
    official code snaps its schedules to a grid) in one jit-compiled call, chunked over times;
    then, per level, the gain of every grid time inside every interval in one vmapped jit call,
    and each interval's exact argmax over the grid (no unimodality assumed). Its cost is
    `grid_size` passes whatever the NFE, against two passes per evaluation for golden-section.
NFE that are not powers of two: the last level splits only the intervals whose best insertion gains
the most KLUB (greedy by gain), so any N >= 1 is reachable.
Several devices (`mesh=distributed.make_mesh()`, on a pod every host's devices): the parallel
search's grid passes are split over the mesh's `data` axis, each device its block of grid times,
and gathered to every process; the rest is cheap and runs on every process alike.
Only the absorbing (mask) process is supported: under the single-transition approximation a
uniform-process token that already jumped in [s, t] has coarse rate 0, and the bound is infinite.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from diffgeo_jax import distributed
from diffgeo_jax.discrete import processes

LOG_FLOOR = 1e-8  # the official estimator's floor inside the logs
METHODS = ('parallel', 'golden')
_INV_PHI = (np.sqrt(5.0) - 1.0) / 2.0  # 0.618...


def _check_process(process):
  if not isinstance(process, processes.Absorbing):
    raise ValueError('the KLUB search supports processes.Absorbing only (the official '
                     f'estimator\'s case; see the module docstring), got {process!r}')


def _rates_and_states(denoiser, process, x0, noise, t, max_rows):
  """Forward states x_t = add_noise(x0, t, noise) for t (K,) and their reverse rates:
  (K, B, L) and (K, B, L, S), the denoiser called on at most `max_rows` rows at a time."""
  k, (b, length) = t.shape[0], x0.shape
  x = jax.vmap(lambda ti: process.add_noise(x0, ti, noise))(t)  # (K, B, L)
  rows = x.reshape(k * b, length)
  trow = jnp.repeat(t, b)
  chunk = max(1, min(k, max_rows // b))  # whole (B,) batches per denoiser call
  pad = (-k) % chunk
  if pad:
    rows = jnp.concatenate([rows, jnp.tile(rows[-b:], (pad, 1))])
    trow = jnp.concatenate([trow, jnp.tile(trow[-b:], pad)])
  rows = rows.reshape(-1, chunk * b, length)
  trow = trow.reshape(-1, chunk * b)
  rates = jax.lax.map(lambda a: process.reverse_rates(a[0], a[1], denoiser(a[0], a[1])),
                      (rows, trow))
  rates = rates.reshape((-1,) + rates.shape[2:])[:k * b]
  return x, rates.reshape(k, b, length, -1)


def _klub_from_rates(x_s, r_s, x_t, r_t, dt, compensator):
  """Mean over (B, L) of the per-token KLUB of [t, u] (dt = t - u), fine rates r_t at x_t against
  coarse rates r_s at x_s. Only tokens in the same state at s and t can jump under both processes
  (absorbing: masked at t); the others contribute 0 (clean at t: no rate in either process)."""
  s_num = r_t.shape[-1]
  off = (jax.nn.one_hot(x_t, s_num) == 0) & (x_t == x_s)[..., None]
  r2 = jnp.where(off, r_t, 0.0)
  r1 = jnp.where(off, r_s, 0.0)
  jump = jnp.sum(r2 * (jnp.log(r2 + LOG_FLOOR) - jnp.log(r1 + LOG_FLOOR)), -1)
  if compensator:
    jump = jump + jnp.sum(r1 - r2, -1)
  return dt * jnp.mean(jump)


def klub(denoiser: Callable, process, x0, noise, s, t, u, *, compensator: bool = False,
         max_rows: int = 1024) -> jax.Array:
  """The KLUB(Q^{s->t->u} || Q^{s->u}) estimate per token (nats), for s > t > u, from clean
  sequences x0 (B, L) and per-token uniforms `noise` (B, L) (the common random numbers)."""
  _check_process(process)
  s, t = jnp.asarray([s], jnp.float32), jnp.asarray([t], jnp.float32)
  x_s, r_s = _rates_and_states(denoiser, process, x0, noise, s, max_rows)
  x_t, r_t = _rates_and_states(denoiser, process, x0, noise, t, max_rows)
  return _klub_from_rates(x_s[0], r_s[0], x_t[0], r_t[0], t[0] - u, compensator)


def schedule_klub(denoiser: Callable, process, x0, noise, times, *, points_per_step: int = 8,
                  compensator: bool = False, max_rows: int = 1024) -> float:
  """The KLUB of a whole schedule against the true reverse process, per token (nats): the sum over
  steps s -> u of  int_u^s E[sum_j R~_tau(x_tau)_j log(R~_tau(x_tau)_j / R~_s(x_s)_j)] dtau
  (eq. 8: the true process jumps at rate R~_tau, tau-leaping at the rate frozen at s), with x_tau,
  x_s forward states coupled through `noise` and the integral by the midpoint rule on
  `points_per_step` points. No single-transition approximation: a yardstick for schedules found
  by any search."""
  _check_process(process)
  times = np.asarray(times, np.float64)
  frac = (np.arange(points_per_step) + 0.5) / points_per_step
  passes = _passes_fn(denoiser, process, max_rows)
  x_s, r_s = passes(x0, noise, jnp.asarray(times[:-1], jnp.float32))
  total = 0.0
  for i, (s, u) in enumerate(zip(times[:-1], times[1:])):
    taus = u + (s - u) * frac
    x_q, r_q = passes(x0, noise, jnp.asarray(taus, jnp.float32))
    per = jax.vmap(functools.partial(_klub_from_rates, compensator=compensator),
                   (None, None, 0, 0, None))(x_s[i], r_s[i], x_q, r_q, (s - u) / points_per_step)
    total += float(jnp.sum(per))
  return total


@dataclasses.dataclass
class SearchResult:
  times: np.ndarray  # (N + 1,) decreasing, t_max -> t_min
  levels: list  # the schedule after every level: (2,), (3,), (5,), ... (N + 1,)
  gains: list  # per level, the maximised KLUB gain of every interval that was split
  evaluations: int  # KLUB evaluations (candidate times) in all
  denoiser_rows: int  # sequences passed through the denoiser in all
  wall_s: float


@functools.lru_cache(maxsize=32)
def _golden_gain_fn(denoiser, process, compensator, max_rows):
  """gain(x0, noise, s (I,), u (I,), cand (I, G)) -> (I, G), jit-compiled once per denoiser: both
  forward passes per evaluation, as the official code."""

  def gains(x0, noise, s, u, cand):
    n_int, n_cand = cand.shape
    x_s, r_s = _rates_and_states(denoiser, process, x0, noise, s, max_rows)
    x_t, r_t = _rates_and_states(denoiser, process, x0, noise, cand.reshape(-1), max_rows)
    x_t = x_t.reshape((n_int, n_cand) + x_t.shape[1:])
    r_t = r_t.reshape((n_int, n_cand) + r_t.shape[1:])
    per = jax.vmap(jax.vmap(functools.partial(_klub_from_rates, compensator=compensator),
                            (None, None, 0, 0, 0)), (0, 0, 0, 0, 0))
    return per(x_s, r_s, x_t, r_t, cand - u[:, None])

  return jax.jit(gains)


class _Objective:
  """The gain KLUB(Q^{s->t->u} || Q^{s->u}) for many intervals and candidates, on fixed data."""

  def __init__(self, denoiser, process, x0, noise, compensator, max_rows):
    fn = _golden_gain_fn(denoiser, process, compensator, max_rows)
    self.gains = functools.partial(fn, x0, noise)


@functools.lru_cache(maxsize=32)
def _passes_fn(denoiser, process, max_rows, mesh=None):
  """(x0, noise, t (K,)) -> the forward states and rates at every t, as numpy with `mesh` (its
  devices each take a block of the K times: `shard_map`, so that each runs its own chunked
  `lax.map`; the padding times are dropped)."""
  passes = lambda x0, noise, t: _rates_and_states(denoiser, process, x0, noise, t, max_rows)
  if mesh is None:
    return jax.jit(passes)
  spread = jax.jit(jax.shard_map(lambda t, x0, noise: passes(x0, noise, t), mesh=mesh,
                                 in_specs=(P('data'), P(), P()), out_specs=P('data')))

  def call(x0, noise, t):
    k = t.shape[0]
    out = spread(distributed.shard_batch(mesh, t), *distributed.replicate(mesh, (x0, noise)))
    return jax.tree.map(lambda a: a[:k], distributed.to_host(out))

  def lower(x0, noise, t):
    """The sharded grid pass lowered for abstract arguments (t's length a multiple of the
    `data` axis), for ahead-of-time compilation (`diffgeo_jax.aot`)."""
    return spread.lower(distributed.abstract(t, distributed.batch_sharding(mesh)),
                        *distributed.abstract((x0, noise), distributed.replicated(mesh)))

  call.lower = lower
  return call


@functools.lru_cache(maxsize=8)
def _pair_gains_fn(compensator):
  per_pair = functools.partial(_klub_from_rates, compensator=compensator)

  def gains(x, rates, s_idx, t_idx, dt):
    one = lambda a: per_pair(x[a[0]], rates[a[0]], x[a[1]], rates[a[1]], a[2])
    return jax.lax.map(one, (s_idx, t_idx, dt), batch_size=8)

  return jax.jit(gains)


class _GridObjective:
  """The parallel search's objective: the forward states and reverse rates at every time of a
  fixed grid, computed once in one jit call (lax.map over chunks of times); then the gain of any
  (s, t, u) on the grid needs no further denoiser call. One level's gains -- every grid time
  inside every interval -- come from one vmapped jit call."""

  def __init__(self, denoiser, process, x0, noise, grid, compensator, max_rows, mesh=None):
    passes = _passes_fn(denoiser, process, max_rows, mesh)
    self.x, self.rates = passes(x0, noise, jnp.asarray(grid, jnp.float32))
    self.grid = np.asarray(grid, np.float64)
    self._gains = _pair_gains_fn(compensator)

  def level(self, sched_idx):
    """For every interval (s, u) of a schedule given as increasing grid indices (t decreasing):
    the best interior grid index and its gain (-inf where the interval has no interior point)."""
    m = len(self.grid)
    s_idx = np.zeros(m, np.int32)
    t_idx = np.zeros(m, np.int32)
    dt = np.zeros(m, np.float32)
    owner = np.full(m, -1)
    n = 0
    for i, (a, b) in enumerate(zip(sched_idx[:-1], sched_idx[1:])):
      inner = np.arange(a + 1, b)
      s_idx[n:n + len(inner)], t_idx[n:n + len(inner)] = a, inner
      dt[n:n + len(inner)] = self.grid[inner] - self.grid[b]
      owner[n:n + len(inner)] = i
      n += len(inner)
    g = np.asarray(self._gains(self.x, self.rates, jnp.asarray(s_idx), jnp.asarray(t_idx),
                               jnp.asarray(dt)), np.float64)
    best_t = np.full(len(sched_idx) - 1, -1)
    best_g = np.full(len(sched_idx) - 1, -np.inf)
    for j in range(n):
      if g[j] > best_g[owner[j]]:
        best_t[owner[j]], best_g[owner[j]] = t_idx[j], g[j]
    return best_t, best_g, n


def _golden_interval(obj, s, u, lo, hi, tol, max_iter):
  """Golden-section search for the max of the gain on [lo, hi] of one interval (s, u); returns the
  best evaluated point, its gain and the number of evaluations."""
  s_arr, u_arr = jnp.asarray([s], jnp.float32), jnp.asarray([u], jnp.float32)
  seen = {}

  def f(t):
    g = float(obj.gains(s_arr, u_arr, jnp.asarray([[t]], jnp.float32))[0, 0])
    seen[t] = g
    return g

  a, c = lo, hi
  b, d = c - _INV_PHI * (c - a), a + _INV_PHI * (c - a)
  fb, fd = f(b), f(d)
  for _ in range(max_iter):
    if c - a <= tol:
      break
    if fb >= fd:  # the max is in [a, d]
      c, d, fd = d, b, fb
      b = c - _INV_PHI * (c - a)
      fb = f(b)
    else:  # in [b, c]
      a, b, fb = b, d, fd
      d = a + _INV_PHI * (c - a)
      fd = f(d)
  t_best = max(seen, key=seen.get)
  return t_best, seen[t_best], len(seen)


def search_with_info(denoiser: Callable, process, data_sampler: Callable, nfe: int, key, *,
                     num_samples: int = 256, t_max: float = 1.0, t_min: float = 0.0,
                     method: str = 'parallel', compensator: bool = False,
                     grid_size: int = 129, tol: float | None = None, max_iter: int = 32,
                     min_gap: float = 1e-3, max_rows: int = 1024, mesh=None) -> SearchResult:
  """The JYS schedule with the search's record; see `search` and the module docstring.

  grid_size: the parallel search's time grid, linspace(t_max, t_min, grid_size) (the official
  code snaps to a 1025-point grid); it costs grid_size denoiser passes of `num_samples` sequences,
  whatever the NFE. tol, max_iter: golden-section's bracket tolerance (default: the grid
  spacing) and cap on shrinking probes. min_gap: golden-section inserts no time closer than this
  to an existing one (the official code's eps; the grid's spacing plays this part for the
  parallel search). max_rows: sequences per denoiser call (on 2 CPU cores 256 ran the grid passes
  1.7x faster than 4096; accelerators want more). mesh: split the parallel search's grid passes
  over its `data` axis (call on every process; see the module docstring)."""
  _check_process(process)
  if not isinstance(nfe, (int, np.integer)) or nfe < 1:
    raise ValueError(f'nfe must be a positive integer, got {nfe!r}')
  if method not in METHODS:
    raise ValueError(f'method must be one of {METHODS}, got {method!r}')
  if not 0.0 <= t_min < t_max <= 1.0:
    raise ValueError(f'need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}')
  if not isinstance(grid_size, (int, np.integer)) or grid_size < nfe + 1:
    raise ValueError(f'grid_size must be an integer >= nfe + 1 = {nfe + 1}, got {grid_size!r}')
  k_data, k_noise = jax.random.split(key)
  x0 = jnp.asarray(data_sampler(k_data, num_samples))
  if x0.ndim != 2 or x0.shape[0] != num_samples:
    raise ValueError(f'data_sampler(key, {num_samples}) must return ({num_samples}, L) tokens, '
                     f'got shape {x0.shape}')
  processes._check_tokens(x0, 'data_sampler output', process.vocab_size)
  noise = jax.random.uniform(k_noise, x0.shape)
  if method == 'parallel':
    return _search_grid(denoiser, process, x0, noise, nfe, t_max, t_min, grid_size, compensator,
                        max_rows, mesh)
  if tol is None:
    tol = (t_max - t_min) / (grid_size - 1)
  obj = _Objective(denoiser, process, x0, noise, compensator, max_rows)
  start = time.time()
  sched = np.array([t_max, t_min], np.float64)
  levels, gains, evals = [sched.copy()], [], 0
  while len(sched) - 1 < nfe:
    s, u = sched[:-1], sched[1:]
    lo, hi = u + min_gap, s - min_gap
    idx = np.flatnonzero(hi > lo)
    if not len(idx):
      raise ValueError(f'no interval of {sched} is wider than 2 * min_gap; lower min_gap')
    t_best = np.full(s.shape, np.nan)
    g_best = np.full(s.shape, -np.inf)
    for i in idx:
      t_best[i], g_best[i], e = _golden_interval(obj, s[i], u[i], lo[i], hi[i], tol, max_iter)
      evals += e
    chosen = _chosen(g_best, nfe - (len(sched) - 1))
    sched = np.sort(np.concatenate([sched, t_best[chosen]]))[::-1]
    levels.append(sched.copy())
    gains.append(g_best[chosen])
  return SearchResult(sched, levels, gains, evals, 2 * evals * num_samples, time.time() - start)


def _chosen(gains, budget):
  """The intervals to split: all that can be, or, when the budget ends mid-level, those whose
  best insertion gains the most KLUB (greedy by gain); sorted by position."""
  order = np.argsort(-gains, kind='stable')
  order = order[np.isfinite(gains[order])]
  return np.sort(order[:budget])


def _search_grid(denoiser, process, x0, noise, nfe, t_max, t_min, grid_size, compensator,
                 max_rows, mesh=None) -> SearchResult:
  start = time.time()
  grid = np.linspace(t_max, t_min, grid_size)
  obj = _GridObjective(denoiser, process, x0, noise, grid, compensator, max_rows, mesh)
  sched = np.array([0, grid_size - 1])
  levels, gains, evals = [grid[sched]], [], 0
  while len(sched) - 1 < nfe:
    t_best, g_best, n = obj.level(sched)
    evals += n
    if not n:
      raise ValueError(f'grid_size={grid_size} has no free grid time left at {len(sched) - 1} '
                       f'steps; raise grid_size above nfe')
    chosen = _chosen(g_best, nfe - (len(sched) - 1))
    sched = np.sort(np.concatenate([sched, t_best[chosen]]))
    levels.append(grid[sched])
    gains.append(g_best[chosen])
  return SearchResult(grid[sched], levels, gains, evals, grid_size * x0.shape[0],
                      time.time() - start)


def search(denoiser: Callable, process, data_sampler: Callable, nfe: int, key,
           **kwargs) -> np.ndarray:
  """The JYS schedule: (nfe + 1,) times from t_max (1.0) down to t_min (0.0), for
  `denoiser(x_t (B, L), t (B,)) -> p(x_0 | x_t) (B, L, V)` and `data_sampler(key, n) -> (n, L)`
  clean tokens. Keyword options: see `search_with_info`."""
  return search_with_info(denoiser, process, data_sampler, nfe, key, **kwargs).times
