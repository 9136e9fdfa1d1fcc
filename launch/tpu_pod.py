r"""Run one of the project's binaries on every worker of a Cloud TPU VM slice, with `gcloud`.

    python launch/tpu_pod.py --name=my-v4 --zone=us-central2-b --accelerator_type=v4-32 \
      --binary=launch/train_t2i.py -- --config=configs/digits/t2i.py --workdir=gs://bucket/run

Everything after `--` goes to the binary, which also gets `--jax_distributed` (--nodistributed
drops it) so that it calls `jax.distributed.initialize()`. The steps, each one `gcloud` command
(--dry_run prints them all and runs nothing):

  describe  does the slice exist? (--reuse, the default; --noreuse creates without asking)
  create    the slice, if it does not exist (--spot for spot capacity; --nocreate skips both)
  pack      the files git tracks (`git ls-files`, as they are in the working tree) into a tarball:
            untracked files do not travel, so `git add` a new file before launching
  copy      scp the tarball to every worker and unpack it as ~/diffgeo_jax (replacing the old copy)
  install   `pip install -e '.[tpu]'` on every worker (--noinstall skips it)
  run       `python3 -u BINARY FLAGS` on every worker, its output streamed here line by line
  delete    the slice (--delete: after everything else, also when a step failed or on Ctrl-C;
            --delete_only: only this step)

Cloud Storage. Every binary runs on every worker (one JAX process per host, the same program
everywhere) and reads and writes gs:// paths directly (etils epath + gcsfs, orbax/tensorstore for
checkpoints), with the TPU VM's service account:
  --workdir=gs://bucket/run              outputs: config.json, results.json, figures, arrays,
                                         TensorBoard events, orbax checkpoints (a rerun resumes);
                                         process 0 writes, every process reads checkpoints
  --config.pipeline_dir=gs://bucket/sd15  a diffusers folder uploaded once
                                         (`gsutil -m cp -r stable-diffusion-v1-5 gs://bucket/sd15`):
                                         every worker reads the weights from the bucket, no copy
                                         per VM (the tokenizer is staged in ~/.cache/diffgeo_jax)
A worker's disk goes with the slice, so with --delete the launcher refuses a --workdir (or
--config.export_dir) that is not on gs://. Ctrl-C stops the local gcloud; the remote processes may
keep running until the slice is deleted.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_DIR = 'diffgeo_jax'  # under the worker's home directory

_NAME = flags.DEFINE_string('name', None, 'TPU VM name.')
_ZONE = flags.DEFINE_string('zone', None, 'Zone, e.g. us-central2-b (v4) or us-west4-a (v5e).')
_PROJECT = flags.DEFINE_string('project', '', 'GCP project; empty: gcloud\'s configured one.')
_ACCELERATOR = flags.DEFINE_string('accelerator_type', 'v4-8', 'Slice type, e.g. v4-32.')
_VERSION = flags.DEFINE_string('version', 'tpu-ubuntu2204-base',
                               'TPU runtime version (v5e: v2-alpha-tpuv5-lite).')
_SPOT = flags.DEFINE_bool('spot', False, 'Create the slice on spot capacity.')
_REUSE = flags.DEFINE_bool('reuse', True, 'Describe first; create only if the slice is missing.')
_CREATE = flags.DEFINE_bool('create', True, 'Create the slice (--nocreate: it exists).')
_COPY = flags.DEFINE_bool('copy', True, 'Copy the git-tracked files to every worker.')
_INSTALL = flags.DEFINE_bool('install', True, "pip install -e '.[tpu]' on every worker.")
_DELETE = flags.DEFINE_bool('delete', False, 'Delete the slice at the end, even after a failure.')
_DELETE_ONLY = flags.DEFINE_bool('delete_only', False, 'Only delete the slice.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print the commands; run nothing.')
_BINARY = flags.DEFINE_string('binary', '', 'Repository-relative script to run, e.g. '
                              'launch/train_t2i.py; empty: set the slice up and stop.')
_DISTRIBUTED = flags.DEFINE_bool('distributed', True,
                                 'Pass --jax_distributed to the binary (multi-host JAX).')
_ENV = flags.DEFINE_multi_string('env', [], 'KEY=VALUE exported to the binary on the workers.')


class StepFailed(Exception):
  def __init__(self, step: str, detail: str):
    super().__init__(f'step {step!r} failed: {detail}')
    self.step = step


@dataclasses.dataclass(frozen=True)
class Config:
  name: str
  zone: str
  project: str = ''
  accelerator_type: str = 'v4-8'
  version: str = 'tpu-ubuntu2204-base'
  spot: bool = False
  reuse: bool = True
  create: bool = True
  copy: bool = True
  install: bool = True
  delete: bool = False
  delete_only: bool = False
  binary: str = ''  # relative to the repository root
  binary_flags: tuple[str, ...] = ()
  distributed: bool = True
  env: tuple[tuple[str, str], ...] = ()
  tarball: str = ''  # local path of the packed code


@dataclasses.dataclass(frozen=True)
class Step:
  name: str
  argv: tuple[str, ...]  # empty for `pack`, which runs in this process
  note: str = ''


# --- Commands: pure functions of the config. ---------------------------------------------------

def _gcloud(cfg: Config, verb: str, *positional: str) -> list[str]:
  project = ['--project', cfg.project] if cfg.project else []
  return ['gcloud', 'compute', 'tpus', 'tpu-vm', verb, *positional, '--zone', cfg.zone, *project]


def describe_command(cfg: Config) -> list[str]:
  return _gcloud(cfg, 'describe', cfg.name) + ['--format', 'value(state)']


def create_command(cfg: Config) -> list[str]:
  return (_gcloud(cfg, 'create', cfg.name)
          + ['--accelerator-type', cfg.accelerator_type, '--version', cfg.version]
          + (['--spot'] if cfg.spot else []))


def ssh_command(cfg: Config, remote: str) -> list[str]:
  """`remote` runs in a shell on every worker at once."""
  return _gcloud(cfg, 'ssh', cfg.name) + ['--worker=all', '--command', remote]


def copy_command(cfg: Config) -> list[str]:
  return _gcloud(cfg, 'scp', cfg.tarball, f'{cfg.name}:{REMOTE_DIR}.tar.gz') + ['--worker=all']


def unpack_command(cfg: Config) -> list[str]:
  # A fresh directory: files deleted here must not linger there. `~` stays unquoted to expand.
  d = f'~/{REMOTE_DIR}'
  return ssh_command(cfg, f'rm -rf {d} && mkdir -p {d} && tar -xzf {d}.tar.gz -C {d} '
                          f'&& rm {d}.tar.gz')


def install_command(cfg: Config) -> list[str]:
  return ssh_command(cfg, f"cd ~/{REMOTE_DIR} && python3 -m pip install -e {shlex.quote('.[tpu]')}")


def binary_flags(cfg: Config) -> list[str]:
  # First, so that a --nojax_distributed among the user's flags wins (absl keeps the last).
  extra = ['--jax_distributed'] if cfg.distributed else []
  return [f for f in extra if f not in cfg.binary_flags] + list(cfg.binary_flags)


def run_command(cfg: Config) -> list[str]:
  env = ''.join(f'{k}={shlex.quote(v)} ' for k, v in cfg.env)
  # -u: unbuffered, so that the logs stream through ssh as they are written.
  python = shlex.join(['python3', '-u', cfg.binary, *binary_flags(cfg)])
  return ssh_command(cfg, f'cd ~/{REMOTE_DIR} && {env}{python}')


def delete_command(cfg: Config) -> list[str]:
  return _gcloud(cfg, 'delete', cfg.name) + ['--quiet']  # --quiet: no confirmation prompt


def plan(cfg: Config) -> list[Step]:
  delete = Step('delete', tuple(delete_command(cfg)))
  if cfg.delete_only:
    return [delete]
  steps = []
  if cfg.create:
    if cfg.reuse:
      steps.append(Step('describe', tuple(describe_command(cfg)),
                        'the next step runs only if this finds no TPU VM'))
    steps.append(Step('create', tuple(create_command(cfg))))
  if cfg.copy:
    steps += [Step('pack', (), f'the files git tracks in {ROOT} -> {cfg.tarball}'),
              Step('copy', tuple(copy_command(cfg))), Step('unpack', tuple(unpack_command(cfg)))]
  if cfg.install:
    steps.append(Step('install', tuple(install_command(cfg))))
  if cfg.binary:
    remote = gcs_paths(cfg)
    note = (f'every worker reads and writes {", ".join(remote)} directly' if remote else
            'no gs:// path: outputs stay on the workers\' disks (process 0\'s)')
    steps.append(Step('run', tuple(run_command(cfg)), note))
  if cfg.delete:
    steps.append(delete)
  return steps


# --- Input checks. -----------------------------------------------------------------------------

def parse_env(items) -> tuple[tuple[str, str], ...]:
  out = []
  for item in items:
    key, sep, value = item.partition('=')
    if not sep or not re.fullmatch(r'[A-Za-z_][A-Za-z0-9_]*', key):
      raise app.UsageError(f'--env={item!r}: expected KEY=VALUE with KEY a shell variable name')
    out.append((key, value))
  return tuple(out)


def resolve_binary(binary: str) -> str:
  """The binary's path relative to the repository root, which is where it runs on the workers."""
  if not binary:
    return ''
  path = os.path.normpath(binary if os.path.isabs(binary) else os.path.join(ROOT, binary))
  rel = os.path.relpath(path, ROOT)
  if rel.startswith('..'):
    raise app.UsageError(f'--binary={binary}: not inside the repository {ROOT}')
  if not os.path.isfile(path):
    raise app.UsageError(f'--binary={binary}: no such file in the repository {ROOT}')
  return rel.replace(os.sep, '/')


