"""The pod path on real TPU topologies, without a TPU: the mesh in topology order and the rows each
host feeds (libtpu, the `[tpu]` extra; skipped where it is not installed). Every job compiled for
a 4-host slice: tests/aot/test_tpu_compile.py."""


import numpy as np
import pytest

from diffgeo_jax import distributed

topologies = pytest.importorskip('jax.experimental.topologies')
pytest.importorskip('libtpu', reason='libtpu (pip install .[tpu]) compiles for TPU topologies')


def _topology(name):
  return list(topologies.get_topology_desc(name, 'tpu').devices)


@pytest.mark.parametrize('name, hosts', [('v5e:2x2', 1), ('v5e:4x4', 4), ('v5p:2x2x2', 2),
                                         ('v6e:4x4', 4),
                                         ('v4:2x2x2', 2)])  # one device per core: jax's order
def test_every_row_is_fed_once_by_the_host_whose_devices_hold_it(name, hosts):
  devices = _topology(name)
  mesh = distributed.make_mesh(devices=devices)
  assert sorted({d.process_index for d in devices}) == list(range(hosts))
  assert sorted(d.id for d in mesh.devices.ravel()) == sorted(d.id for d in devices)
  n = 2 * len(devices)
  held = distributed.batch_sharding(mesh).devices_indices_map((n,))
  feeds = {p: distributed.process_rows(n, mesh, p) for p in range(hosts)}
  assert sorted(np.concatenate(list(feeds.values())).tolist()) == list(range(n))
  for p, rows in feeds.items():
    want = sorted(r for d, idx in held.items() if d.process_index == p
                  for r in range(*idx[0].indices(n)))
    np.testing.assert_array_equal(rows, want)
  if name == 'v5e:4x4':  # topology order: a host's rows are not one block
    assert feeds[0].tolist() != list(range(8))
