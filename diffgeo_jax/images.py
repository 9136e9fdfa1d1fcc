"""Image grids as PNG (the picture every binary writes)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def grid(images: np.ndarray, rows: int, cols: int, scale: int = 1) -> Image.Image:
  """A rows x cols PIL grid of (rows * cols, H, W, C) images in [0, 1], row-major; `scale` > 1
  enlarges it by pixel repetition (tiny images stay crisp in a README)."""
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[0] != rows * cols:
    raise ValueError(f'images must have shape ({rows * cols}, H, W, C) for a {rows}x{cols} grid, '
                     f'got {images.shape}')
  n, h, w, c = images.shape
  if c not in (1, 3):
    raise ValueError(f'cannot write {c}-channel images as PNG (need 1 or 3 channels)')
  pixels = np.round(np.clip(images, 0, 1) * 255).astype(np.uint8)
  tiled = pixels.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4)
  tiled = tiled.reshape(rows * h, cols * w, c)
  if scale > 1:
    tiled = tiled.repeat(scale, axis=0).repeat(scale, axis=1)
  return Image.fromarray(tiled[..., 0] if c == 1 else tiled, mode='L' if c == 1 else 'RGB')
