"""A local Cloud Storage for the tests: the `gcp-storage-emulator` server on 127.0.0.1.

    with gcs.Emulator(buckets=('diffgeo-test',)) as emu:
      subprocess.run([...binary..., '--workdir=gs://diffgeo-test/run'], env=emu.env(os.environ))
      emu.ls('diffgeo-test/run')

`env()` points every client the library uses at the emulator: gcsfs (through etils epath) by
STORAGE_EMULATOR_HOST, orbax's array store tensorstore by TENSORSTORE_GCS_HTTP_URL (with a dummy
token: the emulator checks none). GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false turns off gcsfs's
bucket-type probe, a gRPC call that the emulator does not serve and that otherwise costs 60 s per
bucket. Bucket names follow GCS rules (3-63 characters): tensorstore refuses shorter ones.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

from tests import multihost

# The emulator omits the `x-goog-generation` header of media downloads, which tensorstore (orbax's
# array store) reads to version what it cached ('Malformed StorageGeneration' otherwise): add it
# before the server module captures its handler table.
_SERVER = '''
import sys, time
from gcp_storage_emulator.handlers import objects
_download = objects.download
def download(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
    response['x-goog-generation'] = str(obj['generation'])
    response['x-goog-metageneration'] = str(obj['metageneration'])
  except Exception:  # a missing object: the handler answers 404
    pass
  return _download(request, response, storage, *args, **kwargs)
objects.download = download
from gcp_storage_emulator.server import create_server
server = create_server('127.0.0.1', int(sys.argv[1]), in_memory=True)
server.start()
print('ready', flush=True)
while True:
  time.sleep(3600)
'''


def _forget_clients() -> None:
  """Drops the gcsfs clients that epath and fsspec cached: they hold the endpoint they were made
  with, and the next emulator listens on another port."""
  import fsspec  # noqa: PLC0415
  from etils.epath import backend  # noqa: PLC0415
  backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  fsspec.get_filesystem_class('gs').clear_instance_cache()


class Emulator:
  """The emulator in a subprocess (so its HTTP threads never compete with the test's GIL)."""

  def __init__(self, buckets=('diffgeo-test',)):
    self.buckets = tuple(buckets)
    self.port = multihost.free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self._proc = None

  def env(self, base=None) -> dict[str, str]:
    return {**(os.environ if base is None else base), 'STORAGE_EMULATOR_HOST': self.url,
            'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false', 'TENSORSTORE_GCS_HTTP_URL': self.url,
            'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator', 'GOOGLE_CLOUD_PROJECT': 'test'}

  def start(self) -> Emulator:
    self._proc = subprocess.Popen([sys.executable, '-c', _SERVER, str(self.port)],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if self._proc.stdout.readline().strip() != 'ready':
      raise RuntimeError('the GCS emulator did not start')
    deadline = time.time() + 30
    while True:
      try:
        urllib.request.urlopen(f'{self.url}/storage/v1/b', timeout=2).read()
        break
      except OSError:
        if time.time() > deadline:
          raise
        time.sleep(0.1)
    self._saved_env = {k: os.environ.get(k) for k in self.env({})}
    os.environ.update(self.env({}))  # this process's gcsfs clients too (until stop)
    _forget_clients()
    for bucket in self.buckets:
      self.fs().mkdir(bucket)
    return self

  def fs(self):
    """A gcsfs client of the emulator (the plain one: no bucket-type probe)."""
    from gcsfs.core import GCSFileSystem  # noqa: PLC0415
    return GCSFileSystem(token='anon', endpoint_url=self.url, skip_instance_cache=True)

  def ls(self, prefix: str) -> list[str]:
    """Every object under `prefix` ('bucket/folder'), as paths relative to it."""
    prefix = prefix.rstrip('/')
    return sorted(p[len(prefix) + 1:] for p in self.fs().find(prefix))

  def stop(self) -> None:
    for k, v in getattr(self, '_saved_env', {}).items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    self._saved_env = {}
    _forget_clients()
    if self._proc is not None:
      self._proc.kill()
      self._proc.wait()
      self._proc = None

  def __enter__(self) -> Emulator:
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()
