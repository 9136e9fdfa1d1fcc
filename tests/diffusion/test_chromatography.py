"""Resolution chromatography (arXiv 2401.10247): the SNR mapping, the chromatogram against the
reference numbers of the research notes (shared/papers/latent_geometry_chromatography_upsample.md
§2 and §3.1), prompt switching and the cascade, on closed forms."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from diffgeo_jax.diffusion import chromatography as chrom
from diffgeo_jax.diffusion import guidance, resolution, samplers, schedules
from tests import report

SD = schedules.scaled_linear()  # beta 0.00085..0.012 (sqrt-linear), 1000 steps
DDPM = schedules.linear()  # beta 1e-4..0.02
D, U = resolution.avg_pool, resolution.nearest_upsample

# Notes §2: peak t of -dS_m/dt (numerical, discrete t).
PEAKS = {'sd': {1: 313, 2: 599, 4: 780, 8: 917}, 'ddpm': {1: 219, 2: 408, 4: 546, 8: 656}}
# Notes §3.1: t -> tau, the integer timestep with the nearest log-SNR to lambda(t) + 2 ln m.
TAUS = {('sd', 2): {999: 874, 800: 631, 600: 394, 400: 204, 200: 75},
        ('sd', 3): {999: 789, 800: 515, 600: 275, 400: 120},
        ('ddpm', 2): {999: 928, 800: 709, 600: 480, 400: 262}}
SCHEDULES = {'sd': SD, 'ddpm': DDPM}


class SnrMatchingTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(2, 3, 4, 1.5)
  def test_tau_has_m_squared_times_the_snr(self, m):
    t = jnp.arange(20.0, 1000.0, 37.5)  # floats; small t (tau clipped at 0) excluded
    tau = self.variant(lambda t: resolution.adjusted_timestep(SD, t, m))(t)
    err = float(jnp.abs(SD.log_snr_at(tau) - SD.log_snr_at(t) - 2 * math.log(m)).max())
    report.record(f'|lambda(tau) - lambda(t) - 2 ln m|, m={m}', err)
    assert err < 1e-4  # float32 log-SNR ~ 10: a few ulps
    assert np.all(np.asarray(tau) < np.asarray(t)) if m > 1 else True
    # alpha_bar_tau = alpha_bar_t / P_t = S_m(t), and SNR_m = m^2 SNR.
    chex.assert_trees_all_close(SD.alpha_cumprod_at(tau),
                                SD.alpha_cumprod_at(t) / resolution.power(SD, t, m), rtol=2e-5)
    snr = SD.alpha_cumprod_at(t) / (1 - SD.alpha_cumprod_at(t))
    chex.assert_trees_all_close(resolution.resolution_snr(SD, t, m), m ** 2 * snr, rtol=1e-4)

  @parameterized.parameters(('sd', 2), ('sd', 3), ('ddpm', 2))
  def test_reference_tau_values(self, name, m):
    """The notes list integer tau; ours is the float log-SNR match, so it must be within half a
    step of theirs (and round to it)."""
    ref = TAUS[(name, m)]
    tau = np.asarray(resolution.adjusted_timestep(SCHEDULES[name], np.array(list(ref), np.float32), m))
    report.record(f'{name} m={m} tau(t) for t={list(ref)}', np.array2string(tau, precision=2))
    np.testing.assert_array_equal(np.round(tau), list(ref.values()))
    assert np.abs(tau - np.array(list(ref.values()))).max() <= 0.5

  def test_notes_alpha_bar_check_at_600(self):
    # "at SD t=600, m=2, 0.4339 vs 0.4341": alpha_bar_t / P_t vs the table at the integer tau 394;
    # at our float tau the two agree.
    tau = resolution.adjusted_timestep(SD, 600, 2)
    np.testing.assert_allclose(SD.alphas_cumprod[600] / resolution.power(SD, 600, 2), 0.4339, atol=5e-5)
    np.testing.assert_allclose(SD.alphas_cumprod[394], 0.4341, atol=5e-5)
    np.testing.assert_allclose(SD.alpha_cumprod_at(tau), 0.4339, atol=5e-5)

  def test_clipped_at_zero_and_identity_at_m_one(self):
    np.testing.assert_array_equal(resolution.adjusted_timestep(SD, 0, 2), 0.0)
    t = jnp.array([0.0, 10.0, 500.0, 999.0])
    chex.assert_trees_all_close(resolution.adjusted_timestep(SD, t, 1), t, atol=1e-3)

  def test_pooled_noise_variance_and_power(self):
    """m D eps has unit variance (so D x_t / sqrt(P_t) is a unit-scale low-res sample at tau);
    Monte Carlo with 65536 pooled values: variance within 3% (~5 standard errors)."""
    eps = jax.random.normal(jax.random.key(0), (256, 32, 32, 1))
    var = float(jnp.var(2 * D(eps, 2)))
    report.record('var(2 D eps)', var)
    assert abs(var - 1) < 0.03
    ab = SD.alphas_cumprod[700]
    np.testing.assert_allclose(resolution.power(SD, 700, 2), ab + (1 - ab) / 4, rtol=1e-6)


class ChromatogramTest(parameterized.TestCase):

  @parameterized.parameters('sd', 'ddpm')
  def test_peaks_match_the_notes(self, name):
    """Tolerance 1 step: g_m is flat at its top (neighbours within 1e-5 relative), below the
    resolution of float32 differences of S (~3e-5 relative to g): the argmax of a float32 curve
    may move by one step (ours: DDPM m=2 peaks at 407, 408 in float64); forward differences would
    move it by one step as well (SD m=1: 312)."""
    s = SCHEDULES[name]
    got = {m: int(chrom.peak_time(s, m)) for m in (1, 2, 4, 8)}
    report.record(f'{name} chromatogram peaks m=1,2,4,8 (notes {list(PEAKS[name].values())})',
                  str(list(got.values())))
    for m, ref in PEAKS[name].items():
      assert abs(got[m] - ref) <= 1, (m, got[m], ref)
      ab = float(s.alphas_cumprod[got[m]])
      snr_m = m ** 2 * ab / (1 - ab)
      report.record(f'{name} m={m}: m^2 SNR at the peak', snr_m)
      if name == 'sd':  # notes: SNR at peak ~0.8-1.3 / m^2 (SD; DDPM m=1 peaks at 1.53)
        assert 0.7 <= snr_m <= 1.35, (m, snr_m)

  def test_signal_fraction_and_rate_closed_forms(self):
    ab = np.asarray(SD.alphas_cumprod, np.float64)
    np.testing.assert_allclose(chrom.signal_fraction(SD, 1), ab, rtol=1e-6)
    for m in (2, 4):
      s_m = ab / (ab + (1 - ab) / m ** 2)
      np.testing.assert_allclose(chrom.signal_fraction(SD, m), s_m, rtol=1e-6)
      sig = 1 / (1 + np.exp(-(np.log(ab / (1 - ab)) + 2 * np.log(m))))
      np.testing.assert_allclose(chrom.signal_fraction(SD, m), sig, rtol=1e-5)
      g = np.asarray(chrom.generation_rate(SD, m))
      np.testing.assert_allclose(g, -np.gradient(s_m), atol=1e-7)  # float32 S differences
      assert np.all(g >= 0)
    # Coarser resolutions have more signal at every t.
    assert np.all(np.diff(np.stack([chrom.signal_fraction(SD, m) for m in (1, 2, 4, 8)]), axis=0)
                  >= 0)

  def test_band_pass(self):
    for m in (1, 2, 4):
      band = chrom.band_generation_rate(SD, m)
      chex.assert_trees_all_close(band, chrom.generation_rate(SD, m) - chrom.generation_rate(
          SD, 2 * m), atol=0)
      pk = int(chrom.peak_time(SD, m, band=True))
      report.record(f'SD band-pass g_{m} - g_{2 * m} peak', pk)
      assert pk < int(chrom.peak_time(SD, m))  # the band's own detail comes after its peak
      assert float(band[int(chrom.peak_time(SD, 2 * m))]) < 0  # the coarser band dominates there


class PromptSwitchTest(chex.TestCase):

  def test_switch_time_rules(self):
    for m in (1, 2, 4, 8):
      t_s = chrom.switch_time(SD, m)
      s_m = jax.nn.sigmoid(resolution.resolution_log_snr(SD, t_s, m))
      np.testing.assert_allclose(s_m, 0.5, atol=1e-5)
      np.testing.assert_allclose(chrom.switch_time(SD, m, rule='peak'), chrom.peak_time(SD, m))
    t_30 = chrom.switch_time(SD, 4, level=0.3)
    np.testing.assert_allclose(jax.nn.sigmoid(resolution.resolution_log_snr(SD, t_30, 4)), 0.3,
                               atol=1e-5)
    ts = [float(chrom.switch_time(SD, m)) for m in (1, 2, 4, 8)]
    report.record('SD switch times S_m = 1/2, m=1,2,4,8', str([round(t, 1) for t in ts]))
    assert ts == sorted(ts)  # coarser content is settled earlier in sampling (larger t)
    with pytest.raises(ValueError, match=r'level must be in \(0, 1\)'):
      chrom.switch_time(SD, 2, level=1.0)
    with pytest.raises(ValueError, match="rule must be 'half' or 'peak'"):
      chrom.switch_time(SD, 2, rule='mid')

  @chex.variants(with_jit=True, without_jit=True)
  def test_context_on_each_side_of_the_switch_one_call(self):
    early, late = jnp.full((2, 3, 4), 1.0), jnp.full((2, 3, 4), -1.0)
    calls = []

    def model(x, t, ctx):  # returns which context it saw, per sample
      calls.append(ctx.shape)
      return jnp.broadcast_to(ctx[:, 0, 0][:, None, None, None], x.shape)

    eps_fn = self.variant(chrom.prompt_switch_eps_fn(model, early, late, switch=500.0))
    x = jnp.zeros((2, 4, 4, 1))
    for t, want in ((999, 1.0), (500.5, 1.0), (500, -1.0), (0, -1.0)):
      np.testing.assert_array_equal(eps_fn(x, t)[:, 0, 0, 0], [want, want])
    np.testing.assert_array_equal(eps_fn(x, jnp.array([501.0, 499.0]))[:, 0, 0, 0], [1.0, -1.0])
    assert all(c == (2, 3, 4) for c in calls)

  def test_in_a_sampler_and_with_cfg(self):
    early, late = jnp.full((1, 3, 4), 1.0), jnp.full((1, 3, 4), -1.0)
    uncond = jnp.zeros((1, 3, 4))
    seen = []

    def model(x, t, ctx):
      jax.debug.callback(lambda t, c: seen.append((float(np.max(t)), np.asarray(c[:, 0, 0]))),
                         t, ctx)
      return 0.1 * x + ctx[:, 0, 0][:, None, None, None]

    eps_fn = chrom.prompt_switch_eps_fn(model, early, late, 600.0, uncond=uncond, scale=3.0)
    jax.block_until_ready(jax.jit(lambda x: samplers.ddim(eps_fn, x, SD, 10))(
        jnp.zeros((1, 2, 2, 1))))
    assert len(seen) == 10  # one (CFG-batched) model call per step
    for t, ctx in seen:
      np.testing.assert_array_equal(ctx, [0.0, 1.0 if t > 600 else -1.0])  # rows uncond, cond
    x = jnp.ones((1, 2, 2, 1))
    chex.assert_trees_all_close(
        eps_fn(x, 700), guidance.classifier_free(model, x, 700, early, uncond, 3.0), atol=0)
    with pytest.raises(ValueError, match='context_early and context_late must have the same'):
      chrom.prompt_switch_eps_fn(model, early, late[:, :2], 600.0)


def gaussian_eps(s, mu):
  """Exact eps of i.i.d. N(mu, 1) pixels: sqrt(1 - ab) (x - sqrt(ab) mu)."""
  def eps(x, t):
    ab = guidance._bcast(s.alpha_cumprod_at(t), x)
    return jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * mu)
  return eps


class CascadeTest(chex.TestCase):

  @parameterized.parameters((700, 2), (333.5, 2), (900, 4))
  def test_noising_step_exactly(self, t, m):
    ks = jax.random.split(jax.random.key(1), 3)
    x_low = jax.random.normal(ks[0], (2, 4, 4, 3))
    n_low, n_high = jax.random.normal(ks[1], x_low.shape), jax.random.normal(
        ks[2], (2, 4 * m, 4 * m, 3))
    x = chrom.cascade_start(x_low, SD, t, m, n_low, n_high)
    tau = resolution.adjusted_timestep(SD, t, m)
    p = resolution.power(SD, t, m)
    # The low-res view is x_low noised to tau; the high frequencies are the fresh noise.
    chex.assert_trees_all_close(D(x, m) / jnp.sqrt(p), SD.add_noise(x_low, n_low, tau), atol=1e-6)
    hf = lambda a: a - U(D(a, m), m)
    chex.assert_trees_all_close(hf(x), jnp.sqrt(1 - SD.alpha_cumprod_at(t)) * hf(n_high),
                                atol=1e-6)
    # With the low-res noise m D n_high this is the forward process from U x_low at t.
    x2 = chrom.cascade_start(x_low, SD, t, m, m * D(n_high, m), n_high)
    chex.assert_trees_all_close(x2, SD.add_noise(U(x_low, m), n_high, t), atol=2e-6)

  @parameterized.parameters(('ddim', 400.0), ('ddim', 150.0), ('euler', 400.0))
  def test_end_to_end_on_gaussian_data(self, sampler, tau):
    mu, m, n = 0.5, 2, 25
    x_low = mu + jax.random.normal(jax.random.key(2), (2, 4, 4, 3))
    x0, info = chrom.cascade(gaussian_eps(SD, mu), x_low, SD, tau, n, jax.random.key(3),
                             factor=m, sampler=sampler, return_info=True)
    grid = samplers.timesteps(sampler, SD, n)
    k, t_k = info['first_step'], info['t']
    assert t_k == float(grid[k])
    # t_k is the grid step nearest the t with SNR(t) = SNR(tau) / m^2 ...
    t_star = float(SD.timestep_at_log_snr(SD.log_snr_at(tau) - 2 * math.log(m)))
    assert abs(t_k - t_star) == np.abs(grid - t_star).min()
    # ... and x_low was noised to tau(t_k), within a grid step of the asked tau.
    assert abs(float(info['tau']) - tau) <= 1000 / n
    report.record(f'cascade {sampler} tau={tau}: first_step, t_k, tau used',
                  f"{k}, {t_k}, {float(info['tau']):.1f}")
    if sampler == 'ddim':
      # Each DDIM step maps x - sqrt(ab) mu to (sqrt(ab ab') + sqrt((1-ab)(1-ab'))) times itself.
      ts, alpha_prev = samplers._ddim_grid(SD, n)
      ab = np.asarray(SD.alphas_cumprod, np.float64)[ts[k:]]
      ap = alpha_prev[k:].astype(np.float64)
      gain = np.prod(np.sqrt(ab * ap) + np.sqrt((1 - ab) * (1 - ap)))
      want = mu + gain * (info['x_start'] - np.sqrt(ab[0]) * mu)
      chex.assert_trees_all_close(x0, want, atol=1e-5)
    chex.assert_shape(x0, (2, 8, 8, 3))
    assert np.all(np.isfinite(x0))

  def test_explicit_noise_and_jit(self):
    x_low = jnp.ones((1, 2, 2, 1))
    nl, nh = jnp.zeros((1, 2, 2, 1)), jnp.ones((1, 4, 4, 1))
    f = gaussian_eps(SD, 0.0)
    run = jax.jit(lambda x: chrom.cascade(f, x, SD, 300.0, 10, jax.random.key(0), noise_low=nl,
                                          noise_high=nh))
    chex.assert_trees_all_close(run(x_low), chrom.cascade(f, x_low, SD, 300.0, 10,
                                                          jax.random.key(5), noise_low=nl,
                                                          noise_high=nh), atol=1e-6)


class ErrorsTest(parameterized.TestCase):

  def test_bad_factors_and_times(self):
    for bad in (0, -2, float('nan'), True):
      with pytest.raises(ValueError, match='factor must be a positive number'):
        resolution.adjusted_timestep(SD, 500, bad)
    with pytest.raises(ValueError, match=r't must be in \[0, 999\]'):
      resolution.adjusted_timestep(SD, 1000.0, 2)
    with pytest.raises(ValueError, match='factor must be a positive number'):
      chrom.signal_fraction(SD, 0)
    with pytest.raises(ValueError, match=r'factor=3 must divide the spatial size \(H, W\) = '
                       r'\(8, 8\) of x'):
      resolution.avg_pool(jnp.zeros((1, 8, 8, 1)), 3)
    with pytest.raises(ValueError, match='x must be NHWC'):
      resolution.avg_pool(jnp.zeros((8, 8)), 2)

  def test_bad_cascade_arguments(self):
    x_low, f = jnp.zeros((1, 4, 4, 1)), lambda x, t: x
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r'tau must be a number in \[0, 999\]'):
      chrom.cascade(f, x_low, SD, 1200.0, 10, key)
    with pytest.raises(ValueError, match='factor must be a positive int'):
      chrom.cascade(f, x_low, SD, 300.0, 10, key, factor=1.5)
    with pytest.raises(ValueError, match="unknown sampler 'heun'"):
      chrom.cascade(f, x_low, SD, 300.0, 10, key, sampler='heun')
    with pytest.raises(ValueError, match=r'noise_high must have shape \(1, 8, 8, 1\)'):
      chrom.cascade(f, x_low, SD, 300.0, 10, key, noise_high=jnp.zeros((1, 4, 4, 1)))
    with pytest.raises(ValueError, match='x_low must be NHWC'):
      chrom.cascade(f, jnp.zeros((4, 4, 1)), SD, 300.0, 10, key)
