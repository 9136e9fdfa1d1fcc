"""Several devices and several processes: the mesh, start-up, and moving results between hosts.

On a TPU pod there is one JAX process per host, each driving its local chips, and a `jax.Array`
may span every process's devices. Four rules keep a multi-host program correct, and every binary
of the library follows them:

1. Every process runs the same jitted calls in the same order: each is a collective, and a
   process that skips one leaves the others waiting.
2. Inputs computed identically on every host (the same key, the same prompts) become global arrays
   with `shard_batch` / `replicate` (each host copies only its own shards to its devices).
3. Results reach numpy only fully replicated (jit `out_shardings=replicated(mesh)`) or through
   `to_host`, which gathers whatever is sharded; numpy never sees a partly remote array.
4. A decision read from data on the host (a detector's verdict, say) is taken once, on process 0,
   and broadcast with `same_on_all_hosts`, so that control flow cannot diverge across hosts; a
   cache file is reused only if `exists_on_every_host`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ('data', 'model')


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, heartbeat_timeout_s: int = 100) -> None:
  """`jax.distributed.initialize`: on Cloud TPU (and SLURM, ...) every argument is found in the
  environment; elsewhere give the coordinator's host:port, the process count and this process's
  index. A process that dies is noticed by the others within `heartbeat_timeout_s`, which then
  exit with an error instead of waiting forever in a collective."""
  # CPU processes (tests, clusters without accelerators) need a cross-process collectives
  # library; gloo is jax's default from 0.5 on and this setting only concerns the CPU backend.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  kwargs = {}
  if 'heartbeat_timeout_seconds' in inspect.signature(jax.distributed.initialize).parameters:
    kwargs['heartbeat_timeout_seconds'] = heartbeat_timeout_s  # older jax: its fixed default
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id, **kwargs)
  logging.info('jax.distributed: process %d of %d, %d local of %d devices',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def is_main() -> bool:
  """Process 0: the one that writes outputs."""
  return jax.process_index() == 0


# -- the mesh ----------------------------------------------------------------------------------

def make_mesh(data: int = -1, model: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
  """A (`data`, `model`) mesh over `devices` (default: every process's devices). `data=-1` takes
  what `model` leaves. Devices are laid out by `mesh_utils.create_device_mesh`, which follows the
  TPU's physical topology (neighbouring chips on the `model` axis); other platforms keep their
  order, which groups each process's devices together on the `data` axis."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if model < 1 or n % model:
    raise ValueError(f'model={model} must be >= 1 and divide the number of devices ({n})')
  if data == -1:
    data = n // model
  if data * model != n:
    raise ValueError(f'data * model = {data} * {model} must equal the number of devices ({n})')
  grid = None
  if devices[0].platform == 'tpu':
    try:
      grid = mesh_utils.create_device_mesh((data, model), devices, allow_split_physical_axes=True)
    except (AssertionError, ValueError, NotImplementedError) as e:
      # e.g. a v4 slice with one device per core ("megacore" off): keep jax's order.
      logging.warning('mesh_utils cannot lay out these %d TPU devices (%s); using their order',
                      n, e)
  if grid is None:
    grid = np.asarray(devices, dtype=object).reshape(data, model)
  return Mesh(grid, AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over `data`, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec('data'))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def data_size(mesh: Mesh) -> int:
  return int(mesh.shape['data'])


# -- inputs ------------------------------------------------------------------------------------

def pad_rows(x, multiple: int):
  """`x` with copies of its last row appended up to a multiple of `multiple` rows."""
  pad = -x.shape[0] % multiple
  if not pad:
    return x
  xp = jnp if isinstance(x, jax.Array) else np
  return xp.concatenate([x, xp.repeat(x[-1:], pad, axis=0)])


def shard_batch(mesh: Mesh, tree: Any) -> Any:
  """Arrays (B, ...) computed identically on every host -> global arrays split over `data`, each
  padded with copies of its last row to a multiple of the `data` axis (drop the padding from the
  results). None leaves stay None."""
  n = data_size(mesh)
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda a: _put(pad_rows(a, n), sharding), tree)


def replicate(mesh: Mesh, tree: Any) -> Any:
  """A copy on every device (a no-op for arrays already replicated over `mesh`)."""
  sharding = replicated(mesh)
  return jax.tree.map(lambda a: _put(a, sharding), tree)


