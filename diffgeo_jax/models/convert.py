"""Torch-layout state dicts <-> Flax parameter trees, one mechanical rule each way.

Our linen modules keep the PyTorch attribute names, so a torch key maps to a Flax path without a
per-model table:

* `down_blocks.0.resnets.1.conv1.weight` -> `('down_blocks_0', 'resnets_1', 'conv1', <leaf>)`:
  a numeric segment joins the one before it, as linen names list-held submodules `name_N`.
* The leaf `weight` becomes whatever the *target* tree has at that path: `kernel` (Linear: (out, in)
  -> (in, out); Conv2d: OIHW -> HWIO), `scale` (GroupNorm / LayerNorm) or `embedding` (Embedding,
  no transpose). `bias` stays `bias`.

The target tree comes from `jax.eval_shape(module.init, ...)`, so building it allocates nothing, and
every key and shape is checked: all missing, unexpected and mismatched keys are reported in one
error. The reverse rule needs to know which names are lists (`to_out_0` is `to_out.0`, but
`linear_1` is `linear_1`): that is `LIST_CONTAINERS`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

# Attribute names that hold `nn.ModuleList`s in diffusers / transformers models we port.
LIST_CONTAINERS = frozenset({
    'down_blocks', 'up_blocks', 'resnets', 'attentions', 'transformer_blocks', 'downsamplers',
    'upsamplers', 'to_out', 'net', 'layers',
})

_LIST_SEGMENT = re.compile(r'^(?P<name>.+)_(?P<index>\d+)$')


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model: lists every missing, unexpected and mismatched key."""

  def __init__(self, source: str, missing: Iterable[str] = (), unexpected: Iterable[str] = (),
               mismatched: Iterable[tuple[str, tuple[int, ...], tuple[int, ...]]] = ()):
    self.source = source
    self.missing = sorted(missing)
    self.unexpected = sorted(unexpected)
    self.mismatched = sorted(mismatched)
    lines = [f'{source} does not match the model:']
    if self.missing:
      lines.append(f'  missing keys ({len(self.missing)}): ' + ', '.join(self.missing))
    if self.unexpected:
      lines.append(f'  unexpected keys ({len(self.unexpected)}): ' + ', '.join(self.unexpected))
    if self.mismatched:
      lines.append(f'  shape mismatches ({len(self.mismatched)}): ' + ', '.join(
          f'{k} (expected {exp}, got {got})' for k, exp, got in self.mismatched))
    super().__init__('\n'.join(lines))


def torch_key_to_flax_prefix(key: str) -> tuple[str, ...]:
  """`a.b.0.c.weight` -> `('a', 'b_0', 'c')` (the module path; the leaf name is decided later)."""
  parts = key.split('.')[:-1]
  out: list[str] = []
  for part in parts:
    if part.isdigit():
      if not out:
        raise ValueError(f'torch key {key!r} starts with a list index')
      out[-1] = f'{out[-1]}_{part}'
    else:
      out.append(part)
  return tuple(out)


def flax_prefix_to_torch_key(path: tuple[str, ...]) -> str:
  """Inverse of `torch_key_to_flax_prefix` for module paths."""
  parts = []
  for seg in path:
    m = _LIST_SEGMENT.match(seg)
    if m and m.group('name') in LIST_CONTAINERS:
      parts.extend([m.group('name'), m.group('index')])
    else:
      parts.append(seg)
  return '.'.join(parts)


def _to_flax_leaf(value: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == 'kernel':
    if value.ndim == 4:  # Conv2d OIHW -> HWIO
      return np.transpose(value, (2, 3, 1, 0))
    if value.ndim == 2:  # Linear (out, in) -> (in, out)
      return value.T
  return value


def _to_torch_leaf(value: np.ndarray, leaf: str) -> tuple[str, np.ndarray]:
  if leaf == 'kernel':
    if value.ndim == 4:
      return 'weight', np.transpose(value, (3, 2, 0, 1))
    if value.ndim == 2:
      return 'weight', value.T
    raise ValueError(f'cannot export a kernel of rank {value.ndim}')
  if leaf in ('scale', 'embedding'):
    return 'weight', value
  return leaf, value


def torch_to_flax(state_dict: Mapping[str, np.ndarray], target: Any, *, source: str = 'state dict',
                  ignore: Iterable[str] = (), renames: Iterable[tuple[str, str]] = ()) -> dict:
  """Maps a torch-layout state dict onto the structure of `target` (a params tree of arrays or
  `jax.ShapeDtypeStruct`s). Arrays are cast to the target's dtype (fp16/bf16 checkpoints load
  into float32 models). `ignore`: regexes of torch keys that are buffers, not parameters
  (e.g. CLIP's `position_ids`). `renames`: (regex, replacement) pairs applied to torch keys first,
  for legacy names. Raises `CheckpointMismatchError` listing every problem at once."""
  flat_target = traverse_util.flatten_dict(target)
  ignore_res = [re.compile(p) for p in ignore]
  rename_res = [(re.compile(p), r) for p, r in renames]
  out: dict[tuple[str, ...], np.ndarray] = {}
  seen: set[tuple[str, ...]] = set()
  unexpected, mismatched = [], []
  for key, value in state_dict.items():
    if any(r.search(key) for r in ignore_res):
      continue
    new_key = key
    for pattern, repl in rename_res:
      new_key = pattern.sub(repl, new_key)
    prefix, leaf = torch_key_to_flax_prefix(new_key), new_key.rsplit('.', 1)[-1]
    if leaf == 'weight':
      candidates = [prefix + (name,) for name in ('kernel', 'scale', 'embedding')]
    else:
      candidates = [prefix + (leaf,)]
    path = next((c for c in candidates if c in flat_target), None)
    if path is None:
      unexpected.append(key)
      continue
    if path in seen:
      raise ValueError(f'{source}: two keys map to {"/".join(path)} (second: {key!r})')
    seen.add(path)
    value = _to_flax_leaf(np.asarray(value), path[-1])
    expected = tuple(flat_target[path].shape)
    if tuple(value.shape) != expected:
      mismatched.append((key, expected, tuple(value.shape)))
      continue
    out[path] = value.astype(flat_target[path].dtype)
  missing = [_torch_name(p) for p in flat_target if p not in seen]
  if missing or unexpected or mismatched:
    raise CheckpointMismatchError(source, missing, unexpected, mismatched)
  return traverse_util.unflatten_dict(out)


def _torch_name(path: tuple[str, ...]) -> str:
  leaf = 'weight' if path[-1] in ('kernel', 'scale', 'embedding') else path[-1]
  return flax_prefix_to_torch_key(path[:-1]) + '.' + leaf


def flax_to_torch(params: Any, dtype: Any = None) -> dict[str, np.ndarray]:
  """Inverse of `torch_to_flax`: a Flax params tree -> torch-layout numpy state dict."""
  out = {}
  for path, value in traverse_util.flatten_dict(params).items():
    leaf, arr = _to_torch_leaf(np.asarray(value), path[-1])
    if dtype is not None:
      arr = arr.astype(dtype)
    out[flax_prefix_to_torch_key(path[:-1]) + '.' + leaf] = np.ascontiguousarray(arr)
  return out


def abstract_params(init_fn: Callable[..., Any], *args, **kwargs) -> dict:
  """The `params` collection of `init_fn(*args)` as `ShapeDtypeStruct`s, computed without memory."""
  variables = jax.eval_shape(init_fn, *args, **kwargs)
  return variables['params']
