r"""Explore the latent geometry of a text-to-image diffusion model (arXiv 2302.12469, 2307.12868).

    python launch/explore.py --config=configs/explore/digits.py --workdir=/tmp/explore

For every (prompt, seed) sample: generate its DDIM trajectory, and at each of `config.times` compute
the local basis of h = U-Net mid-block output as a function of x_t (the top singular vectors of
J = dh/dx_t under the sample's own prompt, `geometry.pullback.local_basis`). Then measure:

(a) frequency: the fraction of each top latent direction's energy at low spatial frequency
    (radius < psd_cutoff cycles/image) versus t (paper 2: low frequencies early, high late);
(b) agreement: the mean Grassmann geodesic distance between the tangent spaces (h-space bases) of
    different samples versus t (paper 2: samples share tangent spaces near t = T), split into
    same-prompt and different-prompt pairs, and between times of one sample;
(c) editing: x-space guidance along each sample's top latent direction at `edit_time`, then DDIM;
    the pixel change against a random unit direction, and (digits) whether the classifier still
    reads the prompt's digit at |gamma| <= small_gamma.

Writes to --workdir: `config.json`, `results.json`, `edits.png` (one row per sample: gammas left to
right), `directions.png` (top latent directions, one row per time), `spectra.png` (singular
values), `frequency.png` (low-frequency fraction and radial PSD vs t), `geodesic.png`
(tangent-space distances vs t) and `bases.npz` (singular values, bases, trajectories).
"""

from __future__ import annotations

import itertools
import json
import os
import time

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the headless backend)

