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
   to every process) and takes process 0's detector verdicts, so all hold the same pairs.
2. Training: `unlearning.duo.Objective` (`losses.duo_loss`) on the LoRA factors (the base UNet
   is the frozen reference, passed to the step, sharded by the same rules: `mesh.model` > 1
   shards parameters FSDP-style over the `model` axis), one jit-compiled step with shardings over
   the mesh, orbax checkpoints with resume (`training.trainer.Trainer`). lr and the prior weight
   follow beta as in the official scripts.
   `duo.condition` picks the text conditioning of every branch: 'empty' (the official code),
   'prompt' (each pair under its unsafe prompt) or 'mixed' (either, per pair and step).
   `duo.adversarial.every` > 0 (beyond the paper, as adversarial unlearning does) trains in
   rounds: after each, the learned-embedding attack against the current LoRA, whose embedding
   then joins the prompted branches' conditioning.
   `duo.retain_weight` > 0 (beyond the paper) adds `losses.duo_loss`'s retain term on the base
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
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from diffgeo_jax import digits, distributed, models, paths, runs
from diffgeo_jax.diffusion import pipeline, schedules
from diffgeo_jax.digits import dataset, metrics
from diffgeo_jax.training import embedding_attack, lora, losses, precision, sharding, trainer
from diffgeo_jax.unlearning import duo

_CONFIG = config_flags.DEFINE_config_file('config', None, 'configs/duo/*.py')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder (resumes from its checkpoints).',
                               required=True)


CONDITIONS = ('empty', 'prompt', 'mixed')  # duo.condition: the text conditioning of every branch


def cycled(prompts, n: int) -> list[str]:
  """n prompts: `prompts` (a list from the config) in turn."""
  prompts = list(prompts)
  if not prompts:
    raise ValueError('the config lists no prompts (data.prompts and data.safe_prompts)')
  return [str(prompts[i % len(prompts)]) for i in range(n)]


class Detector:
  """Reads whether images show the concept: the digits classifier (`detector='digits'`, the
  concept a digit word), or nothing (`'none'`: every image passes, as the official violence data)."""

  def __init__(self, config):
    if config.detector not in ('digits', 'none'):
      raise ValueError(f"detector must be 'digits' or 'none', got {config.detector!r}")
    self.scorer = None
    if config.detector == 'digits':
      if config.data.concept not in dataset.DIGIT_WORDS:
        raise ValueError(f'data.concept must be a digit word {dataset.DIGIT_WORDS} for the digits '
                         f'detector, got {config.data.concept!r}')
      self.concept = dataset.DIGIT_WORDS.index(config.data.concept)
      folder = digits.classifier_dir(config.classifier_dir)
      self.scorer = metrics.Scorer.load(paths.local_folder(folder, 'classifier_dir'))

  def shows_concept(self, images) -> np.ndarray | None:
    """(N,) booleans for images in [0, 1], process 0's verdicts on every process (a decision
    that steers resampling: rule 4 of `distributed`); None without a detector."""
    if self.scorer is None:
      return None
    hit = self.scorer.predict(np.asarray(images) * 2 - 1) == self.concept
    return distributed.same_on_all_hosts(hit.astype(np.int32)).astype(bool)


def make_pairs(pipe, detector: Detector, config, key) -> dict[str, np.ndarray]:
  """(unsafe, safe) image pairs in [0, 1], each side gated by the detector; see the module doc.
  Call it on every process: the same sampling calls run everywhere and return the same pairs."""
  d = config.data
  prompts, safe_texts = cycled(d.prompts, d.num_pairs), cycled(d.safe_prompts, d.num_pairs)
  h, w = pipeline.default_image_size(pipe) if not d.image_size else (d.image_size,) * 2
  unsafe = np.zeros((d.num_pairs, h, w, 3), np.float32)
  safe = np.zeros_like(unsafe)
  kw = dict(num_steps=d.num_steps, guidance_scale=d.guidance_scale)
  key, unsafe, left = _until_accepted(
      lambda idx, kk: pipeline.text_to_image(pipe, [prompts[i] for i in idx], kk, height=h,
                                             width=w, **kw),
      lambda hit: hit, detector, d, key, unsafe)
  if left:
    raise RuntimeError(f'{left} of {d.num_pairs} unsafe images were never read as '
                       f'{d.concept!r} in {d.max_attempts} attempts')
  key, safe, left = _until_accepted(
      lambda idx, kk: pipeline.image_to_image(
          pipe, unsafe[idx], [safe_texts[i] for i in idx], kk, strength=d.safe_strength,
          negative_prompts=[prompts[i] for i in idx], **kw),
      lambda hit: ~hit, detector, d, key, safe)
  if left:
    raise RuntimeError(f'{left} of {d.num_pairs} SDEdit images kept the concept in '
                       f'{d.max_attempts} attempts; raise data.safe_strength')
  return {'unsafe': unsafe, 'safe': safe, 'prompts': np.array(prompts),
          'safe_prompts': np.array(safe_texts)}


