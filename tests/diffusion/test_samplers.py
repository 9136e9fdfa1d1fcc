"""Samplers against diffusers' scheduler loops on the same analytic model, and closed forms."""

import inspect
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from absl.testing import parameterized

from diffgeo_jax.diffusion import samplers, schedules
from tests import report

# Scheduler configs shaped like the real ones.
CONFIGS = {
    # Stable Diffusion 1.x scheduler_config.json
    'sd': dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
               beta_schedule='scaled_linear', clip_sample=False, set_alpha_to_one=False,
               steps_offset=1, timestep_spacing='leading', prediction_type='epsilon'),
    # DDPM (google/ddpm-cifar10): linear betas, clipped x0, linspace spacing
    'ddpm': dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule='linear',
                 clip_sample=True, timestep_spacing='linspace', prediction_type='epsilon'),
    # SD 2.x-768 style with trailing spacing, v-prediction and a zero terminal SNR
    'trailing': dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                     beta_schedule='scaled_linear', clip_sample=False, set_alpha_to_one=False,
                     timestep_spacing='trailing', prediction_type='v_prediction',
                     rescale_betas_zero_snr=True),
    'cosine_x0': dict(num_train_timesteps=200, beta_schedule='squaredcos_cap_v2',
                      timestep_spacing='linspace', prediction_type='sample', clip_sample=False),
}
SHAPE = (2, 4, 4, 3)
MU, SIGMA0 = 0.3, 0.7


def model_fns(cfg):
  """The same analytic model in JAX and in numpy: the exact posterior-mean prediction for
  Gaussian data N(MU, SIGMA0^2), of the config's prediction type, at any (float) t."""
  s = schedules.from_diffusers_config(cfg)
  log_snr = np.asarray(s.log_snr, np.float64)
  table = np.asarray(s.alphas_cumprod)

  def ab_np(t):
    t = float(t)
    if t == round(t):
      return float(table[int(round(t))])
    return 1 / (1 + np.exp(-np.interp(t, np.arange(len(log_snr)), log_snr)))

  def predict(x, ab, xp):
    a, sd = xp.sqrt(ab), xp.sqrt(1 - ab)
    x0 = MU + a * SIGMA0 ** 2 * (x - a * MU) / (a ** 2 * SIGMA0 ** 2 + sd ** 2)
    eps = (x - a * x0) / sd
    kind = cfg.get('prediction_type', 'epsilon')
    return {'epsilon': eps, 'sample': x0, 'v_prediction': a * eps - sd * x0}[kind]

  jax_fn = lambda x, t: predict(x, s.alpha_cumprod_at(t), jnp)
  torch_fn = lambda x, t: torch.from_numpy(predict(x.double().numpy(), ab_np(t), np)).float()
  return s, jax_fn, torch_fn


def diffusers_loop(name, cfg, x_T, num_steps, noises=None, eta=0.0, first_step=0, x0=None):
  import diffusers
  cls = {'ddim': diffusers.DDIMScheduler, 'ddpm': diffusers.DDPMScheduler,
         'euler': diffusers.EulerDiscreteScheduler,
         'dpmpp_2m': diffusers.DPMSolverMultistepScheduler}[name]
  sched = cls.from_config(cfg)
  sched.set_timesteps(num_steps)
  _, _, torch_fn = model_fns(cfg)
  x = torch.from_numpy(np.array(x_T)) * sched.init_noise_sigma
  timesteps = sched.timesteps
  if first_step:  # image-to-image: noise x0 to the first run timestep, as the diffusers pipelines
    timesteps = timesteps[first_step:]
    if hasattr(sched, 'set_begin_index'):
      sched.set_begin_index(first_step)
    x = sched.add_noise(torch.from_numpy(np.array(x0)), torch.from_numpy(np.array(x_T)),
                        timesteps[:1])
  step = [0]
  fake_randn = lambda *a, **k: torch.from_numpy(np.array(noises[step[0]]))  # DDPM's noise draw
  with mock.patch('diffusers.schedulers.scheduling_ddpm.randn_tensor', fake_randn):
    for i, t in enumerate(timesteps, start=first_step):
      step[0] = i
      x_in = sched.scale_model_input(x, t)
      out = torch_fn(x_in, t)
      kwargs = {}
      if name == 'ddim':
        kwargs = dict(eta=eta, variance_noise=torch.from_numpy(np.asarray(noises[i])) if eta else None)
      x = sched.step(out, t, x, **kwargs).prev_sample
  return x.numpy()


