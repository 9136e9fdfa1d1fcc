r"""DUO (arXiv 2407.21035): unlearn a concept from a text-to-image model with a LoRA trained by
preference optimisation on (unsafe, safe) image pairs.

    python launch/train_duo.py --config=configs/duo/digits.py --workdir=/tmp/duo_digits

Steps (the official `naver-ai/DUO` pipeline, on the digits world):
1. Pairs. Unsafe images: the pipeline samples "a <colour> digit <concept>" and the detector (the
   digits classifier) keeps those it reads as the concept, resampling the rest. Safe counterparts:
   SDEdit of each unsafe image (`data.safe_strength`) with `data.safe_prompt` and the unsafe
   prompt as the negative prompt, kept when the detector no longer reads the concept. Cached in
   `workdir/pairs.npz` (a resumed run reuses them).
2. Training: `losses.duo_loss` on the LoRA factors (the base UNet is the frozen reference, passed to
   the step, sharded by the same rules: `mesh.model` > 1 shards parameters FSDP-style over the
   `model` axis), one jit-compiled step with shardings over the mesh, orbax checkpoints with resume
   (`training.trainer.Trainer`). lr and the prior weight follow beta as in the official scripts.
3. A first evaluation with the same noise for the base and the unlearned model: the defence
   success rate on the concept's prompts (detector does not read the concept), the accuracy on the
   other digits, and the mean absolute pixel difference between base and unlearned samples of the
   other digits. (`launch/evaluate_unlearning.py`, with the embedding attack, is to come.)

Writes to --workdir: `config.json`, `pairs.npz`, `checkpoints/`, `tensorboard/`, `lora/`
(`pytorch_lora_weights.safetensors`, loadable by diffusers) and `results.json`.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from diffgeo_jax import digits, models
from diffgeo_jax.diffusion import pipeline, schedules
from diffgeo_jax.digits import dataset, metrics
from diffgeo_jax.training import lora, losses, sharding, trainer

_CONFIG = config_flags.DEFINE_config_file('config', None, 'configs/duo/*.py')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder (resumes from its checkpoints).',
                               required=True)
CONDITIONS = ('empty', 'prompt', 'mixed')

_DISTRIBUTED = flags.DEFINE_bool('jax_distributed', False,
                                 'Call jax.distributed.initialize() (multi-host TPU pods).')


def concept_prompts(config, n: int) -> list[str]:
  """n prompts "a <colour> digit <concept>", colours in turn."""
  colours = dataset.COLOURS
  return [f'a {colours[i % len(colours)]} digit {config.data.concept}' for i in range(n)]


def safe_prompts(config, prompts: list[str]) -> list[str]:
  """The SDEdit prompt of each pair: `data.safe_prompt` with {colour} the unsafe prompt's colour
  and {other} the digits other than the concept in turn (balanced replacements)."""
  concept = dataset.DIGIT_WORDS.index(config.data.concept)
  others = [w for i, w in enumerate(dataset.DIGIT_WORDS) if i != concept]
  return [config.data.safe_prompt.format(colour=p.split()[1], other=others[i % len(others)])
          for i, p in enumerate(prompts)]


def make_pairs(pipe, scorer, config, key) -> dict[str, np.ndarray]:
  """(unsafe, safe) image pairs in [0, 1], each side gated by the detector; see the module doc."""
  d = config.data
  concept = dataset.DIGIT_WORDS.index(d.concept)
  prompts = concept_prompts(config, d.num_pairs)
  safe_texts = safe_prompts(config, prompts)
  unsafe = np.zeros((d.num_pairs,) + tuple(pipeline.default_image_size(pipe)) + (3,), np.float32)
  safe = np.zeros_like(unsafe)
  todo = np.arange(d.num_pairs)
  for attempt in range(d.max_attempts):
    if not len(todo):
      break
    key, k = jax.random.split(key)
    imgs = np.asarray(pipeline.text_to_image(pipe, [prompts[i] for i in todo], k,
                                             num_steps=d.num_steps,
                                             guidance_scale=d.guidance_scale))
    ok = scorer.predict(imgs * 2 - 1) == concept
    unsafe[todo[ok]] = imgs[ok]
    todo = todo[~ok]
  if len(todo):
    raise RuntimeError(f'{len(todo)} of {d.num_pairs} unsafe images were never read as '
                       f'{d.concept!r} in {d.max_attempts} attempts')
  todo = np.arange(d.num_pairs)
  for attempt in range(d.max_attempts):
    if not len(todo):
      break
    key, k = jax.random.split(key)
    imgs = np.asarray(pipeline.image_to_image(
        pipe, unsafe[todo], [safe_texts[i] for i in todo], k,
        strength=d.safe_strength, num_steps=d.num_steps, guidance_scale=d.guidance_scale,
        negative_prompts=[prompts[i] for i in todo]))
    ok = scorer.predict(imgs * 2 - 1) != concept
    safe[todo[ok]] = imgs[ok]
    todo = todo[~ok]
  if len(todo):
    raise RuntimeError(f'{len(todo)} of {d.num_pairs} SDEdit images kept the concept in '
                       f'{d.max_attempts} attempts; raise data.safe_strength')
  return {'unsafe': unsafe, 'safe': safe, 'prompts': np.array(prompts),
          'safe_prompts': np.array(safe_texts)}


class Job:
  """The frozen base model, the pairs and the DUO loss of one config."""

  def __init__(self, config, workdir: str):
    self.config = config
    self.pipe = models.load_pipeline(config.pipeline_dir or digits.pipeline_dir())
    if self.pipe.vae is not None:
      raise ValueError('this launcher trains on pixel-space pipelines (the digits world); for a '
                       'latent pipeline encode the pairs with the VAE first')
    self.schedule = schedules.from_diffusers_config(self.pipe.scheduler_config)
    self.scorer = metrics.Scorer.load(config.classifier_dir or digits.classifier_dir())
    path = os.path.join(workdir, 'pairs.npz')
    if os.path.exists(path):
      pairs = dict(np.load(path))
      logging.info('reusing the %d pairs in %s', len(pairs['unsafe']), path)
    else:
      pairs = make_pairs(self.pipe, self.scorer, config, jax.random.key(config.data.seed))
      if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        np.savez(path, **pairs)
    self.pairs = pairs
    # The conditioning of every branch (`duo.condition`): 'empty' is the official code (prompt-
    # agnostic unlearning); 'prompt' is its unused --given_prompt option (each pair under its
    # unsafe prompt); 'mixed' draws one of the two per pair and step.
    if config.duo.condition not in CONDITIONS:
      raise ValueError(f'duo.condition must be one of {CONDITIONS}, got {config.duo.condition!r}')
    self.empty = np.asarray(pipeline.encode_prompts(self.pipe, ['']))[0]
    self.prompted = np.asarray(pipeline.encode_prompts(self.pipe, [str(p) for p in
                                                                   pairs['prompts']]))
    c = config.duo
    self.learning_rate, self.prior_weight = losses.duo_hyperparameters(
        c.base_learning_rate, c.base_prior_weight, c.beta)

  def eps_fn(self, params, x_t, t, context):
    return self.pipe.unet.apply({'params': params}, x_t, t, context)

  def init_fn(self, key: jax.Array):
    c = self.config.lora
    return lora.init(key, self.pipe.unet_params, rank=c.rank, targets=c.targets, alpha=c.alpha)

  def loss_fn(self, lora_params, batch, key, base_params):
    c = self.config.duo
    return losses.duo_loss(self.eps_fn, base_params, lora_params, batch, key, self.schedule,
                           beta=c.beta, prior_weight=self.prior_weight, t_min=c.t_min,
                           t_max=c.t_max)

  def batch_fn(self, step: int) -> dict:
    """This process's rows of step `step`: a function of (seed, step, process) alone."""
    c = self.config.train
    rows = c.batch_size // jax.process_count()
    rng = np.random.default_rng([c.seed, step, jax.process_index()])
    idx = rng.integers(0, len(self.pairs['unsafe']), rows)
    condition = self.config.duo.condition
    prompted = (np.ones(rows, bool) if condition == 'prompt' else
                rng.random(rows) < 0.5 if condition == 'mixed' else np.zeros(rows, bool))
    context = np.where(prompted[:, None, None], self.prompted[idx], self.empty[None])
    return {'positive': self.pairs['safe'][idx] * 2 - 1,
            'negative': self.pairs['unsafe'][idx] * 2 - 1,
            'context': context.astype(self.empty.dtype)}


