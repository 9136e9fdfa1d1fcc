r"""Load a diffusers model or pipeline folder with the Flax ports and run each model once.

    python launch/inspect_checkpoint.py --model_dir=/path/to/stable-diffusion-v1-5 --workdir=/tmp/inspect

Checks that every key and shape of the checkpoint fits our port (the error lists any that do not),
counts parameters, runs one jit-compiled forward pass per model on zeros, and writes
`config.json` (the flags) and `results.json` (metrics: per model, parameter count, output shape
and norm, compile and run seconds) to --workdir (local or gs://). --model_dir may be on gs://
(staged once per host). Multi-host: every process runs the same passes; process 0 writes.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from diffgeo_jax import models, paths, runs
from diffgeo_jax.models import clip, config_utils, unet, vae

_MODEL_DIR = flags.DEFINE_string('model_dir', None, 'diffusers pipeline or model folder.',
                                 required=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where results.json goes.', required=True)
_VARIANT = flags.DEFINE_string('variant', None, 'Weights variant, e.g. fp16.')
_ALLOW_PICKLE = flags.DEFINE_bool('allow_pickle', False, 'Allow loading PyTorch .bin pickles.')


def _timed_forward(name, model, params, args, method=None):
  fn = jax.jit(lambda p, *a: model.apply({'params': p}, *a, method=method))
  start = time.perf_counter()
  out = jax.block_until_ready(fn(params, *args))
  compiled = time.perf_counter() - start
  start = time.perf_counter()
  out = jax.block_until_ready(fn(params, *args))
  run = time.perf_counter() - start
  if isinstance(out, clip.CLIPTextOutput):
    leaf = out.last_hidden_state
  elif isinstance(out, vae.DiagonalGaussian):
    leaf = out.mean
  else:
    leaf = out
  result = {'params': int(sum(np.prod(a.shape) for a in jax.tree.leaves(params))),
            'output_shape': list(leaf.shape), 'output_rms': float(jnp.sqrt(jnp.mean(leaf ** 2))),
            'compile_and_first_run_s': compiled, 'run_s': run}
  logging.info('%s: %s', name, result)
  return result


def main(argv):
  del argv
  kwargs = dict(variant=_VARIANT.value, allow_pickle=_ALLOW_PICKLE.value)
  run = runs.start({'model_dir': _MODEL_DIR.value, **kwargs}, _WORKDIR.value)
  found = {}
  with run.timed('load'):
    path = paths.local_folder(_MODEL_DIR.value, '--model_dir')
    if os.path.exists(os.path.join(path, 'model_index.json')):
      pipe = models.load_pipeline(path, **kwargs)
      for name in ('unet', 'vae', 'text_encoder', 'text_encoder_2'):
        if getattr(pipe, name) is not None:
          found[name] = (getattr(pipe, name), getattr(pipe, f'{name}_params'))
    else:
      cfg = config_utils.read_json(os.path.join(path, 'config.json'))
      default = 'CLIPTextModel' if 'architectures' in cfg else 'UNet2DConditionModel'
      found['model'] = models.load_model(path, default, **kwargs)

  results = {}
  for name, (model, params) in found.items():
    if isinstance(model, models.UNet2DConditionModel):
      args = unet.dummy_inputs(model.config, size=max(8, 2 ** (len(model.config.block_out_channels) - 1)))
      results[name] = _timed_forward(name, model, params, args)
      results[name]['hspace_shape'] = list(jax.eval_shape(
          lambda p: model.apply({'params': p}, *args, method='hspace'), params).shape)
    elif isinstance(model, models.AutoencoderKL):
      results[name] = _timed_forward(name, model, params, vae.dummy_inputs(model.config),
                                     method='encode')
    else:
      results[name] = _timed_forward(name, model, params, clip.dummy_inputs(model.config))
  run.finish(results)
  print(json.dumps(results, indent=2))


if __name__ == '__main__':
  app.run(main)
