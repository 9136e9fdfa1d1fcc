r"""Evaluate a digits text-to-image pipeline with the digits classifier.

    python launch/evaluate.py --config=configs/digits/evaluate.py --workdir=/tmp/digits_eval \
      [--config.pipeline_dir=/tmp/digits_t2i/pipeline] [--config.guidance_scale=5.0]

Samples `samples_per_prompt` images for every prompt "a <colour> digit <digit>" and scores them:
digit accuracy (the classifier's reading against the prompt's digit), colour accuracy (the colour
read from the pixels against the prompt's colour), and the Fréchet distance of their classifier
features to the real test split in every colour. Next to it, the real-vs-real Fréchet distance:
as many real train-split images (random digits and colours) as were generated, against the same
reference, i.e. the distance a perfect generator would score at this sample size.

Writes to --workdir (a local folder or gs://bucket/path): `config.json`, `results.json` (metrics:
the scores, per-digit, per-colour and per-prompt accuracies, sampling times), `samples.png` (one
row per prompt, one column per sample), `samples.npz` (images in [0, 1], their prompts, digits,
colours and what the classifier read) and `tensorboard/` (the metrics as scalars). Multi-host
(--jax_distributed): every process samples the same batches, each sharded over every device
(`pipeline.generate`), and scores the gathered images; process 0 writes.

Image i's initial noise comes from `fold_in(split(key(seed))[0], i)` alone, so it does not depend
on the batching; deterministic samplers then give each image independently of its batch.
"""

from __future__ import annotations

import shlex
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from diffgeo_jax import digits, models, paths, runs
from diffgeo_jax.diffusion import guidance, pipeline
from diffgeo_jax.digits import classifier, dataset, metrics
from diffgeo_jax.images import grid
from diffgeo_jax.training import summary

_CONFIG = config_flags.DEFINE_config_file('config', None,
                                          'Evaluation config (configs/digits/evaluate.py).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder (local or gs://).', required=True)


def prompts_of(config) -> list[tuple[str, int, int]]:
  """(prompt, digit, colour index) of every requested (digit, colour) pair, digit-major."""
  if not config.digits or not config.colours:
    raise ValueError('config.digits and config.colours must both be non-empty')
  out = []
  for d in config.digits:
    for name in config.colours:
      text = dataset.caption(int(d), name)
      dataset.check_prompt(text)
      out.append((text, int(d), dataset.COLOURS.index(name)))
  return out


def keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """(noise key, step key): the initial noise and the step noise of stochastic samplers."""
  noise_key, step_key = jax.random.split(jax.random.key(seed))
  return noise_key, step_key


def initial_noise(seed: int, n: int, shape: tuple[int, ...]) -> jax.Array:
  """(n, *shape) unit Gaussians; row i from fold_in(noise key, i) alone."""
  noise_key = keys(seed)[0]
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(noise_key, i), shape,
                                              jnp.float32))(jnp.arange(n))