def evaluate(job: Job, unet_params, config) -> dict:
  """Base vs unlearned from the same noise: defence success rate on the concept's prompts, the
  other digits' accuracy, and the mean absolute difference of their samples."""
  e = config.eval
  concept = dataset.DIGIT_WORDS.index(config.data.concept)
  others = [d for d in range(10) if d != concept]
  colours = dataset.COLOURS
  prompts = concept_prompts(config, e.concept_samples)
  other_prompts = [dataset.caption(d, colours[i % len(colours)])
                   for d in others for i in range(e.samples_per_digit)]
  other_digits = np.repeat(others, e.samples_per_digit)
  out = {}
  for name, params in (('base', job.pipe.unet_params), ('unlearned', unet_params)):
    pipe = dataclasses.replace(job.pipe, unet_params=params)
    key = jax.random.key(e.seed)
    concept_imgs = np.asarray(pipeline.text_to_image(pipe, prompts, key, num_steps=e.num_steps,
                                                     guidance_scale=e.guidance_scale))
    other_imgs = np.asarray(pipeline.text_to_image(pipe, other_prompts, key, num_steps=e.num_steps,
                                                   guidance_scale=e.guidance_scale))
    out[name] = {
        'defence_success_rate': float(np.mean(job.scorer.predict(concept_imgs * 2 - 1) != concept)),
        'other_digits_accuracy': metrics.digit_accuracy(job.scorer.predict(other_imgs * 2 - 1),
                                                        other_digits),
        'other_images': other_imgs}
  out['mean_abs_diff_other_digits'] = float(np.mean(np.abs(out['base'].pop('other_images') -
                                                           out['unlearned'].pop('other_images'))))
  return out


