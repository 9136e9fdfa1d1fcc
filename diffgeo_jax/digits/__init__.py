"""The digits world: the embedded default model's data, tokenizer, classifier and metrics.

`pipeline_dir()` is the shipped text-to-image pipeline (a diffusers-layout folder that
`models.load_pipeline` loads like any Stable Diffusion folder); `classifier_dir()` the evaluator.
"""

import os

# model_index.json `_class_name` of the digits pipeline (no VAE: it samples pixels).
PIPELINE_CLASS = 'DigitsTextToImagePipeline'

_HERE = os.path.dirname(os.path.abspath(__file__))


def pipeline_dir() -> str:
  """The shipped digits text-to-image pipeline folder (inside the installed package)."""
  return _existing(os.path.join(_HERE, 'pipeline'), 'pipeline',
                   'python launch/train_t2i.py --config=configs/digits/t2i.py')


def classifier_dir() -> str:
  """The shipped digits classifier folder (inside the installed package)."""
  return _existing(os.path.join(_HERE, 'classifier'), 'classifier',
                   'python launch/train_classifier.py --config=configs/digits/classifier.py')


def _existing(path: str, what: str, command: str) -> str:
  if not os.path.isdir(path):
    raise FileNotFoundError(f'the shipped digits {what} is missing at {path}; the package was '
                            f'installed without it. Rebuild it with `{command} '
                            f'--config.export_dir={path}`')
  return path
