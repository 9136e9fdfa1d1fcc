"""The pipeline's resolution options: upsample guidance (`upsample_guidance=`) and time-dependent
prompt composition (`switch_prompts=`, `switch_timestep=`) equal the same samplers run by hand
with the guidance/chromatography eps_fns; the switch's end points equal plain sampling."""

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
  ug = guidance.UpsampleGuidance(factor=2, weight=1.0, eta=0.7, order=order)
  x_T = jax.random.normal(jax.random.key(1), (2, 32, 32, 4))
  ours = pipeline.text_to_image(pipe, PROMPTS, jax.random.key(0), num_steps=STEPS,
                                guidance_scale=3.0, latents=x_T, height=64, width=64,
                                upsample_guidance=ug)
  cond = pipeline.encode_prompts(pipe, PROMPTS)
  uncond = pipeline.encode_prompts(pipe, ['', ''])
  want = _by_hand(pipe, lambda f, s: guidance.upsample_cfg_eps_fn(
      f, s, cond, uncond, 3.0, order=order, factor=2, weight=1.0, eta=0.7), x_T)
  chex.assert_trees_all_close(ours, want, atol=1e-5)
  plain = pipeline.text_to_image(pipe, PROMPTS, jax.random.key(0), num_steps=STEPS,
                                 guidance_scale=3.0, latents=x_T, height=64, width=64)
  assert float(jnp.abs(ours - plain).mean()) > 1e-3  # the guidance did something


def test_upsample_guidance_weight_zero_is_plain_sampling(pipe):
  x_T = jax.random.normal(jax.random.key(2), (2, 32, 32, 4))
  kw = dict(num_steps=STEPS, guidance_scale=1.0, latents=x_T, height=64, width=64)
  plain = pipeline.text_to_image(pipe, PROMPTS, jax.random.key(0), **kw)
  off = pipeline.text_to_image(pipe, PROMPTS, jax.random.key(0), **kw,
                               upsample_guidance=guidance.UpsampleGuidance(weight=0.0))
  np.testing.assert_array_equal(np.asarray(off), np.asarray(plain))


def test_prompt_switch_end_points_and_middle(pipe):
  """t_s above every grid timestep: the second prompts only; below every one: the first only;
  in between: what prompt_switch_eps_fn gives by hand, which differs from both."""
  second = ['digit', 'a red digit']
  x_T = jax.random.normal(jax.random.key(3), (2, 16, 16, 4))
  kw = dict(num_steps=STEPS, guidance_scale=2.0, latents=x_T)
  grid = samplers.timesteps('ddim', schedules.from_diffusers_config(pipe.scheduler_config), STEPS)
  run = lambda t_s: pipeline.text_to_image(pipe, PROMPTS, jax.random.key(0), **kw,
                                           switch_prompts=second, switch_timestep=t_s)
  first_only = pipeline.text_to_image(pipe, PROMPTS, jax.random.key(0), **kw)
  second_only = pipeline.text_to_image(pipe, second, jax.random.key(0), **kw)
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


def test_bad_options_raise(pipe):
  x_T = jax.random.normal(jax.random.key(3), (2, 16, 16, 4))
  kw = dict(num_steps=2, latents=x_T)
  with pytest.raises(ValueError, match='switch_prompts and switch_timestep go together'):
    pipeline.text_to_image(pipe, PROMPTS, jax.random.key(0), switch_prompts=PROMPTS, **kw)
  with pytest.raises(ValueError, match='cannot be combined with upsample_guidance'):
    pipeline.text_to_image(pipe, PROMPTS, jax.random.key(0), switch_prompts=PROMPTS,
                           switch_timestep=500.0, upsample_guidance=guidance.UpsampleGuidance(),
                           **kw)
  with pytest.raises(ValueError, match=r'switch_prompts must have one entry per prompt \(2\)'):
    pipeline.text_to_image(pipe, PROMPTS, jax.random.key(0), switch_prompts=['a', 'b', 'c'],
                           switch_timestep=500.0, **kw)
  with pytest.raises(ValueError, match='upsample_guidance must be a guidance.UpsampleGuidance'):
    pipeline.text_to_image(pipe, PROMPTS, jax.random.key(0), upsample_guidance={'factor': 2},
                           **kw)
  with pytest.raises(ValueError, match='factor=3 must divide the spatial size'):
    pipeline.text_to_image(pipe, PROMPTS, jax.random.key(0), num_steps=2,
                           upsample_guidance=guidance.UpsampleGuidance(factor=3))
  with pytest.raises(ValueError, match='eta must be in'):
    guidance.UpsampleGuidance(eta=1.5)
  with pytest.raises(ValueError, match="order must be 'after' or 'before'"):
    guidance.UpsampleGuidance(order='middle')