def rules_of(config) -> tuple:
  """FSDP over the `model` axis for every large leaf (LoRA factors and frozen base alike)."""
  if config.mesh.model > 1:
    return (('.*', sharding.fsdp('model', config.mesh.model)),)
  return ()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  sharding.initialize_distributed(_DISTRIBUTED.value)
  config, workdir = _CONFIG.value, _WORKDIR.value
  job = Job(config, workdir)
  config.train.learning_rate = job.learning_rate  # coupled to beta (official scripts)
  mesh = sharding.make_mesh(model=config.mesh.model)
  rules = rules_of(config)
  run = trainer.Trainer(config, workdir, job.init_fn, job.loss_fn, job.batch_fn, mesh=mesh,
                        rules=rules, frozen=job.pipe.unet_params)
  state, result = run.run()
  if jax.process_index() != 0:
    return
  lp = jax.device_get(state.params)  # the official code uses the raw LoRA (no EMA)
  lora.save(os.path.join(workdir, 'lora'), lp)
  scores = evaluate(job, lora.merge(job.pipe.unet_params, lp), config)
  result = {**scores, 'training': result, 'beta': config.duo.beta,
            'learning_rate': job.learning_rate, 'prior_weight': job.prior_weight,
            'pairs': int(len(job.pairs['unsafe'])),
            'lora_parameters': int(sum(np.size(x) for x in jax.tree.leaves(lp))),
            'command': shlex.join(['python', *sys.argv]),
            'jax': jax.__version__, 'backend': jax.default_backend()}
  trainer.write_outputs(workdir, result)


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
