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
(tangent-space distances vs t) and `bases.npz` (singular values, bases, trajectories); a local
folder or gs://bucket/path.

Any diffusers folder: SD (bases in the VAE's latent space), SDXL (the UNet conditioned on the
prompt's pooled embedding and the time ids of the sampled size, CFG against zeros as diffusers
without a negative prompt), the digits model (the only one with the classifier check of (c)).

Multi-host (--jax_distributed): every process runs the whole binary; the per-sample work (the
trajectories, the bases, the edits) is split over every process's devices
(`distributed.data_parallel`), each process gets the whole result, and process 0 writes.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402 (after choosing the headless backend)

from diffgeo_jax import digits, distributed, models, paths, runs  # noqa: E402
from diffgeo_jax.diffusion import (  # noqa: E402
    conditioning, guidance, pipeline, samplers, schedules)
from diffgeo_jax.digits import dataset, metrics  # noqa: E402
from diffgeo_jax.geometry import editing, grassmann, pullback, spectra  # noqa: E402
from diffgeo_jax.images import grid  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Explore config (configs/explore/*.py).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder (local or gs://).', required=True)


def _unit_rows(v: np.ndarray) -> np.ndarray:
  """Directions (k, H, W, C) rescaled to [0, 1] for display (symmetric around 0.5)."""
  scale = np.abs(v).reshape(len(v), -1).max(1)[:, None, None, None] + 1e-12
  return 0.5 + 0.5 * v / scale


# The per-sample computations below take the pipeline's parameters as arguments (replicated by
# `data_parallel`) rather than closing over them, and their batched inputs as numpy arrays, the
# same on every host: `data_parallel` then gives each device its slice of the samples.

def _with_params(pipe, params):
  return dataclasses.replace(pipe, unet_params=params['unet'], vae_params=params['vae'])


def _eps_fn(pipe, cond, uncond, scale):
  model_fn = lambda x, t, ctx: pipe.unet.apply({'params': pipe.unet_params}, x, t, ctx)
  return guidance.cfg_eps_fn(model_fn, cond, uncond, scale)


def trajectories_fn(pipe, s, config, mesh):
  """(noise, cond, uncond, params) -> DDIM (with CFG) from x_T = noise: x_0 (B, ...) and the
  trajectory's x_t at every grid step (B, steps + 1, ...)."""
  def run(noise, cond, uncond, params):
    eps_fn = _eps_fn(_with_params(pipe, params), cond, uncond, config.guidance_scale)
    x0, traj = samplers.ddim(eps_fn, noise, s, config.num_steps, return_trajectory=True)
    return x0, jnp.swapaxes(traj.x_t, 0, 1)  # every output batch-first for data_parallel
  return distributed.data_parallel(run, mesh, num_batched=3)


def bases_fn(pipe, config, mesh):
  """(x_t, cond, key data, t, unet params) -> the `LocalBasis` of each sample at timestep t
  (traced: one executable for every t)."""
  return pullback.unet_bases_fn(pipe.unet, mesh, num_vectors=config.num_vectors,
                                num_iters=config.num_iters, chunk_size=config.chunk_size or None,
                                tol=config.tol)


def edit_fn(pipe, s, config, k_edit, mesh):
  """(x_t, direction, cond, uncond, params) -> images (B, G, H, W, C) of x-space guidance along
  each sample's direction at grid step k_edit for every gamma, and the unedited images (B, ...)."""
  gammas = jnp.asarray(config.edit_gammas, jnp.float32)

  def run(x_edit, direction, cond, uncond, params):
    p = _with_params(pipe, params)
    eps_fn = _eps_fn(p, cond, uncond, config.guidance_scale)
    out = editing.edit(eps_fn, x_edit, k_edit, direction, s, config.num_steps, gamma=gammas,
                       guidance_steps=config.edit_guidance_steps)
    return (jnp.swapaxes(pipeline.decode(p, out.x0), 0, 1),  # (G, B, ...) -> (B, G, ...)
            pipeline.decode(p, out.x0_reference))
  return distributed.data_parallel(run, mesh, num_batched=4)


def mean_pairwise(bases: np.ndarray, pairs) -> float:
  if not pairs:
    return float('nan')
  return float(np.mean([grassmann.geodesic_distance(bases[i], bases[j]) for i, j in pairs]))


def plot_lines(x, series: dict, xlabel, ylabel, title):
  fig, ax = plt.subplots(figsize=(5, 3.4))
  for label, y in series.items():
    ax.plot(x, y, marker='o', label=label)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=10)
  if len(series) > 1:
    ax.legend(fontsize=8)
  fig.tight_layout()
  return fig


def main(argv):
  config, run = runs.start_main(argv, _CONFIG, _WORKDIR)
  folder = digits.pipeline_dir(config.pipeline_dir)
  with run.timed('load'):
    pipe = pipeline.replicate(models.load_pipeline(folder))  # params on every device once
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
  mesh = distributed.make_mesh()
  params = {'unet': pipe.unet_params, 'vae': pipe.vae_params}
  # Host copies, identical on every process (rule 2 of `distributed`).
  noise = np.stack([np.asarray(jax.random.normal(jax.random.key(sd), shape)) for _, sd in samples])
  # The UNet's conditioning at the sampled size (SDXL: a dict with the size/crop time ids); the
  # unconditional one as `pipeline.text_to_image` without a negative prompt (SDXL: zeros).
  cond, uncond = distributed.to_host((
      conditioning.of_prompts(pipe, [p for p, _ in samples], (h, w)),
      conditioning.unconditional(pipe, n, (h, w))))

  with run.timed('trajectories'):
    x0, traj_x = trajectories_fn(pipe, s, config, mesh)(noise, cond, uncond, params)
  grid_ts = s.inference_timesteps(config.num_steps)
  idx = [editing.edit_step_index(s, config.num_steps, tt) for tt in config.times]
  ts = [float(grid_ts[i]) for i in idx]
  logging.info('%d samples on %d device(s); bases at t = %s (k=%d)', n, jax.device_count(), ts,
               config.num_vectors)

  # -- local bases -------------------------------------------------------------------------------
  basis_fn = bases_fn(pipe, config, mesh)
  keys = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(0), n)))
  sv, lat, tan, iters = [], [], [], []
  with run.timed('bases'):
    for k, t in zip(idx, ts):
      b = basis_fn(traj_x[:, k], cond, keys, np.float32(t), params['unet'])
      sv.append(b.singular_values)
      lat.append(b.latent_basis)
      tan.append(b.tangent_basis)
      iters.append(b.num_iters_run)
      logging.info('t=%.0f: sigma_1 %.3g, iterations %s', t, sv[-1][:, 0].mean(),
                   iters[-1].tolist())
  sv, lat, tan = np.stack(sv), np.stack(lat), np.stack(tan)  # (T, n, k, ...)

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

  # (c) editing along the top latent direction at edit_time, against a random unit direction.
  k_edit = editing.edit_step_index(s, config.num_steps, config.edit_time)
  x_edit = traj_x[:, k_edit]
  with run.timed('edits'):
    b_edit = basis_fn(x_edit, cond, keys, np.float32(grid_ts[k_edit]), params['unet'])
    top = b_edit.latent_basis[:, 0]
    rand = np.asarray(jax.random.normal(jax.random.key(1), top.shape))
    rand = rand / np.sqrt(np.sum(rand ** 2, axis=(1, 2, 3), keepdims=True))
    run_edit = edit_fn(pipe, s, config, k_edit, mesh)
    imgs, ref = run_edit(x_edit, top, cond, uncond, params)
    imgs_rand, _ = run_edit(x_edit, rand, cond, uncond, params)
  imgs, imgs_rand = imgs.swapaxes(0, 1), imgs_rand.swapaxes(0, 1)  # (G, n, H, W, C)
  gammas = np.asarray(config.edit_gammas, np.float32)
  change = np.abs(imgs - ref[None]).mean(axis=(2, 3, 4))  # (G, n)
  change_rand = np.abs(imgs_rand - ref[None]).mean(axis=(2, 3, 4))
  edit_results = {
      'time': float(grid_ts[k_edit]), 'gammas': [float(g) for g in config.edit_gammas],
      'mean_abs_pixel_change_top': change.mean(1).tolist(),
      'mean_abs_pixel_change_random': change_rand.mean(1).tolist(),
  }
  if is_digits:
    scorer = metrics.Scorer.load(paths.local_folder(config.classifier_dir, 'config.classifier_dir')
                                 if config.classifier_dir else None)  # None: the shipped one
    want = np.array([dataset.parse_caption(p)[0] for p, _ in samples])
    read = scorer.predict(imgs.reshape(-1, *imgs.shape[2:]) * 2 - 1).reshape(len(gammas), n)
    edit_results['digit_kept'] = (read == want[None]).mean(1).tolist()
    small = np.abs(gammas) <= config.small_gamma + 1e-9
    edit_results['digit_kept_small_gamma'] = float((read[small] == want[None]).mean())
    edit_results['reference_digit_accuracy'] = float(np.mean(
        scorer.predict(ref * 2 - 1) == want))

  # -- outputs (process 0) -----------------------------------------------------------------------
  run.save_image('edits.png', grid(imgs.transpose(1, 0, 2, 3, 4).reshape(-1, *imgs.shape[2:]),
                                   n, len(gammas), 3))
  if lat.shape[-1] in (1, 3):
    shown = lat[:, 0, :min(config.num_vectors, 8)]  # sample 0, top directions, per time
    run.save_image('directions.png', grid(np.concatenate([_unit_rows(r) for r in shown]),
                                          len(ts), shown.shape[1], 3))
  t_frac = [t / s.num_train_timesteps for t in ts]
  run.save_figure('spectra.png', plot_lines(
      np.arange(1, config.num_vectors + 1), {f't={t:.0f}': sv[a].mean(0) for a, t in enumerate(ts)},
      'index i', 'singular value sigma_i', 'Jacobian dh/dx_t: singular values (mean over samples)'))
  run.save_figure('frequency.png', plot_lines(
      t_frac,
      {'top direction': low[:, :, 0].mean(1), f'top {config.num_vectors}': low.mean((1, 2))},
      't / T', f'energy fraction at radius < {config.psd_cutoff:g}',
      'Low-frequency content of latent directions'))
  run.save_figure('geodesic.png', plot_lines(
      t_frac, {'same prompt': d_same, 'different prompts': d_diff}, 't / T',
      f'mean geodesic distance (max {d_max:.2f})', 'Tangent spaces of different samples'))
  run.save_npz('bases.npz', times=np.array(ts), singular_values=sv, latent_basis=lat,
               tangent_basis=tan, num_iters=np.stack(iters), x0=x0,
               prompts=np.array([p for p, _ in samples]), seeds=np.array([sd for _, sd in samples]))
  run.finish({
      'samples': [{'prompt': p, 'seed': sd} for p, sd in samples], 'times': ts,
      'pipeline_dir': folder,
      'singular_values_mean': sv.mean(1).tolist(),
      'iterations': np.stack(iters).tolist(),
      'low_frequency_fraction_top': low[:, :, 0].mean(1).tolist(),
      'low_frequency_fraction_all': low.mean((1, 2)).tolist(),
      'radial_psd_top_mean': psd[:, :, 0].mean(1).tolist(),
      'geodesic_same_prompt': d_same, 'geodesic_different_prompts': d_diff,
      'geodesic_across_times_same_sample': d_time, 'geodesic_max': d_max,
      'edit': edit_results,
  })


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
