"""Upsample guidance (arXiv 2404.01709) against its closed forms, on analytic eps functions.

With D the m x m average pool, U the nearest upsampling, y = D x_t / sqrt(P_t), tau = tau(t) and
eps_low = eps(y, tau), the guided eps_hat = eps + w U(eps_low / m - D eps) satisfies exactly

  D eps_hat = (1 - w) D eps + w eps_low / m      (w = 1: the low-res eps / m)
  (I - U D) eps_hat = (I - U D) eps              (the high frequencies are the plain eps)

Tolerances: 1e-6 absolute where only a few float32 roundings separate the sides (|eps| ~ 1);
looser, and said so, where a division by sqrt(alpha_bar) or a sampler loop amplifies them.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from diffgeo_jax.diffusion import guidance, resolution, samplers, schedules
from tests import report

B, H, W, C = 2, 8, 8, 3
S = schedules.scaled_linear()
D, U = resolution.avg_pool, resolution.nearest_upsample


def fake_eps(x, t):
  """A nonlinear eps that depends on x, t (scalar or (B,)) and the pixel position."""
  t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))[:, None, None, None]
  pos = jnp.arange(x.shape[1], dtype=jnp.float32)[None, :, None, None] / x.shape[1]
  return jnp.sin(x * (1 + t / 1000)) + 0.3 * jnp.cos(3 * pos + x) * t / 1000


def exact_eps(x, t):
  """A model whose float32 result cannot depend on how XLA fuses it (flip and halve)."""
  del t
  return jnp.flip(x, axis=1) * 0.5


def gaussian_eps(s, mu=0.5):
  """The exact eps of i.i.d. N(mu, 1) pixels, at any resolution: sqrt(1 - ab) (x - sqrt(ab) mu)."""
  def eps(x, t):
    ab = guidance._bcast(s.alpha_cumprod_at(t), x)
    return jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * mu)
  return eps


def high_freq(a, m):
  return a - U(D(a, m), m)


def x_t(seed=0, shape=(B, H, W, C)):
  return jax.random.normal(jax.random.key(seed), shape)


def low_res_input(x, t, m, s=S):
  return D(x, m) / guidance._bcast(jnp.sqrt(resolution.power(s, t, m)), D(x, m))


class IdentityTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(t=[999, 600, 250.5, 'per_sample'], m=[2, 4])
  def test_weight_one_low_freq_is_low_res_eps_over_m_and_high_freq_is_plain(self, t, m):
    t = jnp.array([700.0, 31.25]) if t == 'per_sample' else t
    x = x_t(1)
    got = self.variant(lambda x, t: guidance.upsample(fake_eps, x, t, S, m, 1.0))(x, t)
    eps_low = fake_eps(low_res_input(x, t, m), resolution.adjusted_timestep(S, t, m))
    err_low = float(jnp.abs(D(got, m) - eps_low / m).max())
    err_high = float(jnp.abs(high_freq(got, m) - high_freq(fake_eps(x, t), m)).max())
    report.record(f'UG w=1 m={m}: |D eps_hat - eps_low/m|, |(I-UD)(eps_hat - eps)|',
                  f'{err_low:.1e}, {err_high:.1e}')
    assert err_low < 1e-6 and err_high < 1e-6

  def test_general_weight_mixes_the_low_frequencies(self):
    x, t, m, w = x_t(2), 500, 2, 1.7
    got = guidance.upsample(fake_eps, x, t, S, m, w)
    eps = fake_eps(x, t)
    eps_low = fake_eps(low_res_input(x, t, m), resolution.adjusted_timestep(S, t, m))
    chex.assert_trees_all_close(D(got, m), (1 - w) * D(eps, m) + w * eps_low / m, atol=1e-6)
    chex.assert_trees_all_close(high_freq(got, m), high_freq(eps, m), atol=1e-6)

  @parameterized.parameters(999, 600, 300, 80)
  def test_downsampled_x0_is_the_low_res_models_x0(self, t):
    """(D x_t - sqrt(1 - ab_t) eps_low / m) / sqrt(ab_t) = (y - sqrt(1 - ab_tau) eps_low) /
    sqrt(ab_tau): holds since ab_tau = ab_t / P_t. Division by sqrt(ab_t) ~ 0.07 at t = 999
    amplifies float32 rounding ~15x: 1e-5 relative to the x0 scale."""
    x, m = 3 * x_t(3), 2
    got = guidance.upsample(fake_eps, x, t, S, m, 1.0)
    x0_hi, _ = S.split_prediction(got, x, t)
    tau = resolution.adjusted_timestep(S, t, m)
    y = low_res_input(x, t, m)
    x0_lo, _ = S.split_prediction(fake_eps(y, tau), y, tau)
    err = float(jnp.abs(D(x0_hi, m) - x0_lo).max() / jnp.abs(x0_lo).max())
    report.record(f'UG D x0_hat vs low-res x0 at t={t}, rel. err', err)
    assert err < 1e-5

  def test_exact_low_frequency_posterior_of_block_constant_data(self):
    """x_0 = U z, z ~ N(mu, I): E[D eps | x_t] = sqrt(1 - ab)(D x_t - sqrt(ab) mu) / (m^2 P_t); the
    i.i.d. N(mu, 1) model used at low resolution through (y, tau) reproduces it exactly."""
    mu, m = 0.5, 2
    for t in (999, 640, 200):
      x = x_t(4)
      got = guidance.upsample(gaussian_eps(S), x, t, S, m, 1.0)
      ab, p = S.alpha_cumprod_at(t), resolution.power(S, t, m)
      want = jnp.sqrt(1 - ab) * (D(x, m) - jnp.sqrt(ab) * mu) / (m ** 2 * p)
      chex.assert_trees_all_close(D(got, m), want, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_low_res_projection_of_guided_ddim_is_low_res_ddim_on_the_tau_grid(self):
    """DDIM (eta 0) with w = 1 everywhere: D x_i / sqrt(P_{t_i}) follows, step by step, DDIM of the
    same model at low resolution on the grid tau(t_i) (alpha_prev -> alpha_prev / P), for ANY
    model, as long as tau is not clipped at 0 (the last step, t = 0, has tau(0) = 0 while
    alpha_bar_0 / P_0 > alpha_bar_0): compared up to the input of the last step. 19 steps of
    float32 rounding: 2e-5."""
    m, n = 2, 20
    x_T = x_t(5)
    ug = guidance.upsample_eps_fn(fake_eps, S, m, 1.0)
    _, traj = self.variant(lambda x: samplers.ddim(ug, x, S, n, return_trajectory=True))(x_T)
    ts, alpha_prev = samplers._ddim_grid(S, n)
    y = low_res_input(x_T, float(ts[0]), m)
    errs = []
    for i, (t, ap) in enumerate(zip(ts[:-1], alpha_prev[:-1])):
      tau = resolution.adjusted_timestep(S, float(t), m)
      assert float(tau) > 0
      ap_low = ap / (ap + (1 - ap) / m ** 2)
      y, _ = samplers.ddim_step(S, fake_eps(y, tau), y, tau, ap_low)
      errs.append(float(jnp.abs(low_res_input(traj.x_t[i + 1], float(ts[i + 1]), m) - y).max()))
    report.record('UG-DDIM 20 steps: max_i |D x_i / sqrt(P) - low-res DDIM on tau grid|', max(errs))
    assert max(errs) < 2e-5


class WeightZeroAndWindowTest(chex.TestCase):

  @parameterized.parameters(600, 123.5)
  def test_weight_zero_changes_nothing_bit_for_bit(self, t):
    x = x_t(6)
    plain = fake_eps(x, t)
    calls = []
    counting = lambda x, t: calls.append(x.shape) or fake_eps(x, t)
    np.testing.assert_array_equal(guidance.upsample(counting, x, t, S, 2, 0.0), plain)
    assert calls == [x.shape]  # a static 0 skips the low-resolution pass
    # A traced weight 0 under jit; a model exact in float32 (XLA may fuse sin differently in the
    # two programs, which would move the last bit of the model itself).
    traced = jax.jit(lambda w: guidance.upsample(exact_eps, x, t, S, 2, w))
    np.testing.assert_array_equal(traced(jnp.float32(0.0)), exact_eps(x, t))
    np.testing.assert_array_equal(guidance.upsample(fake_eps, x, t, S, 2, 1.0, eta=0.0), plain)
    assert not np.array_equal(traced(jnp.float32(1.0)), traced(jnp.float32(0.0)))  # noticeable

  def test_window_is_theta_times_heaviside(self):
    w = guidance.upsample_window(jnp.array([0.0, 599.0, 600.0, 999.0]), S, 1.3, eta=0.4)
    np.testing.assert_array_equal(w, np.float32([0.0, 0.0, 1.3, 1.3]))
    np.testing.assert_array_equal(guidance.upsample_window(0, S, 2.0, eta=1.0), 2.0)

  @chex.variants(with_jit=True, without_jit=True)
  def test_outside_the_window_is_plain_eps_inside_is_guided(self):
    x, m = x_t(7), 2
    f = self.variant(lambda x, t: guidance.upsample(fake_eps, x, t, S, m, 1.0, eta=0.4))
    g = self.variant(lambda x, t: guidance.upsample(exact_eps, x, t, S, m, 1.0, eta=0.4))
    np.testing.assert_array_equal(g(x, 599.0), exact_eps(x, 599.0))
    t = jnp.array([599.0, 600.0])  # per sample: one out, one in
    np.testing.assert_array_equal(g(x, t)[0], exact_eps(x, t)[0])
    got = f(x, t)
    assert float(jnp.abs(g(x, t)[1] - exact_eps(x, t)[1]).max()) > 1e-3
    eps_low = fake_eps(low_res_input(x, t, m), resolution.adjusted_timestep(S, t, m))
    chex.assert_trees_all_close(D(got, m)[1], eps_low[1] / m, atol=1e-6)


class AblationTest(parameterized.TestCase):

  @parameterized.product(time_adjustment=[True, False], power_adjustment=[True, False])
  def test_each_switch_changes_only_its_input_of_the_low_res_pass(self, time_adjustment,
                                                                  power_adjustment):
    # Per-sample t: the guided branch runs without lax.cond, so the recorded values are concrete.
    x, t, m = x_t(8), jnp.full((B,), 700.0), 2
    seen = []

    def recording(x, t):
      seen.append((x, jnp.asarray(t, jnp.float32)))
      return fake_eps(x, t)

    got = guidance.upsample(recording, x, t, S, m, 1.0, time_adjustment=time_adjustment,
                            power_adjustment=power_adjustment)
    (x_hi, t_hi), (y, tau) = seen
    np.testing.assert_array_equal(x_hi, x)
    np.testing.assert_array_equal(t_hi, t)
    want_y = low_res_input(x, t, m) if power_adjustment else D(x, m)
    want_tau = resolution.adjusted_timestep(S, t, m) if time_adjustment else t
    np.testing.assert_array_equal(y, want_y)
    np.testing.assert_array_equal(tau, want_tau)
    if power_adjustment:
      assert float(jnp.abs(y - D(x, m)).max()) > 0.05  # P_700 != 1: the switch is visible
    if time_adjustment:
      assert float(tau.max()) < 700 - 50
    # Only the low frequencies depend on the switches.
    chex.assert_trees_all_close(D(got, m), fake_eps(want_y, want_tau) / m, atol=1e-6)
    chex.assert_trees_all_close(high_freq(got, m), high_freq(fake_eps(x, t), m), atol=1e-6)


class CompositionTest(parameterized.TestCase):

  @parameterized.parameters('ddim', 'ddpm', 'euler', 'dpmpp_2m')
  def test_every_sampler_takes_it_and_weight_zero_is_the_plain_sampler(self, name):
    x_T, key = x_t(9), jax.random.key(0)
    run = lambda f: jax.jit(lambda x: samplers.sample(name, f, x, S, 8, key=key))(x_T)
    plain = run(fake_eps)
    np.testing.assert_array_equal(run(guidance.upsample_eps_fn(fake_eps, S, 2, 0.0)), plain)
    guided = run(guidance.upsample_eps_fn(fake_eps, S, 2, 1.0))
    assert np.all(np.isfinite(guided)) and float(jnp.abs(guided - plain).max()) > 1e-3

  def test_prediction_types_guide_the_implied_eps(self):
    """A v-prediction model: guidance acts on its eps and gives back v, consistently."""
    s_v = schedules.scaled_linear(prediction_type='v_prediction')
    x, t, m = x_t(10), 650.0, 2

    def v_model(x, t):
      ab = guidance._bcast(s_v.alpha_cumprod_at(t), x)
      a, sd = jnp.sqrt(ab), jnp.sqrt(1 - ab)
      return (fake_eps(x, t) - sd * x) / a  # v = a eps - sd x0 with x0 = (x - sd eps) / a

    v_hat = guidance.upsample(v_model, x, t, s_v, m, 1.0)
    _, eps_hat = s_v.split_prediction(v_hat, x, t)
    chex.assert_trees_all_close(eps_hat, guidance.upsample(fake_eps, x, t, S, m, 1.0), atol=2e-5)

  def _cfg_inputs(self):
    ks = jax.random.split(jax.random.key(11), 2)
    cond, uncond = jax.random.normal(ks[0], (B, 5, 4)), jax.random.normal(ks[1], (B, 5, 4))
    model = lambda x, t, ctx: fake_eps(x, t) * (1 + 0.3 * jnp.tanh(ctx.mean((1, 2))))[
        :, None, None, None] + 0.1 * ctx.mean(1)[:, None, None, :C]
    return model, cond, uncond

  def test_before_and_after_cfg_agree_without_rescale_and_differ_with_it(self):
    model, cond, uncond = self._cfg_inputs()
    x, t, scale = x_t(12), 800, 5.0
    calls = []
    counting = lambda x, t, c: calls.append(x.shape) or model(x, t, c)
    fns = {o: guidance.upsample_cfg_eps_fn(counting, S, cond, uncond, scale, order=o)
           for o in ('before', 'after')}
    after = fns['after'](x, t)
    assert calls == [(2 * B, H, W, C), (2 * B, H // 2, W // 2, C)]  # two batched calls each
    calls.clear()
    before = fns['before'](x, t)
    assert calls == [(2 * B, H, W, C), (2 * B, H // 2, W // 2, C)]
    err = float(jnp.abs(before - after).max())
    report.record('UG before vs after CFG (rescale 0), max abs diff', err)
    assert err < 1e-5
    # By hand: per-branch guidance, then CFG.
    ug = lambda c: guidance.upsample(lambda x, t: model(x, t, c), x, t, S, 2, 1.0)
    chex.assert_trees_all_close(before, ug(uncond) + scale * (ug(cond) - ug(uncond)), atol=1e-5)
    resc = {o: guidance.upsample_cfg_eps_fn(model, S, cond, uncond, scale, 0.7, order=o)(x, t)
            for o in ('before', 'after')}
    chex.assert_trees_all_close(
        resc['before'], guidance.rescale_cfg(ug(uncond) + scale * (ug(cond) - ug(uncond)),
                                             ug(cond), 0.7), atol=1e-5)
    assert float(jnp.abs(resc['before'] - resc['after']).max()) > 1e-3


class ErrorsTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('factor_not_dividing', dict(factor=3), 'factor=3 must divide'),
      ('factor_zero', dict(factor=0), 'factor must be a positive int'),
      ('factor_float', dict(factor=2.0), 'factor must be a positive int'),
      ('weight_negative', dict(weight=-0.5), r'weight must be in \[0.0, inf\)'),
      ('weight_nan', dict(weight=float('nan')), 'weight must be in'),
      ('eta_above_one', dict(eta=1.5), r'eta must be in \[0.0, 1.0\]'),
      ('eta_negative', dict(eta=-0.1), 'eta must be in'),
  )
  def test_bad_arguments(self, kwargs, match):
    with pytest.raises(ValueError, match=match):
      guidance.upsample(fake_eps, x_t(), 500, S, **kwargs)

  def test_bad_shapes_and_order(self):
    with pytest.raises(ValueError, match='x_t must be NHWC'):
      guidance.upsample(fake_eps, jnp.zeros((B, H, W)), 500, S)
    with pytest.raises(ValueError, match=r't must be a scalar or of shape \(2,\)'):
      guidance.upsample(fake_eps, x_t(), jnp.zeros((3,)), S)
    with pytest.raises(ValueError, match="order must be 'after' or 'before'"):
      guidance.upsample_cfg_eps_fn(fake_eps, S, jnp.zeros((B, 1, 1)), jnp.zeros((B, 1, 1)), 2.0,
                                   order='middle')
    with pytest.raises(ValueError, match='weight must be in'):
      guidance.upsample_eps_fn(fake_eps, S, 2, -1.0)
