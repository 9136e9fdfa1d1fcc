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


def labelled_rows(rows: list[tuple[str, np.ndarray]], title: str = ''):
  """A matplotlib figure with one labelled row of images (N, H, W, C) in [0, 1] per (label,
  images) pair; rows may differ in N. Save it with `run.save_figure(name, fig, dpi=120)`."""
  import matplotlib  # noqa: PLC0415 (only the binaries that write figures need it)
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # noqa: PLC0415
  n = max(len(imgs) for _, imgs in rows)
  fig, axes = plt.subplots(len(rows), 1, figsize=(0.9 * n + 1.2, 0.95 * len(rows) + 0.5),
                           squeeze=False)
  for ax, (label, imgs) in zip(axes[:, 0], rows):
    ax.imshow(np.asarray(grid(imgs, 1, len(imgs))), interpolation='nearest')
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_ylabel(label, rotation=0, ha='right', va='center', fontsize=8)
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return fig
