"""launch/tpu_pod.py: the exact gcloud commands (--dry_run), input errors, and the real execution
path against a fake `gcloud` that records its calls. The real gcloud is never called."""

import json
import os
import shlex
import subprocess
import sys
import tarfile
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GCLOUD = 'gcloud compute tpus tpu-vm'
BASE = ['--name=my-tpu', '--zone=us-central2-b']

# Records its argv to $FAKE_LOG; describe and ssh behave as $FAKE_STATE and $FAKE_RUN_RC say.
FAKE_GCLOUD = textwrap.dedent('''\
    import json, os, shutil, sys
    args = sys.argv[1:]
    with open(os.environ['FAKE_LOG'], 'a') as f:
      f.write(json.dumps(args) + '\\n')
    verb = args[3]
    if verb == 'describe':
      state = os.environ.get('FAKE_STATE', '')
      if not state:
        sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource was not found")
      print(state)
    elif verb == 'scp':
      shutil.copy(args[4], os.environ['FAKE_LOG'] + '.tar.gz')
    elif verb == 'ssh' and 'python3 -u' in args[-1]:
      print('step 1 loss 0.5')
      print('warning on stderr', file=sys.stderr)
      sys.exit(int(os.environ.get('FAKE_RUN_RC', '0')))
    ''')


def launch(*args, tmp_path, path=None, **env):
  """Runs the launcher; PATH starts with a folder whose `gcloud` is the fake one."""
  fake = tmp_path / 'bin'
  if not fake.exists():
    fake.mkdir()
    (fake / 'gcloud').write_text(f'#!{sys.executable}\n' + FAKE_GCLOUD)
    (fake / 'gcloud').chmod(0o755)
  env = dict(os.environ, TMPDIR=str(tmp_path), FAKE_LOG=str(tmp_path / 'calls'),
             PATH=path if path is not None else f'{fake}{os.pathsep}{os.environ["PATH"]}', **env)
  return subprocess.run([sys.executable, os.path.join(ROOT, 'launch', 'tpu_pod.py'), *args],
                        capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)


def commands(proc):
  assert proc.returncode == 0, proc.stderr[-3000:]
  return [line for line in proc.stdout.splitlines() if not line.startswith('#')]


def calls(tmp_path):
  log = tmp_path / 'calls'
  return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_dry_run_prints_every_command(tmp_path):
  proc = launch('--dry_run', *BASE, '--project=my-proj', '--spot', '--accelerator_type=v4-32',
                '--env', 'A=a b', '--env=XLA_FLAGS=--xla_dump_to=/tmp/x', '--delete',
                '--binary=launch/sample.py', '--', '--config=configs/sample/default.py',
                '--workdir=gs://bucket/run', '--config.prompts=("a cat",)', tmp_path=tmp_path)
  where = '--zone us-central2-b --project my-proj'
  tarball = tmp_path / 'diffgeo_jax-my-tpu.tar.gz'
  assert commands(proc) == [
      f"{GCLOUD} describe my-tpu {where} --format 'value(state)'",
      f'{GCLOUD} create my-tpu {where} --accelerator-type v4-32 --version tpu-ubuntu2204-base '
      '--spot',
      f'{GCLOUD} scp {tarball} my-tpu:diffgeo_jax.tar.gz {where} --worker=all',
      f'{GCLOUD} ssh my-tpu {where} --worker=all --command ' + shlex.quote(
          'rm -rf ~/diffgeo_jax && mkdir -p ~/diffgeo_jax && '
          'tar -xzf ~/diffgeo_jax.tar.gz -C ~/diffgeo_jax && rm ~/diffgeo_jax.tar.gz'),
      f'{GCLOUD} ssh my-tpu {where} --worker=all --command ' + shlex.quote(
          "cd ~/diffgeo_jax && python3 -m pip install -e '.[tpu]'"),
      f'{GCLOUD} ssh my-tpu {where} --worker=all --command ' + shlex.quote(
          "cd ~/diffgeo_jax && A='a b' XLA_FLAGS=--xla_dump_to=/tmp/x python3 -u "
          'launch/sample.py --jax_distributed --config=configs/sample/default.py '
          """--workdir=gs://bucket/run '--config.prompts=("a cat",)'"""),
      f'{GCLOUD} delete my-tpu {where} --quiet',
  ]
  assert '# describe: the next step runs only if this finds no TPU VM' in proc.stdout
  assert f'# pack: the files git tracks in {ROOT} -> {tarball}' in proc.stdout
  assert not calls(tmp_path)  # a dry run calls no gcloud


