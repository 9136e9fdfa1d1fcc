r"""DUO (arXiv 2407.21035): unlearn a concept from a text-to-image model with a LoRA trained by
preference optimisation on (unsafe, safe) image pairs.

    python launch/train_duo.py --config=configs/duo/digits.py --workdir=/tmp/duo_digits
    python launch/train_duo.py --config=configs/duo/sd14.py --config.pipeline_dir=/ckpt/sd-v1-4 \
      --workdir=gs://bucket/duo_sd14 --jax_distributed   # a TPU pod (launch/tpu_pod.py)

Steps (the official `naver-ai/DUO` pipeline):
1. Pairs. Unsafe images: the pipeline samples `data.prompts` (in turn) and the detector keeps
   those that show the concept, resampling the rest. Safe counterparts: SDEdit of each unsafe image
   (`data.safe_strength`) with `data.safe_prompts` (in turn) and the unsafe prompt as the negative
   prompt, kept when the detector no longer sees the concept. The detector is the digits
   classifier (`detector='digits'`), or none (`'none'`, no gating, as the official violence
   data; NudeNet is not available in JAX). Cached in `workdir/pairs.npz` (a resumed run reuses
   them). A latent pipeline (SD) trains on one VAE posterior sample per image. Multi-host: every
   process runs the same sampling calls (each batch sharded over all devices, the images returned
   to every process) and takes process 0's detector verdicts, so all hold the same pairs
   (`unlearning.pairs`).
2. Training: `unlearning.duo.Objective` (`duo.loss`) on the LoRA factors (the base UNet
   is the frozen reference, passed to the step, sharded by the same rules: `mesh.model` > 1
   shards parameters FSDP-style over the `model` axis), one jit-compiled step with shardings over
   the mesh, orbax checkpoints with resume (`training.trainer.Trainer`). lr and the prior weight
   follow beta as in the official scripts.
   `duo.condition` picks the text conditioning of every branch: 'empty' (the official code),
   'prompt' (each pair under its unsafe prompt) or 'mixed' (either, per pair and step)
   (`unlearning.batches`).
   `duo.adversarial.every` > 0 (beyond the paper, as adversarial unlearning does) trains in
   rounds: after each, the learned-embedding attack against the current LoRA, whose embedding
   then joins the prompted branches' conditioning (`unlearning.adversarial`).
   `duo.retain_weight` > 0 (beyond the paper) adds `duo.loss`'s retain term on the base
   model's own samples of `data.retain_prompts` (cached in pairs.npz as well).
3. With the digits detector, a first evaluation with the same noise for the base and the unlearned
   model: the defence success rate on the concept's prompts (detector does not read the concept),
   the accuracy on the other digits, and the mean absolute pixel difference between base and
   unlearned samples of the other digits. `launch/evaluate_unlearning.py` adds the embedding attack
   and the Frechet distance.

Writes to --workdir (local or gs://): `config.json`, `pairs.npz`, `checkpoints/`, `tensorboard/`,
`lora/` (`pytorch_lora_weights.safetensors`, loadable by diffusers) and `results.json` (metrics:
the evaluation, `training`, the derived `learning_rate` and `prior_weight`, `pairs`,
`lora_parameters`). Multi-host: the global batch of a step is a function of (seed, step) and each
process feeds its rows of it, so N processes train the LoRA one process would; every process runs
the evaluation.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from diffgeo_jax import digits, distributed, models, paths, runs
from diffgeo_jax.diffusion import guidance, pipeline, schedules
from diffgeo_jax.digits import dataset, metrics
from diffgeo_jax.training import lora, precision, sharding, trainer
from diffgeo_jax.unlearning import adversarial, batches, duo
from diffgeo_jax.unlearning import pairs as pairs_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'configs/duo/*.py')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder (resumes from its checkpoints).',
                               required=True)


class DigitsDetector:
  """Reads whether images show the concept with the digits classifier (the concept a digit word);
  `unlearning.pairs.Detector`."""

  def __init__(self, config):
    if config.data.concept not in dataset.DIGIT_WORDS:
      raise ValueError(f'data.concept must be a digit word {dataset.DIGIT_WORDS} for the digits '
                       f'detector, got {config.data.concept!r}')
    self.concept = dataset.DIGIT_WORDS.index(config.data.concept)
    folder = digits.classifier_dir(config.classifier_dir)
    self.scorer = metrics.Scorer.load(paths.local_folder(folder, 'classifier_dir'))

  def shows_concept(self, images) -> np.ndarray:
    """(N,) booleans for images in [0, 1], process 0's verdicts on every process (a decision
    that steers resampling: rule 4 of `distributed`)."""
    hit = self.scorer.predict(np.asarray(images) * 2 - 1) == self.concept
    return distributed.same_on_all_hosts(hit.astype(np.int32)).astype(bool)


def detector(config):
  """`config.detector`: 'digits' (the digits classifier) or 'none' (every image passes, as the
  official violence data; NudeNet is not available in JAX)."""
  if config.detector == 'digits':
    return DigitsDetector(config)
  if config.detector == 'none':
    return pairs_lib.NoDetector()
  raise ValueError(f"detector must be 'digits' or 'none', got {config.detector!r}")


class Job:
  """The frozen base model, the pairs and the batches of one config."""

  def __init__(self, config, run: runs.Run):
    self.config = config
    batches.check_condition(config.duo.condition)  # (before minutes of pair generation)
    self.pipe = models.load_pipeline(digits.pipeline_dir(config.pipeline_dir))
    self.schedule = schedules.from_diffusers_config(self.pipe.scheduler_config)
    self.detector = detector(config)
    path = run.path('pairs.npz')
    # Reused only when every process can read it, so that all take the same branch.
    if distributed.exists_on_every_host(path):
      pairs = paths.load_npz(path)
      logging.info('reusing the %d pairs in %s', len(pairs['unsafe']), path)
    else:
      pairs = pairs_lib.make_pairs(self.pipe, self.detector, config.data,
                                   jax.random.key(config.data.seed))
      run.save_npz('pairs.npz', **pairs)
    if config.duo.retain_weight > 0 and 'retain' not in pairs:
      pairs.update(pairs_lib.make_retain(self.pipe, config.data,
                                         jax.random.key(config.data.seed + 2)))
      run.save_npz('pairs.npz', **pairs)
    self.pairs = pairs
    self.data = batches.Batches(self.pipe, pairs, config)
    c = config.duo
    self.learning_rate, self.prior_weight = duo.hyperparameters(
        c.base_learning_rate, c.base_prior_weight, c.beta)

  def objective(self) -> duo.Objective:
    """The training objective: the UNet with the run's `model.dtype` and `model.remat`."""
    unet = precision.configure_unet(self.pipe.unet, self.config.get('model'))
    return duo.Objective.from_config(self.config, unet, self.schedule, self.pipe.unet_params)


