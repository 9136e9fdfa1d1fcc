"""The digits world's evaluator: a small CNN that reads the digit, and colour read from pixels.

    model, params = classifier.load()    # the shipped classifier (digits.classifier_dir())
    logits = model.apply({'params': params}, x)   # x (N, 16, 16, 3) in [-1, 1] -> (N, 10)
    feats = model.apply({'params': params}, x, method='features')   # (N, 64) penultimate
    colours = classifier.colour_index(x)   # (N,) palette indices, from the pixels alone

The CNN is trained on every palette colour plus random colours (`augmented_images`, used by
launch/train_classifier.py), so its digit prediction does not depend on the colour; the colour is
read separately from the pixels (`colour_index`), which needs no training and is exact on rendered
data. The penultimate features are the space of the Fréchet distance (`metrics.frechet_distance`).

A classifier folder holds `config.json` (`ClassifierConfig`), `model.safetensors` (flat '/'-joined
parameter names, read with `safetensors.numpy`) and `results.json` (how it was trained, its test
accuracy).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffgeo_jax import digits, model_folder
from diffgeo_jax.digits import dataset



@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
  """Two stages of two 3x3 convolutions (each stage ends in a 2x2 average pool), then a dense
  layer whose ReLU output is the feature vector, then the linear digit head."""
  channels: tuple[int, ...] = (16, 32)
  features: int = 64
  num_classes: int = 10
  image_size: int = dataset.SIZE

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> ClassifierConfig:
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f'unknown classifier config fields {unknown}; known: {sorted(fields)}')
    d = dict(d)
    if 'channels' in d:
      d['channels'] = tuple(int(c) for c in d['channels'])
    return cls(**d)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d['channels'] = list(self.channels)
    return d


class Classifier(nn.Module):
  """Digit classifier over (N, S, S, 3) images in [-1, 1] (S = `config.image_size`)."""
  config: ClassifierConfig = ClassifierConfig()

  def setup(self):
    c = self.config
    self.convs = [[nn.Conv(ch, (3, 3), name=f'conv{i}_{j}') for j in range(2)]
                  for i, ch in enumerate(c.channels)]
    self.dense = nn.Dense(c.features, name='dense')
    self.head = nn.Dense(c.num_classes, name='head')

  def _check(self, x):
    s = self.config.image_size
    if x.ndim != 4 or x.shape[1:] != (s, s, 3):
      raise ValueError(f'images must have shape (N, {s}, {s}, 3) in [-1, 1], got {x.shape}')

  def features(self, x: jax.Array) -> jax.Array:
    """(N, features) penultimate activations (after the ReLU)."""
    self._check(x)
    h = x
    for stage in self.convs:
      for conv in stage:
        h = nn.relu(conv(h))
      h = nn.avg_pool(h, (2, 2), (2, 2))
    return nn.relu(self.dense(h.reshape(h.shape[0], -1)))

  def __call__(self, x: jax.Array) -> jax.Array:
    """(N, num_classes) logits."""
    return self.head(self.features(x))

  def features_and_logits(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    f = self.features(x)
    return f, self.head(f)


def init(key: jax.Array, config: ClassifierConfig = ClassifierConfig()) -> tuple[Classifier, dict]:
  """A freshly initialised (model, params)."""
  model = Classifier(config)
  s = config.image_size
  return model, model.init(key, jnp.zeros((1, s, s, 3), jnp.float32))['params']


# -- colour from pixels ----------------------------------------------------------------------------

def stroke_rgb(images) -> np.ndarray:
  """(N, 3) the stroke colour of images (N, H, W, 3) in [-1, 1]: the mean RGB (in [0, 1]) of the
  pixels weighted by the square of their brightness (max channel), so the stroke dominates and a
  dark, noisy background barely counts."""
  x = np.asarray(images, np.float64)
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f'images must have shape (N, H, W, 3) in [-1, 1], got {x.shape}')
  v = np.clip((x + 1.0) / 2.0, 0.0, 1.0)
  w = v.max(axis=-1, keepdims=True) ** 2
  return (w * v).sum(axis=(1, 2)) / np.maximum(w.sum(axis=(1, 2)), 1e-12)


def colour_index(images) -> np.ndarray:
  """(N,) nearest palette colour (index into `dataset.COLOURS`) of images (N, H, W, 3) in [-1, 1].

  The colour of an image is its `stroke_rgb`; the palette colour at the smallest angle to it wins
  (brightness does not matter, only hue and saturation). Exact on rendered data: every stroke
  pixel there is a multiple of the palette colour."""
  mean = stroke_rgb(images)
  palette = np.asarray(list(dataset.PALETTE.values()), np.float64)
  cos = (mean @ palette.T) / (np.linalg.norm(mean, axis=-1, keepdims=True) + 1e-12)
  cos /= np.linalg.norm(palette, axis=-1)
  return np.argmax(cos, axis=-1).astype(np.int32)


# -- training data ---------------------------------------------------------------------------------

def random_colours(rng: np.random.Generator, n: int, random_prob: float) -> np.ndarray:
  """(n, 3) RGB foreground colours: palette colours, or with probability `random_prob` a uniformly
  random RGB scaled so that its largest channel is 1 (as every palette colour's)."""
  palette = np.asarray(list(dataset.PALETTE.values()), np.float32)
  rgb = palette[rng.integers(0, len(palette), n)]
  rand = rng.random((n, 3)).astype(np.float32)
  rand /= np.maximum(rand.max(axis=1, keepdims=True), 1e-6)
  pick = rng.random(n) < random_prob
  return np.where(pick[:, None], rand, rgb)


def augmented_images(rng: np.random.Generator, strokes: np.ndarray, *, random_colour_prob: float,
                     min_brightness: float, max_shift: int, max_noise_std: float) -> np.ndarray:
  """Training images (n, S, S, 3) in [-1, 1] of strokes (n, S, S) in [0, 1]: each shifted by up to
  `max_shift` pixels each way (the canvas is padded with background: nothing wraps around),
  painted in `random_colours` times a brightness in [min_brightness, 1], plus Gaussian noise of a
  standard deviation drawn in [0, max_noise_std], clipped. A function of `rng`'s state alone."""
  strokes = np.asarray(strokes, np.float32)
  n, size = strokes.shape[0], strokes.shape[1]
  s = int(max_shift)
  if s:
    padded = np.pad(strokes, ((0, 0), (s, s), (s, s)))
    dy, dx = rng.integers(0, 2 * s + 1, (2, n))
    rows = dy[:, None] + np.arange(size)[None]  # (n, size)
    cols = dx[:, None] + np.arange(size)[None]
    strokes = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
  colour = random_colours(rng, n, random_colour_prob)
  colour *= rng.uniform(min_brightness, 1.0, (n, 1)).astype(np.float32)
  images = strokes[..., None] * colour[:, None, None, :] * 2.0 - 1.0
  std = rng.uniform(0.0, max_noise_std, (n, 1, 1, 1)).astype(np.float32)
  images = images + std * rng.standard_normal(images.shape).astype(np.float32)
  return np.clip(images, -1.0, 1.0).astype(np.float32)


# -- files -----------------------------------------------------------------------------------------

def save(folder: str, params: Mapping, config: ClassifierConfig,
         results: Mapping[str, Any] | None = None) -> None:
  """Writes `config.json`, `model.safetensors` and (if given) `results.json` into `folder`."""
  if isinstance(config, Mapping):
    config = ClassifierConfig.from_dict(config)
  model_folder.save(folder, params, config.to_dict(), results)


def load(folder: str | None = None) -> tuple[Classifier, dict]:
  """(model, params) from a classifier folder; None loads the shipped one (`classifier_dir()`).

  The stored names and shapes must match the config's model exactly; an error lists the missing,
  unexpected and mis-shaped parameters."""
  folder = os.fspath(digits.classifier_dir(folder))
  config = ClassifierConfig.from_dict(model_folder.read_config(folder, 'classifier'))
  model = Classifier(config)
  s = config.image_size
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, s, s, 3)))['params']
  params = model_folder.load_params(folder, abstract,
                                   f'the classifier of {os.path.join(folder, model_folder.CONFIG)}')
  return model, params


def read_results(folder: str | None = None) -> dict:
  """The `results.json` of a classifier folder ({} if it has none); None: the shipped one."""
  return model_folder.read_results(digits.classifier_dir(folder))
