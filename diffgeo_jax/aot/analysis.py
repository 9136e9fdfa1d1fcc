"""Compile a lowered program for a TPU topology and read what the compiler knows about it.

`compile_program(lower, chip)` returns one JSON-ready record: `compiled` (or the compiler's
`error`), `compile_seconds`, per-chip `hbm_bytes` {arguments, outputs, alias, temp, code, total},
the chip's HBM, `fits`, `flops_per_chip`, `bytes_accessed_per_chip` and `roofline_seconds`, and
`has_while_loop`: XLA's cost analysis counts a loop's body once, not once per iteration, so the
FLOPs of such a program are a floor (the sampling loop's per-step figures come from `cfg_step`).
total = arguments + outputs - alias (donated inputs reused as outputs) + temp + code: what one
chip must hold at the program's peak. A program the compiler refuses for memory
("Ran out of memory in memory space hbm. Used X of Y hbm") is reported as not fitting, with the
compiler's figure as its total ("Ran out of memory on HBM, the total memory required for HLO
temporaries (36.00G) exceeds available HBM (15.75G)" and the older "Used X of Y hbm").
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

from diffgeo_jax.aot import chips as chips_lib
from diffgeo_jax.models import attention

_UNITS = {'': 1, 'K': 2 ** 10, 'M': 2 ** 20, 'G': 2 ** 30, 'T': 2 ** 40}
# The TPU compiler's two out-of-memory messages: (used or required, available).
_OOM = (re.compile(r'Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm'),
        re.compile(r'memory required for [^(]*\(([\d.]+)([KMGT]?)\) exceeds available HBM '
                   r'\(([\d.]+)([KMGT]?)\)'))


def _bytes(value: str, unit: str) -> int:
  return int(float(value) * _UNITS[unit])


def memory_record(memory: Any) -> dict[str, int]:
  """Per-chip bytes from `compiled.memory_analysis()`."""
  out = {'arguments': int(memory.argument_size_in_bytes),
         'outputs': int(memory.output_size_in_bytes),
         'alias': int(memory.alias_size_in_bytes),
         'temp': int(memory.temp_size_in_bytes),
         'code': int(memory.generated_code_size_in_bytes)}
  out['total'] = out['arguments'] + out['outputs'] - out['alias'] + out['temp'] + out['code']
  return out


def cost_record(cost: Any) -> tuple[float, float]:
  """(flops, bytes accessed) per chip from `compiled.cost_analysis()` (a dict, or a list of one
  dict in older jax)."""
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  cost = cost or {}
  return float(cost.get('flops', 0.0)), float(cost.get('bytes accessed', 0.0))


def out_of_memory(error: str) -> dict:
  """{fits: False, hbm_bytes: {total}, hbm_capacity_reported} when a compiler error is the
  TPU compiler's out-of-memory verdict (the bytes it needed per chip), else {}."""
  oom = next((m for m in (p.search(error) for p in _OOM) if m), None)
  if not oom:
    return {}
  return dict(fits=False, hbm_bytes={'total': _bytes(*oom.group(1, 2))},
              hbm_capacity_reported=_bytes(*oom.group(3, 4)))


def compile_program(lower: Callable[[], Any], chip: chips_lib.Chip,
                    exec_time_optimization_effort: float = 0.0) -> dict:
  """Traces and lowers (`lower()`, with attention chunked as on a TPU), compiles, analyses.

  `exec_time_optimization_effort` is XLA's knob in [-1, 1] (0: its default). At -1 libtpu skips
  most of its optimisation passes: the SD-1.5 guided step compiled in 23 s with 1.6 GB of host
  memory instead of 240 s and 4.3 GB. The figures are those of a less optimised program: on six
  SD-1.5 programs the same FLOPs, per-chip HBM 1-29% below effort 0's (BENCHMARKS.md). For
  programs a small host cannot otherwise compile (SDXL training).
  """
  if not -1.0 <= exec_time_optimization_effort <= 1.0:
    raise ValueError('exec_time_optimization_effort must be in [-1, 1], got '
                     f'{exec_time_optimization_effort!r}')
  record: dict[str, Any] = {'chip': chip.name, 'hbm_per_chip': chip.hbm_bytes,
                            'exec_time_optimization_effort': exec_time_optimization_effort}
  start = time.perf_counter()
  try:
    with attention.compiling_for('tpu'):
      lowered = lower()
    record['lower_seconds'] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    compiled = lowered.compile(compiler_options={
        'exec_time_optimization_effort': exec_time_optimization_effort})
  except Exception as e:  # the compiler's verdict is the result: keep it, go on with the next
    record.update(compiled=False, compile_seconds=round(time.perf_counter() - start, 2),
                  error=f'{type(e).__name__}: {e}'[:4000])
    record.update(out_of_memory(str(e)))
    return record
  record['compile_seconds'] = round(time.perf_counter() - start, 2)
  record['compiled'] = True
  mem = memory_record(compiled.memory_analysis())
  # XLA's cost analysis counts the body of a while loop (a sampler's steps, lax.map chunks, a
  # fori_loop of training steps) once, whatever its trip count: flag such programs.
  record['has_while_loop'] = ' while(' in compiled.as_text()
  flops, nbytes = cost_record(compiled.cost_analysis())
  seconds, bound = chips_lib.roofline_seconds(flops, nbytes, chip)
  record.update(hbm_bytes=mem, fits=mem['total'] <= chip.hbm_bytes, flops_per_chip=flops,
                bytes_accessed_per_chip=nbytes, roofline_seconds=seconds, roofline_bound=bound)
  return record
