"""The pipeline's guidance objects: upsample guidance (`guidance.UpsampleGuidance`) and
time-dependent prompt composition (`chromatography.PromptSwitch` + `late_prompts`) equal the same
samplers run by hand with the guidance/chromatography eps_fns; the switch's end points equal plain
sampling; a sweep over a guidance's traced numbers compiles once; bad guidance is refused."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffgeo_jax import models
from diffgeo_jax.diffusion import chromatography, guidance, pipeline, samplers, schedules

PROMPTS = ['a red digit', 'digit']
STEPS = 3


@pytest.fixture(scope='module')
def pipe(diffusers_pipeline_dir):
  return models.load_pipeline(diffusers_pipeline_dir)


def _by_hand(pipe, eps_fn_of, x_T):
  """DDIM with eps_fn_of(model_fn, s) on x_T, decoded as the pipeline decodes."""
  s = schedules.from_diffusers_config(json.loads(json.dumps(pipe.scheduler_config)))
  model_fn = lambda x, t, ctx: pipe.unet.apply({'params': pipe.unet_params}, x, t, ctx)
  x0 = samplers.ddim(eps_fn_of(model_fn, s), x_T, s, STEPS)
  return pipeline.decode(pipe, x0)


@pytest.mark.parametrize('order', ['after', 'before'])
def test_upsample_guidance_equals_the_guided_sampler_by_hand(pipe, order):
  """Latents at twice the UNet's size (32x32 for a 16x16 UNet), CFG 3, weight 1, eta 0.7."""
  ug = guidance.UpsampleGuidance(factor=2, weight=1.0, eta=0.7, order=order,
                                 inner=guidance.CFG(3.0))
  x_T = jax.random.normal(jax.random.key(1), (2, 32, 32, 4))
  ours = pipeline.text_to_image(pipe, PROMPTS, jax.random.key(0), num_steps=STEPS, guidance=ug,
                                latents=x_T, height=64, width=64)
  cond = pipeline.encode_prompts(pipe, PROMPTS)
  uncond = pipeline.encode_prompts(pipe, ['', ''])
  want = _by_hand(pipe, lambda f, s: guidance.upsample_cfg_eps_fn(
      f, s, cond, uncond, 3.0, order=order, factor=2, weight=1.0, eta=0.7), x_T)
  chex.assert_trees_all_close(ours, want, atol=1e-5)
  plain = pipeline.text_to_image(pipe, PROMPTS, jax.random.key(0), num_steps=STEPS,
                                 guidance=3.0, latents=x_T, height=64, width=64)
  assert float(jnp.abs(ours - plain).mean()) > 1e-3  # the guidance did something


def test_upsample_guidance_weight_zero_is_plain_sampling(pipe):
  x_T = jax.random.normal(jax.random.key(2), (2, 32, 32, 4))
  kw = dict(num_steps=STEPS, latents=x_T, height=64, width=64)
  plain = pipeline.text_to_image(pipe, PROMPTS, jax.random.key(0), guidance=1.0, **kw)
  off = pipeline.text_to_image(pipe, PROMPTS, jax.random.key(0), **kw,
                               guidance=guidance.UpsampleGuidance(weight=0.0,
                                                                  inner=guidance.Unguided()))
  np.testing.assert_array_equal(np.asarray(off), np.asarray(plain))


def test_prompt_switch_end_points_and_middle(pipe):
  """t_s above every grid timestep: the second prompts only; below every one: the first only;
  in between: what prompt_switch_eps_fn gives by hand, which differs from both."""
  second = ['digit', 'a red digit']
  x_T = jax.random.normal(jax.random.key(3), (2, 16, 16, 4))
  kw = dict(num_steps=STEPS, latents=x_T)
  grid = samplers.timesteps('ddim', schedules.from_diffusers_config(pipe.scheduler_config), STEPS)
  run = lambda t_s: pipeline.text_to_image(
      pipe, PROMPTS, jax.random.key(0), **kw, late_prompts=second,
      guidance=chromatography.PromptSwitch(t_s, inner=guidance.CFG(2.0)))
  first_only = pipeline.text_to_image(pipe, PROMPTS, jax.random.key(0), guidance=2.0, **kw)
  second_only = pipeline.text_to_image(pipe, second, jax.random.key(0), guidance=2.0, **kw)
  chex.assert_trees_all_close(run(float(grid.max()) + 1), second_only, atol=1e-6)
  chex.assert_trees_all_close(run(float(grid.min()) - 1), first_only, atol=1e-6)
  t_mid = float(grid[1])  # the first step uses the first prompts, the rest the second
  middle = run(t_mid)
  cond1, cond2 = pipeline.encode_prompts(pipe, PROMPTS), pipeline.encode_prompts(pipe, second)
  uncond = pipeline.encode_prompts(pipe, ['', ''])
  want = _by_hand(pipe, lambda f, s: chromatography.prompt_switch_eps_fn(
      f, cond1, cond2, t_mid, uncond=uncond, scale=2.0), x_T)
  chex.assert_trees_all_close(middle, want, atol=1e-5)
  for other in (first_only, second_only):
    assert float(jnp.abs(middle - other).mean()) > 1e-3


