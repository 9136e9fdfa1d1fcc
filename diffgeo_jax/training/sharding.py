"""Sharding rules for training: which parameters split over which mesh axis.

One `Mesh` with named axes `data` (batch) and `model` (parameter sharding). Parameters, optimizer
state and EMA get `NamedSharding`s from rules: a list of `(regex, spec)` matched against the
'/'-joined path of each leaf (first match wins, default replicated). Because the optimizer's moments
have the parameter paths inside their own paths, one rule shards a parameter and its moments alike.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# The mesh lives with the other multi-device helpers; re-exported for the training code.
from diffgeo_jax import distributed
from diffgeo_jax.distributed import batch_sharding, make_mesh, replicated  # noqa: F401

Spec = PartitionSpec | Callable[[tuple[int, ...]], PartitionSpec]
Rules = Sequence[tuple[str, Spec]]


def path_str(path) -> str:
  """'/'-joined keys of a `jax.tree_util` key path (dict keys, attributes, sequence indices)."""
  parts = []
  for entry in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
    else:
      parts.append(str(entry))
  return '/'.join(parts)


def fsdp(axis: str = 'model', axis_size: int | None = None, min_size: int = 2 ** 14) -> Callable:
  """A rule spec for FSDP-style sharding: split the largest dimension that `axis_size` divides.

  Leaves smaller than `min_size` elements stay replicated (sharding them costs more than it saves)."""
  def spec(shape: tuple[int, ...]) -> PartitionSpec:
    if axis_size is None or int(np.prod(shape, dtype=np.int64)) < min_size:
      return PartitionSpec()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
      if shape[dim] % axis_size == 0:
        return PartitionSpec(*([None] * dim + [axis]))
    return PartitionSpec()
  return spec


def leaf_spec(path: str, shape: tuple[int, ...], rules: Rules) -> PartitionSpec:
  for pattern, spec in rules:
    if re.search(pattern, path):
      spec = spec(shape) if callable(spec) else spec
      if len(spec) > len(shape):
        raise ValueError(f'rule {pattern!r} gives {spec} for {path!r}, which has only '
                         f'{len(shape)} dimensions {shape}')
      return spec
  return PartitionSpec()


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules = ()) -> Any:
  """`NamedSharding` per leaf of `tree` (arrays or ShapeDtypeStructs) from `rules`."""
  def one(path, leaf):
    return NamedSharding(mesh, leaf_spec(path_str(path), tuple(np.shape(leaf)), rules))
  return jax.tree_util.tree_map_with_path(one, tree)


def put_batch(batch: Any, mesh: Mesh) -> Any:
  """A global batch (numpy, the same on every process) -> global arrays split over `data`.

  Each process copies only the rows its own devices hold (`distributed.process_rows`), so N
  processes build the array one process would. The leading dimension must split evenly over the
  data axis."""
  sharding = batch_sharding(mesh)
  n = mesh.shape['data']

  def one(x):
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] % n:
      raise ValueError(f'batch arrays need a leading dimension divisible by the {n} data-parallel '
                       f'devices, got shape {x.shape}')
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    return jax.make_array_from_process_local_data(
        sharding, x[distributed.process_rows(x.shape[0], mesh)], x.shape)
  return jax.tree.map(one, batch)
