"""A persistent JAX compilation cache shared by the whole test run: the pytest workers (see
conftest.py) and the binaries that tests run as subprocesses. The programs they have in common
(the shipped pipeline's sampler, a tiny training step run again to resume, the one-process
reference of a multi-host test and its resumed run) compile once per run instead of once per
process. The directory is made by the first pytest process (the xdist controller, or the only
process) and handed to the workers through the environment; that process removes it at exit.

JAX writes an entry in place (no rename), so a process may read one that another is still
writing; JAX then warns and compiles instead (compiler._cache_read), so sharing costs at most a
compile, never a wrong program."""

import atexit
import os
import shutil
import tempfile

_VAR = 'DIFFGEO_JAX_TEST_CACHE'

if os.environ.get(_VAR):
  DIR = os.environ[_VAR]
else:
  DIR = os.environ[_VAR] = tempfile.mkdtemp(prefix='diffgeo_jax_test_cache_')
  atexit.register(shutil.rmtree, DIR, ignore_errors=True)

# Programs that compile faster than this are not worth a file.
MIN_COMPILE_SECONDS = '0.5'


def env(**extra) -> dict:
  """os.environ for a CPU subprocess that reads and writes the shared cache."""
  return {**os.environ, 'JAX_PLATFORMS': 'cpu', 'JAX_COMPILATION_CACHE_DIR': DIR,
          'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': MIN_COMPILE_SECONDS, **extra}