def _until_accepted(generate, accept, detector: Detector, d, key, out: np.ndarray):
  """Fills `out` (N, ...) with generate(indices, key) images, resampling the rows the detector
  gate `accept(shows_concept)` refuses, at most `d.max_attempts` times (every row passes without
  a detector). Returns the advanced key, `out` and the number of rows never accepted."""
  todo = np.arange(len(out))
  for _ in range(d.max_attempts):
    if not len(todo):
      break
    key, k = jax.random.split(key)
    imgs = _batched(generate, todo, k, d.generation_batch)
    hit = detector.shows_concept(imgs)
    ok = np.ones(len(todo), bool) if hit is None else accept(hit)
    out[todo[ok]] = imgs[ok]
    todo = todo[~ok]
  return key, out, len(todo)


def make_retain(pipe, config, key) -> dict[str, np.ndarray]:
  """The retain set of `duo.retain_weight`: the base model's own samples of `data.retain_prompts`
  (in turn, `data.num_retain` of them), images in [0, 1]."""
  d = config.data
  if d.num_retain <= 0:
    raise ValueError(f'duo.retain_weight > 0 needs data.num_retain > 0, got {d.num_retain}')
  prompts = cycled(d.retain_prompts, d.num_retain)
  h, w = pipeline.default_image_size(pipe) if not d.image_size else (d.image_size,) * 2
  imgs = _batched(lambda idx, kk: pipeline.text_to_image(
      pipe, [prompts[i] for i in idx], kk, height=h, width=w, num_steps=d.num_steps,
      guidance_scale=d.guidance_scale), np.arange(d.num_retain), key, d.generation_batch)
  return {'retain': imgs.astype(np.float32), 'retain_prompts': np.array(prompts)}


def _batched(generate, idx: np.ndarray, key: jax.Array, batch: int) -> np.ndarray:
  """generate(indices, key) over `idx` in slices of at most `batch` (0 = all at once). `generate`
  returns arrays replicated on every device (the pipeline's), so numpy reads them anywhere."""
  batch = batch or len(idx)
  return np.concatenate([np.asarray(generate(idx[i:i + batch], jax.random.fold_in(key, i)))
                         for i in range(0, len(idx), batch)])


