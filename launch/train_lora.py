r"""DreamBooth-style LoRA customization: teach a text-to-image model a concept from a few reference
images under an identifier token ("a sks digit three"), optionally with prior preservation and
with DECOR (arXiv 2412.09169) on the instance prompt's embeddings during fine-tuning.

    python launch/train_lora.py --config=configs/decor/digits.py --workdir=/tmp/decor_digits
    python launch/train_lora.py --config=configs/decor/digits.py \
      --config.data.images=/data/refs.npz --config.pipeline_dir=/ckpt/sd-v1-5 --workdir=...

Steps (as diffusers' `examples/dreambooth/train_dreambooth_lora.py`):
1. Reference images: `data.images`, a .npz with `images` (N, H, W, 3) in [0, 1] or a folder of
   PNG/JPEG files, all of the pipeline's image size (nothing is resized or cropped). Empty: the
   digits world's references, `data.num_references` training digits `data.reference_digit`
   rendered in the new colour `data.colour_rgb` (not a palette colour: the base model has never
   drawn it).
2. Prior preservation (`prior.weight` > 0): the base model's own samples of `prior.class_prompts`
   (in turn, `prior.num_images`), cached in `workdir/class_images.npz`; the loss adds
   `prior.weight` times their denoising error. Every process samples them (the pipeline shards
   the batch over all devices and returns it to each), so all hold the same set.
3. Training: the denoising loss ||eps - eps_theta(x_t, t, c)||^2 at t ~ U[0, T) on the LoRA
   factors only (the base UNet is the frozen argument of the step), AdamW, orbax checkpoints with
   resume (`training.trainer.Trainer`). `decor.train_strength` > 0 projects the instance prompt's
   embeddings away from `decor.undesired`'s row space (top `decor.rank`) before the UNet sees them
   (DECOR at fine-tuning; the class prompts are not projected).

SDXL folders: the conditioning is SDXL's (both encoders, the pooled embedding, the time ids of the
references' size, no crop); DECOR projects each encoder's part of the token embeddings off that
encoder's embeddings of `decor.undesired`, and the pooled embedding off the undesired texts' pooled
embeddings (`pipeline.decor_prompts`).

Writes to --workdir (local or gs://): `config.json`, `references.png`, `checkpoints/`,
`tensorboard/`, `lora/` (`pytorch_lora_weights.safetensors`, loadable by diffusers) and
`results.json`. `data.images` and `pipeline_dir` may be on gs:// too. Multi-host: every process
builds the same global batch of a step from (seed, step) and feeds its own rows of it, so N
processes train the LoRA one process would. The digits
experiment's evaluation (content leakage vs colour, DECOR at sampling time) is
`launch/evaluate_customization.py` with the same config and workdir.
"""

from __future__ import annotations

import io
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from PIL import Image

from diffgeo_jax import digits, distributed, images as images_lib, models, paths, runs
from diffgeo_jax.diffusion import conditioning, guidance, pipeline, schedules
from diffgeo_jax.digits import dataset
from diffgeo_jax.text import decor
from diffgeo_jax.training import dreambooth, lora, precision, trainer

_CONFIG = config_flags.DEFINE_config_file('config', None, 'configs/decor/*.py')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder (resumes from its checkpoints).',
                               required=True)

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg')


def digits_references(d) -> np.ndarray:
  """(N, 16, 16, 3) in [0, 1]: the first `d.num_references` training digits `d.reference_digit`
  painted in `d.colour_rgb` on black (the digits renderer's rule, with an RGB of our own)."""
  if d.reference_digit not in dataset.DIGIT_WORDS:
    raise ValueError(f'data.reference_digit must be one of {dataset.DIGIT_WORDS}, got '
                     f'{d.reference_digit!r}')
  rgb = np.asarray(d.colour_rgb, np.float32)
  if rgb.shape != (3,) or rgb.min() < 0 or rgb.max() > 1:
    raise ValueError(f'data.colour_rgb must be 3 numbers in [0, 1], got {d.colour_rgb!r}')
  split = dataset.load('train')
  idx = np.flatnonzero(split.digits == dataset.DIGIT_WORDS.index(d.reference_digit))
  if not 1 <= d.num_references <= len(idx):
    raise ValueError(f'data.num_references must be in [1, {len(idx)}], got {d.num_references}')
  return split.strokes[idx[:d.num_references], ..., None] * rgb


