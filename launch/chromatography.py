r"""Resolution chromatography (arXiv 2401.10247) of a pipeline's schedule, and time-dependent prompt
composition on the digits model measured against the chromatogram's prediction.

    python launch/chromatography.py --config=configs/chromatography/digits.py --workdir=/tmp/chrom

1. Chromatograms: the signal fraction S_m(t) = alpha_bar_t / P_t and the generation rate
   g_m = -dS_m/dt for each factor m (`chromatography`), with peak times and the SNR-matched
   timesteps, for the pipeline's schedule (and SD's scaled-linear one).
2. Prompt switching: every sample uses the first prompt while t > t_s and the second after
   (`pipeline.text_to_image(late_prompts=..., guidance=PromptSwitch(t_s))`), from the same initial
   noise for every t_s. Experiment `colour` switches the colour word ("a red digit 3" -> "a blue
   digit 3"), `digit` the digit. Measured: the fraction of samples that keep the FIRST prompt's
   attribute (colour read from the pixels; digit read by the classifier) and the fraction that
   show the second one, against t_s.
   The chromatogram's prediction: an attribute carried by resolution m is settled once most of
   that resolution's signal is generated, S_m(t_s) ~ 1/2, i.e. SNR(t_s) = 1/m^2
   (`chromatography.switch_time`). The curve is compared with S_m(t_s) for each m, and the time
   where it crosses 1/2 gives the attribute's effective resolution (the m whose S_m crosses 1/2
   at the same t).

Writes to --workdir (a local folder or gs://bucket/path): `config.json`, `results.json`,
`chromatogram.png` (and `chromatogram_sd.png`), `switch.png` (measured curves and S_m(t_s)),
`switch_<experiment>.png` (rows: switch times from early to late; columns: samples),
`samples.npz`. Multi-host (--jax_distributed): every process samples the same batches, each
sharded over every device (`pipeline.text_to_image`), and scores the gathered images; process 0
writes.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from diffgeo_jax import digits, models, paths, runs
from diffgeo_jax.diffusion import (chromatography, guidance, pipeline, resolution, samplers,
                                   schedules)
from diffgeo_jax.digits import classifier, dataset, metrics
from diffgeo_jax.images import grid

_CONFIG = config_flags.DEFINE_config_file('config', None, 'configs/chromatography/*.py')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder (local or gs://).', required=True)

EXPERIMENTS = ('colour', 'digit')


def schedule_summary(s, factors) -> dict:
  """Peak times of g_m (and of the band g_m - g_2m), the S_m = 1/2 times, and tau(t) for m = 2."""
  return {
      'peak_time': {str(m): int(chromatography.peak_time(s, m)) for m in factors},
      'band_peak_time': {str(m): int(chromatography.peak_time(s, m, band=True)) for m in factors},
      'half_time': {str(m): float(chromatography.switch_time(s, m)) for m in factors},
      'tau_m2': {str(t): float(resolution.adjusted_timestep(s, t, 2))
                 for t in (999, 800, 600, 400, 200)},
  }


def cases(config, experiment: str) -> list[tuple[str, str, int, int]]:
  """(first prompt, second prompt, first attribute, second attribute) per sample."""
  out = []
  for d in range(10):
    for c1, c2 in config.colour_pairs:
      for _ in range(config.samples_per_case):
        if experiment == 'colour':
          out.append((dataset.caption(d, c1), dataset.caption(d, c2), dataset.COLOURS.index(c1),
                      dataset.COLOURS.index(c2)))
        else:
          d2 = (d + config.digit_shift) % 10
          out.append((dataset.caption(d, c1), dataset.caption(d2, c1), d, d2))
  for first, second, _, _ in out:
    dataset.check_prompt(first)
    dataset.check_prompt(second)
  return out


def crossing(ts, frac, level: float = 0.5) -> float | None:
  """The t where the measured fraction (rising as t_s decreases) first reaches `level`, linearly
  interpolated between switch times; None if it never does."""
  order = np.argsort(ts)[::-1]  # from early (large t) to late
  t, f = np.asarray(ts, float)[order], np.asarray(frac, float)[order]
  for i in range(1, len(t)):
    if f[i - 1] < level <= f[i]:
      return float(t[i - 1] + (level - f[i - 1]) * (t[i] - t[i - 1]) / (f[i] - f[i - 1]))
  return None


def effective_factor(s, t_cross: float | None) -> float | None:
  """The m with S_m(t_cross) = 1/2, i.e. m = 1 / sqrt(SNR(t_cross)) (a real number)."""
  if t_cross is None:
    return None
  return float(math.exp(-0.5 * float(s.log_snr_at(t_cross))))


def plot_chromatogram(s, factors, band: bool = False, title: str | None = None):
  """A two-panel matplotlib Figure: S_m(t) and g_m(t) (or the band-pass g_m - g_2m) for each m in
  `factors`, with the peaks marked (save it with `fig.savefig` or `paths.save_figure`)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazily: plotting is optional
  from matplotlib.figure import Figure
  factors = list(factors)
  if not factors:
    raise ValueError('factors must be a non-empty sequence of positive numbers')
  for m in factors:
    resolution.check_factor(m, 'factors')
  t = np.arange(s.num_train_timesteps)
  fig = Figure(figsize=(7, 6))
  FigureCanvasAgg(fig)
  ax_s, ax_g = fig.subplots(2, 1, sharex=True)
  for m in factors:
    g = np.asarray(chromatography.band_generation_rate(s, m) if band
                   else chromatography.generation_rate(s, m))
    line, = ax_s.plot(t, np.asarray(chromatography.signal_fraction(s, m)), label=f'm = {m:g}')
    ax_g.plot(t, g, color=line.get_color())
    pk = int(np.argmax(g))
    ax_g.axvline(pk, color=line.get_color(), ls=':', lw=1)
    ax_g.annotate(f'{pk}', (pk, g[pk]), textcoords='offset points', xytext=(3, 3), fontsize=8)
  ax_s.set_ylabel('signal fraction $S_m(t)$')
  ax_g.set_ylabel(r'$g_m - g_{2m}$' if band else r'generation rate $-dS_m/dt$')
  ax_g.set_xlabel('timestep t (sampling runs right to left)')
  ax_s.legend()
  ax_s.set_title(title or 'resolution chromatogram')
  fig.tight_layout()
  return fig


