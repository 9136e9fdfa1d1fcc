"""The BENCHMARKS.md table of TPU compilations: merges the results.json of several
`launch/tpu_compile.py` runs (one per row group) into one markdown table, sorted by model, job,
program, topology, dtype, remat and attention.

    python benchmarks/tpu_compile_table.py /tmp/aot/*/results.json
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffgeo_jax.aot import analysis  # noqa: E402
from launch import tpu_compile  # noqa: E402


def main(paths: list[str]) -> str:
  records = []
  for path in paths:
    with open(path) as f:
      records += json.load(f)['metrics']['programs']
  for r in records:
    r.setdefault('attention', 'softmax')  # runs written before the flash switch
    # runs written before the tool read the compiler's out-of-memory message
    if not r.get('compiled') and 'fits' not in r:
      r.update(analysis.out_of_memory(r.get('error', '')))
    r.setdefault('exec_time_optimization_effort', 0.0)  # runs before the effort switch
  order = ('model', 'job', 'program', 'topology', 'dtype', 'remat', 'attention',
           'exec_time_optimization_effort')
  records.sort(key=lambda r: tuple(str(r.get(k)) for k in order))
  return tpu_compile.table(records)


if __name__ == '__main__':
  if len(sys.argv) < 2:
    raise SystemExit(__doc__)
  print(main(sys.argv[1:]), end='')
