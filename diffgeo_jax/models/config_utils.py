"""Model configs: frozen dataclasses read from (and written to) diffusers/transformers config.json.

A config file is read strictly: a key with a wrong type, or a feature we do not port set to a
non-default value, is an error naming the key and the file. Keys that do not change the forward
pass (dropout, init ranges, bookkeeping) are accepted and ignored; keys we have never seen are
reported with a warning, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any, TypeVar

from absl import logging

T = TypeVar('T')


class ConfigError(ValueError):
  """A config.json that cannot describe a model we build."""


def read_json(path: str | os.PathLike) -> dict:
  """Reads a JSON object, with errors that name the file."""
  from diffgeo_jax import paths  # noqa: PLC0415 (epath, for gs:// folders)
  file = paths.resolve(path, 'path')
  path = os.fspath(file)
  if not file.is_file():
    raise FileNotFoundError(f'config file not found: {path}')
  try:
    data = json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise ConfigError(f'{path} is not valid JSON: {e}') from e
  if not isinstance(data, dict):
    raise ConfigError(f'{path} must hold a JSON object, got {type(data).__name__}')
  return data


def _check_type(value: Any, default: Any, key: str, source: str) -> Any:
  """Coerces JSON lists to tuples and checks the value has the kind of the field's default."""
  if isinstance(value, list):
    value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
  if default is None or value is None:
    return value
  if isinstance(default, bool):
    ok = isinstance(value, bool) or (isinstance(value, tuple) and all(isinstance(v, bool) for v in value))
  elif isinstance(default, (int, float)) and not isinstance(default, bool):
    numeric = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    ok = numeric(value) or (isinstance(value, tuple) and all(numeric(v) or v is None for v in value))
  elif isinstance(default, str):
    ok = isinstance(value, str)
  elif isinstance(default, tuple):
    ok = isinstance(value, tuple)
  else:
    ok = True
  if not ok:
    raise ConfigError(f'{source}: key {key!r} has value {value!r}; expected a value like {default!r}')
  return value


def from_dict(cls: type[T], d: Mapping[str, Any], source: str, *, ignored: frozenset[str] = frozenset(),
              unsupported: Mapping[str, Any] | None = None) -> T:
  """Builds the dataclass `cls` from a config dict.

  `ignored`: keys that do not affect the forward pass. `unsupported`: key -> the only value (or
  tuple of values) we accept, for features we do not port.
  """
  if not isinstance(d, Mapping):
    raise ConfigError(f'{source}: expected a mapping, got {type(d).__name__}')
  fields = {f.name: f for f in dataclasses.fields(cls)}
  kwargs, unknown = {}, []
  for key, value in d.items():
    if key.startswith('_') or key in ignored:
      continue
    if unsupported and key in unsupported:
      allowed = unsupported[key]
      allowed = allowed if isinstance(allowed, tuple) else (allowed,)
      if value not in allowed:
        raise ConfigError(f'{source}: {key}={value!r} is not supported by the Flax port '
                          f'(supported: {allowed!r})')
      continue
    if key not in fields:
      unknown.append(key)
      continue
    f = fields[key]
    default = f.default if f.default is not dataclasses.MISSING else None
    kwargs[key] = _check_type(value, default, key, source)
  if unknown:
    logging.warning('%s: ignoring unknown config keys %s', source, sorted(unknown))
  missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING and n not in kwargs]
  if missing:
    raise ConfigError(f'{source}: required keys missing: {missing}')
  try:
    return cls(**kwargs)
  except (TypeError, ValueError) as e:
    raise ConfigError(f'{source}: {e}') from e


def to_dict(config: Any, class_name: str, **extra: Any) -> dict:
  """A config.json-ready dict (tuples become lists)."""
  d = {'_class_name': class_name, **extra}
  for key, value in dataclasses.asdict(config).items():
    d[key] = list(value) if isinstance(value, tuple) else value
  return d
