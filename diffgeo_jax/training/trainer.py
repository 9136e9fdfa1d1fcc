"""The training loop every training binary shares.

One jit-compiled step with explicit shardings over a `Mesh`; optax (AdamW, warmup + cosine, gradient
clipping) and an EMA of the parameters; orbax `CheckpointManager` (keeps the last N, async where
available, resumes from the latest automatically); console progress (step, loss, steps/s, ETA);
TensorBoard scalars; `config.json` in the workdir, refused on resume if the model or data changed.

Runs are exactly reproducible and therefore exactly resumable: the batch of step i is
`batch_fn(i)` and its key is `fold_in(key, i)`, so a run killed and resumed computes the same
updates as one that never stopped.

A training job supplies `loss_fn(params, batch, key) -> (loss, metrics)`, `init_fn(key) -> params`
and `batch_fn(step) -> dict of numpy arrays`: the global batch of the step, a function of the step
alone, the same on every process; each process feeds the rows its own devices hold
(`sharding.put_batch`), so N processes compute the updates one process computes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging

from diffgeo_jax import distributed, paths
from diffgeo_jax.models import attention
from diffgeo_jax.training import defaults, sharding, summary

# Fields that may change between a run and its resumption (how long and how it reports, not what
# it learns). A longer num_steps stretches a cosine schedule from the resumed step on.
RESUMABLE_FIELDS = ('train.num_steps', 'train.log_every', 'train.checkpoint_every',
                    'train.keep_checkpoints', 'train.async_checkpoints', 'jax_distributed',
                    'export_dir', 'eval')


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array  # number of updates applied
  params: Any
  opt_state: Any
  ema_params: Any


default_train_config = defaults.train_config  # the config block, importable without optax


def make_optimizer(c: ml_collections.ConfigDict) -> optax.GradientTransformation:
  if c.schedule == 'cosine':
    lr = optax.warmup_cosine_decay_schedule(0.0, c.learning_rate, c.warmup_steps,
                                            max(c.num_steps, c.warmup_steps + 1),
                                            c.end_learning_rate)
  elif c.schedule == 'constant':
    lr = optax.join_schedules([optax.linear_schedule(0.0, c.learning_rate, c.warmup_steps),
                               optax.constant_schedule(c.learning_rate)], [c.warmup_steps])
  else:
    raise ValueError(f'train.schedule must be cosine or constant, got {c.schedule!r}')
  parts = [optax.clip_by_global_norm(c.grad_clip)] if c.grad_clip else []
  parts.append(optax.adamw(lr, b1=c.b1, b2=c.b2, weight_decay=c.weight_decay))
  return optax.chain(*parts)


def ema_decay_at(decay: float, step: jax.Array) -> jax.Array:
  """EMA decay with a warm-up, so early averages are not dominated by the random initialisation."""
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, ema_decay: float,
                    with_frozen: bool = False):
  """`step(state, batch, key) -> (state, metrics)`, pure (jit it with shardings). With
  `with_frozen`: `step(state, batch, key, frozen)` and `loss_fn(params, batch, key, frozen)`, for
  parameters that are inputs but not trained (a LoRA's base model), passed once per step rather
  than captured as constants of the compiled step."""
  def step(state: TrainState, batch: Any, key: jax.Array, *frozen):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, key,
                                                                       *frozen)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if ema_decay:
      d = ema_decay_at(ema_decay, state.step)
      ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state.ema_params, params)
    else:
      ema = params
    metrics = {**metrics, 'loss': loss, 'grad_norm': optax.global_norm(grads)}
    return TrainState(state.step + 1, params, opt_state, ema), metrics
  return step


def flatten(config: Any, prefix: str = '') -> dict[str, Any]:
  """Dotted-path view of a (nested) config dict, with tuples as lists (JSON round trip)."""
  items = config.to_dict() if hasattr(config, 'to_dict') else config
  out = {}
  for k, v in items.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = json.loads(json.dumps(v))
  return out


def config_differences(saved: Mapping, given: Mapping, ignore=RESUMABLE_FIELDS) -> list[str]:
  """'field: saved -> given' for every field that differs, except `ignore`d ones (and below)."""
  a, b = flatten(saved), flatten(given)
  skip = lambda k: any(k == f or k.startswith(f + '.') for f in ignore)
  return [f'{k}: {a.get(k, "<absent>")!r} -> {b.get(k, "<absent>")!r}'
          for k in sorted(set(a) | set(b)) if not skip(k) and a.get(k) != b.get(k)]


class NonFiniteLossError(FloatingPointError):
  pass


def _quiet_orbax() -> None:
  """Orbax logs every save phase at INFO through absl; keep its warnings (>= 30), drop the rest."""
  logger = logging.get_absl_logger()
  if not any(getattr(f, 'is_orbax_filter', False) for f in logger.filters):
    def drop(record):
      return record.levelno >= 30 or '/orbax/' not in record.pathname
    drop.is_orbax_filter = True
    logger.addFilter(drop)


@dataclasses.dataclass
class Trainer:
  """Runs `config.train.num_steps` updates in `workdir`, resuming from its latest checkpoint."""
  config: ml_collections.ConfigDict
  workdir: str | os.PathLike  # local or gs://
  init_fn: Callable[[jax.Array], Any]
  loss_fn: Callable[[Any, Any, jax.Array], tuple[jax.Array, dict]]
  batch_fn: Callable[[int], Any]
  mesh: jax.sharding.Mesh | None = None
  rules: sharding.Rules = ()
  # Parameters the loss reads but does not train (e.g. the base model under a LoRA), sharded by
  # the same rules; then loss_fn(params, batch, key, frozen). Not checkpointed: they are inputs.
  frozen: Any = None

  def __post_init__(self):
    self.c = self.config.train
    self.mesh = self.mesh or sharding.make_mesh()
    if self.c.batch_size % self.mesh.devices.shape[0]:
      raise ValueError(f'train.batch_size={self.c.batch_size} must be divisible by the data axis '
                       f'of the mesh ({self.mesh.devices.shape[0]} devices)')
    self.tx = make_optimizer(self.c)
    self.is_main = jax.process_index() == 0
    self.workdir = paths.resolve(self.workdir, 'workdir')
    self.ckpt_dir = self.workdir / 'checkpoints'

  # -- state ---------------------------------------------------------------------------------------

  def _init_state(self, key: jax.Array) -> TrainState:
    params = self.init_fn(key)
    return TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(params), params)

  def state_shardings(self) -> Any:
    abstract = jax.eval_shape(self._init_state, jax.random.key(0))
    return sharding.tree_shardings(abstract, self.mesh, self.rules)

  def frozen_shardings(self) -> Any:
    return sharding.tree_shardings(self.frozen, self.mesh, self.rules)

  def put_frozen(self) -> tuple:
    """The frozen parameters placed with their shardings, as the extra step argument (or ())."""
    if self.frozen is None:
      return ()
    return (jax.device_put(self.frozen, self.frozen_shardings()),)

  def compiled_step(self):
    """The jit-compiled step (built once per Trainer, so runs in rounds compile once)."""
    if getattr(self, '_compiled', None) is None:
      self._compiled = self._build_step()
    return self._compiled

  def _build_step(self):
    shardings = self.state_shardings()
    with_frozen = self.frozen is not None
    inner = make_train_step(self.loss_fn, self.tx, self.c.ema_decay, with_frozen)

    def step(*args):
      with attention.partitioned(self.mesh):  # Pallas kernels (flash attention) per device
        return inner(*args)
    ins = (shardings, sharding.batch_sharding(self.mesh), sharding.replicated(self.mesh))
    if with_frozen:
      ins = ins + (self.frozen_shardings(),)
    return jax.jit(step, in_shardings=ins,
                   out_shardings=(shardings, sharding.replicated(self.mesh)), donate_argnums=0)

  def lower(self, batch: Any):
    """The compiled step lowered for abstract inputs (`batch`: the global batch as
    `jax.ShapeDtypeStruct`s; the state and key come from `init_fn` by `jax.eval_shape`, the frozen
    parameters may be ShapeDtypeStructs): ahead-of-time compilation for another platform
    (`diffgeo_jax.aot`) without making or loading any weights."""
    state = jax.eval_shape(self._init_state, jax.random.key(0))
    key = jax.eval_shape(lambda: jax.random.key(0))
    frozen = () if self.frozen is None else (self.frozen,)
    return self.compiled_step().lower(state, batch, key, *frozen)

  def _check_config(self, manager: ocp.CheckpointManager) -> None:
    path = self.workdir / 'config.json'
    if manager.latest_step() is not None and path.exists():
      saved = json.loads(path.read_text())
      diffs = config_differences(saved, self.config.to_dict())
      if diffs:
        raise ValueError(f'--workdir {self.workdir} holds checkpoints of a run with a different '
                         'config; use a new workdir, or restore the config. Differing fields '
                         '(saved -> given):\n  ' + '\n  '.join(diffs))
    distributed.barrier('config.json read')  # every process compared before it changes
    if self.is_main:
      paths.write_json(path, json.loads(self.config.to_json_best_effort()), sort_keys=True)

  def manager(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=self.c.keep_checkpoints, create=True,
                                           enable_async_checkpointing=self.c.async_checkpoints)
    return ocp.CheckpointManager(self.ckpt_dir, options=options)

  def restore(self, manager: ocp.CheckpointManager, step: int | None = None) -> TrainState:
    """The checkpoint at `step` (default latest), placed with this trainer's shardings."""
    step = manager.latest_step() if step is None else step
    abstract = jax.eval_shape(self._init_state, jax.random.key(0))
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, self.state_shardings())
    return manager.restore(step, args=ocp.args.StandardRestore(target))

  # -- the loop ------------------------------------------------------------------------------------

  def run(self, until: int | None = None) -> tuple[TrainState, dict]:
    """Trains to `train.num_steps` (or to step `until` <= it, with a checkpoint there, for work
    between rounds; the next run resumes); returns the final state and a summary for
    results.json."""
    c = self.c
    end = c.num_steps if until is None else until
    if not 0 < end <= c.num_steps:
      raise ValueError(f'until must be in (0, train.num_steps={c.num_steps}], got {until}')
    _quiet_orbax()
    manager = self.manager()
    self._check_config(manager)
    key = jax.random.key(c.seed)
    init_key, step_key = jax.random.split(key)
    start = manager.latest_step()
    if start is None:
      init = jax.jit(self._init_state, out_shardings=self.state_shardings())
      state, start = init(init_key), 0
      logging.info('training from scratch in %s', self.workdir)
    else:
      state = self.restore(manager, start)
      logging.info('resumed from the checkpoint at step %d in %s', start, self.ckpt_dir)
    step_fn = self.compiled_step()
    frozen = self.put_frozen()
    writer = summary.SummaryWriter(self.workdir / 'tensorboard', enabled=self.is_main)
    pending: list[tuple[int, dict]] = []  # device metrics not yet read (reading blocks dispatch)
    history: list[float] = []
    t0, timed_from = time.time(), None
    try:
      for i in range(start, end):
        batch = sharding.put_batch(self.batch_fn(i), self.mesh)
        state, metrics = step_fn(state, batch, jax.random.fold_in(step_key, i), *frozen)
        pending.append((i + 1, metrics))
        done = i + 1
        save = done % c.checkpoint_every == 0 or done == end
        if done % c.log_every == 0 or save:
          rows = self._drain(pending)
          history += [r['loss'] for _, r in rows]
          now = time.time()
          if timed_from is None:  # the first interval includes compilation: rate from here on
            timed_from = (done, now)
            rate = float('nan')
          else:
            rate = (done - timed_from[0]) / max(now - timed_from[1], 1e-9)
          eta = (end - done) / rate if rate == rate and rate > 0 else float('nan')
          means = {k: float(np.mean([r[k] for _, r in rows])) for k in rows[-1][1]}
          logging.info('step %d/%d  loss %.5f  %.2f steps/s  ETA %s', done, c.num_steps,
                       means['loss'], rate, _hms(eta))
          writer.scalars({**{f'train/{k}': v for k, v in means.items()},
                          'train/steps_per_s': rate}, done)
          writer.flush()
        if save:
          manager.save(done, args=ocp.args.StandardSave(state))
      manager.wait_until_finished()
    finally:
      writer.close()
      manager.close()
    wall = time.time() - t0
    result = {'steps': end, 'resumed_from_step': start, 'wall_s': round(wall, 1),
              'steps_per_s': round((end - start) / max(wall, 1e-9), 3),
              'final_loss': float(np.mean(history[-c.log_every:])) if history else None,
              'devices': int(self.mesh.devices.size), 'mesh': dict(self.mesh.shape)}
    return state, result

  @staticmethod
  def _drain(pending: list) -> list[tuple[int, dict]]:
    """Reads the pending metrics; stops the run at the first non-finite loss, before anything
    after it is checkpointed, so the last checkpoint on disk is the last good state."""
    rows = [(s, {k: float(v) for k, v in jax.device_get(m).items()}) for s, m in pending]
    pending.clear()
    for s, r in rows:
      if not np.isfinite(r['loss']):
        raise NonFiniteLossError(f'the loss is {r["loss"]} at step {s}; stopping. The last '
                                 'checkpoint before it is intact: lower the learning rate or '
                                 'check the batch of that step, then resume.')
    return rows


def train_job(config, run, job) -> tuple[Any, dict]:
  """The training binaries' step: a job (`init_fn`, `loss_fn`, `batch_fn`) trained by a `Trainer`
  in `run.workdir` (resuming from its checkpoints), timed as the run's 'training' phase. Returns
  the EMA parameters on the host and the trainer's result."""
  with run.timed('training'):
    state, result = Trainer(config, run.workdir, job.init_fn, job.loss_fn, job.batch_fn).run()
  return distributed.to_host(state.ema_params), result


def _hms(seconds: float) -> str:
  if seconds != seconds:
    return '?'
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'
