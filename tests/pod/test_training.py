"""The LoRA trainers on several hosts: a tiny launch/train_duo.py (pair generation gated by the
detector, training in two rounds with the embedding attack between them, evaluation, then resumed
with a second round) and a tiny
launch/train_lora.py (class images for prior preservation, training) as 2 processes x 1 CPU
device, against one process x 2 devices.

Both meshes have the same 2 devices on the `data` axis and every process feeds its rows of the
same global batch, so the runs must agree up to float reassociation (the sampling programs are
compiled for another device-to-process layout). Two devices keep the tests short on CI's 2 cores;
over 4 devices (2 x 2 against 1 x 4) the LoRAs agreed within 1.1e-5 (tests/pod/test_training_t2i.py
says why 4-device all-reduces differ in the last bits).
"""

import json
import os
import sys

import numpy as np
from safetensors.numpy import load_file

from diffgeo_jax.digits import metrics
from tests import multihost, report

ROOT = multihost.ROOT
LORA_FILE = os.path.join('lora', 'pytorch_lora_weights.safetensors')


def _one_and_two(argv, tmp_path, timeout=300):
  """The workdirs of the run as 1 process x 2 devices and as 2 processes x 1 device."""
  out = {}
  for n, per in ((1, 2), (2, 1)):
    workdir = tmp_path / f'p{n}'
    procs = multihost.launch([*argv, f'--workdir={workdir}'], n, flags=n > 1,
                             devices_per_process=per, timeout=timeout)
    assert all(p.returncode == 0 for p in procs), multihost.report(procs)
    report.record(f'{os.path.basename(argv[1])} wall_s, {n} process(es)',
                  round(max(p.seconds for p in procs), 1))
    results = json.loads((workdir / 'results.json').read_text())
    assert results['runtime']['processes'] == n and results['runtime']['devices'] == 2
    out[n] = workdir, results
  return out[1], out[2]


def _check_lora(one, two, name):
  """The two LoRA files hold the same factors. With two devices the gradient all-reduce adds two
  partial sums, the same in any order: measured bit-identical (0.0) for both trainers."""
  a, b = load_file(str(one / LORA_FILE)), load_file(str(two / LORA_FILE))
  assert sorted(a) == sorted(b) and len(a) >= 8
  diff = max(float(np.abs(a[k] - b[k]).max()) for k in a)
  report.record(f'{name} LoRA max |1 process - 2 processes|', diff)
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-7, err_msg=k)
  # The B factors start at zero: they are the training's doing, and it moved them.
  assert all(np.abs(a[k]).max() > 1e-4 for k in a if 'lora_B' in k)


