"""Radial power spectra: pure cosines land in their radius bin, Parseval, the DC bin."""

import math

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from diffgeo_jax.geometry import spectra


def _cosine(h, w, fy, fx, channels=2, phase=0.3):
  yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing='ij')
  img = np.cos(2 * np.pi * (fy * yy / h + fx * xx / w) + phase)
  return np.repeat(img[..., None], channels, axis=-1).astype(np.float32)


class RadialPSDTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((3, 4, 5), (0, 2, 2), (1, 1, 1), (-2, 5, 5), (5, 5, 7))
  def test_cosine_puts_all_energy_in_its_radius_bin(self, fy, fx, radius_bin):
    v = _cosine(16, 16, fy, fx)
    psd = np.asarray(self.variant(spectra.radial_psd)(v))
    self.assertEqual(psd.shape, (spectra.num_bins(16, 16),))
    total = float(np.sum(v.astype(np.float64) ** 2))
    np.testing.assert_allclose(psd[radius_bin], total, rtol=1e-5)
    np.testing.assert_allclose(np.delete(psd, radius_bin), 0.0, atol=1e-4 * total)

  @parameterized.parameters((8, 8), (8, 12), (7, 5))
  def test_parseval(self, h, w):
    v = np.random.RandomState(0).randn(2, 3, h, w, 4).astype(np.float32)
    psd = spectra.radial_psd(v)
    chex.assert_shape(psd, (2, 3, spectra.num_bins(h, w)))
    np.testing.assert_allclose(psd.sum(-1), np.sum(v.astype(np.float64) ** 2, axis=(-3, -2, -1)),
                               rtol=1e-5)

  def test_constant_image_is_all_dc(self):
    v = np.full((6, 10, 3), -1.5, np.float32)
    psd = np.asarray(spectra.radial_psd(v))
    np.testing.assert_allclose(psd[0], 6 * 10 * 3 * 1.5 ** 2, rtol=1e-6)
    np.testing.assert_allclose(psd[1:], 0.0, atol=1e-9)
    np.testing.assert_allclose(spectra.low_frequency_fraction(v, cutoff=1), 1.0, rtol=1e-6)

  def test_bins(self):
    # 8x8: radii up to sqrt(4^2 + 4^2) = 5.66 -> 6 bins; 7x5: up to sqrt(3^2 + 2^2) = 3.6 -> 4.
    self.assertEqual(spectra.num_bins(8, 8), 6)
    self.assertEqual(spectra.num_bins(7, 5), 4)
    r = spectra.frequency_radius(8, 8)
    self.assertEqual(r[0, 0], 0.0)
    self.assertAlmostEqual(r[4, 4], math.sqrt(32))  # Nyquist corner
    counts = np.bincount(np.floor(r).astype(int).ravel())
    v = np.ones((8, 8, 1), np.float32) + _cosine(8, 8, 0, 1, channels=1)
    np.testing.assert_allclose(spectra.radial_psd(v, reduce='mean') * counts,
                               spectra.radial_psd(v), rtol=1e-6)

  def test_low_frequency_fraction(self):
    v = np.stack([_cosine(16, 16, 3, 4), _cosine(16, 16, 0, 1)])  # radius 5 and 1
    np.testing.assert_allclose(spectra.low_frequency_fraction(v, cutoff=5), [0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(spectra.low_frequency_fraction(v, cutoff=5.01), [1.0, 1.0],
                               atol=1e-6)
    w = np.random.RandomState(1).randn(3, 8, 8, 2).astype(np.float32)
    psd = np.asarray(spectra.radial_psd(w))
    np.testing.assert_allclose(spectra.low_frequency_fraction(w, cutoff=3),
                               psd[:, :3].sum(-1) / psd.sum(-1), rtol=1e-5)

  def test_bad_input(self):
    with pytest.raises(ValueError, match=r'v must be \(..., H, W, C\)'):
      spectra.radial_psd(jnp.zeros((8, 8)))
    with pytest.raises(ValueError, match='reduce must be'):
      spectra.radial_psd(jnp.zeros((8, 8, 1)), reduce='max')
