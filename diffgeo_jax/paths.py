"""Paths that may be local or on Google Cloud Storage, and the few ways the library writes to them.

    workdir = paths.resolve('gs://bucket/run')        # or '/tmp/run'
    paths.write_json(workdir / 'results.json', {...})
    folder = paths.local_folder('gs://bucket/sd15')    # a local copy, made once per host

Every output of the library goes through an `etils.epath.Path` (the path type orbax uses), which
reads and writes `gs://` through gcsfs. Python's `os.makedirs('gs://b/run')` would instead create a
local folder `gs:/b/run` and lose the run with the VM, so `resolve` refuses anything that looks like
a URL it does not support, or a local path starting with `gs:`.

Readers that need real local files (safetensors memory maps, transformers' tokenizer) get a copy of
a remote folder staged once per host under `cache_dir()`; writers of whole folders (model exports)
write to a local temporary folder and upload it (`writable_folder`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
from absl import logging
from etils import epath

PathLike = str | os.PathLike
SCHEMES = ('gs',)  # remote schemes tested here (etils also knows s3://, az://, hf://)
_URL = re.compile(r'^([A-Za-z][A-Za-z0-9+.-]*):/')  # 'scheme:/' or 'scheme://'


def resolve(path: PathLike, name: str = 'path') -> epath.Path:
  """`path` as an `epath.Path`: local paths made absolute, `gs://bucket/...` kept remote.

  `name` (e.g. '--workdir') is named in the error for an unsupported scheme, a malformed URL, or a
  local path that would create a folder called 'gs:'."""
  text = os.fspath(path)
  if not text:
    raise ValueError(f'{name} is empty: give a local folder or gs://bucket/path')
  match = _URL.match(text)
  if match:
    scheme = match.group(1).lower()
    if scheme not in SCHEMES:
      raise ValueError(f'{name}={text!r}: the scheme {scheme!r}:// is not supported; use a local '
                       f'path or one of {", ".join(s + "://" for s in SCHEMES)}')
    if not text.startswith(f'{match.group(1)}://') or len(text) <= len(scheme) + 3:
      raise ValueError(f'{name}={text!r}: expected {scheme}://bucket/path')
    return epath.Path(text)
  if text.split(os.sep, 1)[0].lower() in ('gs:', 'gcs:'):
    # os.path.join('gs://b', 'x') normalised by a tool, or a missing slash.
    raise ValueError(f'{name}={text!r} would create a local folder named {text.split(os.sep)[0]!r}; '
                     'write gs://bucket/path for Cloud Storage')
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def is_remote(path: PathLike) -> bool:
  return bool(_URL.match(os.fspath(path)))


# -- writing -----------------------------------------------------------------------------------

def write_bytes(path: PathLike, data: bytes) -> epath.Path:
  """Writes `data` to `path`, creating its parent folders (a no-op on GCS, which has none)."""
  path = resolve(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)
  return path


def write_json(path: PathLike, obj: Any, **kwargs) -> epath.Path:
  return write_bytes(path, json.dumps(obj, indent=2, **kwargs).encode())


def read_json(path: PathLike) -> Any:
  return json.loads(resolve(path).read_text())


def save_npz(path: PathLike, **arrays) -> epath.Path:
  """`np.savez` to any path (numpy itself writes only local files)."""
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return write_bytes(path, buf.getvalue())


def load_npz(path: PathLike) -> dict[str, np.ndarray]:
  with np.load(io.BytesIO(resolve(path).read_bytes())) as f:
    return dict(f)


def save_image(path: PathLike, image) -> epath.Path:
  """A PIL image as PNG (or the format the suffix names)."""
  buf = io.BytesIO()
  image.save(buf, format=(resolve(path).suffix.lstrip('.') or 'png').upper().replace('JPG', 'JPEG'))
  return write_bytes(path, buf.getvalue())


def save_figure(path: PathLike, fig, dpi: int = 110, close: bool = True) -> epath.Path:
  """A matplotlib figure as PNG; closed afterwards unless `close=False`."""
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=dpi)
  if close:
    import matplotlib.pyplot as plt  # noqa: PLC0415 (only callers with figures import it)
    plt.close(fig)
  return write_bytes(path, buf.getvalue())


def files_under(folder: PathLike) -> list[tuple[str, epath.Path]]:
  """(relative path with '/', path) of every file under `folder`, sorted. (epath's own `walk`
  drops the gs:// scheme from the folders it yields, so this recurses with `iterdir`.)"""
  folder = resolve(folder, 'folder')
  out = []

  def visit(d: epath.Path, prefix: str):
    for p in d.iterdir():
      if p.is_dir():
        visit(p, f'{prefix}{p.name}/')
      else:
        out.append((f'{prefix}{p.name}', p))
  visit(folder, '')
  return sorted(out, key=lambda item: item[0])


def copy_tree(src: PathLike, dst: PathLike) -> None:
  """Copies the files under `src` into `dst` (local or remote, either way), replacing files of
  the same name and keeping others."""
  dst = resolve(dst, 'dst')
  for rel, path in files_under(resolve(src, 'src')):
    target = dst / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    path.copy(target, overwrite=True)


@contextlib.contextmanager
def writable_folder(folder: PathLike) -> Iterator[str]:
  """A local folder to write a whole model folder into: `folder` itself when local, otherwise a
  temporary folder uploaded to `folder` when the block ends without an error."""
  if not is_remote(folder):
    path = os.fspath(resolve(folder))
    os.makedirs(path, exist_ok=True)
    yield path
    return
  with tempfile.TemporaryDirectory(prefix='diffgeo_upload_') as tmp:
    yield tmp
    copy_tree(tmp, folder)
    logging.info('uploaded %s', folder)


# -- reading -----------------------------------------------------------------------------------

def cache_dir() -> str:
  """Where remote folders are staged: $DIFFGEO_JAX_CACHE, else ~/.cache/diffgeo_jax."""
  return os.environ.get('DIFFGEO_JAX_CACHE') or os.path.join(os.path.expanduser('~'), '.cache',
                                                              'diffgeo_jax')


def _listing(folder: epath.Path) -> list[tuple[str, int]]:
  return [(rel, p.stat().length) for rel, p in files_under(folder)]


def local_folder(folder: PathLike, name: str = 'folder') -> str:
  """A local path holding `folder`'s files: `folder` itself when local; for a remote folder, a
  copy under `cache_dir()`, made once per host (reused while the remote file names and sizes are
  unchanged) and logged. Concurrent processes on one host each copy to a private folder and
  rename it into place, so none reads a half-written copy."""
  if not is_remote(folder):
    return os.fspath(resolve(folder, name))
  remote = resolve(folder, name)
  if not remote.exists():
    raise FileNotFoundError(f'{name} {folder} does not exist')
  listing = _listing(remote)
  if not listing:
    raise FileNotFoundError(f'{name} {folder} holds no files')
  text = os.fspath(remote)
  scheme, rest = text.split('://', 1)
  target = os.path.join(cache_dir(), scheme, *rest.strip('/').split('/'))
  manifest = json.dumps(listing)
  stamp = os.path.join(target, '.diffgeo_staged.json')
  if os.path.isfile(stamp) and open(stamp).read() == manifest:
    logging.info('using the staged copy of %s in %s', text, target)
    return target
  size = sum(n for _, n in listing)
  logging.info('staging %s (%d files, %.1f MB) to %s', text, len(listing), size / 1e6, target)
  parent = os.path.dirname(target)
  os.makedirs(parent, exist_ok=True)
  tmp = os.path.join(parent, f'.{os.path.basename(target)}.{uuid.uuid4().hex}')
  copy_tree(remote, tmp)
  with open(os.path.join(tmp, '.diffgeo_staged.json'), 'w') as f:
    f.write(manifest)
  stale = f'{tmp}.old'
  try:
    if os.path.isdir(target):
      os.replace(target, stale)
    os.replace(tmp, target)
  except OSError:  # another process on this host put its copy in place first
    if not (os.path.isfile(stamp) and open(stamp).read() == manifest):
      raise
  finally:
    for leftover in (tmp, stale):
      shutil.rmtree(leftover, ignore_errors=True)
  return target


def local_file(path: PathLike, name: str = 'file') -> str:
  """A local path holding the file `path` (remote files copied once per host, as `local_folder`)."""
  if not is_remote(path):
    return os.fspath(resolve(path, name))
  remote = resolve(path, name)
  if not remote.is_file():
    raise FileNotFoundError(f'{name} {path} does not exist')
  digest = hashlib.sha1(os.fspath(remote).encode()).hexdigest()[:16]
  target = os.path.join(cache_dir(), 'files', digest, remote.name)
  if not (os.path.isfile(target) and os.path.getsize(target) == remote.stat().length):
    logging.info('staging %s to %s', remote, target)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f'{target}.{uuid.uuid4().hex}'
    remote.copy(epath.Path(tmp), overwrite=True)
    os.replace(tmp, target)
  return target