class SamplerParityTest(parameterized.TestCase):

  @parameterized.product(sampler=['ddim', 'ddim_eta', 'ddpm', 'euler', 'dpmpp_2m'],
                         config=['sd', 'ddpm', 'trailing', 'cosine_x0'], num_steps=[10, 25])
  def test_final_sample_equals_diffusers_loop(self, sampler, config, num_steps):
    cfg = CONFIGS[config]
    s, jax_fn, _ = model_fns(cfg)
    x_T = np.asarray(jax.random.normal(jax.random.key(0), SHAPE))
    key = jax.random.key(1)
    noises = np.asarray(jax.vmap(lambda k: jax.random.normal(k, SHAPE))(
        jax.random.split(key, num_steps)))
    name, eta = ('ddim', 0.7) if sampler == 'ddim_eta' else (sampler, 0.0)
    ours = samplers.sample(name, jax_fn, jnp.asarray(x_T), s, num_steps, key=key,
                           eta=eta if name == 'ddim' else None)  # the others' own
    ref = diffusers_loop(name, cfg, x_T, num_steps, noises, eta)
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(np.asarray(ours) - ref).max())
    report.record(f'{sampler} {config} {num_steps} steps: max abs err vs diffusers (scale {scale:.2f})',
                  err)
    assert err <= 1e-4 * scale, (err, scale)

  @parameterized.product(sampler=['ddim', 'ddpm', 'euler', 'dpmpp_2m'], config=['sd', 'trailing'])
  def test_starting_midway_equals_diffusers_image_to_image(self, sampler, config):
    cfg, num_steps, k = CONFIGS[config], 10, 4
    s, jax_fn, _ = model_fns(cfg)
    x0 = np.asarray(MU + SIGMA0 * jax.random.normal(jax.random.key(5), SHAPE))
    noise = np.asarray(jax.random.normal(jax.random.key(6), SHAPE))
    key = jax.random.key(1)
    noises = np.asarray(jax.vmap(lambda k_: jax.random.normal(k_, SHAPE))(
        jax.random.split(key, num_steps)))
    t_k = samplers.timesteps(sampler, s, num_steps)[k]
    x_t = s.add_noise(jnp.asarray(x0), jnp.asarray(noise), t_k)
    ours = samplers.sample(sampler, jax_fn, x_t, s, num_steps, key=key, first_step=k)
    ref = diffusers_loop(sampler, cfg, noise, num_steps, noises, first_step=k, x0=x0)
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(np.asarray(ours) - ref).max())
    report.record(f'{sampler} {config} from step {k}/{num_steps}: max abs err vs diffusers', err)
    assert err <= 1e-4 * scale, (err, scale)

  def test_jit_and_trajectory(self):
    s, jax_fn, _ = model_fns(CONFIGS['sd'])
    x_T = jax.random.normal(jax.random.key(0), SHAPE)
    run = jax.jit(lambda x: samplers.ddim(jax_fn, x, s, 20, return_trajectory=True))
    x0, traj = run(x_T)
    chex.assert_trees_all_close(x0, samplers.ddim(jax_fn, x_T, s, 20), atol=1e-6)
    chex.assert_shape(traj.x_t, (20,) + SHAPE)
    np.testing.assert_array_equal(traj.t, s.inference_timesteps(20))
    chex.assert_trees_all_close(traj.x_t[0], x_T)
    # The predicted x0 at each step is the analytic posterior mean of that step's x_t.
    for i in (0, 10, 19):
      ab = s.alpha_cumprod_at(traj.t[i])
      a, sd = jnp.sqrt(ab), jnp.sqrt(1 - ab)
      expected = MU + a * SIGMA0 ** 2 * (traj.x_t[i] - a * MU) / (a ** 2 * SIGMA0 ** 2 + sd ** 2)
      chex.assert_trees_all_close(traj.pred_x0[i], expected, atol=1e-5)


