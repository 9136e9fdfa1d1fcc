"""Every binary in launch/ takes the multi-host flags that launch/tpu_pod.py passes to it."""

import glob
import json
import os
import subprocess
import sys

import pytest

from tests import multihost

ROOT = multihost.ROOT
# tpu_pod.py is the launcher itself: it runs on the user's machine and passes the flags on.
BINARIES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, 'launch', '*.py'))
                  if os.path.basename(p) not in ('__init__.py', 'tpu_pod.py'))


def test_the_list_covers_the_launchers():
  assert len(BINARIES) >= 16 and 'sample.py' in BINARIES and 'train_duo.py' in BINARIES


# Runs the binary as __main__ with absl's app.run replaced by a parse of the command line alone
# (no required-flag validators, which want a config file and a workdir; nothing is executed).
_PARSE_ONLY = """
import json, runpy, sys
from absl import app, flags

def parse_only(main, argv=None, **kwargs):
  unknown, _ = flags.FLAGS._parse_args(sys.argv[1:], False)
  values = {n: flags.FLAGS[n].value for n in ('jax_distributed', 'jax_coordinator_address',
                                               'jax_num_processes', 'jax_process_id')}
  where = flags.FLAGS.find_module_defining_flag('jax_distributed')
  print(json.dumps({'unknown': [u[0] for u in unknown], 'values': values, 'module': where}))
  sys.exit(0)

app.run = parse_only
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


@pytest.mark.parametrize('binary', BINARIES)
def test_binary_parses_the_distributed_flags(binary):
  proc = subprocess.run(
      [sys.executable, '-c', _PARSE_ONLY, os.path.join(ROOT, 'launch', binary),
       '--jax_distributed', '--jax_coordinator_address=127.0.0.1:1234', '--jax_num_processes=2',
       '--jax_process_id=1', '--jax_heartbeat_timeout_s=30'],
      capture_output=True, text=True, timeout=120, cwd=ROOT,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out['unknown'] == []
  assert out['values'] == {'jax_distributed': True, 'jax_coordinator_address': '127.0.0.1:1234',
                           'jax_num_processes': 2, 'jax_process_id': 1}
  # Defined once, by the shared start-up module, not by each binary.
  assert out['module'] == 'diffgeo_jax.runs'


def test_the_check_sees_an_unknown_flag():
  proc = subprocess.run(
      [sys.executable, '-c', _PARSE_ONLY, os.path.join(ROOT, 'launch', 'sample.py'),
       '--jax_distributed', '--no_such_flag=1'], capture_output=True, text=True, timeout=120,
      cwd=ROOT, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert json.loads(proc.stdout.strip().splitlines()[-1])['unknown'] == ['no_such_flag']
