"""A small project-trained Flax model in a folder (the digits classifier, the discrete denoisers):

    folder/config.json         the model's config dict
    folder/model.safetensors   float32 parameters, flat '/'-joined names
    folder/results.json        how it was trained (optional)

    model_folder.save(folder, params, config.to_dict(), results)
    config = model_folder.read_config(folder, 'classifier')
    params = model_folder.load_params(folder, abstract_params, 'the classifier of ...')

Loading checks the stored parameters against the model's abstract tree and lists every missing,
unexpected and mis-shaped name at once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import traverse_util

CONFIG = 'config.json'
WEIGHTS = 'model.safetensors'
RESULTS = 'results.json'


def flatten_params(params: Mapping) -> dict[str, np.ndarray]:
  flat = traverse_util.flatten_dict(jax.device_get(params), sep='/')
  return {k: np.asarray(v, np.float32) for k, v in flat.items()}


def save(folder: str | os.PathLike, params: Mapping, config: Mapping,
         results: Mapping[str, Any] | None = None) -> None:
  """Writes `config.json` (the config dict), `model.safetensors` and, if given, `results.json`."""
  folder = os.fspath(folder)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, CONFIG), 'w') as f:
    json.dump(dict(config), f, indent=2, sort_keys=True)
  safetensors.numpy.save_file(flatten_params(params), os.path.join(folder, WEIGHTS))
  if results is not None:
    with open(os.path.join(folder, RESULTS), 'w') as f:
      json.dump(dict(results), f, indent=2)


def read_config(folder: str | os.PathLike, kind: str) -> dict:
  """The config dict of a `kind` model folder (`kind` names it in the error when a file is
  missing)."""
  folder = os.fspath(folder)
  for name in (CONFIG, WEIGHTS):
    if not os.path.isfile(os.path.join(folder, name)):
      raise FileNotFoundError(f'{folder} is not a {kind} folder: {name} is missing')
  with open(os.path.join(folder, CONFIG)) as f:
    return json.load(f)


def load_params(folder: str | os.PathLike, abstract: Mapping, what: str) -> dict:
  """The float32 parameter tree of `folder`'s `model.safetensors`, checked against the `abstract`
  tree of the model (`what`, for the error)."""
  path = os.path.join(os.fspath(folder), WEIGHTS)
  want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract, sep='/').items()}
  try:
    stored = safetensors.numpy.load_file(path)
  except Exception as e:  # safetensors raises several types for a corrupt file
    raise ValueError(f'cannot read safetensors file {path}: {e}') from e
  missing = sorted(set(want) - set(stored))
  unexpected = sorted(set(stored) - set(want))
  misshaped = sorted(f'{k}: stored {stored[k].shape}, expected {want[k]}'
                     for k in set(want) & set(stored) if tuple(stored[k].shape) != want[k])
  if missing or unexpected or misshaped:
    raise ValueError(f'{path} does not match {what}: missing keys {missing}; unexpected keys '
                     f'{unexpected}; wrong shapes {misshaped}')
  return traverse_util.unflatten_dict({k: jnp.asarray(v, jnp.float32) for k, v in stored.items()},
                                      sep='/')


def read_results(folder: str | os.PathLike) -> dict:
  """The `results.json` of a model folder ({} if it has none)."""
  path = os.path.join(os.fspath(folder), RESULTS)
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)