def test_a_sweep_over_traced_numbers_compiles_once(pipe):
  """The CFG scale and the switch time are traced leaves of the guidance pytree: new values reuse
  the compiled sampler (and give other images); a new static setting compiles anew."""
  x_T = jax.random.normal(jax.random.key(5), (2, 16, 16, 4))
  kw = dict(num_steps=STEPS, latents=x_T)
  sweep = lambda g, **k: pipeline.text_to_image(pipe, PROMPTS, jax.random.key(0), guidance=g,
                                                **kw, **k)
  sweep(guidance.CFG(2.0))
  before = pipeline._generate._cache_size()
  a, b = sweep(guidance.CFG(2.5)), sweep(guidance.CFG(4.0))
  assert pipeline._generate._cache_size() == before
  assert float(jnp.abs(a - b).mean()) > 1e-3
  switch = lambda t: sweep(chromatography.PromptSwitch(t, inner=guidance.CFG(2.0)),
                           late_prompts=PROMPTS[::-1])
  switch(100.0)
  before = pipeline._generate._cache_size()
  switch(600.0), switch(900.0)
  assert pipeline._generate._cache_size() == before
  sweep(guidance.CFG(2.0, rescale=0.5))  # rescale is static: another program
  assert pipeline._generate._cache_size() == before + 1


def test_bad_options_raise(pipe):
  x_T = jax.random.normal(jax.random.key(3), (2, 16, 16, 4))
  kw = dict(num_steps=2, latents=x_T)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match='PromptSwitch switches to late_prompts: pass them'):
    pipeline.text_to_image(pipe, PROMPTS, key, guidance=chromatography.PromptSwitch(500.0), **kw)
  with pytest.raises(ValueError, match='late_prompts are read only by a guidance that switches'):
    pipeline.text_to_image(pipe, PROMPTS, key, late_prompts=PROMPTS, **kw)
  with pytest.raises(ValueError, match=r'PromptSwitch.inner must be a guidance.CFG or '
                                       r'guidance.Unguided, got UpsampleGuidance'):
    pipeline.text_to_image(pipe, PROMPTS, key, late_prompts=PROMPTS, **kw,
                           guidance=chromatography.PromptSwitch(
                               500.0, inner=guidance.UpsampleGuidance()))
  with pytest.raises(ValueError, match='PromptSwitch.switch_timestep must be a finite timestep'):
    pipeline.text_to_image(pipe, PROMPTS, key, late_prompts=PROMPTS, **kw,
                           guidance=chromatography.PromptSwitch(float('nan')))
  with pytest.raises(ValueError, match=r'late_prompts must have one entry per prompt \(2\)'):
    pipeline.text_to_image(pipe, PROMPTS, key, late_prompts=['a', 'b', 'c'],
                           guidance=chromatography.PromptSwitch(500.0), **kw)
  with pytest.raises(ValueError, match='guidance must be a number .* or a guidance object'):
    pipeline.text_to_image(pipe, PROMPTS, key, guidance={'factor': 2}, **kw)
  with pytest.raises(ValueError, match='factor=3 must divide the spatial size'):
    pipeline.text_to_image(pipe, PROMPTS, key, num_steps=2,
                           guidance=guidance.UpsampleGuidance(factor=3))
  with pytest.raises(ValueError, match=r'UpsampleGuidance.eta must be in \[0.0, 1.0\]'):
    guidance.UpsampleGuidance(eta=1.5)
  with pytest.raises(ValueError, match="UpsampleGuidance.order must be 'after' or 'before'"):
    guidance.UpsampleGuidance(order='middle')  # static settings fail where they are written
  with pytest.raises(ValueError, match=r'CFG.rescale must be in \[0.0, 1.0\]'):
    guidance.CFG(7.5, rescale=2.0)
  with pytest.raises(ValueError, match=r'CFG.scale must be in'):
    pipeline.text_to_image(pipe, PROMPTS, key, guidance=guidance.CFG(float('inf')), **kw)
  with pytest.raises(ValueError, match='unknown sampler'):
    pipeline.text_to_image(pipe, PROMPTS, key, sampler='heun', **kw)
  with pytest.raises(ValueError, match='euler supports only eta=0, got eta=0.5'):
    pipeline.text_to_image(pipe, PROMPTS, key, sampler='euler', eta=0.5, **kw)