def read_images(path: str) -> np.ndarray:
  """(N, H, W, 3) float32 in [0, 1] from a .npz (`images`, in [0, 1]) or a folder of images,
  local or on gs://."""
  folder = paths.resolve(path, 'data.images')
  if path.endswith('.npz'):
    arrays = paths.load_npz(folder)
    if 'images' not in arrays:
      raise ValueError(f'{path} has no array "images" (its arrays: {sorted(arrays)})')
    x = np.asarray(arrays['images'], np.float32)
  elif folder.is_dir():
    files = sorted((f for f in folder.iterdir() if f.name.lower().endswith(IMAGE_SUFFIXES)),
                   key=lambda f: f.name)
    if not files:
      raise ValueError(f'{path} holds no {"/".join(IMAGE_SUFFIXES)} files')
    x = [np.asarray(Image.open(io.BytesIO(f.read_bytes())).convert('RGB'), np.float32) / 255
         for f in files]
    sizes = sorted({a.shape for a in x})
    if len(sizes) > 1:
      raise ValueError(f'the images in {path} have different sizes {sizes}; give them one size')
    x = np.stack(x)
  else:
    raise ValueError(f'data.images must be a .npz file or a folder of images, got {path!r}')
  if x.ndim != 4 or x.shape[-1] != 3 or x.min() < 0 or x.max() > 1:
    raise ValueError(f'the images of {path} must be (N, H, W, 3) in [0, 1], got shape {x.shape} '
                     f'and range [{x.min():.3g}, {x.max():.3g}]')
  return x


def reference_images(pipe, config) -> np.ndarray:
  d = config.data
  if not d.images and not d.reference_digit:
    raise ValueError('data.images must name the reference images (a .npz or a folder of '
                     'images); only the digits world has built-in references '
                     '(data.reference_digit)')
  x = read_images(d.images) if d.images else digits_references(d)
  size = pipeline.default_image_size(pipe)
  if x.shape[1:3] != size:
    raise ValueError(f'the reference images are {x.shape[1]}x{x.shape[2]} but the pipeline '
                     f'samples {size[0]}x{size[1]}; resize or crop them first (nothing is resized '
                     f'here)')
  return x


def cycled(prompts, n: int) -> list[str]:
  prompts = [str(p) for p in prompts]
  if not prompts:
    raise ValueError('prior.weight > 0 needs prior.class_prompts')
  return [prompts[i % len(prompts)] for i in range(n)]


def class_images(pipe, config, run: runs.Run | None) -> dict[str, np.ndarray]:
  """The base model's samples of the class prompts (prior preservation), cached in the run's
  workdir (`run` None: not cached). Every process samples the same batches (the pipeline returns
  them to each) and reuses the cache only when every process can read it."""
  cached = run is not None and distributed.exists_on_every_host(
      run.path('class_images.npz'))
  if cached:
    logging.info('reusing the class images in %s', run.path('class_images.npz'))
    return paths.load_npz(run.path('class_images.npz'))
  p = config.prior
  if p.num_images < 1:
    raise ValueError(f'prior.weight > 0 needs prior.num_images >= 1, got {p.num_images}')
  prompts = cycled(p.class_prompts, p.num_images)
  batch = p.generation_batch or len(prompts)
  key = jax.random.key(p.seed)
  imgs = np.concatenate([np.asarray(pipeline.text_to_image(
      pipe, prompts[i:i + batch], jax.random.fold_in(key, i), num_steps=p.num_steps,
      guidance=guidance.CFG(p.guidance_scale))) for i in range(0, len(prompts), batch)])
  out = {'images': imgs.astype(np.float32), 'prompts': np.array(prompts)}
  if run is not None:
    run.save_npz('class_images.npz', **out)
  return out


def instance_context(pipe, config) -> Any:
  """The UNet's conditioning of the instance prompt, a batch of one at the pipeline's image size
  (SD: (1, L, D); SDXL: the dict with the pooled embedding and the time ids), DECOR-projected when
  decor.train_strength > 0 (SDXL: each encoder's token embeddings and the pooled embedding,
  `pipeline.decor_prompts`)."""
  c = config.decor
  prompts = [config.data.instance_prompt]
  if not c.train_strength:
    embeds = pipeline.encode_prompts(pipe, prompts)
  else:
    if not c.undesired:
      raise ValueError('decor.train_strength > 0 needs decor.undesired (the text to project out)')
    settings = decor.Settings(c.undesired, c.train_strength, c.rank or None)
    embeds = pipeline.decor_prompts(pipe, prompts, settings)
  return conditioning.to_numpy(conditioning.at_size(pipe, embeds))


