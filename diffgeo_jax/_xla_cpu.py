"""XLA:CPU tuning applied when diffgeo_jax is imported (before JAX starts its CPU backend).

jaxlib 0.10 runs convolutions through YNNPACK by default; for the UNet's 3x3 convolutions XLA's
Eigen kernels are faster on CPU (SD-1.5 UNet forward on 2 cores: 3.85 s -> 2.90 s, BENCHMARKS.md).
The flag is added to XLA_FLAGS only when the user has not set it (or its opposite) and only for
jaxlib versions where it was measured, because XLA aborts on a flag it does not know. Opt out
with DIFFGEO_JAX_XLA_CPU_TUNING=0. The flag affects the CPU backend only.
"""

from __future__ import annotations

import os

_FLAG = '--xla_cpu_experimental_ynn_fusion_type=-LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION'
_MEASURED_JAXLIB = ('0.10.',)


def _jaxlib_version() -> str | None:
  try:
    from importlib.metadata import version
    return version('jaxlib')
  except Exception:  # not installed as a distribution: leave XLA alone
    return None


def apply() -> bool:
  """Adds the flag to XLA_FLAGS when appropriate; returns whether it did."""
  if os.environ.get('DIFFGEO_JAX_XLA_CPU_TUNING', '1') == '0':
    return False
  flags = os.environ.get('XLA_FLAGS', '')
  if 'xla_cpu_experimental_ynn_fusion_type' in flags:
    return False
  ver = _jaxlib_version()
  if ver is None or not ver.startswith(_MEASURED_JAXLIB):
    return False
  os.environ['XLA_FLAGS'] = f'{flags} {_FLAG}'.strip()
  return True
