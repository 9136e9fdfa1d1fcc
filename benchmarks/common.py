"""Shared pieces of the side-by-side benchmarks: model configs, environment record, timing."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from typing import Any

# diffusers' defaults are SD-1.x; SD-1.5 only changes cross_attention_dim and sample_size.
CONFIGS: dict[str, dict[str, Any]] = {
    'small': dict(
        unet=dict(sample_size=32, block_out_channels=(32, 64, 64), layers_per_block=2,
                  down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'),
                  up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'),
                  cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32),
        batch=4, size=32, context_len=77),
    'sd15': dict(unet=dict(sample_size=64, cross_attention_dim=768), batch=1, size=64,
                 context_len=77),
}


def environment() -> dict[str, Any]:
  import diffusers
  import flax
  import jax
  import jaxlib
  import numpy as np
  import torch

  import diffgeo_jax
  cpu_model = None
  try:
    with open('/proc/cpuinfo') as f:
      cpu_model = next((l.split(':', 1)[1].strip() for l in f if l.startswith('model name')), None)
  except OSError:
    pass
  return {
      'platform': platform.platform(),
      'processor': cpu_model or platform.processor(),
      'os.cpu_count': os.cpu_count(),
      'cpus_usable': (len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
                      else None),
      'python': sys.version.split()[0],
      'jax': jax.__version__, 'jaxlib': jaxlib.__version__, 'flax': flax.__version__,
      'torch': torch.__version__, 'diffusers': diffusers.__version__, 'numpy': np.__version__,
      'jax_backend': jax.default_backend(), 'jax_devices': [str(d) for d in jax.devices()],
      'torch_num_threads': torch.get_num_threads(),
      **{k: os.environ[k] for k in ('XLA_FLAGS', 'GLIBC_TUNABLES', 'LD_PRELOAD', 'MALLOC_CONF',
                                    'OMP_NUM_THREADS') if k in os.environ},
      'diffgeo_jax': os.path.dirname(diffgeo_jax.__file__),
  }


def _cpu_jiffies() -> tuple[int, int] | None:
  """(busy jiffies of the whole machine, jiffies of this process), Linux only."""
  try:
    with open('/proc/stat') as f:
      fields = [int(v) for v in f.readline().split()[1:9]]
    with open('/proc/self/stat') as f:
      own = f.read().rsplit(')', 1)[1].split()
  except OSError:
    return None
  return sum(fields) - fields[3] - fields[4], int(own[11]) + int(own[12])


def median_time(fn, repeats: int) -> tuple[float, list[float], float | None]:
  """Median wall time of `fn` over `repeats` calls after one warm-up, the individual times, and the
  CPU-seconds other processes used meanwhile (a contention check; None off Linux)."""
  fn()  # warm-up
  times = []
  before = _cpu_jiffies()
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  after = _cpu_jiffies()
  foreign = None
  if before and after:
    foreign = ((after[0] - before[0]) - (after[1] - before[1])) / os.sysconf('SC_CLK_TCK')
  return statistics.median(times), times, foreign




def build_unets(name: str, seed: int = 0, attention_impl: str = 'softmax'):
  """A seeded random diffusers UNet of config `name` and our Flax port with its converted weights:
  (torch_model, flax_model, params, config, convert_seconds)."""
  import diffusers
  import jax
  import torch

  from diffgeo_jax.models import convert, unet

  torch.manual_seed(seed)
  tmodel = diffusers.UNet2DConditionModel(**CONFIGS[name]['unet']).eval()
  cfg = unet.UNet2DConditionConfig.from_dict(dict(tmodel.config))
  model = unet.UNet2DConditionModel(cfg, attention_impl=attention_impl)
  target = convert.abstract_params(model.init, jax.random.PRNGKey(0), *unet.dummy_inputs(cfg))
  t0 = time.perf_counter()
  state = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
  params = jax.block_until_ready(jax.device_put(
      convert.torch_to_flax(state, target, source=f'{name} UNet')))
  return tmodel, model, params, cfg, time.perf_counter() - t0