def test_train_duo_generates_trains_and_evaluates_on_two_processes(tmp_path):
  argv = [sys.executable, os.path.join(ROOT, 'launch', 'train_duo.py'),
          f'--config={os.path.join(ROOT, "configs", "duo", "digits.py")}:tiny',
          '--config.train.batch_size=4', '--config.duo.condition=mixed',
          '--config.duo.adversarial.every=2', '--config.duo.adversarial.steps=3']
  (work1, one), (work2, two) = _one_and_two(argv, tmp_path)
  m1, m2 = one['metrics'], two['metrics']
  for m in (m1, m2):
    assert m['pairs'] == 4 and m['training']['steps'] == 4
    assert np.isfinite(m['training']['final_loss']) and m['training']['devices'] == 2
    for side in ('base', 'unlearned'):
      assert 0 <= m[side]['defence_success_rate'] <= 1
      assert 0 <= m[side]['other_digits_accuracy'] <= 1
  assert {'pairs', 'training', 'evaluation'} <= set(two['wall_s'])
  # The pairs: every process took process 0's detector verdicts, and the gate held on both
  # sides. Measured: images within 2e-6 of one process's (sampled over another layout).
  p1, p2 = np.load(work1 / 'pairs.npz'), np.load(work2 / 'pairs.npz')
  assert sorted(p1.files) == sorted(p2.files)
  for k in p1.files:
    if p1[k].dtype.kind == 'f':
      np.testing.assert_allclose(p2[k], p1[k], atol=1e-5, err_msg=k)
    else:
      np.testing.assert_array_equal(p2[k], p1[k], err_msg=k)
  scorer = metrics.Scorer.load()
  assert np.all(scorer.predict(p2['unsafe'] * 2 - 1) == 8)
  assert np.all(scorer.predict(p2['safe'] * 2 - 1) != 8)
  # duo.adversarial: one round at step 2 of 4, the attack run on every process and process 0's
  # embedding row taken by all. Measured: 9e-8 from one process's row (entries up to 0.34).
  r1, r2 = np.load(work1 / 'adversarial_rows.npz'), np.load(work2 / 'adversarial_rows.npz')
  assert r1.files == r2.files == ['2']
  np.testing.assert_allclose(r2['2'], r1['2'], atol=1e-5)
  _check_lora(work1, work2, 'train_duo')
  # The evaluation ran over both devices of both runs: the same rates (counts of images
  # the detector reads), the same training loss and pixel difference up to float noise.
  for side in ('base', 'unlearned'):
    assert m2[side] == m1[side], side
  np.testing.assert_allclose(m2['mean_abs_diff_other_digits'], m1['mean_abs_diff_other_digits'],
                             rtol=1e-2, atol=1e-6)
  np.testing.assert_allclose(m2['training']['final_loss'], m1['training']['final_loss'],
                             rtol=1e-4)
  # The attacked row moved away from the word's own row, and a run resumed to 6 steps (on the
  # two-process workdir, one process now) reuses round 2's row and attacks again at step 4 only.
  from diffgeo_jax import digits, models
  from diffgeo_jax.unlearning import embedding_attack
  pipe = models.load_pipeline(digits.pipeline_dir())
  word = np.asarray(embedding_attack.embedding_table(pipe.text_encoder_params)[
      embedding_attack.concept_token(pipe, 'eight')])
  assert np.linalg.norm(r1['2'] - word) > 1e-4
  (resumed,) = multihost.launch([*argv, f'--workdir={work2}', '--config.train.num_steps=6',
                                 '--config.eval.concept_samples=0'], 1, flags=False,
                                devices_per_process=2, timeout=300)
  assert resumed.returncode == 0, multihost.report([resumed])
  assert 'adversarial round at step 2' not in resumed.output
  assert 'adversarial round at step 4' in resumed.output
  rows = np.load(work2 / 'adversarial_rows.npz')
  assert sorted(rows.files) == ['2', '4']
  np.testing.assert_array_equal(rows['2'], r2['2'])
  res = json.loads((work2 / 'results.json').read_text())['metrics']
  assert res['training']['resumed_from_step'] == 4 and res['training']['steps'] == 6
  assert 'base' not in res  # eval.concept_samples=0: no evaluation


def test_train_lora_with_prior_preservation_on_two_processes(tmp_path):
  argv = [sys.executable, os.path.join(ROOT, 'launch', 'train_lora.py'),
          f'--config={os.path.join(ROOT, "configs", "decor", "digits.py")}:tiny',
          '--config.train.batch_size=4', '--config.prior.weight=1.0',
          '--config.decor.train_strength=0.5']
  (work1, one), (work2, two) = _one_and_two(argv, tmp_path)
  for r in (one, two):
    assert r['metrics']['prior_images'] == 2 and r['metrics']['references'] == 4
    assert r['metrics']['training']['steps'] == 4
  # The class images: sampled on every process, the same set (process 0 wrote it).
  c1, c2 = np.load(work1 / 'class_images.npz'), np.load(work2 / 'class_images.npz')
  np.testing.assert_array_equal(c2['prompts'], c1['prompts'])
  np.testing.assert_allclose(c2['images'], c1['images'], atol=1e-5)
  assert (work2 / 'references.png').is_file()
  _check_lora(work1, work2, 'train_lora')
  np.testing.assert_allclose(two['metrics']['training']['final_loss'],
                             one['metrics']['training']['final_loss'], rtol=1e-4)