def generate(pipe, config, texts: list[str]) -> tuple[np.ndarray, dict]:
  """Images (N, H, W, C) in [0, 1], one per text, and timings."""
  height, width = pipeline.default_image_size(pipe)
  f = pipeline.latent_factor(pipe)
  noise = initial_noise(config.seed, len(texts),
                        (height // f, width // f, pipe.unet.config.in_channels))
  logging.info('%d images, %s %d steps, guidance %.2f', len(texts), config.sampler,
               config.num_steps, config.guidance_scale)
  return pipeline.generate(pipe, texts, noise, keys(config.seed)[1], config.batch_size,
                           num_steps=config.num_steps, guidance=guidance.CFG(config.guidance_scale),
                           sampler=config.sampler, eta=config.eta)


def breakdown(digit_ok, colour_ok, groups, names) -> dict[str, dict[str, float | None]]:
  d = metrics.grouped_accuracy(digit_ok, groups, len(names))
  c = metrics.grouped_accuracy(colour_ok, groups, len(names))
  return {n: {'digit_accuracy': a, 'colour_accuracy': b}
          for n, a, b in zip(names, d, c) if a is not None}


def main(argv):
  config, run = runs.start_main(argv, _CONFIG, _WORKDIR)
  jobs = prompts_of(config)
  per_prompt = int(config.samples_per_prompt)
  if per_prompt < 1:
    raise ValueError(f'config.samples_per_prompt must be >= 1, got {per_prompt}')
  texts = [p for p, _, _ in jobs for _ in range(per_prompt)]  # row-major: one row per prompt
  want_digits = np.repeat([d for _, d, _ in jobs], per_prompt).astype(np.int32)
  want_colours = np.repeat([c for _, _, c in jobs], per_prompt).astype(np.int32)

  pipeline_dir = digits.pipeline_dir(config.pipeline_dir)
  classifier_dir = digits.classifier_dir(config.classifier_dir)
  logging.info('pipeline %s, classifier %s', pipeline_dir, classifier_dir)
  with run.timed('load'):
    pipe = pipeline.replicate(models.load_pipeline(pipeline_dir))
    digits.require_pipeline(pipe, 'launch/evaluate.py')
    local_classifier = paths.local_folder(classifier_dir, 'config.classifier_dir')
    scorer = metrics.Scorer.load(local_classifier, config.classifier_batch_size)

  with run.timed('sampling'):
    images, timing = generate(pipe, config, texts)  # numpy, the same on every process

  with run.timed('scoring'):
    x = images * 2.0 - 1.0  # the classifier reads [-1, 1]
    feats, logits = scorer.features_and_logits(x)
    pred_digits = logits.argmax(-1).astype(np.int32)
    pred_colours = classifier.colour_index(x)
    test = dataset.load('test', seed=config.split_seed)
    ref_images, _, _ = test.all_colours()
    ref_feats = scorer.features(ref_images)
    train_images, _, _ = dataset.load('train', seed=config.split_seed).all_colours()
    rng = np.random.default_rng(config.seed)
    baseline_idx = np.sort(rng.choice(len(train_images), min(len(x), len(train_images)),
                                      replace=False))
    baseline_feats = scorer.features(train_images[baseline_idx])
    digit_ok, colour_ok = pred_digits == want_digits, pred_colours == want_colours
    scores = {
        'digit_accuracy': metrics.digit_accuracy(pred_digits, want_digits),
        'colour_accuracy': metrics.colour_accuracy(x, want_colours),
        'joint_accuracy': float(np.mean(digit_ok & colour_ok)),
        'frechet_distance': metrics.frechet_distance(feats, ref_feats),
        'frechet_distance_real': metrics.frechet_distance(baseline_feats, ref_feats),
    }

  rows = np.repeat(np.arange(len(jobs)), per_prompt)
  run.save_image('samples.png', grid(images, len(jobs), per_prompt))
  run.save_npz('samples.npz', images=images, prompts=np.array(texts), digits=want_digits,
               colours=want_colours, predicted_digits=pred_digits,
               predicted_colours=pred_colours, real_baseline_indices=baseline_idx)
  with summary.SummaryWriter(run.path('tensorboard'), enabled=run.is_main) as writer:
    writer.scalars({f'eval/{k}': v for k, v in scores.items()}, config.num_steps)
  results = run.finish({
      **scores,
      'per_digit': breakdown(digit_ok, colour_ok, want_digits, dataset.DIGIT_WORDS),
      'per_colour': breakdown(digit_ok, colour_ok, want_colours, dataset.COLOURS),
      'per_prompt': breakdown(digit_ok, colour_ok, rows, [p for p, _, _ in jobs]),
      'num_images': len(texts), 'num_prompts': len(jobs), 'image_shape': list(images.shape[1:]),
      'reference': {'split': 'test', 'images': len(ref_feats), 'colours': list(dataset.COLOURS),
                    'real_baseline_split': 'train', 'real_baseline_images': len(baseline_idx)},
      'pipeline_dir': str(pipeline_dir),
      'classifier': {'dir': str(classifier_dir), 'feature_dim': int(feats.shape[1]),
                     'test_accuracy': classifier.read_results(local_classifier).get(
                         'test_accuracy')},
      **timing,
  })
  if config.record_in_pipeline and run.is_main:
    # The shipped model's results.json: its training run (training.json, written by
    # train_t2i.py) next to this evaluation.
    folder = paths.resolve(pipeline_dir, 'config.pipeline_dir')
    record = {'evaluation': results, 'evaluate_command': shlex.join(['python', *sys.argv])}
    if (folder / 'training.json').exists():
      record['training'] = paths.read_json(folder / 'training.json')
    paths.write_json(folder / 'results.json', record)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
