"""The multi-host test harness: N JAX processes on 127.0.0.1, as the hosts of a pod.

    procs = multihost.launch([sys.executable, 'launch/sample.py', ...], num_processes=2)
    assert all(p.returncode == 0 for p in procs), multihost.report(procs)

Each process gets `--jax_distributed` and the coordinator's address, the process count and its
index as flags (the binaries' `runs` flags; `flags=False` leaves them out: a plain run, for the
one-process reference), its own `devices_per_process` CPU devices, and one shared deadline: a
process still running at `timeout` seconds is killed and the test fails with every process's
output, so a hang in a collective fails the test instead of CI.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence

from tests import compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@dataclasses.dataclass
class Process:
  index: int
  argv: list[str]
  returncode: int | None
  output: str  # stdout and stderr together
  seconds: float
  timed_out: bool = False
  killed: bool = False  # by the test's `kill`
  killed_at: float | None = None  # seconds after the start at which the test killed a process

  def tail(self, chars: int = 4000) -> str:
    # XLA/gloo start-up chatter is long and says nothing about a failure.
    lines = [l for l in self.output.splitlines()
             if not l.startswith(('[Gloo]', 'I1', 'W1', 'E0000'))]
    return '\n'.join(lines)[-chars:]


def report(procs: Sequence[Process], chars: int = 4000) -> str:
  return '\n'.join(f'--- process {p.index}: rc={p.returncode} timed_out={p.timed_out} '
                   f'killed={p.killed} {p.seconds:.0f}s\n{p.tail(chars)}' for p in procs)


def launch(argv: Sequence[str], num_processes: int, *, devices_per_process: int = 2,
           timeout: float = 300, env: dict[str, str] | None = None, flags: bool = True,
           heartbeat_timeout_s: int = 60, log_dir: str | None = None,
           kill: tuple[int, Callable[[], bool]] | None = None,
           argv_for: Callable[[int], Sequence[str]] | None = None) -> list[Process]:
  """Runs `argv` as `num_processes` JAX processes and waits for all of them (see the module doc).

  `kill=(i, ready)`: SIGKILL process i as soon as `ready()` returns True (polled), to check that
  the others stop on their own. `argv_for(i)` adds per-process arguments. `heartbeat_timeout_s`:
  60 s by default, because a process compiling on a loaded 2-core machine can miss 15 s of
  heartbeats and have the coordinator declare the whole job dead (seen with 4 processes beside
  the other pytest worker); the kill test passes its own, shorter one."""
  port = free_port()
  # The run's shared compilation cache (tests/compile_cache.py): a one-process reference and a
  # resumed run compile what an earlier run of the same layout already compiled. (JAX's
  # jax_share_binary_between_hosts, one process compiling for all, hung in gloo's start-up.)
  base = {**compile_cache.env(), 'PYTHONUNBUFFERED': '1',
          'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices_per_process}',
          **(env or {})}
  log_dir = log_dir or tempfile.mkdtemp(prefix='multihost_')
  os.makedirs(log_dir, exist_ok=True)
  running = []
  for i in range(num_processes):
    extra = ['--jax_distributed', f'--jax_coordinator_address=127.0.0.1:{port}',
             f'--jax_num_processes={num_processes}', f'--jax_process_id={i}',
             f'--jax_heartbeat_timeout_s={heartbeat_timeout_s}'] if flags else []
    full = [*argv, *(argv_for(i) if argv_for else ()), *extra]
    log = open(os.path.join(log_dir, f'process_{i}.log'), 'w+')
    proc = subprocess.Popen(full, stdout=log, stderr=subprocess.STDOUT, env=base, cwd=ROOT,
                            start_new_session=True)
    running.append((i, full, proc, log))
  start = time.time()
  deadline = start + timeout
  ended: dict[int, float] = {}
  killed, timed_out = set(), set()
  killed_at = None
  while len(ended) < num_processes:
    now = time.time()
    for i, _, proc, _ in running:
      if i not in ended and proc.poll() is not None:
        ended[i] = now - start
    if kill is not None and kill[0] not in killed and kill[0] not in ended and kill[1]():
      os.killpg(running[kill[0]][2].pid, signal.SIGKILL)
      killed.add(kill[0])
      killed_at = now - start
    if now > deadline:
      for i, _, proc, _ in running:
        if i not in ended:
          os.killpg(proc.pid, signal.SIGKILL)
          proc.wait()
          timed_out.add(i)
          ended[i] = now - start
      break
    time.sleep(0.05)
  out = []
  for i, full, proc, log in running:
    log.seek(0)
    out.append(Process(i, full, proc.wait(), log.read(), ended[i], i in timed_out, i in killed,
                       killed_at))
    log.close()
  return out

