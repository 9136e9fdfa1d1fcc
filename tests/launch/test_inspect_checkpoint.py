"""launch/inspect_checkpoint.py on a diffusers-written pipeline folder, as a user runs it."""

import json
import os
import subprocess
import sys

import numpy as np

from tests.models import oracles

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_inspect_pipeline_folder(tmp_path, diffusers_pipeline_dir):
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch', 'inspect_checkpoint.py'),
       f'--model_dir={diffusers_pipeline_dir}', f'--workdir={tmp_path}'],
      capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((tmp_path / 'results.json').read_text())
  assert results['config']['model_dir'] == str(diffusers_pipeline_dir)
  results = results['metrics']
  assert set(results) == {'unet', 'vae', 'text_encoder'}
  n_unet = sum(p.numel() for p in oracles.torch_unet('sd1').parameters())
  assert results['unet']['params'] == n_unet
  n_text = sum(p.numel() for p in oracles.torch_clip().parameters())
  assert results['text_encoder']['params'] == n_text
  assert results['unet']['output_shape'] == [1, 8, 8, 4]
  assert results['unet']['hspace_shape'] == [1, 2, 2, 64]
  assert np.isfinite(results['vae']['output_rms'])