class InversionTest(parameterized.TestCase):

  @parameterized.parameters('sd', 'trailing')
  def test_ddim_inversion_then_sampling_returns_the_start(self, config):
    """The inversion evaluates the model one step off, so the round trip is first order in the
    step size: the error must fall about 4x for 4x the steps and be small at 1000 steps."""
    s, jax_fn, _ = model_fns(CONFIGS[config])
    x0 = MU + SIGMA0 * jax.random.normal(jax.random.key(3), SHAPE)
    errs = {}
    for n in (250, 1000):
      back = samplers.ddim(jax_fn, samplers.ddim_inversion(jax_fn, x0, s, n), s, n)
      errs[n] = float(jnp.max(jnp.abs(back - x0)))
      report.record(f'DDIM inversion -> DDIM, {config}, {n} steps: max abs reconstruction err',
                    errs[n])
    assert errs[250] / errs[1000] > 3.5, errs
    assert errs[1000] < 1e-2, errs


class ErrorsTest(parameterized.TestCase):

  def test_too_many_steps(self):
    s = schedules.linear(100)
    with pytest.raises(ValueError, match='num_steps=101 is larger than .* num_train_timesteps=100'):
      samplers.ddim(lambda x, t: x, jnp.zeros((1, 2)), s, 101)

  @parameterized.parameters('ddim', 'ddpm', 'euler', 'dpmpp_2m')
  def test_jit_with_closed_over_schedule_and_clear_error_for_traced_one(self, name):
    s = schedules.scaled_linear()
    f = lambda x, t: 0.1 * x
    run = jax.jit(lambda x: samplers.sample(name, f, x, s, 10, key=jax.random.key(0)))
    eager = samplers.sample(name, f, jnp.ones((1, 3)), s, 10, key=jax.random.key(0))
    chex.assert_trees_all_close(run(jnp.ones((1, 3))), eager, atol=1e-6)
    with pytest.raises(ValueError, match='close over it'):
      jax.jit(lambda sched, x: samplers.sample(name, f, x, sched, 10, key=jax.random.key(0)))(
          s, jnp.ones((1, 3)))

  def test_stochastic_sampler_needs_key(self):
    with pytest.raises(ValueError, match='key'):
      samplers.ddpm(lambda x, t: x, jnp.zeros((1, 2)), schedules.linear(100), 10, key=None)

  def test_unknown_sampler_lists_supported(self):
    with pytest.raises(ValueError, match='supported: .*ddim.*ddpm.*dpmpp_2m.*euler'):
      samplers.sample('heun', lambda x, t: x, jnp.zeros((1, 2)), schedules.linear(100), 10)

  def test_eta_a_sampler_does_not_take_is_refused(self):
    s, x, f = schedules.linear(100), jnp.zeros((1, 2)), lambda x, t: x
    for name, eta in (('euler', 0.5), ('dpmpp_2m', 1.0), ('ddpm', 0.0)):
      with pytest.raises(ValueError, match=f'{name} supports only eta='):
        samplers.sample(name, f, x, s, 10, key=jax.random.key(0), eta=eta)
    with pytest.raises(ValueError, match='eta must be >= 0 for ddim'):
      samplers.ddim(f, x, s, 10, eta=-0.1)


class SignatureTest(parameterized.TestCase):
  """The four samplers share one signature, so `sample` is a table lookup."""

  def test_one_signature(self):
    params = {name: inspect.signature(fn).parameters for name, fn in samplers.SAMPLERS.items()}
    want = ['eps_fn', 'x_T', 'schedule', 'num_steps', 'key', 'eta', 'first_step',
            'return_trajectory']
    for name, p in params.items():
      assert list(p) == want, (name, list(p))
      assert all(p[k].kind is inspect.Parameter.KEYWORD_ONLY for k in want[4:]), name

  @parameterized.parameters('ddim', 'ddpm', 'euler', 'dpmpp_2m')
  def test_sample_is_the_sampler(self, name):
    s = schedules.scaled_linear()
    f = lambda x, t: 0.1 * x + 1e-4 * t
    x = jax.random.normal(jax.random.key(1), (2, 3))
    kw = dict(key=jax.random.key(2), first_step=1)
    by_name = samplers.sample(name, f, x, s, 6, **kw)
    chex.assert_trees_all_equal(by_name, samplers.SAMPLERS[name](f, x, s, 6, **kw))
    # ... and the key matters exactly for the stochastic one.
    other = samplers.sample(name, f, x, s, 6, key=jax.random.key(3), first_step=1)
    assert (float(jnp.abs(other - by_name).max()) > 0) == (name == 'ddpm')
