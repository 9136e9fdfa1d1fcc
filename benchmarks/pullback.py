r"""Local-basis benchmark: the official subspace iteration (PyTorch) vs `pullback.local_basis`.

    python benchmarks/pullback.py --config=all --iters=10
    python benchmarks/pullback.py --config=sd15 --iters=2 --repeats=1 --out=/tmp/pullback_sd15.json

Both sides compute the top k right singular vectors of J = dh/dx_t, h = the U-Net's h-space (the
mid-block output), at one x_t, t and context, with the same U-Net weights and the same orthonormal
initial V, for the same fixed number of iterations (no early stop):

* torch: our replication of the official algorithm (enkeejunior1/Diffusion-Pullback,
  `local_encoder_pullback_xt`/`_zt`; notes section 1.3). Per iteration: U = J V by
  `torch.func.jacfwd` of a -> h(x + a V_c) over chunks V_c of `--chunk_size` directions (one batched
  forward-mode pass per chunk); J^T U by `torch.autograd.functional.jacobian` of the k-output map
  g_b(x) = <u_b, h(x)> (one forward, k backward passes); V <- right singular vectors of J^T U
  (`torch.linalg.svd`); sigma = sqrt of its singular values. `get_h` runs the diffusers
  UNet2DConditionModel's time embedding, conv_in, down blocks and mid block (what our
  `method='hspace'` computes). fp32; the U-Net's parameters get requires_grad=False (so autograd
  records only the x-path; the official code does not say, and recording parameter grads would
  only slow torch down). Attention: diffusers' default `F.scaled_dot_product_attention`; its fused
  CPU kernel has no forward-mode AD in torch 2.13, so the JVPs run under
  `sdpa_kernel(SDPBackend.MATH)` (the composite math attention) and the backward passes keep the
  fused kernel (the official code turns xformers off "for using forward AD" for the same reason).
* ours: `jax.jit` of `pullback.local_basis(unet_h_fn(...), x, k, iters, init=V0, chunk_size=...,
  tol=0, min_iters=iters, rayleigh_ritz=False)` (rayleigh_ritz=False returns the official outputs:
  sigma = sqrt of the singular values of J^T J V_prev). One `jax.linearize` forward, then per
  iteration k JVPs and k transposed JVPs (`lax.map` over chunks), and an SVD, in a `lax.while_loop`.

Each framework runs in its own subprocess (this script, `--worker=torch|jax`), one after the
other, never concurrently, so that each has the machine and its own peak-memory record:

* time: torch - median over the iterations of one N-iteration run, after a 1-iteration warm-up
  run; ours - the median over `--repeats` calls of the whole jitted N-iteration call, divided by
  N (it includes the one linearisation forward, so it slightly overstates ours per iteration).
  Ours' compile time (trace + XLA compile + the first N-iteration call) is reported separately.
* memory (Linux /proc): `peak RSS` = VmHWM of the worker over the timed iterations (after the
  warm-up / compile call, glibc's `malloc_trim(0)` returns freed heap to the kernel and the peak
  counter is reset through /proc/self/clear_refs, so XLA compilation and memory malloc merely kept
  do not count); `working` = that peak minus the RSS just before the timed iterations (what the
  iterations themselves allocate; for ours it matches XLA's temp-buffer size of the compiled call,
  also reported); `max RSS` = the worker's VmHWM over its whole life (imports, weights, compile,
  warm-up, timing). Not `ru_maxrss`: a child started by subprocess (vfork + exec) inherits the
  parent's peak RSS in it. diffusers maps the safetensors file, so torch's RSS counts only the
  weights it has touched (down + mid blocks); ours holds all of them (JAX copies the arrays).
* agreement: h at x_t (max abs diff, and relative to max |h|); the k singular values after N
  iterations (max relative difference); the Grassmann geodesic distance between the two final
  span(V) (0 = same subspace; at most (pi/2) sqrt(k)).

Configs: `digits` = the shipped digits U-Net (16x16x3, context from its text encoder, prompt
`--prompt`); `small` = benchmarks/common.py's small U-Net, random init (32x32x4, context 1x77x32);
`sd15` = the SD-1.5-shaped U-Net, random init (64x64x4, context 1x77x768; slow on CPU, give it
`--iters=2 --repeats=1`). `--config=all` is digits,small; name sd15 explicitly
(`--config=all,sd15`).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

from absl import app, flags

import common
from common import CONFIGS, environment

FLAGS = flags.FLAGS
flags.DEFINE_list('config', ['all'], 'Comma list of digits, small, sd15; all = digits,small.')
flags.DEFINE_integer('iters', 10, 'Subspace iterations per run (both frameworks, no early stop).')
flags.DEFINE_integer('repeats', 3, 'Timed calls of ours (median), after the compile call.')
flags.DEFINE_integer('num_vectors', 10, 'k, the number of directions.')
flags.DEFINE_integer('chunk_size', 5, 'Directions per JVP batch (official SD setting: 5).')
flags.DEFINE_float('t', 700.0, 'Timestep (float, as the official code evaluates the U-Net).')
flags.DEFINE_string('prompt', 'a red digit three', 'digits config: the prompt of the context.')
flags.DEFINE_integer('seed', 0, 'Seed of the random-init U-Nets, x_t, context and initial V.')
flags.DEFINE_string('out', None, 'If set, also write the report as JSON to this path.')
flags.DEFINE_integer('attention_chunk_scores', None,
                     'Diagnostic: set models.attention.MAX_SCORES_PER_CHUNK (the forward pass\'s '
                     "query-chunk budget) in ours (default: the library's). Derivatives use "
                     'attention.AD_SCORES_PER_CHUNK.')
flags.DEFINE_enum('worker', None, ['torch', 'jax'], 'Internal: run one framework on --spec.')
flags.DEFINE_string('spec', None, 'Internal: the worker spec JSON.')

_ALL = ('digits', 'small')
_SIZES = {'digits': None, 'small': (32, 77), 'sd15': (64, 77)}  # latent size, context length


# -- torch worker: our replication of the official algorithm ---------------------------------------

def _torch_get_h(unet, x, t, ctx):
  """diffusers UNet2DConditionModel: time embedding, conv_in, down blocks, mid block -> h (NCHW)."""
  emb = unet.time_embedding(unet.get_time_embed(sample=x, timestep=t.expand(x.shape[0])))
  if unet.time_embed_act is not None:
    emb = unet.time_embed_act(emb)
  s = unet.conv_in(x)
  for block in unet.down_blocks:
    if getattr(block, 'has_cross_attention', False):
      s, _ = block(hidden_states=s, temb=emb, encoder_hidden_states=ctx)
    else:
      s, _ = block(hidden_states=s, temb=emb)
  return unet.mid_block(s, emb, encoder_hidden_states=ctx)


def _torch_subspace_iteration(get_h, x, v, iters: int, chunk_size: int):
  """The official loop, fixed iteration count. x (1, C, H, W); v (k, C, H, W) orthonormal rows.
  Returns (u = J V_prev, sigma, V, seconds of each iteration)."""
  import torch
  from torch.nn.attention import SDPBackend, sdpa_kernel
  k, n = v.shape[0], v[0].numel()
  a = torch.tensor(0.0, dtype=x.dtype)
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    us = []
    for vc in v.chunk(max(k // chunk_size, 1)):  # as the official code splits the directions
      jvp = lambda a, vc=vc: get_h(x + a * vc, len(vc))  # x (batch 1) + a v_c (batch b)
      with sdpa_kernel([SDPBackend.MATH]):  # the fused CPU attention kernel has no forward AD
        us.append(torch.func.jacfwd(jvp)(a).detach())
    u = torch.cat(us)
    g = lambda xx: torch.einsum('bchw,ichw->b', u, get_h(xx, 1))  # g_b(x) = <u_b, h(x)>
    w = torch.autograd.functional.jacobian(g, x).reshape(k, n)  # rows J^T u_b (k backward passes)
    _, s2, v = torch.linalg.svd(w, full_matrices=False)
    v = v.reshape(k, *x.shape[1:])
    times.append(time.perf_counter() - t0)
  return u, s2.sqrt(), v, times


def torch_worker(spec: dict[str, Any]) -> dict[str, Any]:
  import diffusers
  import numpy as np
  import torch

  rec: dict[str, Any] = {'rss_after_imports_mb': common.rss_mb()}
  unet = diffusers.UNet2DConditionModel.from_pretrained(spec['unet_dir']).eval()
  unet.requires_grad_(False)
  inp = np.load(spec['inputs'])
  x = torch.from_numpy(inp['x'].transpose(2, 0, 1)[None].copy())  # HWC -> 1CHW
  ctx = torch.from_numpy(inp['context'])
  v0 = torch.from_numpy(inp['v0'].transpose(0, 3, 1, 2).copy())  # (k, H, W, C) -> (k, C, H, W)
  t = torch.tensor(spec['t'], dtype=torch.float32)
  get_h = lambda xx, b: _torch_get_h(unet, xx, t, ctx.repeat(b, 1, 1))
  rec['rss_setup_mb'] = common.rss_mb()

  with torch.no_grad():
    h = get_h(x, 1)[0].numpy().transpose(1, 2, 0)
  _torch_subspace_iteration(get_h, x, v0, 1, spec['chunk_size'])  # warm-up
  with common.timed_section(rec):
    _, sigma, v, times = _torch_subspace_iteration(get_h, x, v0, spec['iters'],
                                                   spec['chunk_size'])
  rec.update(s_per_iter=statistics.median(times), iter_times_s=times, total_s=sum(times),
             torch_threads=torch.get_num_threads())
  np.savez(spec['result'], h=h, sigma=sigma.numpy(), v=v.numpy().transpose(0, 2, 3, 1))
  return rec


# -- JAX worker: ours ------------------------------------------------------------------------------

def jax_worker(spec: dict[str, Any]) -> dict[str, Any]:
  import diffgeo_jax  # noqa: F401  (sets the XLA CPU flags before JAX starts)
  import gc

  import jax
  import numpy as np

  from diffgeo_jax import models
  from diffgeo_jax.geometry import pullback
  from diffgeo_jax.models import attention

  if spec.get('attention_chunk_scores'):
    attention.MAX_SCORES_PER_CHUNK = spec['attention_chunk_scores']
  rec: dict[str, Any] = {'rss_after_imports_mb': common.rss_mb(),
                         'attention_chunk_scores': attention.MAX_SCORES_PER_CHUNK}
  unet, params = models.load_unet(spec['unet_dir'])
  params = jax.block_until_ready(jax.device_put(params))
  inp = np.load(spec['inputs'])
  x, ctx, v0 = (jax.device_put(inp[name]) for name in ('x', 'context', 'v0'))
  del inp
  gc.collect()
  t, k, iters = spec['t'], spec['num_vectors'], spec['iters']
  rec['rss_setup_mb'] = common.rss_mb()

  hspace = jax.jit(lambda p, x, c: unet.apply({'params': p}, x[None], t, c, method='hspace')[0])
  h = np.asarray(hspace(params, x, ctx))

  def run(p, x, c, v0):
    h_fn = pullback.unet_h_fn(unet, p, t, c)
    b = pullback.local_basis(h_fn, x, k, iters, init=v0, chunk_size=spec['chunk_size'], tol=0.0,
                             min_iters=iters, rayleigh_ritz=False)
    return b.singular_values, b.latent_basis, b.num_iters_run

  t0 = time.perf_counter()
  compiled = jax.jit(run).lower(params, x, ctx, v0).compile()
  out = jax.block_until_ready(compiled(params, x, ctx, v0))
  rec['compile_s'] = time.perf_counter() - t0  # trace + compile + first call
  try:
    mem = compiled.memory_analysis()
    rec['xla_temp_mb'] = mem.temp_size_in_bytes / 2**20
  except Exception:  # pylint: disable=broad-except  (not every backend reports it)
    rec['xla_temp_mb'] = None
  times = []
  with common.timed_section(rec):
    for _ in range(spec['repeats']):
      t0 = time.perf_counter()
      out = jax.block_until_ready(compiled(params, x, ctx, v0))
      times.append(time.perf_counter() - t0)
  sigma, v, n_run = (np.asarray(a) for a in out)
  if int(n_run) != iters:
    raise RuntimeError(f'local_basis ran {int(n_run)} iterations, expected {iters}')
  rec.update(s_per_iter=statistics.median(times) / iters, call_times_s=times,
             total_s=statistics.median(times))
  np.savez(spec['result'], h=h, sigma=sigma, v=v)
  return rec


# -- driver ----------------------------------------------------------------------------------------

def _prepare(name: str, tmp: str, seed: int, k: int) -> tuple[str, dict[str, Any]]:
  """The U-Net folder and inputs (x_t HWC, context (1, L, D), V0 (k, H, W, C)) of config `name`."""
  import numpy as np
  rng = np.random.default_rng(seed)
  if name == 'digits':
    from diffgeo_jax import digits, models
    from diffgeo_jax.diffusion import pipeline
    pipe = models.load_pipeline(digits.pipeline_dir())
    context = np.asarray(pipeline.encode_prompts(pipe, [FLAGS.prompt]), np.float32)
    cfg = pipe.unet.config
    unet_dir, size, channels = os.path.join(digits.pipeline_dir(), 'unet'), cfg.sample_size, \
        cfg.in_channels
  else:
    import diffusers
    import torch
    torch.manual_seed(seed)
    tmodel = diffusers.UNet2DConditionModel(**CONFIGS[name]['unet'])
    unet_dir = os.path.join(tmp, f'{name}_unet')
    tmodel.save_pretrained(unet_dir)  # safetensors; both workers load this folder
    size, length = _SIZES[name]
    channels, cross = tmodel.config.in_channels, tmodel.config.cross_attention_dim
    del tmodel
    context = rng.standard_normal((1, length, cross), dtype=np.float32)
  x = rng.standard_normal((size, size, channels), dtype=np.float32)
  q, _ = np.linalg.qr(rng.standard_normal((x.size, k)))  # (n, k) orthonormal columns, float64
  v0 = np.ascontiguousarray(q.T.astype(np.float32).reshape(k, *x.shape))
  inputs = os.path.join(tmp, f'{name}_inputs.npz')
  np.savez(inputs, x=x, context=context, v0=v0)
  return unet_dir, {'inputs': inputs, 'x_shape': list(x.shape),
                    'context_shape': list(context.shape)}


def run_config(name: str, tmp: str) -> dict[str, Any]:
  import numpy as np

  from diffgeo_jax.geometry import grassmann

  k, iters = FLAGS.num_vectors, FLAGS.iters
  print(f'[{name}] preparing weights and inputs...', flush=True)
  unet_dir, info = _prepare(name, tmp, FLAGS.seed, k)
  recs, results = {}, {}
  for worker in ('torch', 'jax'):
    spec = dict(config=name, unet_dir=unet_dir, inputs=info['inputs'], t=FLAGS.t, num_vectors=k,
                iters=iters, chunk_size=FLAGS.chunk_size, repeats=FLAGS.repeats,
                attention_chunk_scores=FLAGS.attention_chunk_scores,
                result=os.path.join(tmp, f'{name}_{worker}.npz'),
                record=os.path.join(tmp, f'{name}_{worker}.json'))
    print(f'[{name}] {worker}: k={k}, {iters} iterations, chunks of {FLAGS.chunk_size}...',
          flush=True)
    recs[worker] = common.spawn(__file__, worker, spec, tmp)
    results[worker] = dict(np.load(spec['result']))
  tr, jr = results['torch'], results['jax']
  h_diff = float(np.max(np.abs(tr['h'] - jr['h'])))
  h_max = float(np.max(np.abs(tr['h'])))
  sigma_rel = np.abs(jr['sigma'] - tr['sigma']) / tr['sigma']
  geo = float(grassmann.geodesic_distance(tr['v'], jr['v']))
  cos = np.abs(np.sum(tr['v'].reshape(k, -1) * jr['v'].reshape(k, -1), axis=1))
  return {
      'config': name, 'x': info['x_shape'], 'h': list(tr['h'].shape),
      'context': info['context_shape'], 't': FLAGS.t, 'k': k, 'iters': iters,
      'chunk_size': FLAGS.chunk_size, 'repeats_ours': FLAGS.repeats,
      'torch_s_per_iter': recs['torch']['s_per_iter'], 'jax_s_per_iter': recs['jax']['s_per_iter'],
      'torch_over_jax': recs['torch']['s_per_iter'] / recs['jax']['s_per_iter'],
      'jax_compile_s': recs['jax']['compile_s'],
      'h_max_abs_diff': h_diff, 'h_max_abs': h_max, 'h_rel_diff': h_diff / h_max,
      'sigma_torch': tr['sigma'].tolist(), 'sigma_jax': jr['sigma'].tolist(),
      'sigma_max_rel_diff': float(sigma_rel.max()),
      'v_geodesic_distance': geo, 'v_min_abs_cos': float(cos.min()),
      'torch': recs['torch'], 'jax': recs['jax'],
  }


def format_table(rows: list[dict[str, Any]]) -> str:
  head = ('config', 'torch s/iter', 'ours s/iter', 'torch / ours', 'ours compile s',
          'torch peak / working MB', 'ours peak / working MB', 'torch / ours max RSS MB',
          'h rel diff', 'sigma max rel diff', 'd_geo(V)')
  cells = []
  for r in rows:
    mem = {}
    for fw in ('torch', 'jax'):
      w = r[fw]
      work = (None if w['peak_rss_mb'] is None or w['rss_before_timing_mb'] is None
              else w['peak_rss_mb'] - w['rss_before_timing_mb'])
      mem[fw] = f"{common.fmt(w['peak_rss_mb'], '.0f')} / {common.fmt(work, '.0f')}"
    max_rss = ' / '.join(common.fmt(r[fw]['max_rss_mb'], '.0f') for fw in ('torch', 'jax'))
    cells.append([r['config'], f"{r['torch_s_per_iter']:.3f}", f"{r['jax_s_per_iter']:.3f}",
                  f"**{r['torch_over_jax']:.2f}**", f"{r['jax_compile_s']:.1f}", mem['torch'],
                  mem['jax'], max_rss, f"{r['h_rel_diff']:.1e}",
                  f"{r['sigma_max_rel_diff']:.1e}", f"{r['v_geodesic_distance']:.1e}"])
  return common.markdown_table(head, cells)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if FLAGS.worker:
    common.worker_main({'torch': torch_worker, 'jax': jax_worker}, FLAGS.worker, FLAGS.spec)
    return
  import diffgeo_jax  # noqa: F401  (XLA CPU flags, inherited by the workers)
  names = []
  for n in FLAGS.config:
    for m in (_ALL if n == 'all' else (n,)):
      if m not in _SIZES:
        raise app.UsageError(f'--config: unknown {m!r}; choose from digits, small, sd15, all')
      if m not in names:
        names.append(m)
  if FLAGS.iters < 1 or FLAGS.repeats < 1:
    raise app.UsageError('--iters and --repeats must be >= 1')
  env = environment()
  print(json.dumps(env, indent=2), flush=True)
  rows = []
  with tempfile.TemporaryDirectory(prefix='pullback_bench_') as tmp:
    for name in names:
      rows.append(run_config(name, tmp))
      r = rows[-1]
      print(f"[{name}] torch {r['torch_s_per_iter']:.3f} s/iter, ours {r['jax_s_per_iter']:.3f} "
            f"s/iter ({r['torch_over_jax']:.2f}x); h rel diff {r['h_rel_diff']:.1e}, sigma max "
            f"rel diff {r['sigma_max_rel_diff']:.1e}", flush=True)
  print()
  print(format_table(rows))
  fmt = common.fmt
  for r in rows:
    print(f"[{r['config']}] sigma torch {[round(s, 4) for s in r['sigma_torch']]}")
    print(f"[{r['config']}] sigma ours  {[round(s, 4) for s in r['sigma_jax']]}")
    print(f"[{r['config']}] h max abs diff {r['h_max_abs_diff']:.2e} (max |h| "
          f"{r['h_max_abs']:.2f}); min |cos(v_i torch, v_i ours)| {r['v_min_abs_cos']:.6f}; "
          f"ours XLA temp buffers {fmt(r['jax']['xla_temp_mb'], '.0f')} MB")
    for fw in ('torch', 'jax'):
      w = r[fw]
      print(f"[{r['config']}] {fw} RSS MB: after imports {fmt(w['rss_after_imports_mb'], '.0f')}, "
            f"weights+inputs loaded {fmt(w['rss_setup_mb'], '.0f')}, before timing "
            f"{fmt(w['rss_before_timing_mb'], '.0f')}, peak while timing "
            f"{fmt(w['peak_rss_mb'], '.0f')}, whole-process max {fmt(w['max_rss_mb'], '.0f')}")
    for fw, wall in (('torch', r['torch']['total_s']),
                     ('jax', r['jax']['total_s'] * r['repeats_ours'])):
      foreign = r[fw]['foreign_cpu_s']
      if foreign is not None:
        contended = foreign > max(0.1 * wall, 0.5)
        print(f"[{r['config']}] {fw}: other processes used {foreign:.1f} CPU-s during "
              f"{wall:.1f} s of timing" + (' -- WARNING: contended' if contended else ''))
  report = {'command': ' '.join(sys.argv), 'environment': env, 'results': rows}
  if FLAGS.out:
    with open(FLAGS.out, 'w') as f:
      json.dump(report, f, indent=2)
    print(f'wrote {FLAGS.out}')


if __name__ == '__main__':
  app.run(main)
