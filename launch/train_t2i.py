r"""Train a text-to-image diffusion model (text encoder and UNet jointly, from scratch) on the digits.

    python launch/train_t2i.py --config=configs/digits/t2i.py --workdir=/tmp/digits_t2i \
      [--config.export_dir=/tmp/digits_pipeline] [--jax_distributed]

The loss is the epsilon-prediction MSE of DDPM at uniformly drawn integer timesteps; about 10% of
captions are empty so the model also learns the unconditional prediction classifier-free guidance
needs. Writes to --workdir: `config.json`, `checkpoints/` (orbax; a rerun resumes from the latest),
`tensorboard/`, `pipeline/` (the EMA weights as a diffusers pipeline folder, also written to
`export_dir` when set) and `results.json`.
"""

from __future__ import annotations

import json
import os
import shlex
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from diffgeo_jax import digits, models
from diffgeo_jax.models import unet as unet_lib
from diffgeo_jax.diffusion import schedules
from diffgeo_jax.digits import dataset, tokenizer
from diffgeo_jax.training import sharding, trainer

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config (configs/digits/t2i.py).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder (resumes from its checkpoints).',
                               required=True)
_DISTRIBUTED = flags.DEFINE_bool('jax_distributed', False,
                                 'Call jax.distributed.initialize() (multi-host TPU pods).')


class Job:
  """The models, schedule, data and loss of one text-to-image training config."""

  def __init__(self, config, workdir: str):
    self.config = config
    self.unet = models.UNet2DConditionModel(
        models.UNet2DConditionConfig.from_dict(config.unet.to_dict()))
    self.text = models.CLIPTextModel(models.CLIPTextConfig.from_dict(config.text_encoder.to_dict()))
    self.schedule = schedules.from_diffusers_config(config.scheduler.to_dict())
    self.tokenizer_dir = os.path.join(workdir, 'tokenizer')
    if jax.process_index() == 0 or not os.path.isdir(self.tokenizer_dir):
      tokenizer.write(self.tokenizer_dir)
    self.tokenizer = models.load_tokenizer(self.tokenizer_dir)
    self.split = dataset.load('train', seed=config.data.split_seed)
    # Captions come from a closed set: tokenize each once.
    captions = [''] + [dataset.caption(d, c) for d in range(10) for c in range(len(dataset.COLOURS))]
    ids = self.tokenizer(captions, padding='max_length', max_length=tokenizer.MAX_LENGTH,
                         return_tensors='np').input_ids
    self.ids = dict(zip(captions, ids.astype(np.int32)))

  def init_fn(self, key: jax.Array) -> dict:
    k_text, k_unet = jax.random.split(key)
    ids = jnp.zeros((1, tokenizer.MAX_LENGTH), jnp.int32)
    text_params = self.text.init(k_text, ids)['params']
    x, t, context, _ = unet_lib.dummy_inputs(self.unet.config, batch=1)
    unet_params = self.unet.init(k_unet, x, t, context)['params']
    return {'text_encoder': text_params, 'unet': unet_params}

  def loss_fn(self, params: dict, batch: dict, key: jax.Array):
    x0 = batch['images']
    k_t, k_noise = jax.random.split(key)
    t = jax.random.randint(k_t, (x0.shape[0],), 0, self.schedule.num_train_timesteps)
    noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
    x_t = self.schedule.add_noise(x0, noise, t)
    context = self.text.apply({'params': params['text_encoder']}, batch['input_ids']).last_hidden_state
    eps = self.unet.apply({'params': params['unet']}, x_t, t, context)
    return jnp.mean((eps - noise) ** 2), {}

  def batch_fn(self, step: int) -> dict:
    """This process's rows of step `step`'s batch: a function of (seed, step, process) alone."""
    c = self.config.train
    rows = c.batch_size // jax.process_count()
    rng = np.random.default_rng([c.seed, step, jax.process_index()])
    b = dataset.sample_batch(rng, self.split, rows, self.config.data.empty_caption_prob)
    return {'images': b['images'], 'input_ids': np.stack([self.ids[s] for s in b['captions']])}

  def pipeline(self, params: dict) -> models.Pipeline:
    scheduler = {'_class_name': 'DDPMScheduler', **self.config.scheduler.to_dict()}
    return models.Pipeline(
        unet=self.unet, unet_params=params['unet'], text_encoder=self.text,
        text_encoder_params=params['text_encoder'], tokenizer=self.tokenizer,
        scheduler_config=scheduler, class_name=digits.PIPELINE_CLASS)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  sharding.initialize_distributed(_DISTRIBUTED.value)
  config, workdir = _CONFIG.value, _WORKDIR.value
  job = Job(config, workdir)
  run = trainer.Trainer(config, workdir, job.init_fn, job.loss_fn, job.batch_fn)
  state, result = run.run()
  if jax.process_index() != 0:
    return
  params = jax.device_get(state.ema_params)
  out = os.path.join(workdir, 'pipeline')
  models.save_pipeline(out, job.pipeline(params))
  # transformers 5 saves only tokenizer.json; the BPE files keep older transformers (and any CLIP
  # BPE reader) able to load the tokenizer.
  tokenizer.write(os.path.join(out, 'tokenizer'))
  n_params = {k: int(sum(np.size(p) for p in jax.tree.leaves(v))) for k, v in params.items()}
  result = {**result, 'parameters': n_params, 'train_images': len(job.split),
            'command': shlex.join(['python', *sys.argv]),
            'jax': jax.__version__, 'backend': jax.default_backend()}
  with open(os.path.join(out, 'training.json'), 'w') as f:
    json.dump(result, f, indent=2)
  trainer.write_outputs(workdir, result, out, config.export_dir)


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
