"""Hugging Face hub model ids -> local pipeline folders, through the hub's own cache.

    folder = hub.resolve('stabilityai/stable-diffusion-xl-base-1.0')             # cached snapshot
    folder = hub.resolve('CompVis/stable-diffusion-v1-4', revision='<commit>')    # a pinned commit
    folder = hub.resolve('/ckpt/sd15')                                            # unchanged

`models.load_pipeline(source, revision=...)` calls `resolve` and loads the folder it returns.

What counts as a hub id: a string `owner/name` (huggingface_hub's repo-id rule) that is not an
existing local path and not a URL. Local paths (existing, absolute, `./x`, `~/x`, more than one
`/`) and gs:// URLs are returned unchanged, and then `revision` must be None.

The cache is the one `huggingface_hub` writes and `diffusers` reads
(`models--owner--name/refs/<rev>` holding a commit, `snapshots/<commit>/...` linking into
`blobs/`), found at call time from `HF_HUB_CACHE`, else `HF_HOME/hub`, else huggingface_hub's
default (`cache_dir()`). Lookup order:

1. Offline, always first: the snapshot of `revision` (a branch or tag through `refs/`, or a full
   commit hash; default 'main') whose `model_index.json` is cached, complete when every part that
   `load_pipeline` reads has its folder (and, where huggingface_hub cached the repo's file
   listing, every file `pipeline_files` picks is there). No network.
2. Download, only when allowed: not when `local_files_only=True`, and not when `HF_HUB_OFFLINE` is
   set (read at call time; None = follow it). Only the files a pipeline needs, picked as diffusers
   picks them (`pipeline_files`): `model_index.json` and, in the folder of each part that
   `load_pipeline` reads (unet, vae, text encoders, tokenizers, scheduler), its JSON configs,
   tokenizer files (`*.txt`, `*.model`) and safetensors weights of the requested `variant` (or the
   plain ones) -- no `.bin` / `.ckpt` / `.msgpack` / ONNX / OpenVINO duplicates, no root-level
   single-file checkpoint, no safety checker / feature extractor / folder the index does not name.

Errors (`HubModelNotFoundError`, a FileNotFoundError) name the id, the revision, the cache folder
and why nothing was downloaded; for an `owner/name` string they also say it was not a local folder
(relative to the working directory) either.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from diffgeo_jax import paths

MODEL_INDEX = 'model_index.json'
DEFAULT_REVISION = 'main'
_TRUE = ('1', 'on', 'yes', 'true')
# huggingface_hub's repo-id rule (validate_repo_id), with the owner required.
_REPO_ID = re.compile(r'^(?!.*(--|\.\.))[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$')
_SHARD = re.compile(r'-\d{5}-of-\d{5}$')


class HubModelNotFoundError(FileNotFoundError):
  """A hub model id that is neither cached (completely) nor downloadable now."""

  def __init__(self, message: str, repo_id: str, revision: str | None, cache: str):
    super().__init__(message)
    self.repo_id, self.revision, self.cache_dir = repo_id, revision, cache


def cache_dir() -> str:
  """The hub cache folder, read from the environment now (huggingface_hub reads it at import)."""
  for var in ('HF_HUB_CACHE', 'HUGGINGFACE_HUB_CACHE'):
    if os.environ.get(var):
      return os.path.expanduser(os.environ[var])
  if os.environ.get('HF_HOME'):
    return os.path.join(os.path.expanduser(os.environ['HF_HOME']), 'hub')
  from huggingface_hub import constants  # noqa: PLC0415 (light, but only hub ids need it)
  return constants.HF_HUB_CACHE


def offline() -> bool:
  """True when `HF_HUB_OFFLINE` is set (now, or when huggingface_hub was imported)."""
  if os.environ.get('HF_HUB_OFFLINE', '').strip().lower() in _TRUE:
    return True
  constants = getattr(sys.modules.get('huggingface_hub'), 'constants', None)
  return bool(getattr(constants, 'HF_HUB_OFFLINE', False))


def is_hub_id(source: Any) -> bool:
  """`owner/name` that is not a local path or a URL (a str: os.PathLike objects are paths)."""
  if not isinstance(source, str) or paths.is_remote(source) or os.path.exists(source):
    return False
  return bool(_REPO_ID.match(source)) and not source.startswith(('.', '~'))


def resolve(source: Any, revision: str | None = None, *, variant: str | None = None,
            local_files_only: bool | None = None, cache: str | os.PathLike | None = None) -> Any:
  """A pipeline folder for `source`: a local path or gs:// URL unchanged, a hub id (`owner/name`)
  as its snapshot folder in the hub cache (see the module docstring for the order and policy).

  `revision`: a branch, tag or full commit hash of a hub id (default 'main'); a ValueError for a
  local path or URL. `variant`: e.g. 'fp16', the weight files to download (the plain ones where a
  part has none). `local_files_only`: True = never download; None = download unless
  `HF_HUB_OFFLINE` is set. `cache`: the cache folder (default `cache_dir()`)."""
  if not is_hub_id(source):
    if revision is not None:
      raise ValueError(f'revision={revision!r} is read only for a hub model id (owner/name); '
                       f'{os.fspath(source)!r} is a local path or URL')
    return source
  repo_id = source
  cache = os.fspath(cache) if cache is not None else cache_dir()
  rev = revision or DEFAULT_REVISION
  folder, missing = cached_snapshot(repo_id, rev, cache, variant)
  if folder is not None and not missing:
    return folder
  where = (f'{repo_id!r} is not a local folder (no {os.path.abspath(repo_id)}), and the Hugging '
           f'Face hub cache {cache} ')
  if folder is None:
    state = f'has no snapshot of {repo_id} at revision {rev!r} with a {MODEL_INDEX}'
  else:
    state = (f'holds an incomplete snapshot of {repo_id} at revision {rev!r} ({folder}): missing '
             f'{", ".join(missing[:8])}{" ..." if len(missing) > 8 else ""}')
  no_download = local_files_only if local_files_only is not None else offline()
  if no_download:
    why = ('local_files_only=True' if local_files_only else
           'HF_HUB_OFFLINE is set: unset it to download')
    raise HubModelNotFoundError(
        f'{where}{state}; nothing was downloaded ({why}). Download it where the network allows '
        f'(`hf download {repo_id}{" --revision " + rev if revision else ""}` with HF_HOME or '
        f'HF_HUB_CACHE pointing at this cache), or pass a local pipeline folder.',
        repo_id, revision, cache)
  return download(repo_id, rev, cache, variant, reason=f'{where}{state}')


def _components(index: Mapping[str, Any]) -> list[str]:
  """The parts a `model_index.json` names (entries [library, class] with both set) that
  `models.load_pipeline` reads: not a safety checker, feature extractor or image encoder."""
  from diffgeo_jax.models import loading  # noqa: PLC0415 (loading imports this module lazily)
  read = {*loading._MODEL_COMPONENTS, *loading._TOKENIZERS, 'scheduler'}  # noqa: SLF001
  return sorted(k for k, v in index.items()
                if k in read and isinstance(v, (list, tuple)) and len(v) == 2
                and all(isinstance(x, str) and x for x in v))


def _weight_variant(name: str) -> str | None | bool:
  """The variant of a safetensors weight or index file name ('fp16'), None for plain, False for
  another file."""
  if name.endswith('.safetensors'):
    parts = name[:-len('.safetensors')].split('.')
    if len(parts) == 1:
      return None
    if len(parts) == 2:
      return _SHARD.sub('', parts[1])
    return False
  m = re.fullmatch(r'[^.]+\.safetensors\.index(?:\.([^.]+))?\.json', name)
  if m:
    return m.group(1)
  return False


def pipeline_files(listing: Iterable[str], index: Mapping[str, Any],
                   variant: str | None = None) -> list[str]:
  """The files of a hub pipeline repo (`listing`, paths relative to the repo root) that a pipeline
  needs: `model_index.json`, and directly inside the folder of each part `index` names that
  `load_pipeline` reads (unet, vae, text_encoder[_2], tokenizer[_2], scheduler): configs and
  other JSON (not index files of other weights), `*.txt` / `*.model` tokenizer files, and the
  safetensors weights (shards and their index) of `variant`, or the plain ones where that part has
  none of `variant`. Nothing else: no pickles, Flax/ONNX/OpenVINO duplicates, other variants,
  root-level single-file checkpoints, safety checker or other folders."""
  listing = sorted(set(listing))
  out = [MODEL_INDEX] if MODEL_INDEX in listing else []
  for part in _components(index):
    files = [f[len(part) + 1:] for f in listing
             if f.startswith(part + '/') and '/' not in f[len(part) + 1:]]
    weights = {f: _weight_variant(f) for f in files}
    have = {v for v in weights.values() if v is not False}
    want = variant if variant is not None and variant in have else None
    for f in files:
      v = weights[f]
      if v is not False:
        keep = v == want
      elif f.endswith('.json'):
        keep = '.index.' not in f  # pytorch_model.bin.index.json and the like
      else:
        keep = f.endswith(('.txt', '.model'))
      if keep:
        out.append(f'{part}/{f}')
  return out


def _cached_listing(repo_id: str, revision: str, cache: str) -> list[str] | None:
  """The repo's file listing huggingface_hub cached with the snapshot (newer versions), or None."""
  try:
    from huggingface_hub import get_cached_repo_tree  # noqa: PLC0415
  except ImportError:
    return None
  try:
    return [f.path for f in get_cached_repo_tree(repo_id, revision=revision, cache_dir=cache)]
  except Exception:  # noqa: BLE001 (no listing cached: CachedRepoTreeNotFoundError, OSError)
    return None