# Binary flags whose folders must outlive the slice.
OUTPUT_FLAGS = ('workdir', 'config.export_dir')


def flag_value(flags_: tuple[str, ...], name: str) -> str | None:
  """The last value of `--name=value` or `--name value` among the binary's flags (absl keeps the
  last), None if absent."""
  value = None
  for i, f in enumerate(flags_):
    if f.startswith(f'--{name}='):
      value = f.split('=', 1)[1]
    elif f == f'--{name}' and i + 1 < len(flags_):
      value = flags_[i + 1]
  return value


def check_outputs_survive(cfg: Config) -> None:
  """With --delete, outputs on a worker's disk would be deleted with it: they must be on GCS."""
  if not (cfg.delete and cfg.binary):
    return
  workdir = flag_value(cfg.binary_flags, 'workdir')
  if workdir is None:
    raise app.UsageError('--delete deletes the TPU VMs and their disks: give the binary a '
                         '--workdir=gs://bucket/path after -- so that its outputs survive')
  for name in OUTPUT_FLAGS:
    value = flag_value(cfg.binary_flags, name)
    if value and not value.startswith('gs://'):
      raise app.UsageError(f'--{name}={value} is not on Cloud Storage, and --delete deletes the '
                           'TPU VMs with their disks: use gs://bucket/path, or drop --delete')


