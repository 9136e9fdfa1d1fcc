"""TPU chips: HBM capacity, dense bf16 peak and HBM bandwidth per chip, from Google Cloud's
public system-architecture pages (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e). The roofline bound
of a program is max(flops / peak, bytes accessed / bandwidth), per chip and per call: the time
below which no implementation can go, not a prediction. The peak is the bf16 MXU rate; float32
matrix products at XLA's default precision run as bf16 passes on TPU (one pass), at 'highest'
precision as six, so a float32 program's real bound is up to 6x higher than this one.
"""

from __future__ import annotations

import dataclasses
import math

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  hbm_bytes: int  # per chip
  peak_flops: float  # dense bf16 FLOP/s per chip
  hbm_bandwidth: float  # bytes/s per chip


CHIPS = {
    'v4': Chip('v4', 32 * GiB, 275e12, 1228e9),
    'v5e': Chip('v5e', 16 * GiB, 197e12, 819e9),
    'v5p': Chip('v5p', 95 * GiB, 459e12, 2765e9),
    'v6e': Chip('v6e', 32 * GiB, 918e12, 1640e9),
}


def chip_of(topology: str) -> Chip:
  """The chip of a topology name such as 'v5e:2x4' or 'v4:2x2x2'."""
  kind = topology.split(':', 1)[0]
  if kind not in CHIPS or ':' not in topology:
    raise ValueError(f"topology must be '<chip>:<shape>' with chip one of {sorted(CHIPS)}, e.g. "
                     f"'v5e:2x4', got {topology!r}")
  return CHIPS[kind]


def roofline_seconds(flops: float, bytes_accessed: float, chip: Chip) -> tuple[float, str]:
  """(seconds, 'compute' or 'memory'): the larger of the two per-chip lower bounds."""
  compute, memory = flops / chip.peak_flops, bytes_accessed / chip.hbm_bandwidth
  return (compute, 'compute') if compute >= memory else (memory, 'memory')


def chip_count(topology: str) -> int:
  """Chips in a topology name: the product of its shape, e.g. 8 for 'v5e:2x4'."""
  chip_of(topology)
  try:
    dims = [int(d) for d in topology.split(':', 1)[1].split('x')]
  except ValueError:
    raise ValueError(f"topology shape must be like '2x4' or '2x2x1', got {topology!r}") from None
  return int(math.prod(dims))


def _host_bounds(topology: str) -> tuple[int, int, int] | None:
  """Chips per host as Cloud TPU VMs have them: a v5e/v6e slice of up to 8 chips is one host
  (1, 4 or 8 chips); larger slices and v4/v5p have 2x2x1 chips per host (the compiler's default,
  which cannot describe slices smaller than it)."""
  kind, shape = topology.split(':', 1)
  dims = [int(d) for d in shape.split('x')]
  dims += [1] * (3 - len(dims))
  if (kind in ('v5e', 'v6e') and math.prod(dims) <= 8) or math.prod(dims) < 4:
    return tuple(dims)
  return None


def topology_devices(topology: str) -> list:
  """The devices of a TPU slice named like 'v5e:4x4', for compiling without one (needs libtpu:
  `pip install 'diffgeo_jax[tpu]'`), with Cloud TPU's chips per host (`_host_bounds`):
  multi-host slices give devices of several processes (v5e:4x4: 4 hosts)."""
  chip_count(topology)
  from jax.experimental import topologies  # noqa: PLC0415
  bounds = _host_bounds(topology)
  kwargs = {} if bounds is None else {'chips_per_host_bounds': bounds}
  try:
    return list(topologies.get_topology_desc(topology, 'tpu', **kwargs).devices)
  except Exception as e:
    raise ValueError(f'cannot describe TPU topology {topology!r} ({type(e).__name__}: {e}); is '
                     "libtpu installed (pip install 'diffgeo_jax[tpu]'), and is the shape one "
                     'the chip comes in?') from e


def per_device(chip: Chip, devices_per_chip: int) -> Chip:
  """The share of a chip one JAX device has: v4 slices described per TensorCore (2 per chip)
  split the chip's HBM, peak and bandwidth."""
  if devices_per_chip == 1:
    return chip
  return Chip(f'{chip.name} (1/{devices_per_chip} chip per device)',
              chip.hbm_bytes // devices_per_chip, chip.peak_flops / devices_per_chip,
              chip.hbm_bandwidth / devices_per_chip)


def libtpu_available() -> bool:
  import importlib.util  # noqa: PLC0415
  return importlib.util.find_spec('libtpu') is not None
