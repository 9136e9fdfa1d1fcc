r"""Upsample-guidance benchmark: what the guidance costs per sample, ours (JAX) vs PyTorch.

    python benchmarks/upsample_guidance.py --config=all --repeats=3
    python benchmarks/upsample_guidance.py --config=digits --digits_steps=50 --digits_batch=8
    python benchmarks/upsample_guidance.py --config=small --small_steps=5 --small_batch=4 \
        --out=/tmp/ug_small.json

Upsample guidance (Hwang, Park & Jo, arXiv 2404.01709; notes section 3) samples at m times the
model's native resolution and adds, per guided step, one model pass on the m x m average-pooled
x_t at the adjusted timestep tau(t):

    eps_hat = eps(x_t, t) + w_t U[eps(D x_t / sqrt(P_t), tau(t)) / m - D eps(x_t, t)]

so it costs one extra U-Net pass at 1/m^2 of the pixels per guided step: an overhead of about
eta / m^2 of the pixel work (25% at m = 2, eta = 1). This script measures it. Per config, a full
DDIM + classifier-free guidance loop at m times the native size runs four ways in one process,
on the same weights, initial noise (B, mH, mW, C) and embeddings:

* torch plain: diffusers' pipeline loop (as benchmarks/sampling.py: concatenate uncond/cond, one
  `UNet2DConditionModel` call per step, CFG, `DDIMScheduler.step`) under `torch.inference_mode`.
* torch guided: the same loop with upsample guidance written here in torch from the formula:
  D = `F.avg_pool2d(m)`, U = `F.interpolate(mode='nearest')`, P_t = alpha_bar_t + (1 -
  alpha_bar_t) / m^2, tau(t) the float timestep with log SNR(tau) = log SNR(t) + 2 ln m (linear
  interpolation of the log-SNR table), applied after CFG (the low-resolution pass is CFG-guided
  too: one more batched UNet call on [y, y] with the same embeddings).
* ours plain: `samplers.ddim` over `guidance.cfg_eps_fn`, one `jax.jit` (parameters as arguments).
* ours guided: `samplers.ddim` over `guidance.upsample_cfg_eps_fn(..., order='after')`, one jit.

Timings are medians over `--repeats` rounds after one warm-up loop each; a round runs the four
loops one after the other (interleaved, so that drift of the machine during the run hits all four
alike: the overhead is a small difference of two times that vary by ~10% between runs). Ours'
compile time (trace + XLA compile + the first loop) is reported separately. The guidance overhead
(guided / plain - 1) of each framework is set beside three predictions: pixels (the fraction of
guided steps times 1/m^2), FLOPs (the same fraction times the ratio of the UNet forward's FLOPs
at the native vs the sampled size, counted by torch's FlopCounterMode with the math attention
kernel: convolutions, linear layers and attention matmuls, so attention's quadratic cost in the
number of pixels counts; XLA's cost analysis is not used: it misses most of our chunked
attention, a `lax.map` loop) and forward time (the fraction times the measured ratio of
one UNet forward, per framework, at the two sizes). Agreement: the max abs difference of the final
samples, ours vs torch, plain and guided.

Configs: `digits` = the shipped digits UNet (16x16x3 native, sampled at 32x32; its DDPM-linear
scheduler config; context from its text encoder, `--prompt` and the empty prompt; CFG 1.5, its
evaluation setting). `small` = benchmarks/common.py's small UNet, random init (32x32x4 native,
sampled at 64x64; SD-1.5 scheduler config; random 77x32 embeddings; CFG 7.5 as sampling.py).
Defaults: digits 50 steps, batch 8; small 5 steps, batch 4 (its 64x64 loop is ~10 s per step on
2 CPU cores). A 32x32 -> 64x64 sample of the small UNet has 4096-token self-attention at its first
level, 1024 tokens natively: attention grows with the square of the pixels, so its low-resolution
pass is cheaper than 1/m^2 of the full one.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from typing import Any

from absl import app, flags

import common
from common import CONFIGS, build_unets, environment, median_time

FLAGS = flags.FLAGS
flags.DEFINE_list('config', ['all'], 'Comma list of digits, small; all = digits,small.')
flags.DEFINE_integer('digits_steps', 50, 'DDIM steps for the digits config.')
flags.DEFINE_integer('small_steps', 5, 'DDIM steps for the small config (64x64 on CPU is slow).')
flags.DEFINE_integer('digits_batch', 8, 'Samples per digits loop (the UNet sees 2x: CFG).')
flags.DEFINE_integer('small_batch', 4, 'Samples per small loop (the UNet sees 2x: CFG).')
flags.DEFINE_integer('repeats', 3, 'Timed loops per variant (median), after 1 warm-up loop.')
flags.DEFINE_float('guidance_scale', None,
                   'CFG scale; default per config: digits 1.5 (its evaluation setting), small 7.5.')
flags.DEFINE_integer('factor', 2, 'Upsampling factor m (sampled size = m x native size).')
flags.DEFINE_float('weight', 1.0, 'Upsample-guidance weight theta.')
flags.DEFINE_float('eta', 1.0, 'Upsample-guidance window: the first eta fraction of [0, T).')
flags.DEFINE_string('prompt', 'a red digit three', 'digits config: the prompt of every sample.')
flags.DEFINE_integer('seed', 0, 'Seed of the initial noise (and of the small config).')
flags.DEFINE_string('out', None, 'If set, also write the report as JSON to this path.')

_ALL = ('digits', 'small')
_DEFAULT_SCALE = {'digits': 1.5, 'small': 7.5}
# The SD-1.5 scheduler config of benchmarks/sampling.py (not imported from there: that module
# defines absl flags of the same names as this one).
SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                    beta_schedule='scaled_linear', clip_sample=False, set_alpha_to_one=False,
                    steps_offset=1, timestep_spacing='leading', prediction_type='epsilon')


def _setup(name: str, batch: int, seed: int) -> dict[str, Any]:
  """torch and Flax UNets with the same weights, the scheduler config and (B, L, D) embeddings."""
  import diffusers
  import numpy as np

  if name == 'digits':
    from diffgeo_jax import digits, models
    from diffgeo_jax.diffusion import pipeline
    pipe = models.load_pipeline(digits.pipeline_dir())
    tmodel = diffusers.UNet2DConditionModel.from_pretrained(
        os.path.join(digits.pipeline_dir(), 'unet')).eval()
    cond = np.asarray(pipeline.encode_prompts(pipe, [FLAGS.prompt] * batch), np.float32)
    uncond = np.asarray(pipeline.encode_prompts(pipe, [''] * batch), np.float32)
    return dict(tmodel=tmodel, model=pipe.unet, params=pipe.unet_params,
                scheduler=dict(pipe.scheduler_config), cond=cond, uncond=uncond)
  tmodel, model, params, cfg, _ = build_unets(name, seed)
  rng = np.random.default_rng(seed + 1)
  shape = (batch, CONFIGS[name]['context_len'], cfg.per_block('cross_attention_dim')[0])
  return dict(tmodel=tmodel, model=model, params=params, scheduler=SD_SCHEDULER,
              cond=rng.standard_normal(shape, dtype=np.float32),
              uncond=rng.standard_normal(shape, dtype=np.float32))


def _torch_flops(tmodel, x, t, ctx) -> int:
  """Multiply-add FLOPs (x2) of one forward, counted by torch's FlopCounterMode: convolutions,
  linear layers and, under the math attention kernel (the fused CPU kernel is not counted), the
  attention matmuls. Elementwise work (norms, softmax, activations) is not counted."""
  import torch
  from torch.nn.attention import SDPBackend, sdpa_kernel
  from torch.utils.flop_counter import FlopCounterMode

  counter = FlopCounterMode(display=False)
  with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), counter:
    tmodel(x, t, encoder_hidden_states=ctx)
  return counter.get_total_flops()


def run_config(name: str, num_steps: int, batch: int, repeats: int, scale: float, m: int,
               weight: float, eta: float, seed: int) -> dict[str, Any]:
  import diffusers
  import jax
  import numpy as np
  import torch
  import torch.nn.functional as F

  from diffgeo_jax.diffusion import guidance, samplers, schedules

  print(f'[{name}] building the models...', flush=True)
  st = _setup(name, batch, seed)
  tmodel, model, params, cond, uncond = (st[k] for k in ('tmodel', 'model', 'params', 'cond',
                                                         'uncond'))
  native = tmodel.config.sample_size
  size, channels = m * native, tmodel.config.in_channels
  x_T = np.random.default_rng(seed).standard_normal((batch, size, size, channels),
                                                    dtype=np.float32)

  # -- PyTorch ------------------------------------------------------------------------------------
  sched = diffusers.DDIMScheduler.from_config(st['scheduler'])
  T = sched.config.num_train_timesteps
  ac = sched.alphas_cumprod.double().numpy()
  lam = np.log(ac) - np.log1p(-ac)  # log-SNR, decreasing in t
  grid = np.arange(T, dtype=np.float64)
  ctx = torch.from_numpy(np.concatenate([uncond, cond]))

  def cfg_eps(x, t):
    out_u, out_c = tmodel(torch.cat([x, x]), t, encoder_hidden_states=ctx).sample.chunk(2)
    return out_u + scale * (out_c - out_u)

  def torch_loop(guided: bool):
    sched.set_timesteps(num_steps)
    x = torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy())
    with torch.inference_mode():
      for t in sched.timesteps:
        eps = cfg_eps(x, t)
        if guided and weight != 0 and int(t) >= (1 - eta) * T:
          ab = float(ac[int(t)])
          p_t = ab + (1 - ab) / m ** 2
          tau = np.interp(lam[int(t)] + 2 * math.log(m), lam[::-1], grid[::-1])
          y = F.avg_pool2d(x, m) / math.sqrt(p_t)
          eps_low = cfg_eps(y, torch.tensor(tau, dtype=torch.float32))
          delta = eps_low / m - F.avg_pool2d(eps, m)
          eps = eps + weight * F.interpolate(delta, scale_factor=m, mode='nearest')
        x = sched.step(eps, t, x).prev_sample
    return x.numpy().transpose(0, 2, 3, 1)

  # -- ours ---------------------------------------------------------------------------------------
  s = schedules.from_diffusers_config(st['scheduler'])
  model_fn = lambda p: (lambda x, t, c: model.apply({'params': p}, x, t, c))

  @jax.jit
  def ours_plain(p, x, c, u):
    return samplers.ddim(guidance.cfg_eps_fn(model_fn(p), c, u, scale), x, s, num_steps)

  @jax.jit
  def ours_guided(p, x, c, u):
    eps_fn = guidance.upsample_cfg_eps_fn(model_fn(p), s, c, u, scale, order='after', factor=m,
                                          weight=weight, eta=eta)
    return samplers.ddim(eps_fn, x, s, num_steps)

  res: dict[str, Any] = {}
  out: dict[str, np.ndarray] = {}
  for kind, loop in (('plain', ours_plain), ('guided', ours_guided)):
    print(f'[{name}] compiling ours {kind}...', flush=True)
    t0 = time.perf_counter()
    out[f'ours_{kind}'] = np.asarray(loop(params, x_T, cond, uncond))
    res[f'ours_{kind}_compile_s'] = time.perf_counter() - t0
  loops = {f'torch_{k}': (lambda k=k: out.__setitem__(f'torch_{k}', torch_loop(k == 'guided')))
           for k in ('plain', 'guided')}
  loops.update({f'ours_{k}': (lambda l=l: l(params, x_T, cond, uncond).block_until_ready())
                for k, l in (('plain', ours_plain), ('guided', ours_guided))})
  print(f'[{name}] timing the four loops, {num_steps} steps, {repeats} interleaved rounds...',
        flush=True)
  medians, times, res['foreign_cpu_s'] = common.interleaved_medians(loops, repeats)
  for key in loops:
    res[f'{key}_s'], res[f'{key}_times_s'] = medians[key], times[key]
  res['timed_wall_s'] = sum(sum(v) for v in times.values())

  # -- what the overhead should be ----------------------------------------------------------------
  ts = s.inference_timesteps(num_steps)
  guided_frac = float(np.mean(ts >= (1 - eta) * T)) if weight != 0 else 0.0
  print(f'[{name}] timing single UNet forwards at {native} and {size}...', flush=True)
  fwd = jax.jit(lambda p, x, t, c: model.apply({'params': p}, x, t, c))
  ctx2 = np.concatenate([uncond, cond])
  t_mid = np.float32(ts[len(ts) // 2])
  fwd_s, flops = {}, {}
  for res_name, n in (('low', native), ('high', size)):
    x2 = np.random.default_rng(1).standard_normal((2 * batch, n, n, channels), dtype=np.float32)
    fwd_s[f'ours_{res_name}'] = median_time(
        lambda: fwd(params, x2, t_mid, ctx2).block_until_ready(), repeats)[0]
    xt = torch.from_numpy(x2.transpose(0, 3, 1, 2).copy())
    flops[res_name] = _torch_flops(tmodel, xt, torch.tensor(t_mid), ctx)
    with torch.inference_mode():
      fwd_s[f'torch_{res_name}'] = median_time(
          lambda: tmodel(xt, torch.tensor(t_mid), encoder_hidden_states=ctx).sample,
          repeats)[0]

  for fw in ('torch', 'ours'):
    res[f'{fw}_overhead'] = res[f'{fw}_guided_s'] / res[f'{fw}_plain_s'] - 1
    res[f'{fw}_overhead_per_round'] = [g / p - 1 for g, p in zip(res[f'{fw}_guided_times_s'],
                                                                 res[f'{fw}_plain_times_s'])]
    res[f'{fw}_expected_by_forward'] = guided_frac * fwd_s[f'{fw}_low'] / fwd_s[f'{fw}_high']
  res['expected_by_pixels'] = guided_frac / m ** 2
  res['expected_by_flops'] = guided_frac * flops['low'] / flops['high']
  diff = lambda a, b: float(np.abs(out[a] - out[b]).max())
  return {
      'config': name, 'native': native, 'size': size, 'factor': m, 'channels': channels,
      'num_steps': num_steps, 'batch': batch, 'unet_batch': 2 * batch, 'guidance_scale': scale,
      'weight': weight, 'eta': eta, 'guided_steps': int(round(guided_frac * num_steps)), **res,
      'torch_over_ours_plain': res['torch_plain_s'] / res['ours_plain_s'],
      'torch_over_ours_guided': res['torch_guided_s'] / res['ours_guided_s'],
      'forward_s': fwd_s, 'flops': flops,
      'max_abs_diff_guided': diff('ours_guided', 'torch_guided'),
      'max_abs_diff_plain': diff('ours_plain', 'torch_plain'),
      'max_abs_out': float(np.abs(out['torch_guided']).max()),
      'max_abs_guided_minus_plain': diff('ours_guided', 'ours_plain'),
  }


def format_tables(rows: list[dict[str, Any]]) -> str:
  pct = lambda v: common.fmt(None if v is None else 100 * v, '+.0f') + '%'
  lines = ['| config | steps | batch (UNet) | torch plain s | torch UG s | ours plain s | '
           'ours UG s | torch / ours plain | torch / ours UG | ours compile s plain / UG | '
           'max abs diff UG (plain) |',
           '|---|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(
        f"| {r['config']} {r['native']}->{r['size']} | {r['num_steps']} | {r['batch']} "
        f"({r['unet_batch']}) | {r['torch_plain_s']:.3f} | {r['torch_guided_s']:.3f} | "
        f"{r['ours_plain_s']:.3f} | {r['ours_guided_s']:.3f} | "
        f"**{r['torch_over_ours_plain']:.2f}** | **{r['torch_over_ours_guided']:.2f}** | "
        f"{r['ours_plain_compile_s']:.1f} / {r['ours_guided_compile_s']:.1f} | "
        f"{r['max_abs_diff_guided']:.1e} ({r['max_abs_diff_plain']:.1e}) |")
  lines += ['', '| config | UG overhead torch | UG overhead ours | expected: pixels | '
            'expected: FLOPs | expected: forward time torch / ours |',
            '|---|---|---|---|---|---|']
  for r in rows:
    lines.append(
        f"| {r['config']} | {pct(r['torch_overhead'])} | {pct(r['ours_overhead'])} | "
        f"{pct(r['expected_by_pixels'])} | {pct(r['expected_by_flops'])} | "
        f"{pct(r['torch_expected_by_forward'])} / {pct(r['ours_expected_by_forward'])} |")
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  import diffgeo_jax  # noqa: F401  (sets the XLA CPU flags before JAX starts)
  names = []
  for n in FLAGS.config:
    for c in (_ALL if n == 'all' else (n,)):
      if c not in _ALL:
        raise app.UsageError(f'--config: unknown {c!r}; choose from digits, small, all')
      if c not in names:
        names.append(c)
  if min(FLAGS.repeats, FLAGS.digits_batch, FLAGS.small_batch, FLAGS.factor, FLAGS.digits_steps,
         FLAGS.small_steps) < 1:
    raise app.UsageError('--repeats, --factor and the step counts and batches must be >= 1')
  env = environment()
  print(json.dumps(env, indent=2), flush=True)
  rows = []
  for name in names:
    steps, batch = ((FLAGS.digits_steps, FLAGS.digits_batch) if name == 'digits' else
                    (FLAGS.small_steps, FLAGS.small_batch))
    scale = _DEFAULT_SCALE[name] if FLAGS.guidance_scale is None else FLAGS.guidance_scale
    rows.append(run_config(name, steps, batch, FLAGS.repeats, scale, FLAGS.factor,
                           FLAGS.weight, FLAGS.eta, FLAGS.seed))
  print()
  print(format_tables(rows))
  for r in rows:
    rounds = '; '.join(
        f"{fw} " + ', '.join(f'{100 * v:+.0f}%' for v in r[f'{fw}_overhead_per_round'])
        for fw in ('torch', 'ours'))
    print(f"[{r['config']}] UG overhead per round: {rounds}")
    print(f"[{r['config']}] CPU-seconds used by other processes while timing: "
          f"{common.fmt(r['foreign_cpu_s'], '.1f')} of {r['timed_wall_s']:.0f} s; max |sample| "
          f"{r['max_abs_out']:.2f}, ours UG vs plain max abs diff "
          f"{r['max_abs_guided_minus_plain']:.2f}")
  if FLAGS.out:
    with open(FLAGS.out, 'w') as f:
      json.dump({'command': ' '.join(sys.argv), 'environment': env, 'results': rows}, f, indent=2)


if __name__ == '__main__':
  app.run(main)