def gcs_paths(cfg: Config) -> list[str]:
  """The binary's gs:// arguments, named in the run step's note."""
  return [f.split('=', 1)[1] if '=gs://' in f else f for f in cfg.binary_flags
          if f.startswith('gs://') or '=gs://' in f]


def config_from_flags(passed: tuple[str, ...]) -> Config:
  name, zone = _NAME.value or '', _ZONE.value or ''
  if not name:
    raise app.UsageError('--name is required: the TPU VM name, e.g. --name=my-v4')
  if not re.fullmatch(r'[a-z]([-a-z0-9]*[a-z0-9])?', name):
    raise app.UsageError(f'--name={name!r}: lowercase letters, digits and dashes, starting with '
                         'a letter, not ending with a dash')
  if not zone:
    raise app.UsageError('--zone is required, e.g. --zone=us-central2-b')
  if _DELETE_ONLY.value and (_BINARY.value or passed):
    raise app.UsageError('--delete_only runs nothing: drop --binary and the flags after --')
  if any(re.fullmatch(r'--?(no)?dry_run(=.*)?', f) for f in passed):
    # A misplaced --dry_run would really launch: refuse rather than guess.
    raise app.UsageError('--dry_run after -- would go to the binary: put it before --')
  if passed and not _BINARY.value:
    raise app.UsageError(f'flags after -- ({shlex.join(passed)}) need a --binary to go to')
  cfg = Config(
      name=name, zone=zone, project=_PROJECT.value, accelerator_type=_ACCELERATOR.value,
      version=_VERSION.value, spot=_SPOT.value, reuse=_REUSE.value, create=_CREATE.value,
      copy=_COPY.value, install=_INSTALL.value, delete=_DELETE.value,
      delete_only=_DELETE_ONLY.value, binary=resolve_binary(_BINARY.value),
      binary_flags=tuple(passed), distributed=_DISTRIBUTED.value, env=parse_env(_ENV.value),
      tarball=os.path.join(tempfile.gettempdir(), f'diffgeo_jax-{name}.tar.gz'))
  check_outputs_survive(cfg)
  return cfg


def tracked_files() -> list[str]:
  """Repository-relative paths of the files git tracks that exist in the working tree."""
  try:
    out = subprocess.run(['git', '-C', ROOT, 'ls-files', '-z'], capture_output=True, check=True)
  except (OSError, subprocess.CalledProcessError) as e:
    raise app.UsageError(f'cannot list the files to copy with `git ls-files` in {ROOT}: {e}')
  names = [n for n in out.stdout.decode().split('\0') if n]
  # A file deleted but not yet committed is gone; a submodule is a folder (not packed).
  return [n for n in names if os.path.isfile(os.path.join(ROOT, n))]


