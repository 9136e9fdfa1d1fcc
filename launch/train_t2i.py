r"""Train a text-to-image diffusion model (text encoder and UNet jointly, from scratch) on the digits.

    python launch/train_t2i.py --config=configs/digits/t2i.py --workdir=/tmp/digits_t2i \
      [--config.export_dir=/tmp/digits_pipeline] [--jax_distributed]
    # a pod: launch/tpu_pod.py ... --binary=launch/train_t2i.py -- --config=... --workdir=gs://b/run

The loss is the epsilon-prediction MSE of DDPM at uniformly drawn integer timesteps; about 10% of
captions are empty so the model also learns the unconditional prediction classifier-free guidance
needs. Writes to --workdir (local or gs://): `config.json`, `checkpoints/` (orbax; a rerun resumes
from the latest), `tensorboard/`, `pipeline/` (the EMA weights as a diffusers pipeline folder, also
written to `export_dir` when set) and `results.json`.

Multi-host: every process builds the same global batch of a step from (seed, step) and feeds the
rows its devices hold, so a run on N processes computes the same updates as one process with the
same global batch.
"""

from __future__ import annotations

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from diffgeo_jax import digits, models, paths, runs
from diffgeo_jax.diffusion import schedules
from diffgeo_jax.digits import dataset, tokenizer
from diffgeo_jax.training import precision, text_to_image, trainer

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config (configs/digits/t2i.py).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder (resumes from its checkpoints).',
                               required=True)


class Job:
  """The models, schedule, data and loss of one text-to-image training config."""

  def __init__(self, config):
    self.config = config
    self.unet = models.UNet2DConditionModel(
        models.UNet2DConditionConfig.from_dict(config.unet.to_dict()))
    self.text = models.CLIPTextModel(models.CLIPTextConfig.from_dict(config.text_encoder.to_dict()))
    self.schedule = schedules.from_diffusers_config(config.scheduler.to_dict())
    self.tokenizer = tokenizer.load()
    self.split = dataset.load('train', seed=config.data.split_seed)
    # Captions come from a closed set: tokenize each once.
    captions = [''] + [dataset.caption(d, c) for d in range(10) for c in range(len(dataset.COLOURS))]
    ids = self.tokenizer(captions, padding='max_length', max_length=tokenizer.MAX_LENGTH,
                         return_tensors='np').input_ids
    self.ids = dict(zip(captions, ids.astype(np.int32)))

  def objective(self) -> text_to_image.Objective:
    """The UNet and text encoder trained jointly, with the run's `model.dtype` and `model.remat`."""
    return text_to_image.Objective(precision.configure_unet(self.unet, self.config.get('model')),
                                   self.schedule, self.text, max_length=tokenizer.MAX_LENGTH)

  def init_fn(self, key: jax.Array) -> dict:
    return self.objective().init_fn(key)

  def loss_fn(self, params: dict, batch: dict, key: jax.Array):
    return self.objective().loss_fn(params, batch, key)

  def batch_fn(self, step: int) -> dict:
    """The global batch of step `step`, a function of (seed, step) alone (the Trainer feeds each
    process's rows of it)."""
    c = self.config.train
    rng = np.random.default_rng([c.seed, step])
    b = dataset.sample_batch(rng, self.split, c.batch_size, self.config.data.empty_caption_prob)
    return {'images': b['images'], 'input_ids': np.stack([self.ids[s] for s in b['captions']])}

  def pipeline(self, params: dict) -> models.Pipeline:
    scheduler = {'_class_name': 'DDPMScheduler', **self.config.scheduler.to_dict()}
    return models.Pipeline(
        unet=self.unet, unet_params=params['unet'], text_encoder=self.text,
        text_encoder_params=params['text_encoder'], tokenizer=self.tokenizer,
        scheduler_config=scheduler, class_name=digits.PIPELINE_CLASS)


def main(argv):
  # config_file=None: the Trainer writes config.json
  config, run = runs.start_main(argv, _CONFIG, _WORKDIR, config_file=None)
  job = Job(config)
  params, result = trainer.train_job(config, run, job)
  n_params = {k: int(sum(np.size(p) for p in jax.tree.leaves(v))) for k, v in params.items()}
  result = {**result, 'parameters': n_params, 'train_images': len(job.split)}
  if run.is_main:
    with run.folder('pipeline', config.export_dir) as out:
      models.save_pipeline(out, job.pipeline(params))
      # transformers 5 saves only tokenizer.json; the BPE files keep older transformers (and any
      # CLIP BPE reader) able to load the tokenizer.
      tokenizer.write(f'{out}/tokenizer')
      training = run.results(result)
      paths.write_json(f'{out}/training.json', training)
  run.finish(result)


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
