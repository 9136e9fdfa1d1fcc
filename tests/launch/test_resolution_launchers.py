"""launch/upsample.py and launch/chromatography.py with their quick configs on a tiny random digits
pipeline, as a user runs them; their numbers are recomputed from what they wrote."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffgeo_jax import digits, models
from diffgeo_jax.diffusion import pipeline, resolution
from diffgeo_jax.digits import classifier, metrics
from tests import compile_cache

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(script, config, workdir, *flags):
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch', script),
       f'--config={os.path.join(ROOT, "configs", config)}:quick', f'--workdir={workdir}', *flags],
      capture_output=True, text=True, timeout=600, env=compile_cache.env(),
      cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((workdir / 'results.json').read_text())
  assert results['binary'] == script[:-3] and results['runtime']['processes'] == 1
  assert json.loads((workdir / 'config.json').read_text()) == results['config']
  return results


@pytest.fixture(scope='module')
def scorer():
  return metrics.Scorer.load(digits.classifier_dir())


def test_upsample_launcher(tmp_path, tiny_digits_pipeline_dir, scorer):
  results = _run('upsample.py', 'upsample/digits.py', tmp_path,
                 f'--config.pipeline_dir={tiny_digits_pipeline_dir}')
  for name in ('comparison.png', 'accuracy.png', 'samples.npz', 'config.json'):
    assert (tmp_path / name).is_file(), name
  out = np.load(tmp_path / 'samples.npz')
  variants = results['metrics']['variants']
  assert results['config']['factor'] == 2
  assert 0 < results['wall_s']['sampling_guided'] <= results['wall_s']['total']
  assert list(variants) == ['native', 'plain', 'guided', 'no_time', 'no_power']
  assert out['native'].shape == (10, 16, 16, 3) and out['guided'].shape == (10, 32, 32, 3)
  want = np.arange(10)  # quick: one red sample per digit, digit-major
  for name, rec in variants.items():
    low = out[name] if name == 'native' else np.asarray(
        resolution.avg_pool(jnp.asarray(out[name]), 2))
    x = low * 2 - 1
    np.testing.assert_allclose(rec['digit_accuracy'], np.mean(scorer.predict(x) == want))
    np.testing.assert_allclose(rec['colour_accuracy'],
                               np.mean(classifier.colour_index(x) == 0))  # red
    if name != 'native':
      np.testing.assert_allclose(rec['mean_abs_diff_to_native'],
                                 np.mean(np.abs(low - out['native'])), rtol=1e-5)
  # The ablations differ from the full guidance and from each other; all from the same noise.
  for a, b in (('guided', 'no_time'), ('guided', 'no_power'), ('guided', 'plain')):
    assert np.abs(out[a] - out[b]).mean() > 1e-4, (a, b)
  assert variants['no_time']['guidance']['time_adjustment'] is False
  assert variants['no_power']['guidance']['power_adjustment'] is False


def test_upsample_launcher_rejects_unknown_variant(tmp_path, tiny_digits_pipeline_dir):
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch', 'upsample.py'),
       f'--config={os.path.join(ROOT, "configs", "upsample", "digits.py")}:quick',
       f'--config.pipeline_dir={tiny_digits_pipeline_dir}', "--config.variants=('guided', 'x')",
       f'--workdir={tmp_path}'],
      capture_output=True, text=True, timeout=120, env=compile_cache.env(),
      cwd=ROOT)
  assert proc.returncode != 0
  assert "unknown variant 'x' in config.variants" in proc.stderr


def test_chromatography_launcher(tmp_path, tiny_digits_pipeline_dir, scorer):
  results = _run('chromatography.py', 'chromatography/digits.py', tmp_path,
                 f'--config.pipeline_dir={tiny_digits_pipeline_dir}')
  for name in ('chromatogram.png', 'chromatogram_sd.png', 'switch.png', 'switch_colour.png',
               'switch_digit.png', 'samples.npz'):
    assert (tmp_path / name).is_file(), name
  # The digits schedule is DDPM's linear one: the notes' reference peaks (m = 1, 2, 4, 8: 219,
  # 408, 546, 656; 407 in float32, where the curve is flat to 1e-5) and SD's (313, 599, 780, 917).
  m = results['metrics']
  peaks = m['schedule']['peak_time']
  assert [peaks[m] for m in ('1', '4', '8')] == [219, 546, 656] and peaks['2'] in (407, 408)
  assert [m['sd_schedule']['peak_time'][f] for f in ('1', '2', '4', '8')] == [
      313, 599, 780, 917]
  # Switch end points: t_s = 995 is above every grid timestep (the second prompt throughout),
  # t_s = 0 below every one (the first throughout); recompute the colour one from scratch.
  pipe = models.load_pipeline(tiny_digits_pipeline_dir)
  colour = m['switch']['colour']
  assert colour['switch_times'] == [995.0, 500.0, 0.0]
  noise = jax.random.normal(jax.random.key(0), (10, 16, 16, 3))
  firsts = [f'a red digit {w}' for w in ('zero', 'one', 'two', 'three', 'four', 'five', 'six',
                                         'seven', 'eight', 'nine')]
  seconds = [p.replace('red', 'blue') for p in firsts]
  for t_index, prompts in ((0, seconds), (2, firsts)):
    images = np.asarray(pipeline.text_to_image(pipe, prompts, jax.random.key(0), num_steps=3,
                                               guidance=1.5, latents=noise))
    got = classifier.colour_index(images * 2 - 1)
    np.testing.assert_allclose(colour['keep_first'][t_index], np.mean(got == 0))
    np.testing.assert_allclose(colour['show_second'][t_index], np.mean(got == 2))
  s_half = {f: float(v) for f, v in m['schedule']['half_time'].items()}
  assert s_half['1'] < s_half['2'] < s_half['4'] < s_half['8']  # coarser settles earlier


def test_chromatogram_plot():
  """The binary's figure (its module defines absl flags, so it is imported in a process of its
  own): two panels with S_m for each m; the band panel plots the library's g_m - g_2m."""
  script = textwrap.dedent('''
      import io, json
      import numpy as np
      from diffgeo_jax.diffusion import chromatography, schedules
      from launch import chromatography as binary
      fig = binary.plot_chromatogram(schedules.scaled_linear(), [1, 2, 4, 8])
      buf = io.BytesIO()
      fig.savefig(buf, format='png')
      band = binary.plot_chromatogram(schedules.linear(), [2], band=True)
      err = np.max(np.abs(band.axes[1].lines[0].get_ydata() - np.asarray(
          chromatography.band_generation_rate(schedules.linear(), 2))))
      try:
        binary.plot_chromatogram(schedules.scaled_linear(), [0])
        refused = ''
      except ValueError as e:
        refused = str(e)
      print(json.dumps(dict(axes=len(fig.axes), lines=len(fig.axes[0].lines),
                            png=buf.getvalue()[:4].hex(), band_label=band.axes[1].get_ylabel(),
                            band_err=float(err), refused=refused)))
  ''')
  out = subprocess.run([sys.executable, '-c', script], check=True, capture_output=True, text=True,
                       cwd=ROOT, env=compile_cache.env())
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert (got['axes'], got['lines'], got['png']) == (2, 4, '89504e47')
  assert got['band_label'] == r'$g_m - g_{2m}$' and got['band_err'] == 0.0
  assert 'factors must be a positive number' in got['refused']
