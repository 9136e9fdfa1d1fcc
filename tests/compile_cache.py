"""A persistent JAX compilation cache shared by the binaries that a test module runs as
subprocesses: the programs they have in common (the shipped pipeline's sampler, a tiny training
step run again to resume) compile once per pytest worker instead of once per process."""

import atexit
import os
import shutil
import tempfile

DIR = tempfile.mkdtemp(prefix='diffgeo_jax_test_cache_')
atexit.register(shutil.rmtree, DIR, ignore_errors=True)


def env(**extra) -> dict:
  """os.environ for a CPU subprocess that reads and writes the shared cache."""
  return {**os.environ, 'JAX_PLATFORMS': 'cpu', 'JAX_COMPILATION_CACHE_DIR': DIR,
          'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0.5', **extra}
