r"""Sampling-loop benchmark: DDIM + classifier-free guidance, diffusers (PyTorch) vs ours (JAX).

    python benchmarks/sampling.py --config=small --num_steps=50
    python benchmarks/sampling.py --config=sd15 --num_steps=5 --repeats=1

Same UNet weights (random init, converted), same initial latents, same prompt embeddings, SD-1.5
scheduler config. PyTorch runs the loop diffusers' StableDiffusionPipeline runs (concatenate
uncond/cond, one UNet call per step, guidance, `DDIMScheduler.step`) under `torch.inference_mode`.
Ours is `samplers.ddim` over `guidance.cfg_eps_fn`, one `jax.jit` with the parameters as arguments
(compile time reported separately). Reports the median loop time, the ratio and the max abs
difference of the final latents.
"""

from __future__ import annotations

import json
import sys
import time

from absl import app, flags

from common import CONFIGS, build_unets, environment, median_time

FLAGS = flags.FLAGS
flags.DEFINE_enum('config', 'small', ['small', 'sd15', 'all'], 'Which UNet config(s) to time.')
flags.DEFINE_integer('num_steps', 50, 'DDIM steps (sd15 runs min(num_steps, --sd15_steps)).')
flags.DEFINE_integer('sd15_steps', 5, 'Steps for the SD-1.5-shaped UNet (a full loop is minutes).')
flags.DEFINE_integer('repeats', 3, 'Timed loops per framework (median), after 1 warm-up.')
flags.DEFINE_float('guidance_scale', 7.5, 'Classifier-free guidance scale.')
flags.DEFINE_string('out', None, 'If set, also write the report as JSON to this path.')

SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                    beta_schedule='scaled_linear', clip_sample=False, set_alpha_to_one=False,
                    steps_offset=1, timestep_spacing='leading', prediction_type='epsilon')


def run_config(name: str, num_steps: int, repeats: int, scale: float) -> dict:
  import diffusers
  import jax
  import numpy as np
  import torch

  from diffgeo_jax.diffusion import guidance, samplers, schedules

  spec = CONFIGS[name]
  tmodel, model, params, cfg, _ = build_unets(name)
  rng = np.random.default_rng(0)
  b, size, cross = spec['batch'], spec['size'], cfg.per_block('cross_attention_dim')[0]
  x_T = rng.standard_normal((b, size, size, cfg.in_channels), dtype=np.float32)
  cond = rng.standard_normal((b, spec['context_len'], cross), dtype=np.float32)
  uncond = rng.standard_normal((b, spec['context_len'], cross), dtype=np.float32)

  sched = diffusers.DDIMScheduler.from_config(SD_SCHEDULER)

  def torch_loop():
    sched.set_timesteps(num_steps)
    x = torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy())
    ctx = torch.from_numpy(np.concatenate([uncond, cond]))
    with torch.inference_mode():
      for t in sched.timesteps:
        out_u, out_c = tmodel(torch.cat([x, x]), t, encoder_hidden_states=ctx).sample.chunk(2)
        x = sched.step(out_u + scale * (out_c - out_u), t, x).prev_sample
    return x.numpy().transpose(0, 2, 3, 1)

  s = schedules.from_diffusers_config(SD_SCHEDULER)

  @jax.jit
  def jax_loop(p, x, c, u):
    model_fn = lambda x, t, ctx: model.apply({'params': p}, x, t, ctx)
    return samplers.ddim(guidance.cfg_eps_fn(model_fn, c, u, scale), x, s, num_steps)

  print(f'[{name}] timing torch, {num_steps} steps x {repeats}...', flush=True)
  torch_s, torch_times, torch_foreign = median_time(torch_loop, repeats)
  ref = torch_loop()
  t0 = time.perf_counter()
  ours = np.asarray(jax_loop(params, x_T, cond, uncond))
  compile_s = time.perf_counter() - t0
  print(f'[{name}] timing jax...', flush=True)
  jax_s, jax_times, jax_foreign = median_time(
      lambda: jax_loop(params, x_T, cond, uncond).block_until_ready(), repeats)
  return {'config': name, 'num_steps': num_steps, 'batch': b, 'guidance_scale': scale,
          'torch_s': torch_s, 'jax_s': jax_s, 'torch_over_jax': torch_s / jax_s,
          'jax_compile_s': compile_s, 'max_abs_diff': float(np.abs(ours - ref).max()),
          'max_abs_out': float(np.abs(ref).max()), 'torch_times_s': torch_times,
          'jax_times_s': jax_times, 'foreign_cpu_s_torch': torch_foreign,
          'foreign_cpu_s_jax': jax_foreign}


def main(argv):
  del argv
  env = environment()
  print(json.dumps(env, indent=2), flush=True)
  names = list(CONFIGS) if FLAGS.config == 'all' else [FLAGS.config]
  rows = []
  for name in names:
    steps = min(FLAGS.num_steps, FLAGS.sd15_steps) if name == 'sd15' else FLAGS.num_steps
    rows.append(run_config(name, steps, FLAGS.repeats, FLAGS.guidance_scale))
  print('\n| config | steps | torch s/loop | jax s/loop | torch/jax | jax compile s | max abs diff |')
  print('|---|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['config']} | {r['num_steps']} | {r['torch_s']:.3f} | {r['jax_s']:.3f} | "
          f"{r['torch_over_jax']:.2f} | {r['jax_compile_s']:.1f} | {r['max_abs_diff']:.2e} |")
    print(f"[{r['config']}] CPU-seconds used by other processes while timing: torch "
          f"{r['foreign_cpu_s_torch']:.1f}, jax {r['foreign_cpu_s_jax']:.1f}")
  if FLAGS.out:
    with open(FLAGS.out, 'w') as f:
      json.dump({'command': ' '.join(sys.argv), 'environment': env, 'results': rows}, f, indent=2)


if __name__ == '__main__':
  app.run(main)