def _put(x, sharding: NamedSharding):
  """`jax.device_put`, also for a jax.Array on this process's devices (a key, parameters, the
  same on every host) going to devices of other processes too, which device_put refuses."""
  if jax.process_count() == 1 or not isinstance(x, jax.Array) or not x.is_fully_addressable:
    return jax.device_put(x, sharding)
  return jax.make_array_from_process_local_data(sharding, x, x.shape)


def process_rows(global_rows: int, mesh: Mesh, process: int | None = None) -> np.ndarray:
  """The indices of the rows of a global batch of `global_rows` that the devices of `process`
  (default: this process) hold when the batch is split over the `data` axis of `mesh`, ascending
  (the order `jax.make_array_from_process_local_data` expects). On a TPU pod the mesh follows the
  physical topology, so a host's rows need not be one block: on v5e:4x4, host 0 holds rows
  0-3, 12, 13, 30 and 31 of 32 (tests/pod/test_tpu_layout.py)."""
  n = data_size(mesh)
  if global_rows % n:
    raise ValueError(f'a global batch of {global_rows} rows does not split over the {n} devices '
                     'of the data axis')
  process = jax.process_index() if process is None else process
  rows = set()
  for device, index in batch_sharding(mesh).devices_indices_map((global_rows,)).items():
    if device.process_index == process:
      rows.update(range(*index[0].indices(global_rows)))
  return np.array(sorted(rows), dtype=np.int64)


def data_parallel(fn, mesh: Mesh | None = None, num_batched: int = 1):
  """`fn(*batched, *shared)`, jit-compiled, with its first `num_batched` arguments (arrays or
  pytrees whose leaves share a leading batch axis B) split over the `data` axis of `mesh` (default
  `make_mesh()`) and the other arguments replicated. Every output leaf must have B leading: the
  call returns numpy arrays of the global result on every process, padding rows dropped.

  For work over many independent samples (bases of several trajectories, images to score):
  each device, on every host, computes its slice, and every process gets the whole answer.
  Call it on every process with the same arguments (rule 1)."""
  mesh = make_mesh() if mesh is None else mesh
  jitted = jax.jit(fn, out_shardings=replicated(mesh))

  def call(*args):
    if len(args) < num_batched:
      raise ValueError(f'expected at least {num_batched} batched arguments, got {len(args)}')
    batched, shared = args[:num_batched], args[num_batched:]
    sizes = {int(x.shape[0]) for x in jax.tree.leaves(batched)}
    if len(sizes) != 1:
      raise ValueError(f'the batched arguments must share one leading size, got {sorted(sizes)}')
    n = sizes.pop()
    out = jitted(*shard_batch(mesh, batched), *replicate(mesh, shared))
    return jax.tree.map(lambda x: x[:n], to_host(out))

  def lower(*args):
    """The jitted computation lowered for abstract arguments (`jax.ShapeDtypeStruct`s, batch
    sizes already a multiple of the `data` axis), placed as `call` places them: for
    ahead-of-time compilation on `mesh`'s devices (`diffgeo_jax.aot`)."""
    batched, shared = args[:num_batched], args[num_batched:]
    return jitted.lower(*abstract(batched, batch_sharding(mesh)),
                        *abstract(shared, replicated(mesh)))

  call.lower = lower
  return call


def abstract(tree: Any, sharding) -> Any:
  """Every array leaf of `tree` (arrays or `jax.ShapeDtypeStruct`s) as a ShapeDtypeStruct with
  `sharding`: the inputs of `jit(...).lower` for a program compiled ahead of time."""
  def one(x):
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)
  return jax.tree.map(one, tree)


# -- outputs -----------------------------------------------------------------------------------

def to_host(tree: Any) -> Any:
  """Every leaf as a numpy array holding its global value, on every process. Leaves that are
  sharded over other processes' devices are all-gathered: call this on every process."""
  def one(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
      return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(one, tree)


def same_on_all_hosts(tree: Any) -> Any:
  """Process 0's value of `tree` (numpy arrays or scalars) on every process: for decisions read
  from data on the host, so that every process takes the same branch."""
  if jax.process_count() == 1:
    return tree
  return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(tree))


def exists_on_every_host(path) -> bool:
  """Whether every process sees the file `path` (an epath): a cache in the workdir is reused only
  when all of them can read it (a gs:// workdir; a local one on a single machine), so that all
  take the same branch, and a local workdir on separate hosts recomputes instead of failing."""
  here = np.int32(path.exists())
  if jax.process_count() == 1:
    return bool(here)
  return bool(np.all(multihost_utils.process_allgather(here)))


def barrier(name: str) -> None:
  """Waits until every process got here (e.g. before reading what process 0 wrote)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