def evaluate(job: Job, unet_params, config) -> dict:
  """Base vs unlearned from the same noise: defence success rate on the concept's prompts, the
  other digits' accuracy, and the mean absolute difference of their samples. Every process runs
  it (the sampling is sharded over all devices) and gets the same numbers."""
  e, scorer, concept = config.eval, job.detector.scorer, job.detector.concept
  others = [d for d in range(10) if d != concept]
  colours = dataset.COLOURS
  prompts = pairs_lib.cycled(config.data.prompts, e.concept_samples)
  other_prompts = [dataset.caption(d, colours[i % len(colours)])
                   for d in others for i in range(e.samples_per_digit)]
  other_digits = np.repeat(others, e.samples_per_digit)
  out = {}
  for name, params in (('base', job.pipe.unet_params), ('unlearned', unet_params)):
    pipe = dataclasses.replace(job.pipe, unet_params=params)
    key = jax.random.key(e.seed)
    concept_imgs = np.asarray(pipeline.text_to_image(pipe, prompts, key, num_steps=e.num_steps,
                                                     guidance=guidance.CFG(e.guidance_scale)))
    other_imgs = np.asarray(pipeline.text_to_image(pipe, other_prompts, key, num_steps=e.num_steps,
                                                   guidance=guidance.CFG(e.guidance_scale)))
    out[name] = {
        'defence_success_rate': float(np.mean(scorer.predict(concept_imgs * 2 - 1) != concept)),
        'other_digits_accuracy': metrics.digit_accuracy(scorer.predict(other_imgs * 2 - 1),
                                                        other_digits),
        'other_images': other_imgs}
  out['mean_abs_diff_other_digits'] = float(np.mean(np.abs(out['base'].pop('other_images') -
                                                           out['unlearned'].pop('other_images'))))
  return out


def main(argv):
  # config_file=None: the Trainer writes config.json
  config, run = runs.start_main(argv, _CONFIG, _WORKDIR, config_file=None)
  with run.timed('pairs'):
    job = Job(config, run)
  config.train.learning_rate = job.learning_rate  # coupled to beta (official scripts)
  mesh = sharding.make_mesh(model=config.mesh.model)
  objective = job.objective()
  train = trainer.Trainer(config, run.workdir, objective.init_fn, objective.loss_fn,
                          job.data.batch_fn,
                          mesh=mesh, rules=duo.rules(config),
                          frozen=precision.frozen_params(job.pipe.unet_params,
                                                         config.get('model')))
  with run.timed('training'):
    if config.duo.adversarial.every > 0:
      state, result = adversarial.rounds(job.data, train, run)
    else:
      state, result = train.run()
  lp = distributed.to_host(state.params)  # the official code uses the raw LoRA (no EMA)
  if run.is_main:
    with run.folder('lora') as out:
      lora.save(out, lp)
  scores = {}
  # The evaluation is the digits world's; eval.concept_samples=0 skips it.
  if isinstance(job.detector, DigitsDetector) and config.eval.concept_samples > 0:
    with run.timed('evaluation'):
      scores = evaluate(job, lora.merge(job.pipe.unet_params, lp), config)
  run.finish({**scores, 'training': result, 'learning_rate': job.learning_rate,
              'prior_weight': job.prior_weight, 'pairs': int(len(job.pairs['unsafe'])),
              'lora_parameters': int(sum(np.size(x) for x in jax.tree.leaves(lp)))})


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
