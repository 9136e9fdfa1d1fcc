"""The pod path on real TPU topologies, without a TPU: the mesh in topology order, the rows each
host feeds, and the sampling and training programs compiled by the TPU compiler (libtpu, the
`[tpu]` extra; skipped where it is not installed)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffgeo_jax import digits, distributed, models
from diffgeo_jax.diffusion import pipeline
from diffgeo_jax.training import trainer

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


def test_sampling_and_training_compile_for_a_four_host_topology():
  devices = _topology('v5e:4x4')
  mesh = distributed.make_mesh(devices=devices)
  rep, bat = distributed.replicated(mesh), distributed.batch_sharding(mesh)
  spec = lambda tree, s: jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=s), tree)
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep)
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
  # The pipeline's sampler (digits model, DDIM with CFG): batch over `data`, output replicated.
  pipe = models.load_pipeline(digits.pipeline_dir())
  generate = pipeline._generator(pipe.unet, pipe.vae,
                                 json.dumps(pipe.scheduler_config, sort_keys=True), 'ddim', 2, 0,
                                 0.0, True, False, False, None, False, mesh)
  b = len(devices)
  cond = jax.ShapeDtypeStruct((b, 12, pipe.text_encoder.config.hidden_size), jnp.float32,
                              sharding=bat)
  x = jax.ShapeDtypeStruct((b, 16, 16, 3), jnp.float32, sharding=bat)
  compiled = generate.lower(spec(pipe.unet_params, rep), None, x, cond, cond, scalar, scalar,
                            key).compile()
  images, _ = compiled.output_shardings
  assert images.is_fully_replicated
  assert compiled.cost_analysis()['flops'] > 0
  # The train_t2i step (tiny config) with the trainer's shardings.
  from configs.digits import t2i
  from launch import train_t2i
  config = t2i.get_config('tiny')
  config.train.batch_size = 2 * b
  job = train_t2i.Job(config)
  tr = trainer.Trainer(config, '/nonexistent', job.init_fn, job.loss_fn, job.batch_fn, mesh=mesh)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       jax.eval_shape(tr._init_state, jax.random.key(0)), tr.state_shardings())
  step = tr.compiled_step().lower(state, spec(job.batch_fn(0), bat), key).compile()
  assert step.memory_analysis().temp_size_in_bytes > 0
