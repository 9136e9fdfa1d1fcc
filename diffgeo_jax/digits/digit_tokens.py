"""The digits as token sequences: the digits world's task for discrete diffusion (Jump Your Steps'
digits-token denoiser, `launch/train_discrete.py` and `launch/jys_search.py`).

    tokens, digits = digit_tokens.load('train')           # (N, 65): label token, then 64 pixels
    strokes, labels, invalid = digit_tokens.decode(tokens)
    images = digit_tokens.render(strokes)  # (N, 16, 16, 3) in [-1, 1], for the digits classifier

scikit-learn's 8x8 digits (grey levels 0..16) as sequences of 65 tokens, position 0 the class
label (token 17 + digit), positions 1..64 the pixels in row-major order. Conditional sampling is
infilling: start from all MASK except position 0 = the label; absorbing samplers never change
clean tokens.
"""

from __future__ import annotations

import functools

import numpy as np

from diffgeo_jax.digits import dataset

GREY_LEVELS = 17  # sklearn digits pixels are integers 0..16
LABEL_OFFSET = GREY_LEVELS  # the label token of digit d is 17 + d
VOCAB = GREY_LEVELS + 10  # 27
LENGTH = 65  # label + 8 x 8 pixels
WHITE = dataset.COLOURS.index('white')


@functools.cache
def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
  """(1797, 8, 8) int32 grey levels 0..16 and (1797,) labels."""
  from sklearn.datasets import load_digits  # noqa: PLC0415 (import cost only when used)
  raw = load_digits()
  images = np.rint(raw.images).astype(np.int32)
  if not np.array_equal(images, raw.images) or images.min() < 0 or images.max() >= GREY_LEVELS:
    raise ValueError('sklearn digits are expected to hold integer grey levels 0..16')
  return images, raw.target.astype(np.int32)


def encode(images, digits) -> np.ndarray:
  """(N, 8, 8) grey levels 0..16 and (N,) digits -> (N, 65) int32 tokens."""
  images, digits = np.asarray(images), np.asarray(digits)
  if images.ndim != 3 or images.shape[1:] != (8, 8) or digits.shape != images.shape[:1]:
    raise ValueError(f'images must be (N, 8, 8) and digits (N,), got {images.shape} and '
                     f'{digits.shape}')
  if images.min(initial=0) < 0 or images.max(initial=0) >= GREY_LEVELS:
    raise ValueError(f'images must hold grey levels 0..{GREY_LEVELS - 1}')
  if digits.min(initial=0) < 0 or digits.max(initial=0) > 9:
    raise ValueError('digits must be in 0..9')
  return np.concatenate([LABEL_OFFSET + digits[:, None], images.reshape(len(images), 64)],
                        axis=1).astype(np.int32)


def load(split: str = 'train',
                 seed: int = dataset.SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
  """(tokens (N, 65) int32, digits (N,) int32) of a split of the source digits, the same split
  as `digits.dataset.split_indices(seed)` (no test digit is ever trained on)."""
  indices = dataset.split_indices(seed)
  if split not in indices:
    raise ValueError(f'split must be one of {sorted(indices)}, got {split!r}')
  images, digits = _sklearn_digits()
  idx = indices[split]
  return encode(images[idx], digits[idx]), digits[idx]


def decode(tokens) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(strokes (N, 8, 8) float32 in [0, 1], label (N,) int32, invalid (N,) bool) of tokens (N, 65).

  A pixel token that is not a grey level (a label token or MASK) decodes as 0 and makes its
  sequence invalid; so does a position 0 that is not a label token (its label is then -1)."""
  x = np.asarray(tokens)
  if x.ndim != 2 or x.shape[1] != LENGTH or not np.issubdtype(x.dtype, np.integer):
    raise ValueError(f'tokens must be integer sequences of shape (N, {LENGTH}), got '
                     f'{x.shape} {x.dtype}')
  pixels = x[:, 1:].reshape(-1, 8, 8)
  grey = (pixels >= 0) & (pixels < GREY_LEVELS)
  strokes = np.where(grey, pixels, 0).astype(np.float32) / (GREY_LEVELS - 1)
  head = x[:, 0]
  is_label = (head >= LABEL_OFFSET) & (head < VOCAB)
  label = np.where(is_label, head - LABEL_OFFSET, -1).astype(np.int32)
  return strokes, label, ~grey.all(axis=(1, 2)) | ~is_label


def render(strokes) -> np.ndarray:
  """(N, 8, 8) in [0, 1] -> (N, 16, 16, 3) white digits in [-1, 1], as the digits classifier
  was trained on (`dataset.upsample`, then `dataset.render`)."""
  strokes = np.asarray(strokes, np.float32)
  if strokes.ndim != 3 or strokes.shape[1:] != (8, 8):
    raise ValueError(f'strokes must have shape (N, 8, 8), got {strokes.shape}')
  return dataset.render(dataset.upsample(strokes), np.full(len(strokes), WHITE))
