r"""Upsample guidance (arXiv 2404.01709) on a digits model: sampling above the training resolution.

    python launch/upsample.py --config=configs/upsample/digits.py --workdir=/tmp/upsample

Samples every "a <colour> digit <d>" prompt at `factor` x the model's resolution in each of
`config.variants`, all from the same initial noise x_T, and reads each sample, average-pooled back
to the model's resolution, with the digits classifier:

* native   the model at its own resolution from factor * D(x_T) (unit variance; what the guided
           run's low-resolution branch starts from), the reference;
* plain    the model run directly at the higher resolution;
* guided   with upsample guidance (`guidance.UpsampleGuidance(weight, eta, order)`);
* no_time, no_power   guided without the time adjustment (tau = t) or the power adjustment
           (P_t = 1): the paper's ablations.

Any other pipeline folder (SD, SDXL; `config.prompts` names the prompts, `config.eta` is the
guided fraction of the trajectory, the paper's 0.6 for latent models): the same variants from the
same x_T (latent pipelines: in the latent space, images decoded by the VAE), without the digits
classifier (no accuracies; the difference to native remains). SDXL is conditioned with the time
ids of the size sampled.

Writes to --workdir (a local folder or gs://bucket/path): `config.json`; `results.json` (metrics,
per variant: digit, colour and joint accuracy of the downsampled samples (digits model only), the
mean absolute difference of D(sample) to the native sample from the same noise, seconds of its
one jitted call including compilation); `comparison.png` (rows: prompts; columns: the variants,
native ones enlarged by pixel repetition); `accuracy.png` (bar chart, digits model only);
`samples.npz`. Multi-host (--jax_distributed): every process samples the same batches, each sharded over every device
(`pipeline.text_to_image`), and scores the gathered images; process 0 writes.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from diffgeo_jax import digits, models, paths, runs
from diffgeo_jax.diffusion import guidance, pipeline, resolution
from diffgeo_jax.digits import classifier, dataset, metrics
from diffgeo_jax.images import grid

_CONFIG = config_flags.DEFINE_config_file('config', None, 'configs/upsample/*.py')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder (local or gs://).', required=True)

VARIANTS = ('native', 'plain', 'guided', 'no_time', 'no_power')


def variant_guidance(name: str, config) -> guidance.Guidance:
  """The guidance of a variant: CFG at config.guidance_scale, inside upsample guidance but for
  'native' and 'plain'."""
  if name not in VARIANTS:
    raise ValueError(f'unknown variant {name!r} in config.variants; supported: {VARIANTS}')
  cfg = guidance.CFG(float(config.guidance_scale))
  if name in ('native', 'plain'):
    return cfg
  return guidance.UpsampleGuidance(
      factor=int(config.factor), weight=float(config.weight), eta=float(config.eta),
      order=config.order, time_adjustment=name != 'no_time', power_adjustment=name != 'no_power',
      inner=cfg)


def prompts_of(config) -> tuple[list[str], np.ndarray | None, np.ndarray | None]:
  """Texts (`samples_per_prompt` each) and, for the digits grid, their digits and colour indices:
  `config.prompts` when it names any (digits and colours None), else every "a <colour> digit
  <d>" of `config.digits` x `config.colours`, digit-major."""
  if config.samples_per_prompt < 1:
    raise ValueError(f'config.samples_per_prompt must be >= 1, got {config.samples_per_prompt}')
  if config.get('prompts'):
    return ([str(p) for p in config.prompts for _ in range(config.samples_per_prompt)], None,
            None)
  if not config.digits or not config.colours:
    raise ValueError('config.digits and config.colours (or config.prompts) are needed')
  jobs = [(dataset.caption(int(d), c), int(d), dataset.COLOURS.index(c))
          for d in config.digits for c in config.colours for _ in range(config.samples_per_prompt)]
  for text, _, _ in jobs:
    dataset.check_prompt(text)
  return ([j[0] for j in jobs], np.array([j[1] for j in jobs], np.int32),
          np.array([j[2] for j in jobs], np.int32))


def sample(pipe, config, name: str, texts, noise_high) -> tuple[np.ndarray, float]:
  """Images in [0, 1] for one variant (high resolution, or native for 'native'), and seconds
  (one jitted call of all images, compilation included)."""
  m = int(config.factor)
  kw = dict(num_steps=config.num_steps, sampler=config.sampler,
            guidance=variant_guidance(name, config))
  if name == 'native':
    noise = m * resolution.avg_pool(noise_high, m)  # D x_T has variance 1/m^2
  else:
    noise = noise_high
    f = pipeline.latent_factor(pipe)
    kw.update(height=noise.shape[1] * f, width=noise.shape[2] * f)
  start = time.perf_counter()
  images = np.asarray(pipeline.text_to_image(pipe, texts, jax.random.key(config.seed),
                                             latents=noise, **kw))
  return images, time.perf_counter() - start


