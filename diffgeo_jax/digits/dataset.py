"""The digits world's data: scikit-learn's 8x8 handwritten digits as 16x16 coloured images.

Each of the 1,797 source digits (shipped inside scikit-learn, no download) is upsampled smoothly to
16x16 and painted in a palette colour on a black background. The digit is the *content*, the colour
the *style*; captions follow one template, ``"a red digit three"``. The train/test split is a fixed,
seeded split of the source images, so no test digit is seen in training in any colour.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np

# Foreground colours (RGB in [0, 1]). Pure, well separated hues, so colour is read from pixels alone.
PALETTE: dict[str, tuple[float, float, float]] = {
    'red': (1.0, 0.0, 0.0),
    'green': (0.0, 1.0, 0.0),
    'blue': (0.0, 0.0, 1.0),
    'yellow': (1.0, 1.0, 0.0),
    'white': (1.0, 1.0, 1.0),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
DIGIT_WORDS: tuple[str, ...] = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven',
                                'eight', 'nine')
TEMPLATE = 'a {colour} digit {digit}'
TEMPLATE_WORDS: tuple[str, ...] = ('a', 'digit')
# Words a caption may use: what the model was trained on.
VOCABULARY: tuple[str, ...] = TEMPLATE_WORDS + COLOURS + DIGIT_WORDS

SIZE = 16  # rendered image side
SPLIT_SEED = 0
TEST_FRACTION = 0.2


def caption(digit: int, colour: int | str) -> str:
  """The caption of digit `digit` (0-9) in colour `colour` (index or name)."""
  name = COLOURS[colour] if isinstance(colour, (int, np.integer)) else colour
  if name not in PALETTE:
    raise ValueError(f'colour must be one of {COLOURS} or an index below {len(COLOURS)}, '
                     f'got {colour!r}')
  if not 0 <= int(digit) <= 9:
    raise ValueError(f'digit must be in 0..9, got {digit!r}')
  return TEMPLATE.format(colour=name, digit=DIGIT_WORDS[int(digit)])


def check_prompt(prompt: str, extra_words=()) -> list[str]:
  """The words of `prompt`, after checking each is in the trained vocabulary (or `extra_words`).

  An unknown word (a colour or digit the model never saw, a typo) would otherwise be tokenized into
  byte pieces the model never saw and silently produce noise."""
  if not isinstance(prompt, str):
    raise TypeError(f'prompt must be a str, got {type(prompt).__name__}')
  words = prompt.lower().split()
  known = set(VOCABULARY) | set(extra_words)
  unknown = [w for w in words if w not in known]
  if unknown:
    raise ValueError(
        f'prompt {prompt!r} has words outside the digits vocabulary: {unknown}. '
        f'Colours: {list(COLOURS)}; digits: {list(DIGIT_WORDS)}; other words: '
        f'{list(TEMPLATE_WORDS) + sorted(extra_words)}')
  return words


_CAPTION_RE = re.compile(r'^a (\w+) digit (\w+)$')


def parse_caption(text: str) -> tuple[int, int]:
  """(digit, colour index) of a template caption; errors name the vocabulary."""
  check_prompt(text)
  match = _CAPTION_RE.match(text.lower().strip())
  if not match or match.group(1) not in PALETTE or match.group(2) not in DIGIT_WORDS:
    raise ValueError(f'caption {text!r} does not follow the template {TEMPLATE!r} '
                     f'(colours {list(COLOURS)}, digits {list(DIGIT_WORDS)})')
  return DIGIT_WORDS.index(match.group(2)), COLOURS.index(match.group(1))


@functools.cache
def _source() -> tuple[np.ndarray, np.ndarray]:
  """(1797, 16, 16) stroke intensities in [0, 1] and (1797,) labels."""
  from sklearn.datasets import load_digits  # noqa: PLC0415 (import cost only when used)
  raw = load_digits()
  return upsample(raw.images / 16.0), raw.target.astype(np.int32)


def upsample(strokes: np.ndarray) -> np.ndarray:
  """(N, 8, 8) intensities -> (N, 16, 16), separable linear interpolation at pixel centres.

  Smooth rather than blocky, so the images have a natural spectrum for the frequency analyses."""
  strokes = np.asarray(strokes, np.float64)
  if strokes.ndim != 3 or strokes.shape[1:] != (8, 8):
    raise ValueError(f'strokes must have shape (N, 8, 8), got {strokes.shape}')
  # Output pixel i of 16 sits at source coordinate (i + 0.5) / 2 - 0.5, clamped at the borders.
  pos = np.clip((np.arange(SIZE) + 0.5) / 2 - 0.5, 0, 7)
  lo = np.floor(pos).astype(int)
  hi = np.minimum(lo + 1, 7)
  w = pos - lo
  m = np.zeros((SIZE, 8))
  m[np.arange(SIZE), lo] += 1 - w
  m[np.arange(SIZE), hi] += w
  return np.einsum('ij,njk,lk->nil', m, strokes, m).astype(np.float32)


def render(strokes: np.ndarray, colours) -> np.ndarray:
  """(N, 16, 16) intensities in [0, 1] and (N,) colour indices -> (N, 16, 16, 3) in [-1, 1]."""
  rgb = np.asarray(list(PALETTE.values()), np.float32)[np.asarray(colours)]
  return (strokes[..., None] * rgb[:, None, None, :]) * 2.0 - 1.0


@dataclasses.dataclass(frozen=True)
class Split:
  """One split's source digits (each can be rendered in any colour)."""
  strokes: np.ndarray  # (N, 16, 16) float32 intensities in [0, 1]
  digits: np.ndarray   # (N,) int32
  source_index: np.ndarray  # (N,) index into sklearn's load_digits()

  def __len__(self) -> int:
    return len(self.digits)

  def images(self, colours) -> np.ndarray:
    """(N, 16, 16, 3) in [-1, 1]: every digit of the split in colours[i] (int or (N,) ints)."""
    colours = np.broadcast_to(np.asarray(colours, np.int32), self.digits.shape)
    return render(self.strokes, colours)

  def all_colours(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (digit, colour) pair: images (N*K, 16, 16, 3), digits (N*K,), colours (N*K,)."""
    k = len(COLOURS)
    colours = np.tile(np.arange(k, dtype=np.int32), len(self))
    idx = np.repeat(np.arange(len(self)), k)
    return render(self.strokes[idx], colours), self.digits[idx], colours


def split_indices(seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
  """Sorted source indices of the train and test splits (stratified by digit)."""
  _, labels = _source()
  rng = np.random.default_rng(seed)
  train, test = [], []
  for d in range(10):
    idx = rng.permutation(np.flatnonzero(labels == d))
    n_test = int(round(TEST_FRACTION * len(idx)))
    test.append(idx[:n_test])
    train.append(idx[n_test:])
  return {'train': np.sort(np.concatenate(train)), 'test': np.sort(np.concatenate(test))}


def load(split: str = 'train', seed: int = SPLIT_SEED) -> Split:
  """The `split` ('train' or 'test') of the source digits."""
  indices = split_indices(seed)
  if split not in indices:
    raise ValueError(f'split must be one of {sorted(indices)}, got {split!r}')
  strokes, labels = _source()
  idx = indices[split]
  return Split(strokes[idx], labels[idx], idx)


def sample_batch(rng: np.random.Generator, split: Split, batch_size: int,
                 empty_caption_prob: float = 0.1) -> dict[str, np.ndarray]:
  """A random training batch: images in random colours, their captions (some empty, for
  classifier-free guidance), digits and colours."""
  idx = rng.integers(0, len(split), batch_size)
  colours = rng.integers(0, len(COLOURS), batch_size).astype(np.int32)
  digits = split.digits[idx]
  captions = [caption(d, c) for d, c in zip(digits, colours)]
  drop = rng.random(batch_size) < empty_caption_prob
  captions = ['' if dropped else c for c, dropped in zip(captions, drop)]
  return {'images': render(split.strokes[idx], colours), 'captions': captions,
          'digits': digits, 'colours': colours}
