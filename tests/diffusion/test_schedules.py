"""NoiseSchedule against diffusers' schedulers and closed forms."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from diffgeo_jax.diffusion import schedules
from diffgeo_jax.models.config_utils import ConfigError


class DiffusersConfigTest(parameterized.TestCase):

  @parameterized.parameters(
      dict(beta_schedule='linear'),
      dict(beta_schedule='scaled_linear', beta_start=0.00085, beta_end=0.012),
      dict(beta_schedule='squaredcos_cap_v2'),
      dict(beta_schedule='scaled_linear', beta_start=0.00085, beta_end=0.012,
           rescale_betas_zero_snr=True),
  )
  def test_alphas_cumprod_equal_diffusers(self, **cfg):
    from diffusers import DDIMScheduler
    ref = DDIMScheduler(**cfg)
    s = schedules.from_diffusers_config(cfg)
    # Rescaled betas are 1 - ratios of nearby float32 numbers: ~1e-4 relative cancellation noise.
    np.testing.assert_allclose(s.betas, ref.betas.numpy(),
                               rtol=1e-3 if cfg.get('rescale_betas_zero_snr') else 1e-6, atol=1e-9)
    # float32 cumprod: numpy and torch accumulate in different orders (~1e-6 relative).
    np.testing.assert_allclose(s.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-5, atol=1e-9)
    self.assertEqual(float(s.final_alpha_cumprod), float(ref.final_alpha_cumprod))

  @parameterized.product(spacing=['leading', 'trailing', 'linspace'], n=[1, 7, 50, 1000],
                         offset=[0, 1])
  def test_inference_timesteps_equal_diffusers(self, spacing, n, offset):
    from diffusers import DDIMScheduler
    ref = DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
    ref.set_timesteps(n)
    s = schedules.from_diffusers_config(dict(timestep_spacing=spacing, steps_offset=offset))
    np.testing.assert_array_equal(s.inference_timesteps(n), ref.timesteps.numpy())

  def test_unknown_option_lists_supported(self):
    with pytest.raises(ConfigError, match=r"unknown scheduler option 'karras'.*beta_schedule"):
      schedules.from_diffusers_config({'karras': True})
    with pytest.raises(ConfigError, match=r'use_karras_sigmas=True is not supported'):
      schedules.from_diffusers_config({'use_karras_sigmas': True})
    with pytest.raises(ConfigError, match=r"beta_schedule='sigmoid'.*supported"):
      schedules.from_diffusers_config({'beta_schedule': 'sigmoid'})
    with pytest.raises(ConfigError, match=r"prediction_type='eps'"):
      schedules.from_diffusers_config({'prediction_type': 'eps'})

  def test_sd_pndm_config_loads(self):
    # Stable Diffusion 1.5's scheduler/scheduler_config.json.
    cfg = {'_class_name': 'PNDMScheduler', '_diffusers_version': '0.6.0', 'beta_end': 0.012,
           'beta_schedule': 'scaled_linear', 'beta_start': 0.00085, 'num_train_timesteps': 1000,
           'set_alpha_to_one': False, 'skip_prk_steps': True, 'steps_offset': 1,
           'trained_betas': None, 'clip_sample': False}
    s = schedules.from_diffusers_config(cfg)
    self.assertEqual(s.steps_offset, 1)
    self.assertAlmostEqual(float(s.final_alpha_cumprod), float(s.alphas_cumprod[0]))


class FloatTimestepTest(parameterized.TestCase):

  def test_integers_are_exact_and_fractions_interpolate_log_snr(self):
    s = schedules.scaled_linear()
    ts = jnp.arange(0, 1000, 37)
    np.testing.assert_array_equal(s.alpha_cumprod_at(ts.astype(jnp.float32)), s.alphas_cumprod[ts])
    lam = np.asarray(s.log_snr, np.float64)
    t = 412.25
    expected = 1 / (1 + math.exp(-(0.75 * lam[412] + 0.25 * lam[413])))
    np.testing.assert_allclose(float(s.alpha_cumprod_at(t)), expected, rtol=1e-5)
    # monotone between integers
    fine = s.alpha_cumprod_at(jnp.linspace(0, 999, 9991))
    assert bool(jnp.all(jnp.diff(fine) <= 0))

  def test_timestep_at_log_snr_inverts(self):
    s = schedules.scaled_linear()
    t = jnp.array([3.0, 250.5, 777.25, 998.0])
    chex.assert_trees_all_close(s.timestep_at_log_snr(s.log_snr_at(t)), t, atol=1e-3)

  def test_add_noise_closed_form(self):
    s = schedules.linear()
    x0, eps = jnp.ones((2, 3)), jnp.full((2, 3), 2.0)
    t = jnp.array([10.0, 500.0])
    ab = s.alphas_cumprod[jnp.array([10, 500])]
    expected = jnp.sqrt(ab)[:, None] + 2 * jnp.sqrt(1 - ab)[:, None]
    chex.assert_trees_all_close(s.add_noise(x0, eps, t), jnp.broadcast_to(expected, (2, 3)), rtol=1e-6)

  @parameterized.parameters('epsilon', 'v_prediction', 'sample')
  def test_split_prediction_recovers_x0_and_eps(self, kind):
    s = schedules.scaled_linear(prediction_type=kind)
    x0 = jnp.linspace(-1, 1, 12).reshape(2, 6)
    eps = jnp.cos(jnp.arange(12.0)).reshape(2, 6)
    t = jnp.array([100.0, 900.5])
    ab = s.alpha_cumprod_at(t)[:, None]
    x_t = jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * eps
    out = {'epsilon': eps, 'sample': x0,
           'v_prediction': jnp.sqrt(ab) * eps - jnp.sqrt(1 - ab) * x0}[kind]
    got_x0, got_eps = s.split_prediction(out, x_t, t)
    chex.assert_trees_all_close(got_x0, x0, atol=2e-5)
    chex.assert_trees_all_close(got_eps, eps, atol=2e-5)

  def test_cosine_matches_closed_form(self):
    s = schedules.cosine(1000)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    # Away from the 0.999 beta cap, alpha_bar_t = f((t+1)/T) / f(0).
    for t in (0, 100, 500, 900):
      np.testing.assert_allclose(float(s.alphas_cumprod[t]), f((t + 1) / 1000) / f(0), rtol=1e-4)


def test_interp_equals_jnp_interp_without_a_loop():
  """schedules.interp: jnp.interp's values (ends included) with no `while` in the program; the
  bisection loop jnp.interp nests in every sampler step failed XLA:GPU's dynamic-slice pass
  (openxla/xla#49299) when launch/train_duo.py ran on an H100."""
  rng = np.random.default_rng(0)
  xp = jnp.arange(1000, dtype=jnp.float32)
  fp = jnp.asarray(rng.normal(size=1000).cumsum(), jnp.float32)
  x = jnp.asarray(np.concatenate([rng.uniform(-5, 1005, 4096), [0.0, 999.0, 3.0, 3.5]]),
                  jnp.float32)
  got, want = schedules.interp(x, xp, fp), jnp.interp(x, xp, fp)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * float(jnp.max(jnp.abs(fp))))
  assert 'while' not in jax.jit(lambda t: schedules.interp(t, xp, fp)).lower(x[0]).as_text()
  # A DDIM loop over fractional timesteps: its only loop is the steps' own.
  s = schedules.linear()
  step = lambda x, t: x * jnp.sqrt(s.alpha_cumprod_at(t))
  hlo = jax.jit(lambda x: jax.lax.fori_loop(
      0, 5, lambda i, x: step(x, 10.5 * i.astype(jnp.float32)), x)).lower(jnp.ones(3)).as_text()
  assert hlo.count('stablehlo.while') == 1