def plot_accuracy(results: dict):
  """Bar chart of each variant's digit and colour accuracy (a matplotlib Figure)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  names = list(results)
  fig = Figure(figsize=(6, 3.2))
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  x = np.arange(len(names))
  for i, (key, label) in enumerate((('digit_accuracy', 'digit'), ('colour_accuracy', 'colour'))):
    vals = [results[n][key] for n in names]
    bars = ax.bar(x + (i - 0.5) * 0.38, vals, 0.38, label=label)
    ax.bar_label(bars, fmt='%.2f', fontsize=7)
  ax.set_xticks(x, names)
  ax.set_ylim(0, 1.3)
  ax.set_ylabel('accuracy of D(sample)')
  ax.legend(loc='upper center', ncol=2)
  ax.set_title('digits model (16x16) sampled at 32x32')
  fig.tight_layout()
  return fig


def main(argv):
  config, run = runs.start_main(argv, _CONFIG, _WORKDIR)
  names = list(config.variants)
  for n in names:
    variant_guidance(n, config)  # unknown names fail before any sampling
  texts, want_digits, want_colours = prompts_of(config)
  with run.timed('load'):
    pipe = pipeline.replicate(models.load_pipeline(digits.pipeline_dir(config.pipeline_dir)))
  is_digits = pipe.class_name == digits.PIPELINE_CLASS
  if not is_digits and want_digits is not None:
    raise ValueError(f'{config.pipeline_dir} is not the digits model: name its prompts in '
                     'config.prompts (the digit captions are the digits model\'s)')
  for text in texts if is_digits else ():
    dataset.check_prompt(text)
  scorer = None
  if is_digits and want_digits is not None:  # the digits classifier reads the digits grid only
    scorer = metrics.Scorer.load(paths.local_folder(
        digits.classifier_dir(config.classifier_dir), 'config.classifier_dir'))
  m, f = int(config.factor), pipeline.latent_factor(pipe)
  h, w = pipeline.default_image_size(pipe)
  noise_high = jax.random.normal(jax.random.key(config.seed), (
      len(texts), h // f * m, w // f * m, pipe.unet.config.in_channels))

  images, results = {}, {}
  for name in names:
    logging.info('sampling %s: %d images', name, len(texts))
    with run.timed(f'sampling_{name}'):
      images[name], seconds = sample(pipe, config, name, texts, noise_high)
    low = images[name] if name == 'native' else np.asarray(
        resolution.avg_pool(jnp.asarray(images[name]), m))
    results[name] = {'sampling_s': seconds}
    if scorer is not None:
      x = low * 2.0 - 1.0  # the classifier reads [-1, 1]
      pred = scorer.predict(x)
      colour = classifier.colour_index(x)
      results[name].update({
          'digit_accuracy': float(np.mean(pred == want_digits)),
          'colour_accuracy': float(np.mean(colour == want_colours)),
          'joint_accuracy': float(np.mean((pred == want_digits) & (colour == want_colours))),
      })
    if 'native' in images and name != 'native':
      results[name]['mean_abs_diff_to_native'] = float(np.mean(np.abs(low - images['native'])))
    if name != 'native':
      ug = variant_guidance(name, config)
      results[name]['guidance'] = None if ug is None else dataclasses.asdict(ug)
    logging.info('%s: %s', name, results[name])

  if want_digits is not None:  # digit d in colour d mod |colours|, first sample
    rows = [i * config.samples_per_prompt * len(config.colours)
            + (i % len(config.colours)) * config.samples_per_prompt
            for i in range(min(config.grid_prompts, len(config.digits)))]
  else:  # the first sample of each of the first grid_prompts prompts
    rows = [i * config.samples_per_prompt
            for i in range(min(config.grid_prompts, len(config.prompts)))]
  cols = [images[n][rows] if n != 'native' else
          np.asarray(resolution.nearest_upsample(jnp.asarray(images[n][rows]), m))
          for n in names]
  run.save_image('comparison.png', grid(np.stack(cols, 1).reshape(-1, *cols[0].shape[1:]),
                                        len(rows), len(names), config.grid_scale))
  if scorer is not None:
    run.save_figure('accuracy.png', plot_accuracy(results))
  run.save_npz('samples.npz', prompts=np.array(texts), **images)
  run.finish({'variants': results, 'num_images_per_variant': len(texts),
              'resolution': [h * m, w * m], 'model_resolution': [h, w],
              'grid_rows': [texts[r] for r in rows], 'grid_columns': names})


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