class Job:
  """The frozen base model, the pairs and the DUO loss of one config."""

  def __init__(self, config, run: runs.Run):
    self.config = config
    if config.duo.condition not in CONDITIONS:  # (before minutes of pair generation)
      raise ValueError(f'duo.condition must be one of {CONDITIONS}, got {config.duo.condition!r}')
    self.pipe = models.load_pipeline(digits.pipeline_dir(config.pipeline_dir))
    self.schedule = schedules.from_diffusers_config(self.pipe.scheduler_config)
    self.detector = Detector(config)
    path = run.path('pairs.npz')
    # Reused only when every process can read it, so that all take the same branch.
    if distributed.exists_on_every_host(path):
      pairs = paths.load_npz(path)
      logging.info('reusing the %d pairs in %s', len(pairs['unsafe']), path)
    else:
      pairs = make_pairs(self.pipe, self.detector, config, jax.random.key(config.data.seed))
      run.save_npz('pairs.npz', **pairs)
    if config.duo.retain_weight > 0 and 'retain' not in pairs:
      pairs.update(make_retain(self.pipe, config, jax.random.key(config.data.seed + 2)))
      run.save_npz('pairs.npz', **pairs)
    self.pairs = pairs
    # The UNet's inputs, once: 2x - 1 in pixel space; for a latent pipeline one sample of the VAE
    # posterior per image (the official code draws a new one every step).
    k_pos, k_neg = jax.random.split(jax.random.key(config.data.seed + 1))
    b = config.data.generation_batch or len(pairs['unsafe'])
    self.x_safe, self.x_unsafe = (
        np.concatenate([np.asarray(pipeline.encode_images(self.pipe, x[i:i + b],
                                                          jax.random.fold_in(k, i)))
                        for i in range(0, len(x), b)])
        for x, k in ((pairs['safe'], k_pos), (pairs['unsafe'], k_neg)))
    # The conditioning of every branch (`duo.condition`): 'empty' is the official code (prompt-
    # agnostic unlearning); 'prompt' is its unused --given_prompt option (each pair under its
    # unsafe prompt); 'mixed' draws one of the two per pair and step.
    self.empty = np.asarray(pipeline.encode_prompts(self.pipe, ['']))[0]
    self.prompted = np.asarray(pipeline.encode_prompts(self.pipe, [str(p) for p in
                                                                   pairs['prompts']]))
    self.adversarial: list[np.ndarray] = []  # the prompts under attacked embeddings (rounds)
    if config.duo.retain_weight > 0:
      self.x_retain = np.asarray(pipeline.encode_images(
          self.pipe, pairs['retain'], jax.random.key(config.data.seed + 3)))
      self.retain_context = np.asarray(pipeline.encode_prompts(
          self.pipe, [str(p) for p in pairs['retain_prompts']]))
    c = config.duo
    self.learning_rate, self.prior_weight = losses.duo_hyperparameters(
        c.base_learning_rate, c.base_prior_weight, c.beta)

  def add_adversarial_row(self, row) -> None:
    """The unsafe prompts encoded with the concept token's embedding row replaced by `row`."""
    token = embedding_attack.concept_token(self.pipe, self.config.data.concept)
    pipe = dataclasses.replace(self.pipe, text_encoder_params=embedding_attack.with_row(
        self.pipe.text_encoder_params, token, jnp.asarray(row)))
    self.adversarial.append(np.asarray(pipeline.encode_prompts(
        pipe, [str(p) for p in self.pairs['prompts']])))

  def objective(self) -> duo.Objective:
    """The training objective: the UNet with the run's `model.dtype` and `model.remat`."""
    unet = precision.configure_unet(self.pipe.unet, self.config.get('model'))
    return duo.Objective.from_config(self.config, unet, self.schedule, self.pipe.unet_params)

  def batch_fn(self, step: int) -> dict:
    """The global batch of step `step`, a function of (seed, step) alone (the Trainer feeds each
    process's rows of it)."""
    c = self.config.train
    rows = c.batch_size  # the global batch (the Trainer feeds each process's rows of it)
    rng = np.random.default_rng([c.seed, step])
    idx = rng.integers(0, len(self.pairs['unsafe']), rows)
    condition = self.config.duo.condition
    prompted = (np.ones(rows, bool) if condition == 'prompt' else
                rng.random(rows) < 0.5 if condition == 'mixed' else np.zeros(rows, bool))
    prompted_ctx = self.prompted[idx]
    if self.adversarial:  # clean or one of the attacked embeddings, uniformly
      pick = rng.integers(0, len(self.adversarial) + 1, rows)
      prompted_ctx = np.stack([prompted_ctx[j] if pick[j] == 0 else
                               self.adversarial[pick[j] - 1][idx[j]] for j in range(rows)])
    context = np.where(prompted[:, None, None], prompted_ctx, self.empty[None])
    batch = {'positive': self.x_safe[idx], 'negative': self.x_unsafe[idx],
             'context': context.astype(self.empty.dtype)}
    if self.config.duo.retain_weight > 0:
      r = rng.integers(0, len(self.x_retain), rows)
      batch.update(retain=self.x_retain[r], retain_context=self.retain_context[r])
    return batch


