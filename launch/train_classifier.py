r"""Train the digits evaluator: a small CNN digit classifier, colour-invariant.

    python launch/train_classifier.py --config=configs/digits/classifier.py \
      --workdir=/tmp/digits_classifier [--config.export_dir=diffgeo_jax/digits/classifier]

Batches come from the train split in palette and random colours with light augmentation (see
configs/digits/classifier.py); the global batch of step i is a function of (seed, i) alone and
each process feeds its rows of it, so a resumed run is the run that never stopped and N processes
compute what one does. The loss is softmax cross-entropy. After training, the EMA weights are
evaluated (on every process) on the test split in every palette colour (and in random colours).
Writes to --workdir (local or gs://): `config.json`, `checkpoints/` (orbax; a rerun resumes from
the latest), `tensorboard/`, `classifier/` (the classifier folder: config.json, model.safetensors
and results.json, the metrics; also copied to `export_dir` when set) and `results.json`.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags

from diffgeo_jax import runs
from diffgeo_jax.digits import classifier, dataset, metrics
from diffgeo_jax.training import trainer

_CONFIG = config_flags.DEFINE_config_file('config', None,
                                          'Training config (configs/digits/classifier.py).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder (resumes from its checkpoints).',
                               required=True)


class Job:
  """The model, data and loss of one classifier training config."""

  def __init__(self, config):
    self.config = config
    self.model_config = classifier.ClassifierConfig.from_dict(config.model.to_dict())
    self.model = classifier.Classifier(self.model_config)
    self.split = dataset.load('train', seed=config.data.split_seed)

  def init_fn(self, key: jax.Array) -> dict:
    return classifier.init(key, self.model_config)[1]

  def loss_fn(self, params: dict, batch: dict, key: jax.Array):
    del key  # no dropout
    logits = self.model.apply({'params': params}, batch['images'])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['digits']).mean()
    return loss, {'accuracy': (logits.argmax(-1) == batch['digits']).mean()}

  def batch_fn(self, step: int) -> dict:
    """The global batch of step `step`, a function of (seed, step) alone (the Trainer feeds each
    process's rows of it)."""
    c = self.config.train
    rng = np.random.default_rng([c.seed, step])
    idx = rng.integers(0, len(self.split), c.batch_size)
    d = self.config.data
    images = classifier.augmented_images(
        rng, self.split.strokes[idx], random_colour_prob=d.random_colour_prob,
        min_brightness=d.min_brightness, max_shift=d.max_shift, max_noise_std=d.max_noise_std)
    return {'images': images, 'digits': self.split.digits[idx].astype(np.int32)}


def evaluate(scorer: metrics.Scorer, split_seed: int) -> dict:
  """Accuracies on the test split in every palette colour (overall, per colour, per digit), in
  random colours, and on the train split in every palette colour."""
  test = dataset.load('test', seed=split_seed)
  images, digits, colours = test.all_colours()
  correct = scorer.predict(images) == digits
  random_images = classifier.augmented_images(  # random colours, nothing else
      np.random.default_rng(12345), test.strokes, random_colour_prob=1.0, min_brightness=1.0,
      max_shift=0, max_noise_std=0.0)
  train_images, train_digits, _ = dataset.load('train', seed=split_seed).all_colours()
  return {
      'test_accuracy': float(correct.mean()),
      'test_accuracy_per_colour': dict(zip(dataset.COLOURS, metrics.grouped_accuracy(
          correct, colours, len(dataset.COLOURS)))),
      'test_accuracy_per_digit': dict(zip(dataset.DIGIT_WORDS, metrics.grouped_accuracy(
          correct, digits, 10))),
      'test_accuracy_random_colours': metrics.digit_accuracy(scorer.predict(random_images),
                                                             test.digits),
      'train_accuracy': metrics.digit_accuracy(scorer.predict(train_images), train_digits),
      'test_images': int(len(digits)), 'train_images': int(len(train_digits)),
  }


def main(argv):
  # config_file=None: the Trainer writes config.json
  config, run = runs.start_main(argv, _CONFIG, _WORKDIR, config_file=None)
  job = Job(config)
  params, result = trainer.train_job(config, run, job)
  with run.timed('evaluation'):
    scores = evaluate(metrics.Scorer(job.model, params, config.eval.batch_size),
                      config.data.split_seed)
  result = {**scores, 'training': result,
            'parameters': int(sum(np.size(p) for p in jax.tree.leaves(params)))}
  if run.is_main:
    with run.folder('classifier', config.export_dir) as out:
      classifier.save(out, params, job.model_config, result)  # results.json: the metrics
  run.finish(result)


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
