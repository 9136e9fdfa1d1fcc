"""paths: local or gs:// paths, clear errors for the rest; runs: the start-up and results.json
schema every binary shares."""

import json
import os

import numpy as np
import pytest
from absl import flags
from etils import epath
from PIL import Image

from diffgeo_jax import paths, runs
from tests import gcs


@pytest.mark.parametrize('text, message', [
    ('s3://bucket/run', "--workdir='s3://bucket/run': the scheme 's3':// is not supported"),
    ('http://host/run', "the scheme 'http':// is not supported"),
    ('gs:/bucket/run', "--workdir='gs:/bucket/run': expected gs://bucket/path"),
    ('gs://', 'expected gs://bucket/path'),
    ('gs:', "would create a local folder named 'gs:'"),
    ('', '--workdir is empty'),
])
def test_resolve_refuses_what_it_cannot_write(text, message):
  with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)')):
    paths.resolve(text, '--workdir')


def test_resolve_keeps_gcs_remote_and_makes_local_paths_absolute(tmp_path, monkeypatch):
  remote = paths.resolve('gs://bucket/run')
  assert str(remote) == 'gs://bucket/run' and paths.is_remote(remote)
  monkeypatch.chdir(tmp_path)
  local = paths.resolve('out/run')
  assert str(local) == str(tmp_path / 'out' / 'run') and not paths.is_remote(local)
  assert isinstance(local, epath.Path)


def test_writers_round_trip_locally(tmp_path):
  paths.write_json(tmp_path / 'a' / 'b.json', {'x': 1})
  assert paths.read_json(tmp_path / 'a' / 'b.json') == {'x': 1}
  paths.save_npz(tmp_path / 'c.npz', v=np.arange(3.0))
  np.testing.assert_array_equal(paths.load_npz(tmp_path / 'c.npz')['v'], np.arange(3.0))
  paths.save_image(tmp_path / 'd.png', Image.fromarray(np.full((2, 3, 3), 7, np.uint8)))
  assert np.asarray(Image.open(tmp_path / 'd.png')).tolist() == np.full((2, 3, 3), 7).tolist()
  assert [r for r, _ in paths.files_under(tmp_path)] == ['a/b.json', 'c.npz', 'd.png']


def test_gcs_writers_and_staging_once_per_host(tmp_path, monkeypatch):
  monkeypatch.setenv('DIFFGEO_JAX_CACHE', str(tmp_path / 'cache'))
  with gcs.Emulator(buckets=('paths-test',)) as emu:
    root = 'gs://paths-test/folder'
    paths.write_json(f'{root}/sub/config.json', {'a': 1})
    paths.save_npz(f'{root}/arrays.npz', v=np.arange(4))
    assert emu.ls('paths-test/folder') == ['arrays.npz', 'sub/config.json']
    assert paths.read_json(f'{root}/sub/config.json') == {'a': 1}
    local = paths.local_folder(root)
    assert local == str(tmp_path / 'cache' / 'gs' / 'paths-test' / 'folder')
    assert json.load(open(os.path.join(local, 'sub', 'config.json'))) == {'a': 1}
    stamp = os.path.join(local, '.diffgeo_staged.json')
    first = os.stat(stamp).st_mtime_ns
    assert paths.local_folder(root) == local and os.stat(stamp).st_mtime_ns == first  # reused
    paths.write_json(f'{root}/sub/config.json', {'a': 22})  # changed size: staged again
    assert json.load(open(os.path.join(paths.local_folder(root), 'sub', 'config.json'))) == {
        'a': 22}
    with pytest.raises(FileNotFoundError, match='gs://paths-test/missing does not exist'):
      paths.local_folder('gs://paths-test/missing')
    # A model folder written through writable_folder lands in the bucket.
    with paths.writable_folder('gs://paths-test/model') as out:
      open(os.path.join(out, 'weights.bin'), 'wb').write(b'abc')
    assert emu.ls('paths-test/model') == ['weights.bin']
  assert not os.path.exists('gs:') and not (tmp_path / 'gs:').exists()


def test_run_writes_config_and_one_results_schema(tmp_path):
  config = {'lr': 0.1, 'name': 'x'}
  run = runs.start(config, str(tmp_path / 'w'), binary='unit')
  with run.timed('phase'):
    pass
  run.save_npz('a.npz', v=np.ones(2))
  out = run.finish({'accuracy': np.float32(0.5), 'per_class': np.arange(2)})
  saved = json.loads((tmp_path / 'w' / 'results.json').read_text())
  assert saved == out
  assert set(saved) == {'binary', 'command', 'config', 'versions', 'runtime', 'wall_s', 'metrics'}
  assert saved['binary'] == 'unit' and saved['config'] == config
  assert saved['metrics'] == {'accuracy': 0.5, 'per_class': [0, 1]}
  assert saved['runtime']['processes'] == 1 and saved['runtime']['devices'] >= 1
  assert 'jax' in saved['versions'] and 0 <= saved['wall_s']['phase'] <= saved['wall_s']['total']
  assert json.loads((tmp_path / 'w' / 'config.json').read_text()) == config
  with pytest.raises(ValueError, match='--workdir'):
    runs.start(config, 'ftp://host/x')


def test_distributed_flags_are_defined_once_by_runs():
  assert flags.FLAGS.find_module_defining_flag('jax_distributed') == 'diffgeo_jax.runs'