def evaluate(job: Job, unet_params, config) -> dict:
  """Base vs unlearned from the same noise: defence success rate on the concept's prompts, the
  other digits' accuracy, and the mean absolute difference of their samples. Every process runs
  it (the sampling is sharded over all devices) and gets the same numbers."""
  e, scorer, concept = config.eval, job.detector.scorer, job.detector.concept
  others = [d for d in range(10) if d != concept]
  colours = dataset.COLOURS
  prompts = cycled(config.data.prompts, e.concept_samples)
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
        'defence_success_rate': float(np.mean(scorer.predict(concept_imgs * 2 - 1) != concept)),
        'other_digits_accuracy': metrics.digit_accuracy(scorer.predict(other_imgs * 2 - 1),
                                                        other_digits),
        'other_images': other_imgs}
  out['mean_abs_diff_other_digits'] = float(np.mean(np.abs(out['base'].pop('other_images') -
                                                           out['unlearned'].pop('other_images'))))
  return out


def adversarial_rounds(job: Job, train: trainer.Trainer, run: runs.Run):
  """Training in rounds of `duo.adversarial.every` steps; after each, the learned-embedding attack
  (`training.embedding_attack`, from the concept word's own row) against the current LoRA, and
  the prompted branches go on under the clean or any attacked embedding so far. The rows are
  kept in `workdir/adversarial_rows.npz` (a resumed run reuses them). Multi-host: every process
  runs the (unsharded) attack and takes process 0's row, so all batches agree."""
  a, c = job.config.duo.adversarial, job.config.train
  if job.config.duo.condition == 'empty':
    raise ValueError("duo.adversarial needs prompted branches: duo.condition 'prompt' or 'mixed'")
  path = run.path('adversarial_rows.npz')
  rows = (paths.load_npz(path) if distributed.exists_on_every_host(path)
          else {})
  for r in sorted(rows, key=int):
    job.add_adversarial_row(rows[r])
  token = embedding_attack.concept_token(job.pipe, job.config.data.concept)
  for end in range(a.every, c.num_steps, a.every):
    state, _ = train.run(until=end)
    if str(end) in rows:
      continue
    unet = lora.merge(job.pipe.unet_params, distributed.to_host(state.params))
    row, log = embedding_attack.learn_embedding(
        job.pipe, unet, job.pairs['unsafe'], job.pairs['prompts'], token,
        jax.random.key(c.seed + end), steps=a.steps, learning_rate=a.learning_rate,
        batch_size=a.batch_size)
    logging.info('adversarial round at step %d: %s', end, log)
    rows[str(end)] = distributed.same_on_all_hosts(np.asarray(row))
    job.add_adversarial_row(rows[str(end)])
    run.save_npz('adversarial_rows.npz', **rows)
  return train.run()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  run = runs.start(config, _WORKDIR.value, config_file=None)  # the Trainer writes config.json
  with run.timed('pairs'):
    job = Job(config, run)
  config.train.learning_rate = job.learning_rate  # coupled to beta (official scripts)
  mesh = sharding.make_mesh(model=config.mesh.model)
  objective = job.objective()
  train = trainer.Trainer(config, run.workdir, objective.init_fn, objective.loss_fn, job.batch_fn,
                          mesh=mesh, rules=duo.rules(config),
                          frozen=precision.frozen_params(job.pipe.unet_params,
                                                         config.get('model')))
  with run.timed('training'):
    if config.duo.adversarial.every > 0:
      state, result = adversarial_rounds(job, train, run)
    else:
      state, result = train.run()
  lp = distributed.to_host(state.params)  # the official code uses the raw LoRA (no EMA)
  if run.is_main:
    with run.folder('lora') as out:
      lora.save(out, lp)
  scores = {}
  if job.detector.scorer is not None:  # the evaluation is the digits world's
    with run.timed('evaluation'):
      scores = evaluate(job, lora.merge(job.pipe.unet_params, lp), config)
  run.finish({**scores, 'training': result, 'learning_rate': job.learning_rate,
              'prior_weight': job.prior_weight, 'pairs': int(len(job.pairs['unsafe'])),
              'lora_parameters': int(sum(np.size(x) for x in jax.tree.leaves(lp)))})


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
