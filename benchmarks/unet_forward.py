r"""UNet forward-pass benchmark: diffusers (PyTorch) vs our Flax port, same weights, same process.

    python benchmarks/unet_forward.py --config=small --repeats=10
    python benchmarks/unet_forward.py --config=sd15 --repeats=3 --out=/tmp/unet_sd15.json
    python benchmarks/unet_forward.py --config=all --repeats=3 --attention_impl=jax

For each config a diffusers `UNet2DConditionModel` is built with random init (seeded), its weights
are converted with `convert.torch_to_flax`, and both forwards run on the same inputs:

* PyTorch: fp32, eval mode, under `torch.inference_mode()`, default intra-op threads.
* JAX: `jax.jit` of `model.apply`; the first call (trace + XLA compile + one run) is reported as
  compile time; steady state is timed with `block_until_ready`.

Both are timed as the median over `--repeats` calls after one warm-up call. The max abs difference
of the two outputs is printed as a parity check. The table has: config, torch s/forward, jax
s/forward, torch/jax (>1 means ours is faster), jax compile s, max abs diff.

Environment variables that change the numbers must be set before the script starts; the ones in
effect are recorded in the report (see BENCHMARKS.md for measurements):

* `XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION`
  runs convolutions on XLA's Eigen kernels instead of YNNPACK (faster for SD's convs on CPU).
  `import diffgeo_jax` sets it on jaxlib 0.10 unless XLA_FLAGS already names it;
  `DIFFGEO_JAX_XLA_CPU_TUNING=0` turns that off (to time the XLA default).
* `GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736:
  glibc.malloc.arena_max=1` (one word, no line break)
  stops glibc from returning freed memory to the kernel, so large per-call buffers are not
  page-faulted in again on every forward (helps both frameworks, JAX more).

The CPU time other processes used while timing is reported too (from /proc/stat; it includes
steal time): if it is more than a small fraction of the wall time, the timings are contended.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from typing import Any

from absl import app, flags

import common
from common import CONFIGS, build_unets, environment, median_time

FLAGS = flags.FLAGS
flags.DEFINE_enum('config', 'small', ['small', 'sd15', 'all'], 'Which UNet config(s) to time.')
flags.DEFINE_integer('repeats', 5,
                     'Timed forwards per framework (median reported), after 1 warm-up.')
flags.DEFINE_string('out', None, 'If set, also write the report as JSON to this path.')
flags.DEFINE_string('attention_impl', 'softmax',
                    'attention_impl of our UNet2DConditionModel (see attention.ATTENTION_IMPLS).')
flags.DEFINE_integer('seed', 0, 'Seed for the torch init and the inputs.')
flags.DEFINE_integer('torch_threads', None, 'torch.set_num_threads (default: torch default).')


def run_config(name: str, repeats: int, attention_impl: str, seed: int) -> dict[str, Any]:
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  spec = CONFIGS[name]
  print(f'[{name}] building diffusers UNet2DConditionModel (random init)...', flush=True)
  tmodel, model, params, cfg, convert_s = build_unets(name, seed, attention_impl)
  n_params = sum(p.numel() for p in tmodel.parameters())
  gc.collect()  # the numpy copy of the weights (3.4 GB for SD-1.5) is gone
  print(f'[{name}] {n_params / 1e6:.1f}M params, converted in {convert_s:.1f}s', flush=True)

  rng = np.random.default_rng(seed)
  b, s, cross = spec['batch'], spec['size'], cfg.per_block('cross_attention_dim')[0]
  x_nchw = rng.standard_normal((b, cfg.in_channels, s, s), dtype=np.float32)
  ctx = rng.standard_normal((b, spec['context_len'], cross), dtype=np.float32)
  t = np.full((b,), 500.0, np.float32)

  # -- PyTorch ------------------------------------------------------------------------------------
  tx, tt, tctx = torch.from_numpy(x_nchw), torch.from_numpy(t), torch.from_numpy(ctx)

  def torch_fwd():
    with torch.inference_mode():
      return tmodel(tx, tt, encoder_hidden_states=tctx).sample

  print(f'[{name}] timing torch ({repeats} repeats)...', flush=True)
  torch_s, torch_times, torch_foreign = median_time(torch_fwd, repeats)
  torch_out = torch_fwd().numpy().transpose(0, 2, 3, 1)  # NCHW -> NHWC
  del tmodel
  gc.collect()

  # -- JAX ----------------------------------------------------------------------------------------
  jx, jt, jctx = jnp.asarray(x_nchw.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(ctx)
  fwd = jax.jit(lambda p, x, t, c: model.apply({'params': p}, x, t, c))
  print(f'[{name}] compiling jax...', flush=True)
  t0 = time.perf_counter()
  jax_out = fwd(params, jx, jt, jctx).block_until_ready()
  compile_s = time.perf_counter() - t0
  print(f'[{name}] timing jax ({repeats} repeats)...', flush=True)
  jax_s, jax_times, jax_foreign = median_time(
      lambda: fwd(params, jx, jt, jctx).block_until_ready(), repeats)

  diff = float(np.max(np.abs(np.asarray(jax_out) - torch_out)))
  ref = float(np.max(np.abs(torch_out)))
  return {
      'config': name, 'params_M': round(n_params / 1e6, 2), 'batch': b,
      'latent': f'{s}x{s}x{cfg.in_channels}', 'context': f'{b}x{spec["context_len"]}x{cross}',
      'attention_impl': attention_impl, 'repeats': repeats,
      'torch_s': torch_s, 'jax_s': jax_s, 'torch_over_jax': torch_s / jax_s,
      'jax_compile_s': compile_s, 'max_abs_diff': diff, 'max_abs_out': ref,
      'torch_times_s': torch_times, 'jax_times_s': jax_times, 'convert_s': convert_s,
      # CPU-seconds used by other processes while timing: >0.1 * total means the numbers are noisy.
      'foreign_cpu_s_torch': torch_foreign, 'foreign_cpu_s_jax': jax_foreign,
  }


def format_table(rows: list[dict[str, Any]]) -> str:
  head = ('config', 'torch s/fwd', 'jax s/fwd', 'torch/jax', 'jax compile s', 'max abs diff')
  return common.markdown_table(head, [
      [r['config'], f"{r['torch_s']:.4f}", f"{r['jax_s']:.4f}", f"{r['torch_over_jax']:.2f}",
       f"{r['jax_compile_s']:.1f}", f"{r['max_abs_diff']:.2e}"] for r in rows])


def main(argv):
  del argv
  import torch
  if FLAGS.torch_threads is not None:
    torch.set_num_threads(FLAGS.torch_threads)
  from diffgeo_jax.models.attention import ATTENTION_IMPLS
  if FLAGS.attention_impl not in ATTENTION_IMPLS:
    raise app.UsageError(f'--attention_impl must be one of {ATTENTION_IMPLS}')
  env = environment()
  print(json.dumps(env, indent=2), flush=True)
  names = list(CONFIGS) if FLAGS.config == 'all' else [FLAGS.config]
  rows = []
  for name in names:
    rows.append(run_config(name, FLAGS.repeats, FLAGS.attention_impl, FLAGS.seed))
    gc.collect()
  print()
  print(format_table(rows))
  for r in rows:
    if r['foreign_cpu_s_torch'] is not None:
      print(f"[{r['config']}] CPU-seconds used by other processes while timing: torch "
            f"{r['foreign_cpu_s_torch']:.1f} (of {sum(r['torch_times_s']):.1f} s wall), jax "
            f"{r['foreign_cpu_s_jax']:.1f} (of {sum(r['jax_times_s']):.1f} s wall)")
      for fw in ('torch', 'jax'):
        if r[f'foreign_cpu_s_{fw}'] > 0.1 * sum(r[f'{fw}_times_s']):
          print(f"WARNING [{r['config']}] other processes used the CPU while {fw} was timed; "
                'its numbers are not reliable')
  report = {'command': ' '.join(sys.argv), 'environment': env, 'results': rows}
  if FLAGS.out:
    with open(FLAGS.out, 'w') as f:
      json.dump(report, f, indent=2)
    print(f'wrote {FLAGS.out}')


if __name__ == '__main__':
  app.run(main)
