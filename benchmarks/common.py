"""The torch-vs-JAX benchmark harness every benchmark here uses:

- model configs (`CONFIGS`, `build_unets`: a seeded diffusers UNet and our port with its weights);
- the environment record (`environment`);
- timing (`median_time`, `interleaved_medians`) with the CPU other processes used meanwhile;
- memory of a timed section (`timed_section`: peak and working RSS from /proc, Linux);
- one framework per subprocess (`spawn` a worker of the calling script, `worker_main` in it), so
  that neither framework's allocator, threads or compile cache skews the other's numbers;
- the report (`fmt`, `markdown_table`).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
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


def foreign_cpu_s(before, after) -> float | None:
  """CPU-seconds other processes used between two `_cpu_jiffies()` readings (None off Linux)."""
  if not (before and after):
    return None
  return ((after[0] - before[0]) - (after[1] - before[1])) / os.sysconf('SC_CLK_TCK')


def interleaved_medians(fns: dict[str, Callable[[], Any]], repeats: int):
  """Median wall time of each fn over `repeats` rounds that call every fn once in turn (after one
  warm-up call each), so that a slow drift of the machine hits all of them alike; also the times
  and the CPU-seconds other processes used meanwhile (a contention check)."""
  for fn in fns.values():
    fn()  # warm-up
  times: dict[str, list[float]] = {k: [] for k in fns}
  before = _cpu_jiffies()
  for _ in range(repeats):
    for key, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[key].append(time.perf_counter() - t0)
  foreign = foreign_cpu_s(before, _cpu_jiffies())
  return {k: statistics.median(v) for k, v in times.items()}, times, foreign


def median_time(fn, repeats: int) -> tuple[float, list[float], float | None]:
  """Median wall time of `fn` over `repeats` calls after one warm-up, the individual times, and the
  CPU-seconds other processes used meanwhile (a contention check; None off Linux)."""
  medians, times, foreign = interleaved_medians({'fn': fn}, repeats)
  return medians['fn'], times['fn'], foreign


# -- memory of a timed section (Linux /proc) -------------------------------------------------------

def rss_mb(field: str = 'VmRSS') -> float | None:
  """This process's resident memory (VmRSS) or its peak since the last reset (VmHWM), MB."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith(field + ':'):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return None


def reset_peak() -> bool:
  """Returns freed heap memory to the kernel (glibc malloc_trim: memory the compiler or a warm-up
  freed but malloc kept would otherwise count as resident), then resets the kernel's peak-RSS
  counter (VmHWM) of this process to its current RSS."""
  try:
    import ctypes
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):
    pass
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


@contextlib.contextmanager
def timed_section(rec: dict[str, Any]):
  """Records into `rec` the peak RSS before the section (imports, weights, compile, warm-up), the
  RSS at its start, its own peak (`peak_rss_mb`; working memory = peak - start), the process's
  overall peak (`max_rss_mb`) and the CPU other processes used meanwhile. Not `ru_maxrss`: a
  child started by subprocess (vfork + exec) inherits the parent's."""
  rec['hwm_before_timing_mb'] = rss_mb('VmHWM')
  rec['peak_reset'] = reset_peak()
  rec['rss_before_timing_mb'] = rss_mb()
  before = _cpu_jiffies()
  yield rec
  rec['foreign_cpu_s'] = foreign_cpu_s(before, _cpu_jiffies())
  rec['peak_rss_mb'] = rss_mb('VmHWM')
  peaks = [v for v in (rec['hwm_before_timing_mb'], rec['peak_rss_mb']) if v is not None]
  rec['max_rss_mb'] = max(peaks) if peaks else None


# -- one framework per subprocess ------------------------------------------------------------------

def spawn(script: str, worker: str, spec: dict[str, Any], tmp: str) -> dict[str, Any]:
  """Runs `python script --worker=<worker> --spec=<spec.json>` (the script calls `worker_main`)
  and returns the record it wrote to spec['record']."""
  path = os.path.join(tmp, f'{spec["config"]}_{worker}_spec.json')
  with open(path, 'w') as f:
    json.dump(spec, f)
  proc = subprocess.run([sys.executable, os.path.abspath(script), f'--worker={worker}',
                         f'--spec={path}'], check=False)
  if proc.returncode != 0:
    raise RuntimeError(f'{worker} worker failed ({proc.returncode}) on {spec["config"]}')
  with open(spec['record']) as f:
    return json.load(f)


def worker_main(workers: dict[str, Callable[[dict], dict]], worker: str, spec_path: str) -> None:
  """In the worker subprocess: runs workers[worker](spec) and writes its record."""
  with open(spec_path) as f:
    spec = json.load(f)
  rec = workers[worker](spec)
  with open(spec['record'], 'w') as f:
    json.dump(rec, f)


# -- the report ------------------------------------------------------------------------------------

def fmt(v, spec: str) -> str:
  return 'n/a' if v is None else format(v, spec)


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '|'.join('---' for _ in head) + '|']
  lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines)


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