def test_dry_run_defaults_set_up_only(tmp_path):
  # No project, no spot, no binary: describe, create, copy, install; nothing is run or deleted.
  got = commands(launch('--dry_run', *BASE, tmp_path=tmp_path))
  where = '--zone us-central2-b'
  assert got[:2] == [
      f"{GCLOUD} describe my-tpu {where} --format 'value(state)'",
      f'{GCLOUD} create my-tpu {where} --accelerator-type v4-8 --version tpu-ubuntu2204-base']
  assert [c.split()[4] for c in got] == ['describe', 'create', 'scp', 'ssh', 'ssh']
  assert got[-1].endswith("'cd ~/diffgeo_jax && python3 -m pip install -e '\"'\"'.[tpu]'\"'\"''")


@pytest.mark.parametrize('flags, verbs', [
    (['--noreuse'], ['create', 'scp', 'ssh', 'ssh', 'ssh']),
    (['--nocreate'], ['scp', 'ssh', 'ssh', 'ssh']),
    (['--nocreate', '--nocopy', '--noinstall'], ['ssh']),
    (['--delete_only', '--binary='], ['delete']),
])
def test_dry_run_step_selection(tmp_path, flags, verbs):
  got = commands(launch('--dry_run', *BASE, '--binary=launch/sample.py', *flags,
                        tmp_path=tmp_path))
  assert [c.split()[4] for c in got] == verbs


@pytest.mark.parametrize('flags, want', [
    ([], 'python3 -u launch/sample.py --jax_distributed --x=1'),
    (['--nodistributed'], 'python3 -u launch/sample.py --x=1'),
])
def test_jax_distributed_flag(tmp_path, flags, want):
  got = commands(launch('--dry_run', *BASE, '--nocreate', '--nocopy', '--noinstall', *flags,
                        '--binary=launch/sample.py', '--', '--x=1', tmp_path=tmp_path))
  assert got == [f'{GCLOUD} ssh my-tpu --zone us-central2-b --worker=all --command '
                 + shlex.quote(f'cd ~/diffgeo_jax && {want}')]
  # Given by the user already: not repeated.
  got = commands(launch('--dry_run', *BASE, '--nocreate', '--nocopy', '--noinstall',
                        f'--binary={ROOT}/launch/sample.py', '--', '--jax_distributed',
                        tmp_path=tmp_path))
  assert got[0].endswith("'cd ~/diffgeo_jax && python3 -u launch/sample.py --jax_distributed'")


@pytest.mark.parametrize('args, message', [
    (['--zone=z'], '--name is required'),
    (['--name=my-tpu'], '--zone is required'),
    (['--name=My_TPU', '--zone=z'], "--name='My_TPU': lowercase letters"),
    ([*BASE, '--binary=launch/nope.py'], '--binary=launch/nope.py: no such file in the repo'),
    ([*BASE, '--binary=/etc/hostname'], '--binary=/etc/hostname: not inside the repository'),
    ([*BASE, '--env=NOVALUE'], "--env='NOVALUE': expected KEY=VALUE"),
    ([*BASE, '--env=1X=2'], "--env='1X=2': expected KEY=VALUE"),
    ([*BASE, '--', '--x=1'], 'need a --binary'),
    ([*BASE, '--binary=launch/sample.py', '--', '--dry_run'], '--dry_run after -- would go'),
    ([*BASE, '--delete_only', '--binary=launch/sample.py'], '--delete_only runs nothing'),
    ([*BASE, 'stray'], "unexpected arguments ['stray']"),
])
def test_bad_input_fails_clearly(tmp_path, args, message):
  proc = launch('--dry_run', *args, tmp_path=tmp_path)
  assert proc.returncode != 0
  assert message in proc.stderr.splitlines()[-1], proc.stderr[-2000:]
  assert not calls(tmp_path)


@pytest.mark.parametrize('binary_flags, message', [
    ([], 'give the binary a --workdir=gs://bucket/path'),
    (['--workdir=/tmp/run'], '--workdir=/tmp/run is not on Cloud Storage'),
    (['--workdir', 'run'], '--workdir=run is not on Cloud Storage'),
    # absl keeps the last value: that one counts.
    (['--workdir=gs://b/run', '--workdir=/tmp/run'], '--workdir=/tmp/run is not on Cloud'),
    (['--workdir=gs://b/run', '--config.export_dir=/data/pipe'],
     '--config.export_dir=/data/pipe is not on Cloud Storage'),
])
def test_delete_refuses_outputs_that_die_with_the_slice(tmp_path, binary_flags, message):
  proc = launch('--dry_run', *BASE, '--delete', '--binary=launch/train_t2i.py', '--',
                *binary_flags, tmp_path=tmp_path)
  assert proc.returncode != 0
  assert message in proc.stderr.splitlines()[-1], proc.stderr[-2000:]


