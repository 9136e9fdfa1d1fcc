"""The jobs compiled ahead of time: each builds the jitted function its binary runs, from the
library code the binary calls (not a copy), with the binary's shardings over the given devices.

    progs = jobs.programs('duo', shapes.abstract_model('sd15'), devices, config)
    record = analysis.compile_program(progs[0].lower, chip)

| job       | program(s)                | the binary's code                                        |
|-----------|---------------------------|----------------------------------------------------------|
| sample    | cfg_step, loop            | `guidance.CFG.eps_fn`, `pipeline._generate`              |
| explore   | pullback_iteration        | `pullback.unet_bases_fn` (explore.py), k vectors, 1 iteration |
| train_t2i | train_step                | `Trainer` + `text_to_image.Objective` (train_t2i.py)     |
| duo       | train_step                | `Trainer` + `unlearning.duo.Objective` (train_duo.py)    |
| lora      | train_step                | `Trainer` + `dreambooth.Objective` (train_lora.py)       |
| jys       | grid_pass                 | `jys._passes_fn` (jys_search.py), shipped Countdown model |
| goar      | retrain                   | `retrain._train_and_test_many` (goar.py)                 |

Parameters and batches are `jax.ShapeDtypeStruct`s (no weights), except the JYS denoiser, which
its binary closes over as constants: the shipped one is small and used as it is. Training jobs
take their settings from the job configs (`config.<job>[model]`, the binaries' own configs) and
the tool's `dtype`, `remat` and `attention` (explore keeps 'softmax': it needs forward-mode AD,
which the flash kernel lacks); a data axis that does not divide the paper's global batch moves
the remaining devices to the FSDP `model` axis.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from diffgeo_jax import distributed
from diffgeo_jax.aot import shapes
from diffgeo_jax.diffusion import guidance, pipeline, schedules
from diffgeo_jax.geometry import pullback
from diffgeo_jax.models import attention
from diffgeo_jax.training import dreambooth, precision, sharding, text_to_image, trainer
from diffgeo_jax.unlearning import duo

JOBS = ('sample', 'explore', 'train_t2i', 'duo', 'lora', 'jys', 'goar')
# Jobs whose model is their own, whatever --config.model says.
OWN_MODELS = {'jys': 'countdown denoiser (shipped)', 'goar': 'digits retraining MLP'}


@dataclasses.dataclass(frozen=True)
class Program:
  job: str
  name: str
  lower: Callable[[], Any]  # () -> jax.stages.Lowered
  mesh: dict  # axis sizes
  steps: int = 1  # sampler steps (or training steps) one call runs
  notes: str = ''


def _job_config(table, model: str):
  """`table[model]`, or the latent-diffusion entry 'sd' for the SD shapes."""
  key = model if model in table else 'sd'
  if key not in table:
    raise ValueError(f'no job config for model {model!r}; have {sorted(table)}')
  return ml_collections.ConfigDict(table[key].to_dict())


def _model_config(c, attention: str | None = None) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(dtype=c.dtype, remat=bool(c.remat),
                                        attention=attention or c.attention))


def _batched(tree, n: int):
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct((n, *s.shape), s.dtype), tree)


def _mesh_for_batch(devices, batch: int, model_axis: int = 1):
  """The largest data axis that divides `batch` (and the devices), the rest on `model`."""
  n = len(devices)
  data = math.gcd(batch, n // model_axis)
  return distributed.make_mesh(data=data, model=n // data, devices=devices)


def _trainer(config, objective, mesh, rules=(), frozen=None) -> trainer.Trainer:
  return trainer.Trainer(config, os.path.join(tempfile.gettempdir(), 'aot-unused'),
                         objective.init_fn, objective.loss_fn, None, mesh=mesh, rules=rules,
                         frozen=frozen)


def _fsdp_rules(mesh) -> tuple:
  m = int(mesh.shape['model'])
  return (('.*', sharding.fsdp('model', m)),) if m > 1 else ()


# -- the jobs ----------------------------------------------------------------------------------

def sample(m: shapes.AbstractModel, devices, c) -> list[Program]:
  mesh = distributed.make_mesh(devices=devices)
  mc = _model_config(c)
  unet = precision.configure_unet(m.unet, mc)
  b = c.sample.batch_per_chip * distributed.data_size(mesh)
  rep, bat = distributed.replicated(mesh), distributed.batch_sharding(mesh)
  unet_params = distributed.abstract(precision.frozen_params(m.unet_params, mc), rep)
  vae_params = (None if m.vae is None else
                distributed.abstract(precision.frozen_params(m.vae_params, mc), rep))
  x = jax.ShapeDtypeStruct((b, *m.sample_shape), np.float32, sharding=bat)
  cond = distributed.abstract(_batched(m.context, b), bat)
  scalar = jax.ShapeDtypeStruct((), np.float32, sharding=rep)
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep)
  config_json = json.dumps(m.scheduler_config, sort_keys=True)
  s = schedules.from_diffusers_config(m.scheduler_config)

  contexts = guidance.Contexts(cond, cond)  # the prompts' and the negative prompts'
  cfg = guidance.CFG(scalar)  # a traced scale, as the pipeline's

  def step(params, x_t, t, contexts, cfg):
    with attention.partitioned(mesh):  # as the sampler loop (pipeline._generate)
      return cfg.eps_fn(pipeline.model_fn(unet, params), s, contexts)(x_t, t)

  def lower_step():
    return jax.jit(step, out_shardings=bat).lower(unet_params, x, scalar, contexts, cfg)

  def lower_loop():
    settings = pipeline.SamplerSettings(c.sample.sampler, c.sample.num_steps)
    return pipeline._generate.lower(unet_params, vae_params, x, contexts, cfg, key, unet=unet,
                                    vae=m.vae, schedule_json=config_json, settings=settings,
                                    mesh=mesh)

  shape = dict(mesh.shape)
  return [Program('sample', 'cfg_step', lower_step, shape, 1,
                  f'one classifier-free-guided UNet call on {b} samples (2 x {b} rows)'),
          Program('sample', 'loop', lower_loop, shape, c.sample.num_steps,
                  f'{c.sample.sampler} {c.sample.num_steps} steps + VAE decode, {b} samples')]


def explore(m: shapes.AbstractModel, devices, c) -> list[Program]:
  mesh = distributed.make_mesh(devices=devices)
  mc = _model_config(c, attention='softmax')  # forward-mode AD: the flash kernel has none
  e = c.explore
  n = e.samples_per_chip * distributed.data_size(mesh)
  fn = pullback.unet_bases_fn(precision.configure_unet(m.unet, mc), mesh,
                              num_vectors=e.num_vectors, num_iters=1,
                              chunk_size=e.chunk_size or None, tol=0.0)
  sds = jax.ShapeDtypeStruct
  lower = lambda: fn.lower(sds((n, *m.sample_shape), np.float32), _batched(m.context, n),
                           sds((n, 2), np.uint32), sds((), np.float32),
                           precision.frozen_params(m.unet_params, mc))
  return [Program('explore', 'pullback_iteration', lower, dict(mesh.shape), 1,
                  f'linearise + 1 subspace iteration ({e.num_vectors} JVPs + VJPs) + '
                  f'Rayleigh-Ritz, {n} samples')]


def train_t2i(m: shapes.AbstractModel, devices, c) -> list[Program]:
  config = _job_config(c.train_t2i, m.name)
  mc = _model_config(c)
  mesh = distributed.make_mesh(model=c.model_axis, devices=devices)
  b = config.train.batch_size = c.train_t2i_batch_per_chip * distributed.data_size(mesh)
  unet = precision.configure_unet(m.unet, mc)
  s = schedules.from_diffusers_config(m.scheduler_config)
  if m.vae is None:  # the digits world: text encoder and UNet from scratch, as train_t2i.py
    obj = text_to_image.Objective(unet, s, m.text_encoder,
                                  max_length=m.text_encoder.config.max_position_embeddings)
    batch = text_to_image.batch_shapes(b, m.sample_shape, max_length=obj.max_length)
    what = 'UNet + text encoder trained jointly'
  else:  # a full UNet fine-tune on precomputed text conditioning
    obj = text_to_image.Objective(unet, s)
    batch = text_to_image.batch_shapes(b, m.sample_shape, m.context)
    what = 'full UNet fine-tune (AdamW + EMA), conditioning precomputed'
  train = _trainer(config, obj, mesh, _fsdp_rules(mesh))
  return [Program('train_t2i', 'train_step', lambda: train.lower(batch), dict(mesh.shape), 1,
                  f'{what}, global batch {b}')]


def duo_step(m: shapes.AbstractModel, devices, c) -> list[Program]:
  config = _job_config(c.duo, m.name)
  mc = _model_config(c)
  mesh = _mesh_for_batch(devices, config.train.batch_size, c.model_axis)
  config.mesh.model = int(mesh.shape['model'])
  config.model = mc
  s = schedules.from_diffusers_config(m.scheduler_config)
  config.train.learning_rate = 1e-4  # set from beta by the binary; no effect on the program
  obj = duo.Objective.from_config(config, precision.configure_unet(m.unet, mc), s, m.unet_params)
  train = _trainer(config, obj, mesh, duo.rules(config),
                   frozen=precision.frozen_params(m.unet_params, mc))
  batch = duo.batch_shapes(config, m.sample_shape, m.context)
  return [Program('duo', 'train_step', lambda: train.lower(batch), dict(mesh.shape), 1,
                  f'LoRA rank {config.lora.rank} on {config.lora.targets}, '
                  f'{config.train.batch_size} pairs, retain {config.duo.retain_weight > 0}')]


def lora_step(m: shapes.AbstractModel, devices, c) -> list[Program]:
  config = _job_config(c.lora, m.name)
  mc = _model_config(c)
  mesh = _mesh_for_batch(devices, config.train.batch_size, c.model_axis)
  s = schedules.from_diffusers_config(m.scheduler_config)
  obj = dreambooth.Objective.from_config(config, precision.configure_unet(m.unet, mc), s,
                                         m.unet_params)
  train = _trainer(config, obj, mesh, _fsdp_rules(mesh),
                   frozen=precision.frozen_params(m.unet_params, mc))
  batch = dreambooth.batch_shapes(config, m.sample_shape, m.context)
  return [Program('lora', 'train_step', lambda: train.lower(batch), dict(mesh.shape), 1,
                  f'LoRA rank {config.lora.rank} on {config.lora.targets}, batch '
                  f'{config.train.batch_size}, prior {config.prior.weight > 0} (DECOR acts on '
                  'the instance embedding before the step)')]


def jys_pass(m, devices, c) -> list[Program]:
  from diffgeo_jax.discrete import jys, model as model_lib, processes  # noqa: PLC0415
  mesh = distributed.make_mesh(devices=devices)
  j = c.jys
  folder = os.path.join(os.path.dirname(model_lib.__file__), 'pretrained', 'countdown')
  net, params, mcfg = model_lib.load(folder)
  proc = processes.Absorbing(mcfg.vocab_size, processes.LogLinear(j.process_eps))
  den = jax.jit(model_lib.denoiser(net, params))  # as jys_search.run_trained
  passes = jys._passes_fn(den, proc, j.max_rows, mesh)
  grid = -(-j.grid_size // distributed.data_size(mesh)) * distributed.data_size(mesh)
  sds = jax.ShapeDtypeStruct
  lower = lambda: passes.lower(sds((j.num_samples, mcfg.length), np.int32),
                               sds((j.num_samples, mcfg.length), np.float32),
                               sds((grid,), np.float32))
  return [Program('jys', 'grid_pass', lower, dict(mesh.shape), 1,
                  f'{grid} grid times x {j.num_samples} sequences of {mcfg.length} tokens')]


def goar_retrain(m, devices, c) -> list[Program]:
  from diffgeo_jax.xai import attributions, retrain  # noqa: PLC0415
  mesh = distributed.make_mesh(devices=devices)
  g = c.goar
  model = retrain.MLP(hidden=tuple(g.hidden), num_classes=10)
  many = retrain._train_and_test_many(model, g.steps, g.batch_size, g.learning_rate, 0.0, mesh)
  n_models = len(attributions.METHODS) * g.levels * g.seeds
  n = -(-n_models // distributed.data_size(mesh)) * distributed.data_size(mesh)
  sds = jax.ShapeDtypeStruct
  image = (16, 16, 3)
  lower = lambda: many.lower(sds((n, g.num_train, *image), np.float32),
                             sds((n,), jax.random.key(0).dtype),
                             sds((n, g.num_test, *image), np.float32),
                             sds((g.num_train,), np.int32), sds((g.num_test,), np.int32))
  return [Program('goar', 'retrain', lower, dict(mesh.shape), g.steps,
                  f'{n} MLPs {tuple(g.hidden)} x {g.steps} steps, vmapped')]


BUILDERS = {'sample': sample, 'explore': explore, 'train_t2i': train_t2i, 'duo': duo_step,
            'lora': lora_step, 'jys': jys_pass, 'goar': goar_retrain}


def programs(job: str, model: str, devices, config) -> list[Program]:
  if job not in BUILDERS:
    raise ValueError(f'job must be one of {JOBS}, got {job!r}')
  m = None if job in OWN_MODELS else shapes.abstract_model(model)
  return BUILDERS[job](m, list(devices), config)