class Job:
  """The frozen base model, the encoded references (and class images) and the loss."""

  def __init__(self, config, run: runs.Run | None = None):
    self.config = config
    self.pipe = models.load_pipeline(digits.pipeline_dir(config.pipeline_dir))
    self.schedule = schedules.from_diffusers_config(self.pipe.scheduler_config)
    self.references = reference_images(self.pipe, config)
    key = jax.random.key(config.data.seed)
    # One VAE posterior sample per image for a latent pipeline (2x - 1 in pixel space).
    self.x_instance = np.asarray(pipeline.encode_images(self.pipe, self.references, key))
    # One sample's conditioning (SD: (L, D); SDXL: a dict of per-sample leaves).
    self.c_instance = conditioning.rows(instance_context(self.pipe, config), 0)
    self.prior = config.prior.weight > 0
    if self.prior:
      cls = class_images(self.pipe, config, run)
      self.x_class = np.asarray(pipeline.encode_images(self.pipe, cls['images'],
                                                       jax.random.fold_in(key, 1)))
      self.c_class = conditioning.to_numpy(conditioning.of_prompts(
          self.pipe, [str(p) for p in cls['prompts']]))

  def objective(self) -> dreambooth.Objective:
    """The training objective: the UNet with the run's `model.dtype` and `model.remat`."""
    unet = precision.configure_unet(self.pipe.unet, self.config.get('model'))
    return dreambooth.Objective.from_config(self.config, unet, self.schedule,
                                            self.pipe.unet_params)

  def batch_fn(self, step: int) -> dict:
    """The global batch of step `step`: instance rows (and as many class rows with prior
    preservation), a function of (seed, step) alone (the Trainer feeds each process's rows)."""
    c = self.config.train
    rows = c.batch_size  # the global batch (the Trainer feeds each process's rows of it)
    rng = np.random.default_rng([c.seed, step])
    idx = rng.integers(0, len(self.x_instance), rows)
    x = self.x_instance[idx]
    ctx = conditioning.broadcast(self.c_instance, rows)
    instance = np.ones(rows, np.float32)
    if self.prior:  # as DreamBooth: the batch is half instance, half class rows
      n_cls = rows // 2
      j = rng.integers(0, len(self.x_class), n_cls)
      x = np.concatenate([x[:rows - n_cls], self.x_class[j]])
      ctx = conditioning.concatenate([conditioning.rows(ctx, slice(0, rows - n_cls)),
                                      conditioning.rows(self.c_class, j)])
      instance = np.concatenate([instance[:rows - n_cls], np.zeros(n_cls, np.float32)])
    return {'x': x.astype(np.float32),
            'context': jax.tree.map(lambda a: np.ascontiguousarray(a, np.float32), ctx),
            'instance': instance}


def main(argv):
  # config_file=None: the Trainer writes config.json
  config, run = runs.start_main(argv, _CONFIG, _WORKDIR, config_file=None)
  if config.prior.weight > 0 and config.train.batch_size < 2:
    raise ValueError('prior preservation needs train.batch_size >= 2 (half instance, half class)')
  with run.timed('data'):
    job = Job(config, run)
  n = len(job.references)
  run.save_image('references.png', images_lib.grid(
      job.references, 1, n, scale=max(1, 64 // job.references.shape[1])))
  with run.timed('training'):
    objective = job.objective()
    state, result = trainer.Trainer(
        config, run.workdir, objective.init_fn, objective.loss_fn, job.batch_fn,
        frozen=precision.frozen_params(job.pipe.unet_params, config.get('model'))).run()
  lp = distributed.to_host(state.params)
  if run.is_main:
    with run.folder('lora') as out:
      lora.save(out, lp)
  run.finish({'training': result, 'references': n,
              'prior_images': int(len(job.x_class)) if job.prior else 0,
              'lora_parameters': int(sum(np.size(x) for x in jax.tree.leaves(lp)))})


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