def plot_switch(s, measured: dict, factors):
  """The measured switch curves against S_m(t_s) (a matplotlib Figure)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(7, 4))
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  t = np.arange(s.num_train_timesteps)
  for m in factors:
    ax.plot(t, np.asarray(chromatography.signal_fraction(s, m)), ls=':', lw=1,
            label=f'$S_{{{m}}}(t_s)$')
  for name, rec in measured.items():
    ax.plot(rec['switch_times'], rec['keep_first'], marker='o', lw=2,
            label=f'{name}: fraction keeping the first prompt\'s {name}')
  ax.set_xlabel('switch time $t_s$ (first prompt for t > $t_s$)')
  ax.set_ylabel('fraction')
  ax.set_xlim(s.num_train_timesteps, 0)
  ax.legend(fontsize=7, loc='center left')
  ax.set_title('prompt switching vs the chromatogram')
  fig.tight_layout()
  return fig


def main(argv):
  config, run = runs.start_main(argv, _CONFIG, _WORKDIR)
  for e in config.experiments:
    if e not in EXPERIMENTS:
      raise ValueError(f'unknown experiment {e!r} in config.experiments; supported: {EXPERIMENTS}')
  if not config.switch_times:
    raise ValueError('config.switch_times must be non-empty')
  with run.timed('load'):
    pipe = pipeline.replicate(models.load_pipeline(digits.pipeline_dir(config.pipeline_dir)))
    digits.require_pipeline(pipe, 'launch/chromatography.py')
    scorer = metrics.Scorer.load(paths.local_folder(
        digits.classifier_dir(config.classifier_dir), 'config.classifier_dir'))
  s = schedules.from_diffusers_config(pipe.scheduler_config)
  factors = [int(m) for m in config.factors]
  results = {'schedule': schedule_summary(s, factors),
             'grid_timesteps': [int(t) for t in samplers.timesteps(config.sampler, s,
                                                                     config.num_steps)]}
  run.save_figure('chromatogram.png', plot_chromatogram(
      s, factors, title='digits model schedule (DDPM linear)'))
  if config.plot_sd_schedule:
    sd = schedules.scaled_linear()
    results['sd_schedule'] = schedule_summary(sd, factors)
    run.save_figure('chromatogram_sd.png', plot_chromatogram(
        sd, factors, title='SD scaled-linear schedule'))

  h, w = pipeline.default_image_size(pipe)
  measured, arrays = {}, {}
  for experiment in config.experiments:
    jobs = cases(config, experiment)
    first, second = [j[0] for j in jobs], [j[1] for j in jobs]
    a1, a2 = np.array([j[2] for j in jobs]), np.array([j[3] for j in jobs])
    noise = jax.random.normal(jax.random.key(config.seed),
                              (len(jobs), h, w, pipe.unet.config.in_channels))
    keep, show, per_t = [], [], []
    for t_s in config.switch_times:
      # One executable for every t_s: the switch time is a traced argument.
      with run.timed(f'sampling_{experiment}'):
        images = np.asarray(pipeline.text_to_image(
            pipe, first, jax.random.key(config.seed), latents=noise, num_steps=config.num_steps,
            sampler=config.sampler, late_prompts=second, guidance=chromatography.PromptSwitch(
                float(t_s), inner=guidance.CFG(config.guidance_scale))))
      x = images * 2.0 - 1.0
      got = classifier.colour_index(x) if experiment == 'colour' else scorer.predict(x)
      keep.append(float(np.mean(got == a1)))
      show.append(float(np.mean(got == a2)))
      per_t.append(images[:config.grid_samples])
      logging.info('%s switch at t_s=%s: keep first %.3f, show second %.3f', experiment, t_s,
                   keep[-1], show[-1])
    t_cross = crossing(config.switch_times, keep)
    measured[experiment] = {
        'switch_times': [float(t) for t in config.switch_times], 'keep_first': keep,
        'show_second': show, 'num_samples': len(jobs),
        'half_crossing_t': t_cross, 'effective_factor': effective_factor(s, t_cross),
        'predicted_keep_first': {str(m): [float(chromatography.signal_fraction(s, m)[
            int(min(max(round(t), 0), s.num_train_timesteps - 1))]) for t in config.switch_times]
            for m in factors},
    }
    arrays[experiment] = np.stack(per_t)
    run.save_image(f'switch_{experiment}.png', grid(
        arrays[experiment].reshape(-1, *arrays[experiment].shape[2:]), len(config.switch_times),
        arrays[experiment].shape[1], 2))
  results['switch'] = measured
  run.save_figure('switch.png', plot_switch(s, measured, factors))
  run.save_npz('samples.npz', **arrays)
  run.finish(results)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