def test_model_folders_and_workdir_on_gcs(tmp_path):
  """A pod run reads the model folder from the bucket and writes there; with --delete too."""
  proc = launch('--dry_run', *BASE, '--nocreate', '--nocopy', '--noinstall', '--delete',
                '--binary=launch/sample.py', '--', '--config=configs/sample/default.py',
                '--config.pipeline_dir=gs://bucket/sd15', '--workdir=gs://bucket/run',
                tmp_path=tmp_path)
  got = commands(proc)
  assert got[0].endswith(shlex.quote(
      'cd ~/diffgeo_jax && python3 -u launch/sample.py --jax_distributed '
      '--config=configs/sample/default.py --config.pipeline_dir=gs://bucket/sd15 '
      '--workdir=gs://bucket/run'))
  assert ('# run: every worker reads and writes gs://bucket/sd15, gs://bucket/run directly'
          in proc.stdout)
  # Without --delete a local workdir is allowed, and the note says where the outputs stay.
  proc = launch('--dry_run', *BASE, '--nocreate', '--nocopy', '--noinstall',
                '--binary=launch/sample.py', '--', '--workdir=/tmp/run', tmp_path=tmp_path)
  assert "no gs:// path: outputs stay on the workers' disks" in proc.stdout


def test_untracked_binary_is_refused(tmp_path):
  path = os.path.join(ROOT, 'launch', f'_untracked_{os.getpid()}.py')
  open(path, 'w').close()
  try:
    proc = launch('--dry_run', *BASE, f'--binary={path}', tmp_path=tmp_path)
  finally:
    os.remove(path)
  assert proc.returncode != 0
  assert 'is not tracked by git, so it would not be copied' in proc.stderr


def test_without_gcloud_on_path_says_so(tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  proc = launch(*BASE, tmp_path=tmp_path, path=str(empty))
  assert proc.returncode != 0
  assert 'gcloud is not on PATH' in proc.stderr
  assert not calls(tmp_path)


def test_runs_steps_streams_logs_and_packs_tracked_files(tmp_path):
  proc = launch(*BASE, '--binary=launch/sample.py', '--', '--x=1', tmp_path=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert [c[3] for c in calls(tmp_path)] == ['describe', 'create', 'scp', 'ssh', 'ssh', 'ssh']
  assert '# describe: no TPU VM my-tpu in us-central2-b: creating it' in proc.stdout
  assert '[run] step 1 loss 0.5\n' in proc.stdout
  assert '[run] warning on stderr\n' in proc.stdout
  tracked = subprocess.run(['git', 'ls-files', '-z'], capture_output=True, text=True, cwd=ROOT,
                           check=True).stdout.split('\0')
  with tarfile.open(tmp_path / 'calls.tar.gz') as tar:
    names = tar.getnames()
  assert 'launch/sample.py' in names and 'pyproject.toml' in names
  assert set(names) == {n for n in tracked if n and os.path.isfile(os.path.join(ROOT, n))}
  assert not any(n.startswith(('.venv/', '.git/')) for n in names)


def test_reuses_a_ready_slice(tmp_path):
  proc = launch(*BASE, '--noinstall', '--nocopy', tmp_path=tmp_path, FAKE_STATE='READY')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert [c[3] for c in calls(tmp_path)] == ['describe']
  assert 'exists and is READY: reusing it' in proc.stdout


def test_a_preempted_slice_stops_the_launch(tmp_path):
  proc = launch(*BASE, '--binary=launch/sample.py', tmp_path=tmp_path, FAKE_STATE='PREEMPTED')
  assert proc.returncode != 0
  assert "step 'describe' failed: TPU VM my-tpu exists but is PREEMPTED" in proc.stderr
  assert [c[3] for c in calls(tmp_path)] == ['describe']


def test_failed_run_exits_nonzero_and_still_deletes(tmp_path):
  proc = launch(*BASE, '--nocreate', '--nocopy', '--noinstall', '--delete',
                '--binary=launch/sample.py', '--', '--workdir=gs://bucket/run', tmp_path=tmp_path,
                FAKE_RUN_RC='3')
  assert proc.returncode != 0
  assert "tpu_pod: step 'run' failed: exit code 3" in proc.stderr
  assert [c[3] for c in calls(tmp_path)] == ['ssh', 'delete']