from diffgeo_jax import digits, models  # noqa: E402
from diffgeo_jax.diffusion import guidance, pipeline, samplers, schedules  # noqa: E402
from diffgeo_jax.digits import dataset, metrics  # noqa: E402
from diffgeo_jax.geometry import editing, grassmann, pullback, spectra  # noqa: E402
from diffgeo_jax.images import grid  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Explore config (configs/explore/*.py).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder.', required=True)


def _unit_rows(v: np.ndarray) -> np.ndarray:
  """Directions (k, H, W, C) rescaled to [0, 1] for display (symmetric around 0.5)."""
  scale = np.abs(v).reshape(len(v), -1).max(1)[:, None, None, None] + 1e-12
  return 0.5 + 0.5 * v / scale


def trajectories(pipe, s, cond, uncond, noise, config):
  """DDIM (with CFG) from x_T = noise: the trajectory's x_t at every grid step, and x_0."""
  model_fn = lambda x, t, ctx: pipe.unet.apply({'params': pipe.unet_params}, x, t, ctx)
  eps_fn = guidance.cfg_eps_fn(model_fn, cond, uncond, config.guidance_scale)
  run = jax.jit(lambda x: samplers.ddim(eps_fn, x, s, config.num_steps, return_trajectory=True))
  x0, traj = run(noise)
  return eps_fn, x0, traj


def bases_at(pipe, config):
  """vmapped, jitted local_basis over samples at one (traced) timestep."""
  def one(x, t, ctx, key):
    h_fn = pullback.unet_h_fn(pipe.unet, pipe.unet_params, t, ctx)
    return pullback.local_basis(h_fn, x, config.num_vectors, config.num_iters, key,
                                chunk_size=config.chunk_size or None, tol=config.tol)
  return jax.jit(jax.vmap(one, in_axes=(0, None, 0, 0)))


def mean_pairwise(bases: np.ndarray, pairs) -> float:
  if not pairs:
    return float('nan')
  return float(np.mean([grassmann.geodesic_distance(bases[i], bases[j]) for i, j in pairs]))


def plot_lines(path, x, series: dict, xlabel, ylabel, title):
  fig, ax = plt.subplots(figsize=(5, 3.4))
  for label, y in series.items():
    ax.plot(x, y, marker='o', label=label)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=10)
  if len(series) > 1:
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config, workdir = _CONFIG.value, _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json(indent=2))
  start = time.perf_counter()
  folder = config.pipeline_dir or digits.pipeline_dir()
  pipe = models.load_pipeline(folder)
  is_digits = pipe.class_name == digits.PIPELINE_CLASS
  prompts, seeds = list(config.prompts), [int(s) for s in config.seeds]
  if not prompts or not seeds:
    raise ValueError('config.prompts and config.seeds must both be non-empty')
  if is_digits:
    for p in prompts:
      dataset.check_prompt(p)
  samples = [(p, sd) for p in prompts for sd in seeds]
  n = len(samples)
  s = schedules.from_diffusers_config(pipe.scheduler_config)
  h, w = pipeline.default_image_size(pipe)
  f = pipeline.latent_factor(pipe)
  shape = (h // f, w // f, pipe.unet.config.in_channels)
  noise = jnp.stack([jax.random.normal(jax.random.key(sd), shape) for _, sd in samples])
  cond = pipeline.encode_prompts(pipe, [p for p, _ in samples])
  uncond = pipeline.encode_prompts(pipe, [''] * n)

  eps_fn, x0, traj = trajectories(pipe, s, cond, uncond, noise, config)
  grid_ts = s.inference_timesteps(config.num_steps)
  idx = [editing.edit_step_index(s, config.num_steps, tt) for tt in config.times]
  ts = [float(grid_ts[i]) for i in idx]
  logging.info('%d samples; bases at t = %s (k=%d)', n, ts, config.num_vectors)

  # -- local bases -------------------------------------------------------------------------------
  basis_fn = bases_at(pipe, config)
  keys = jax.random.split(jax.random.key(0), n)
  sv, lat, tan, iters = [], [], [], []
  for k, t in zip(idx, ts):
    b = basis_fn(traj.x_t[k], jnp.float32(t), cond, keys)
    sv.append(np.asarray(b.singular_values))
    lat.append(np.asarray(b.latent_basis))
    tan.append(np.asarray(b.tangent_basis))
    iters.append(np.asarray(b.num_iters_run))
    logging.info('t=%.0f: sigma_1 %.3g, iterations %s', t, sv[-1][:, 0].mean(), iters[-1].tolist())
  sv, lat, tan = np.stack(sv), np.stack(lat), np.stack(tan)  # (T, n, k, ...)
  basis_s = time.perf_counter() - start

  # (a) frequency content of the latent directions.
  low = np.asarray(spectra.low_frequency_fraction(jnp.asarray(lat), config.psd_cutoff))  # (T, n, k)
  psd = np.asarray(spectra.radial_psd(jnp.asarray(lat)))  # (T, n, k, bins)
  psd = psd / psd.sum(-1, keepdims=True)
  # (b) tangent-space agreement between samples, and across time for one sample.
  same = [(i, j) for i, j in itertools.combinations(range(n), 2) if samples[i][0] == samples[j][0]]
  diff = [(i, j) for i, j in itertools.combinations(range(n), 2) if samples[i][0] != samples[j][0]]
  d_same = [mean_pairwise(tan[a], same) for a in range(len(ts))]
  d_diff = [mean_pairwise(tan[a], diff) for a in range(len(ts))]
  d_time = [[float(np.mean([grassmann.geodesic_distance(tan[a, i], tan[b, i]) for i in range(n)]))
             for b in range(len(ts))] for a in range(len(ts))]
  d_max = float(np.pi / 2 * np.sqrt(config.num_vectors))

  # (c) editing along the top latent direction at edit_time.
  k_edit = editing.edit_step_index(s, config.num_steps, config.edit_time)
  x_edit = traj.x_t[k_edit]
  b_edit = basis_fn(x_edit, jnp.float32(grid_ts[k_edit]), cond, keys)
  top = b_edit.latent_basis[:, 0]
  rand = jax.random.normal(jax.random.key(1), top.shape)
  rand = rand / jnp.sqrt(jnp.sum(rand ** 2, axis=(1, 2, 3), keepdims=True))
  gammas = jnp.asarray(config.edit_gammas, jnp.float32)
  run_edit = jax.jit(lambda d: editing.edit(eps_fn, x_edit, k_edit, d, s, config.num_steps,
                                            gamma=gammas, guidance_steps=config.edit_guidance_steps))
  edited, edited_rand = run_edit(top), run_edit(rand)
  imgs = np.asarray(pipeline.decode(pipe, edited.x0))  # (G, n, H, W, C)
  imgs_rand = np.asarray(pipeline.decode(pipe, edited_rand.x0))
  ref = np.asarray(pipeline.decode(pipe, edited.x0_reference))
  change = np.abs(imgs - ref[None]).mean(axis=(2, 3, 4))  # (G, n)
  change_rand = np.abs(imgs_rand - ref[None]).mean(axis=(2, 3, 4))
  edit_results = {
      'time': float(grid_ts[k_edit]), 'gammas': [float(g) for g in config.edit_gammas],
      'mean_abs_pixel_change_top': change.mean(1).tolist(),
      'mean_abs_pixel_change_random': change_rand.mean(1).tolist(),
  }
  if is_digits:
    scorer = metrics.Scorer.load(config.classifier_dir or None)
    want = np.array([dataset.parse_caption(p)[0] for p, _ in samples])
    read = scorer.predict(imgs.reshape(-1, *imgs.shape[2:]) * 2 - 1).reshape(len(gammas), n)
    edit_results['digit_kept'] = (read == want[None]).mean(1).tolist()
    small = np.abs(np.asarray(gammas)) <= config.small_gamma + 1e-9
    edit_results['digit_kept_small_gamma'] = float((read[small] == want[None]).mean())
    edit_results['reference_digit_accuracy'] = float(np.mean(
        scorer.predict(ref * 2 - 1) == want))

  # -- outputs -----------------------------------------------------------------------------------
  grid(imgs.transpose(1, 0, 2, 3, 4).reshape(-1, *imgs.shape[2:]), n, len(gammas), 3).save(
      os.path.join(workdir, 'edits.png'))
  if lat.shape[-1] in (1, 3):
    shown = lat[:, 0, :min(config.num_vectors, 8)]  # sample 0, top directions, per time
    grid(np.concatenate([_unit_rows(r) for r in shown]), len(ts), shown.shape[1], 3).save(
        os.path.join(workdir, 'directions.png'))
  t_frac = [t / s.num_train_timesteps for t in ts]
  plot_lines(os.path.join(workdir, 'spectra.png'), np.arange(1, config.num_vectors + 1),
             {f't={t:.0f}': sv[a].mean(0) for a, t in enumerate(ts)}, 'index i',
             'singular value sigma_i', 'Jacobian dh/dx_t: singular values (mean over samples)')
  plot_lines(os.path.join(workdir, 'frequency.png'), t_frac,
             {'top direction': low[:, :, 0].mean(1), f'top {config.num_vectors}': low.mean((1, 2))},
             't / T', f'energy fraction at radius < {config.psd_cutoff:g}',
             'Low-frequency content of latent directions')
  plot_lines(os.path.join(workdir, 'geodesic.png'), t_frac,
             {'same prompt': d_same, 'different prompts': d_diff}, 't / T',
             f'mean geodesic distance (max {d_max:.2f})', 'Tangent spaces of different samples')
  np.savez(os.path.join(workdir, 'bases.npz'), times=np.array(ts), singular_values=sv,
           latent_basis=lat, tangent_basis=tan, num_iters=np.stack(iters), x0=np.asarray(x0),
           prompts=np.array([p for p, _ in samples]), seeds=np.array([sd for _, sd in samples]))
  results = {
      'samples': [{'prompt': p, 'seed': sd} for p, sd in samples], 'times': ts,
      'singular_values_mean': sv.mean(1).tolist(),
      'iterations': np.stack(iters).tolist(),
      'low_frequency_fraction_top': low[:, :, 0].mean(1).tolist(),
      'low_frequency_fraction_all': low.mean((1, 2)).tolist(),
      'radial_psd_top_mean': psd[:, :, 0].mean(1).tolist(),
      'geodesic_same_prompt': d_same, 'geodesic_different_prompts': d_diff,
      'geodesic_across_times_same_sample': d_time, 'geodesic_max': d_max,
      'edit': edit_results,
      'settings': {k: config[k] for k in ('num_steps', 'guidance_scale', 'num_vectors',
                                          'num_iters', 'tol', 'psd_cutoff', 'edit_time',
                                          'edit_guidance_steps')} | {'pipeline_dir': folder},
      'timing': {'bases_s': basis_s, 'total_s': time.perf_counter() - start},
      'device_kind': jax.devices()[0].device_kind,
  }
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2)
  logging.info('wrote %s', workdir)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
