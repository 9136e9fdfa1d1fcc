"""The start-up and outputs every binary in `launch/` shares.

    run = runs.start(config, _WORKDIR.value)     # multi-host start-up, workdir, config.json
    with run.timed('sampling'):
      images = ...
    run.save_image('samples.png', grid(images, ...))
    run.finish({'images_per_s': ...})            # results.json

Flags (defined here, so every binary that imports this module takes them):
  --jax_distributed                call `jax.distributed.initialize()` (Cloud TPU pods find their
                                   peers from the environment; `launch/tpu_pod.py` passes it)
  --jax_coordinator_address, --jax_num_processes, --jax_process_id
                                   for clusters without auto-detection (and tests on 127.0.0.1)
  --jax_heartbeat_timeout_s        how soon the others notice a dead process and exit with an error

The workdir is an `epath.Path` (`paths.resolve`): a local folder or `gs://bucket/run`. Every
process runs the whole binary (rule 1 of `distributed`); only process 0 writes, through the `Run`
methods, which do nothing elsewhere.

`results.json` has one schema for every binary: `binary`, `command`, `config`, `versions`,
`runtime` (backend, devices, processes), `wall_s` (`total` and each timed phase) and `metrics`
(the binary's numbers).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import shlex
import socket
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging
from etils import epath

from diffgeo_jax import distributed, paths

_DISTRIBUTED = flags.DEFINE_bool(
    'jax_distributed', False, 'Call jax.distributed.initialize() (multi-host: TPU pods, clusters).')
_COORDINATOR = flags.DEFINE_string(
    'jax_coordinator_address', None, 'host:port of process 0 (when the environment does not say).')
_NUM_PROCESSES = flags.DEFINE_integer('jax_num_processes', None, 'Number of JAX processes.')
_PROCESS_ID = flags.DEFINE_integer('jax_process_id', None, 'This process\'s index.')
_HEARTBEAT = flags.DEFINE_integer(
    'jax_heartbeat_timeout_s', 100, 'Seconds without a heartbeat before a process counts as dead '
    'and the others stop with an error.')

_PACKAGES = ('jax', 'jaxlib', 'libtpu', 'flax', 'optax', 'orbax-checkpoint', 'numpy', 'diffgeo_jax')


def _flag(holder, default=None):
  return holder.value if flags.FLAGS.is_parsed() else default


def initialize_from_flags() -> None:
  """`jax.distributed.initialize` when --jax_distributed is set (once per process)."""
  if not _flag(_DISTRIBUTED, False) or getattr(initialize_from_flags, 'done', False):
    return
  distributed.initialize(_flag(_COORDINATOR), _flag(_NUM_PROCESSES), _flag(_PROCESS_ID),
                         _flag(_HEARTBEAT, 100))
  initialize_from_flags.done = True


def _as_dict(config) -> dict:
  if config is None:
    return {}
  if hasattr(config, 'to_json_best_effort'):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(dict(config), default=str))


def versions() -> dict[str, str]:
  out = {'python': platform.python_version()}
  for name in _PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


def runtime() -> dict[str, Any]:
  return {'backend': jax.default_backend(), 'device_kind': jax.devices()[0].device_kind,
          'devices': jax.device_count(), 'local_devices': jax.local_device_count(),
          'processes': jax.process_count(), 'host': socket.gethostname()}


class Run:
  """One binary's run: its workdir, its config and what it writes. Every process holds one; only
  process 0 (`is_main`) writes."""

  def __init__(self, config, workdir: epath.Path, binary: str):
    self.config = config
    self.workdir = workdir
    self.binary = binary
    self.is_main = distributed.is_main()
    self.wall_s: dict[str, float] = {}
    self._start = time.perf_counter()

  def path(self, name: str) -> epath.Path:
    return self.workdir / name

  @contextlib.contextmanager
  def timed(self, phase: str) -> Iterator[None]:
    """Adds the block's wall time to `wall_s[phase]` in results.json."""
    t0 = time.perf_counter()
    try:
      yield
    finally:
      self.wall_s[phase] = round(self.wall_s.get(phase, 0.0) + time.perf_counter() - t0, 3)

  # Writers: process 0 only; each returns the path written (None elsewhere).
  def write_json(self, name: str, obj: Any):
    return paths.write_json(self.path(name), obj) if self.is_main else None

  def write_text(self, name: str, text: str):
    return paths.write_bytes(self.path(name), text.encode()) if self.is_main else None

  def save_npz(self, name: str, **arrays):
    return paths.save_npz(self.path(name), **arrays) if self.is_main else None

  def save_image(self, name: str, image):
    return paths.save_image(self.path(name), image) if self.is_main else None

  def save_figure(self, name: str, fig, dpi: int = 110):
    if not self.is_main:
      import matplotlib.pyplot as plt  # noqa: PLC0415
      plt.close(fig)
      return None
    return paths.save_figure(self.path(name), fig, dpi=dpi)

  @contextlib.contextmanager
  def folder(self, name: str, export_to: str = '') -> Iterator[str]:
    """A local folder to write a model folder into (process 0 only), which ends up as
    `workdir/name` (uploaded when the workdir is on GCS) and, with `export_to`, also copied there
    (local or gs://)."""
    if not self.is_main:
      raise RuntimeError('Run.folder is for process 0 (check run.is_main): the others write nothing')
    target = self.path(name)
    with paths.writable_folder(target) as local:
      yield local
    if export_to:
      paths.copy_tree(target, paths.resolve(export_to, 'export_dir'))
      logging.info('exported %s to %s', target, export_to)

  def results(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {'binary': self.binary, 'command': shlex.join(['python', *sys.argv]),
            'config': _as_dict(self.config), 'versions': versions(), 'runtime': runtime(),
            'wall_s': {'total': round(time.perf_counter() - self._start, 3), **self.wall_s},
            'metrics': _jsonable(dict(metrics))}

  def finish(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Writes `results.json` (process 0) and returns its content (every process)."""
    out = self.results(metrics)
    self.write_json('results.json', out)
    logging.info('wrote %s/results.json (%.1f s): %s', self.workdir, out['wall_s']['total'],
                 json.dumps(out['metrics'])[:2000])
    return out


def start_main(argv, config_flag, workdir_flag, **start_kw) -> tuple[Any, Run]:
  """The prologue of a config binary's `main(argv)`: no positional arguments, then the config
  of `config_flag` and `start(config, workdir_flag.value, **start_kw)`."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = config_flag.value
  return config, start(config, workdir_flag.value, **start_kw)


def start(config, workdir: str | os.PathLike, *, config_file: str | None = 'config.json',
          binary: str | None = None) -> Run:
  """The start of every binary: `jax.distributed.initialize()` under --jax_distributed, the
  workdir resolved (local or gs://; a bad URL is an error naming --workdir), and the resolved
  config written to `config_file` by process 0. Training binaries pass `config_file=None`: their
  `Trainer` writes config.json after checking it against the checkpoints it resumes from."""
  initialize_from_flags()
  path = paths.resolve(workdir, '--workdir')
  if jax.process_count() > 1 and not paths.is_remote(path):
    logging.warning('--workdir=%s is local on a run of %d processes: only process 0 writes its '
                    'outputs, and on separate hosts checkpoints need a shared file system; use '
                    'gs:// on a pod', path, jax.process_count())
  run = Run(config, path, binary or os.path.splitext(os.path.basename(sys.argv[0]))[0])
  if run.is_main:
    path.mkdir(parents=True, exist_ok=True)
    if config_file:
      run.write_json(config_file, _as_dict(config))
  return run


def _jsonable(obj):
  """numpy scalars and arrays -> Python numbers and lists, recursively."""
  if isinstance(obj, Mapping):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, (np.generic, np.ndarray, jax.Array)):
    return np.asarray(obj).tolist()
  return obj
