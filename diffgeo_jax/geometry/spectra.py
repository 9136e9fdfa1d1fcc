"""Radial power spectra of image-shaped directions (NHWC), e.g. local latent basis vectors.

    psd = spectra.radial_psd(b.latent_basis)                    # (k, H, W, C) -> (k, n_bins)
    f = spectra.low_frequency_fraction(b.latent_basis, cutoff=2)  # (k,)

Paper 2 (arXiv 2307.12868) finds that "the model focuses on low-frequency components early in the
generative process and attunes to high-frequency details later" from power spectral densities of
the latent basis vectors (notes section 1.9, claim P2-a; the official code's
`vis_power_spectral_density` body is not in the repository, so the binning here is ours).

Definitions. F = fft2(v, norm='ortho') over the H, W axes (unitary, so Parseval holds exactly:
sum |F|^2 = sum v^2), power |F|^2 summed over channels. Frequencies are FFT indices in cycles per
image, centred: f_y in {-floor(H/2), ..., ceil(H/2) - 1} (numpy's fftfreq(H) * H), likewise f_x, and
the radius is r = sqrt(f_y^2 + f_x^2). Bin b holds the frequencies with floor(r) = b, i.e.
b <= r < b + 1, b = 0 .. n_bins - 1, n_bins = floor(r_max) + 1. Bin 0 is the mean (DC) only. For
non-square images the radius mixes the two axes' index units (cycles per image, not per pixel).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def frequency_radius(height: int, width: int) -> np.ndarray:
  """(height, width) radius sqrt(f_y^2 + f_x^2) of each FFT bin, in fft2's (uncentred) order."""
  fy = np.fft.fftfreq(height) * height
  fx = np.fft.fftfreq(width) * width
  return np.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)


def num_bins(height: int, width: int) -> int:
  """Number of radial bins of an (height, width) image: floor(max radius) + 1."""
  return int(np.floor(frequency_radius(height, width).max())) + 1


def _power(v) -> jax.Array:
  v = jnp.asarray(v)
  if v.ndim < 3:
    raise ValueError(f'v must be (..., H, W, C) (NHWC), got shape {v.shape}')
  if not jnp.issubdtype(v.dtype, jnp.floating):
    v = v.astype(jnp.float32)
  f = jnp.fft.fft2(v, axes=(-3, -2), norm='ortho')
  return jnp.sum(jnp.abs(f) ** 2, axis=-1).astype(v.dtype)  # (..., H, W)


def radial_psd(v, *, reduce: str = 'sum') -> jax.Array:
  """Radial power spectrum: v (..., H, W, C) -> (..., n_bins) (binning in the module docstring).

  reduce='sum': the power in each ring, so the bins add up to sum(v**2) over (H, W, C) (Parseval).
  reduce='mean': the power per frequency in each ring (the radially averaged PSD).
  """
  if reduce not in ('sum', 'mean'):
    raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
  power = _power(v)
  h, w = power.shape[-2:]
  bins = np.floor(frequency_radius(h, w)).astype(np.int32).reshape(-1)
  n = int(bins.max()) + 1
  onehot = jnp.asarray(np.eye(n, dtype=np.float32)[bins], power.dtype)  # (H*W, n_bins)
  psd = power.reshape(*power.shape[:-2], h * w) @ onehot
  if reduce == 'mean':
    psd = psd / jnp.asarray(np.bincount(bins, minlength=n), power.dtype)
  return psd


def low_frequency_fraction(v, cutoff: float) -> jax.Array:
  """Fraction of the energy of v (..., H, W, C) at radius r < cutoff -> (...,).

  cutoff in the same units as the radius (cycles per image); for an integer cutoff this is
  radial_psd(v)[..., :cutoff].sum(-1) / radial_psd(v).sum(-1). cutoff=1 keeps only the mean. nan for
  an all-zero v."""
  power = _power(v)
  h, w = power.shape[-2:]
  low = jnp.asarray(frequency_radius(h, w) < cutoff, power.dtype)
  return jnp.sum(power * low, axis=(-2, -1)) / jnp.sum(power, axis=(-2, -1))
