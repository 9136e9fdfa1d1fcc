"""Outputs and model folders on Cloud Storage, through a local GCS emulator (tests/gcs.py).

Every binary writes its workdir through etils epath, orbax checkpoints through tensorstore, and
`models.load_pipeline` reads gs:// folders; none of them may create a local folder named 'gs:'.
"""

import io
import json
import os
import signal
import subprocess
import sys
import time

import chex
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from PIL import Image

from diffgeo_jax import models, paths
from diffgeo_jax.training import summary
from tests import compile_cache, gcs, multihost

ROOT = multihost.ROOT
BUCKET = 'diffgeo-test'
T2I = [sys.executable, os.path.join(ROOT, 'launch', 'train_t2i.py'),
       f'--config={os.path.join(ROOT, "configs", "digits", "t2i.py")}:tiny',
       '--config.train.checkpoint_every=5', '--config.train.log_every=5']


@pytest.fixture(scope='module')
def emulator():
  with gcs.Emulator(buckets=(BUCKET,)) as emu:
    yield emu


@pytest.fixture(scope='module')
def gcs_pipeline(emulator, tiny_digits_pipeline_dir):
  """The tiny digits pipeline uploaded to gs://diffgeo-test/digits."""
  paths.copy_tree(tiny_digits_pipeline_dir, f'gs://{BUCKET}/digits')
  return f'gs://{BUCKET}/digits'


def _env(emulator, tmp_path):
  return emulator.env(compile_cache.env(DIFFGEO_JAX_CACHE=str(tmp_path / 'staged')))


def _no_local_gs_folder(*folders):
  for folder in (*folders, ROOT):
    assert not any(name.lower().startswith('gs:') for name in os.listdir(folder)), folder


def test_load_pipeline_from_gcs_equals_local(emulator, gcs_pipeline, tiny_digits_pipeline_dir,
                                             tmp_path, monkeypatch):
  monkeypatch.setenv('DIFFGEO_JAX_CACHE', str(tmp_path / 'staged'))
  remote = models.load_pipeline(gcs_pipeline)
  local = models.load_pipeline(tiny_digits_pipeline_dir)
  chex.assert_trees_all_equal(remote.unet_params, local.unet_params)
  chex.assert_trees_all_equal(remote.text_encoder_params, local.text_encoder_params)
  assert remote.scheduler_config == local.scheduler_config
  ids = lambda p: p.tokenizer(['a red digit three']).input_ids
  assert ids(remote) == ids(local)
  # Weights were read from the bucket, not copied: only the tokenizer was staged.
  staged = [os.path.relpath(os.path.join(r, f), tmp_path / 'staged')
            for r, _, fs in os.walk(tmp_path / 'staged') for f in fs]
  assert staged and all('/tokenizer/' in s for s in staged), staged
  assert not any(s.endswith('.safetensors') for s in staged)
  with pytest.raises(FileNotFoundError, match=f'gs://{BUCKET}/nowhere/model_index.json'):
    models.load_pipeline(f'gs://{BUCKET}/nowhere')
  _no_local_gs_folder(tmp_path, os.getcwd())


def test_sample_writes_every_output_to_gcs(emulator, gcs_pipeline, tmp_path):
  workdir = f'gs://{BUCKET}/sample'
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch', 'sample.py'),
       f'--config={os.path.join(ROOT, "configs", "sample", "default.py")}:quick',
       f'--config.pipeline_dir={gcs_pipeline}',
       "--config.prompts=('a red digit three', 'a blue digit one')", '--config.seeds=(0, 1)',
       '--config.prompts_per_row=1', '--config.grid_scale=1', f'--workdir={workdir}'],
      capture_output=True, text=True, timeout=300, env=_env(emulator, tmp_path), cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert emulator.ls(f'{BUCKET}/sample') == ['config.json', 'results.json', 'samples.npz',
                                             'samples.png']
  results = json.loads(epath.Path(workdir, 'results.json').read_text())
  assert results['metrics']['num_images'] == 4
  assert results['config']['pipeline_dir'] == gcs_pipeline
  out = paths.load_npz(f'{workdir}/samples.npz')
  assert out['images'].shape == (4, 16, 16, 3) and list(out['seeds']) == [0, 1, 0, 1]
  png = np.asarray(Image.open(io.BytesIO(epath.Path(workdir, 'samples.png').read_bytes())))
  assert png.shape == (2 * 16, 2 * 16, 3)
  # The grid holds the npz's images (row prompt 2, column seed 1).
  assert np.abs(png[16:, 16:].astype(int) - np.round(out['images'][3] * 255)).max() <= 1
  _no_local_gs_folder(tmp_path)


def _wait_for_checkpoint(emulator, prefix, proc, timeout=300):
  """Returns once a checkpoint step is committed under `prefix` (or the process ended)."""
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if any(p.endswith('/commit_success.txt') and p.count('/') == 1
           for p in emulator.ls(prefix)):
      return
    time.sleep(0.05)


def _final_params(workdir):
  with ocp.CheckpointManager(epath.Path(workdir, 'checkpoints')) as manager:
    step = manager.latest_step()
    return step, manager.restore(step, args=ocp.args.StandardRestore())


def test_train_t2i_on_gcs_resumes_after_sigkill_to_the_same_parameters(emulator, tmp_path):
  env = _env(emulator, tmp_path)
  steps = ['--config.train.num_steps=20']
  full, cut = f'gs://{BUCKET}/t2i_full', f'gs://{BUCKET}/t2i_cut'
  proc = subprocess.run(T2I + steps + [f'--workdir={full}'], env=env, capture_output=True,
                        text=True, timeout=600, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  listing = emulator.ls(f'{BUCKET}/t2i_full')
  for name in ('config.json', 'results.json', 'pipeline/model_index.json',
               'pipeline/unet/diffusion_pytorch_model.safetensors', 'pipeline/training.json',
               'pipeline/tokenizer/vocab.json', 'checkpoints/20/commit_success.txt'):
    assert name in listing, (name, listing)
  assert any(n.startswith('tensorboard/events.out.tfevents.') for n in listing), listing
  scalars = summary.read_scalars(f'{full}/tensorboard')
  assert [s for s, _ in scalars['train/loss']] == [5, 10, 15, 20]
  # The exported pipeline loads from the bucket.
  exported = models.load_pipeline(f'{full}/pipeline')
  assert exported.class_name == 'DigitsTextToImagePipeline'

  # Killed after its first committed checkpoint, then resumed.
  killed = subprocess.Popen(T2I + steps + [f'--workdir={cut}'], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  _wait_for_checkpoint(emulator, f'{BUCKET}/t2i_cut/checkpoints', killed)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  assert killed.returncode == -signal.SIGKILL, 'the run finished before it could be killed'
  assert 'results.json' not in emulator.ls(f'{BUCKET}/t2i_cut')
  proc = subprocess.run(T2I + steps + [f'--workdir={cut}'], env=env, capture_output=True,
                        text=True, timeout=600, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  resumed = json.loads(epath.Path(cut, 'results.json').read_text())['metrics']
  assert 0 < resumed['resumed_from_step'] < 20
  step_a, a = _final_params(full)
  step_b, b = _final_params(cut)
  assert step_a == step_b == 20
  chex.assert_trees_all_equal(a, b)  # bit-exact: same batches, keys and computations
  _no_local_gs_folder(tmp_path)