# --- Execution. --------------------------------------------------------------------------------

def pack(cfg: Config, files: list[str]):
  with tarfile.open(cfg.tarball, 'w:gz') as tar:
    for name in files:
      tar.add(os.path.join(ROOT, name), arcname=name, recursive=False)
  print(f'# pack: {len(files)} files, {os.path.getsize(cfg.tarball) / 1e6:.1f} MB', flush=True)


def stream(step: Step):
  """Runs a step, printing its stdout and stderr here line by line as `[step] line`."""
  # No stdin: a gcloud prompt (say, to enable an API) fails at once instead of waiting unseen.
  proc = subprocess.Popen(step.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors='replace', bufsize=1)
  try:
    for line in proc.stdout:
      print(f'[{step.name}] {line}', end='', flush=True)
    code = proc.wait()
  except KeyboardInterrupt:
    proc.terminate()  # gcloud got the SIGINT too; this makes sure it is gone
    proc.wait()
    raise
  if code:
    raise StepFailed(step.name, f'exit code {code}: {shlex.join(step.argv)}')


def exists(cfg: Config, step: Step) -> bool:
  """Runs `describe`: True if the slice is there and READY, False if there is none."""
  proc = subprocess.run(step.argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                        errors='replace')
  if proc.returncode:
    if 'NOT_FOUND' in proc.stderr or 'not found' in proc.stderr.lower():
      print(f'# describe: no TPU VM {cfg.name} in {cfg.zone}: creating it', flush=True)
      return False
    raise StepFailed(step.name, f'exit code {proc.returncode}: {proc.stderr.strip()}')
  state = proc.stdout.strip()
  if state != 'READY':
    raise StepFailed(step.name, f'TPU VM {cfg.name} exists but is {state or "in no state"}, not '
                     'READY: wait for it, or delete it (--delete_only) and launch again')
  print(f'# describe: TPU VM {cfg.name} exists and is READY: reusing it', flush=True)
  return True


def announce(step: Step):
  print(f'# {step.name}' + (f': {step.note}' if step.note else ''), flush=True)
  if step.argv:
    print(shlex.join(step.argv), flush=True)


def execute(cfg: Config, steps: list[Step], files: list[str]):
  """Runs the steps in order; `delete` runs last whatever happened before it."""
  failure, current = None, ''
  try:
    skip_create = False
    for step in steps:
      if step.name == 'delete':
        continue
      current = step.name
      announce(step)
      if step.name == 'describe':
        skip_create = exists(cfg, step)
      elif step.name == 'pack':
        pack(cfg, files)
      elif not (step.name == 'create' and skip_create):
        stream(step)
  except StepFailed as e:
    failure = e
  except KeyboardInterrupt:
    failure = StepFailed(current, 'interrupted (Ctrl-C)')
  for step in steps:
    if step.name == 'delete':
      announce(step)
      try:
        stream(step)
      except StepFailed as e:
        failure = failure or e
  if failure:
    raise failure


def main(argv, passed: tuple[str, ...] = ()):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}: flags for the binary go after --')
  cfg, dry_run = config_from_flags(passed), _DRY_RUN.value
  if not dry_run and shutil.which('gcloud') is None:
    sys.exit('tpu_pod: gcloud is not on PATH: install the Google Cloud SDK '
             '(https://cloud.google.com/sdk/docs/install) and run `gcloud auth login`, '
             'or pass --dry_run to print the commands')
  files = tracked_files() if cfg.copy and not cfg.delete_only else []
  if cfg.copy and cfg.binary and cfg.binary not in files:
    raise app.UsageError(f'--binary={cfg.binary} is not tracked by git, so it would not be '
                         f'copied to the workers: `git add {cfg.binary}` first')
  steps = plan(cfg)
  if dry_run:
    for step in steps:
      announce(step)
    return
  try:
    execute(cfg, steps, files)
  except StepFailed as e:
    sys.exit(f'tpu_pod: {e}')


def split_argv(argv: list[str]) -> tuple[list[str], tuple[str, ...]]:
  """(the launcher's own arguments, the binary's flags: everything after the first --)."""
  if '--' in argv:
    i = argv.index('--')
    return argv[:i], tuple(argv[i + 1:])
  return argv, ()


if __name__ == '__main__':
  own, passed = split_argv(sys.argv)
  app.run(functools.partial(main, passed=passed), argv=own)
