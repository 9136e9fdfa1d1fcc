"""The multi-host harness itself: a hang becomes a failure at the deadline, not a stuck CI."""

import sys

from tests import multihost


def test_a_hanging_process_is_killed_at_the_deadline(tmp_path):
  # Process 0 ends at once; process 1 waits as for a collective that never comes.
  hang = [sys.executable, '-c', 'import sys, time; print("up", flush=True); '
          'time.sleep(0 if "--jax_process_id=0" in sys.argv else 600)']
  procs = multihost.launch(hang, 2, timeout=5, log_dir=str(tmp_path))
  first, second = procs
  assert first.returncode == 0 and not first.timed_out, multihost.report(procs)
  assert second.timed_out and second.returncode != 0
  assert 4 <= second.seconds < 30
  assert 'up' in second.output and 'timed_out=True' in multihost.report(procs)