def cached_snapshot(repo_id: str, revision: str, cache: str,
                    variant: str | None = None) -> tuple[str | None, list[str]]:
  """(snapshot folder or None, what it misses) for `repo_id` at `revision`, from the cache only."""
  from huggingface_hub import try_to_load_from_cache  # noqa: PLC0415
  index_file = try_to_load_from_cache(repo_id, MODEL_INDEX, cache_dir=cache, revision=revision)
  if not isinstance(index_file, str) or not os.path.isfile(index_file):
    return None, []
  folder = os.path.dirname(index_file)
  try:
    with open(index_file) as f:
      index = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    return folder, [f'a readable {MODEL_INDEX} ({e})']
  listing = _cached_listing(repo_id, revision, cache)
  if listing is not None:
    needed = pipeline_files(listing, index, variant)
  else:  # no listing: every named part needs its folder (the loaders name missing files)
    needed = [f'{p}/' for p in _components(index)]
  missing = [f for f in needed if not os.path.exists(os.path.join(folder, f.rstrip('/')))]
  return folder, missing


def download(repo_id: str, revision: str, cache: str, variant: str | None = None,
             reason: str = '') -> str:
  """Downloads the files `pipeline_files` picks into the cache; returns the snapshot folder."""
  from huggingface_hub import HfApi, hf_hub_download, snapshot_download  # noqa: PLC0415
  from huggingface_hub import errors  # noqa: PLC0415

  def fail(e: Exception, what: str):
    raise HubModelNotFoundError(
        f'{reason}; downloading it failed ({what}: {type(e).__name__}: {e})', repo_id, revision,
        cache) from e

  try:
    index_file = hf_hub_download(repo_id, MODEL_INDEX, revision=revision, cache_dir=cache)
  except errors.LocalEntryNotFoundError as e:  # the hub could not be reached
    fail(e, f'fetching {MODEL_INDEX}')
  except errors.RepositoryNotFoundError as e:
    fail(e, 'the hub has no such repo, or it is private or gated and no token allows it')
  except errors.RevisionNotFoundError as e:
    fail(e, f'the repo has no revision {revision!r}')
  except errors.EntryNotFoundError as e:
    fail(e, f'the repo has no {MODEL_INDEX}: not a diffusers pipeline')
  except Exception as e:  # noqa: BLE001 (network down, offline mode, hub errors)
    fail(e, f'fetching {MODEL_INDEX}')
  commit = os.path.basename(os.path.dirname(index_file))  # snapshots/<commit>/model_index.json
  with open(index_file) as f:
    index = json.load(f)
  try:
    listing = HfApi().list_repo_files(repo_id, revision=commit)
  except Exception as e:  # noqa: BLE001
    fail(e, 'listing the repo files')
  files = pipeline_files(listing, index, variant)
  try:
    return snapshot_download(repo_id, revision=commit, cache_dir=cache, allow_patterns=files)
  except Exception as e:  # noqa: BLE001
    fail(e, f'downloading {len(files)} files')
