"""The digits world: the embedded default model's data, tokenizer, classifier and metrics, and
the digits as tokens for discrete diffusion (`digit_tokens`).

`pipeline_dir()` is the shipped text-to-image pipeline (a diffusers-layout folder that
`models.load_pipeline` loads like any Stable Diffusion folder); `classifier_dir()` the evaluator.
The methods' packages (diffusion, geometry, discrete, training, unlearning, text, xai) do not
import this package; binaries, tests and `aot`'s 'digits' shapes use it as the default world.
"""

import os

# model_index.json `_class_name` of the digits pipeline (no VAE: it samples pixels).
PIPELINE_CLASS = 'DigitsTextToImagePipeline'

_HERE = os.path.dirname(os.path.abspath(__file__))


def pipeline_dir(folder: str | None = None) -> str:
  """`folder` when a config names one (`config.pipeline_dir`), else the shipped digits
  text-to-image pipeline folder (inside the installed package): the binaries' one resolver."""
  if folder:
    return folder
  return _existing(os.path.join(_HERE, 'pipeline'), 'pipeline',
                   'python launch/train_t2i.py --config=configs/digits/t2i.py')


def classifier_dir(folder: str | None = None) -> str:
  """`folder` when a config names one (`config.classifier_dir`), else the shipped digits
  classifier folder (inside the installed package)."""
  if folder:
    return folder
  return _existing(os.path.join(_HERE, 'classifier'), 'classifier',
                   'python launch/train_classifier.py --config=configs/digits/classifier.py')


def _existing(path: str, what: str, command: str) -> str:
  if not os.path.isdir(path):
    raise FileNotFoundError(f'the shipped digits {what} is missing at {path}; the package was '
                            f'installed without it. Rebuild it with `{command} '
                            f'--config.export_dir={path}`')
  return path


def require_pipeline(pipe, binary: str) -> None:
  """Refuses, before any work, a pipeline other than the digits model in a binary whose numbers
  are the digits classifier's (or whose images are the digits dataset's): an SD or SDXL folder
  would only fail later on an image shape."""
  if pipe.class_name != PIPELINE_CLASS:
    raise ValueError(f'{binary} measures digits images with the digits classifier: it needs the '
                     f'digits model (a {PIPELINE_CLASS} folder, as launch/train_t2i.py writes), '
                     f'not a {pipe.class_name} folder (config.pipeline_dir)')
