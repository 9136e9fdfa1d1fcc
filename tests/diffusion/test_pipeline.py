"""text_to_image / image_to_image against diffusers' StableDiffusion(Img2Img)Pipeline on the same
tiny random pipeline folder and the same noise; pixel-space pipelines; prompt checks; sharding."""

import dataclasses
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from diffgeo_jax import models
from diffgeo_jax.diffusion import guidance, pipeline, samplers, schedules
from diffgeo_jax.models import convert
from diffgeo_jax.models import unet as unet_lib
from tests import report
from tests.models import oracles

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPTS = ['a red digit', 'digit', 'red', 'a digit', 'red red', 'digit 7', '', 'the red digit']
STEPS, SCALE = 5, 3.0
LATENT_SHAPE = (len(PROMPTS), 16, 16, 4)  # the tiny pipeline: 32x32 images, VAE factor 2


@pytest.fixture(scope='module')
def pipe(diffusers_pipeline_dir):
  return models.load_pipeline(diffusers_pipeline_dir)


@pytest.fixture(scope='module')
def latents():
  return np.asarray(jax.random.normal(jax.random.key(3), LATENT_SHAPE))


@pytest.fixture(scope='module')
def ours_t2i(pipe, latents):
  """Our DDIM text_to_image on the fixed noise (shared by the diffusers and sharding tests)."""
  return np.asarray(pipeline.text_to_image(pipe, PROMPTS, jax.random.key(0), num_steps=STEPS,
                                           guidance=SCALE, latents=jnp.asarray(latents)))


def _diffusers(cls, folder):
  from diffusers import DDIMScheduler
  dp = cls.from_pretrained(folder, safety_checker=None)
  dp.scheduler = DDIMScheduler.from_config(dp.scheduler.config)
  # The tiny tokenizer was saved without a length limit; ours caps it at the position table.
  dp.tokenizer.model_max_length = dp.text_encoder.config.max_position_embeddings
  dp.set_progress_bar_config(disable=True)
  return dp


def test_text_to_image_matches_diffusers(diffusers_pipeline_dir, ours_t2i, latents):
  from diffusers import StableDiffusionPipeline
  dp = _diffusers(StableDiffusionPipeline, diffusers_pipeline_dir)
  with torch.no_grad(), oracles.one_torch_thread():
    ref = dp(PROMPTS, num_inference_steps=STEPS, guidance_scale=SCALE,
             latents=oracles.nchw(latents), output_type='np').images
  err, scale = oracles.assert_close_to_reference(ours_t2i, ref, rel=1e-4, what='text_to_image')
  report.record('text_to_image (DDIM 5 steps, CFG 3) vs diffusers max abs error', err)
  # The comparison means something only if the images are not saturated.
  assert 0.5 < np.mean((ref > 0) & (ref < 1)) and ours_t2i.min() >= 0 and ours_t2i.max() <= 1


def test_image_to_image_matches_diffusers(pipe, diffusers_pipeline_dir):
  from diffusers import StableDiffusionImg2ImgPipeline
  from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as i2i
  prompts, strength, key = PROMPTS[:2], 0.6, jax.random.key(5)
  rng = np.random.RandomState(0)
  images = rng.rand(2, 32, 32, 3).astype(np.float32)
  noise = rng.randn(2, 16, 16, 4).astype(np.float32)
  ours = np.asarray(pipeline.image_to_image(pipe, images, prompts, key, strength=strength,
                                            num_steps=STEPS, guidance=SCALE, noise=noise))
  dp = _diffusers(StableDiffusionImg2ImgPipeline, diffusers_pipeline_dir)
  with oracles.img2img_noise(i2i, key, noise), torch.no_grad(), oracles.one_torch_thread():
    ref = dp(prompts, image=oracles.nchw(images), strength=strength, num_inference_steps=STEPS,
             guidance_scale=SCALE, output_type='np').images
  err, _ = oracles.assert_close_to_reference(ours, ref, rel=1e-4, what='image_to_image')
  report.record('image_to_image (strength 0.6) vs diffusers max abs error', err)
  assert np.abs(ours - images).mean() > 0.01  # it did change the images


def _pixel_pipe(pipe):
  """A pixel-space pipeline (vae=None): a tiny random 3-channel UNet on 8x8 images."""
  cfg = unet_lib.UNet2DConditionConfig.from_dict(dict(
      in_channels=3, out_channels=3, sample_size=8, block_out_channels=(16, 16), layers_per_block=1,
      norm_num_groups=8, down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
      up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), cross_attention_dim=24,
      attention_head_dim=4))
  model = unet_lib.UNet2DConditionModel(cfg)
  # Random weights from numpy on the abstract shapes: Flax's init would compile for seconds.
  rng = np.random.RandomState(0)
  params = jax.tree.map(lambda a: jnp.asarray(0.03 * rng.randn(*a.shape), a.dtype),
                        convert.abstract_params(model.init, jax.random.key(0),
                                                *unet_lib.dummy_inputs(cfg)))
  return dataclasses.replace(pipe, unet=model, unet_params=params, vae=None, vae_params=None)


def test_pixel_space_pipeline(pipe):
  pix = _pixel_pipe(pipe)
  prompts, negs = ['a red digit', 'digit'], ['red', '']
  x_T = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  images, traj = pipeline.text_to_image(pix, prompts, jax.random.key(0), num_steps=4,
                                        guidance=2.0, negative_prompts=negs, latents=x_T,
                                        return_trajectory=True)
  assert images.shape == (2, 8, 8, 3) and images.dtype == jnp.float32
  assert traj.x_t.shape == (4, 2, 8, 8, 3)
  np.testing.assert_array_equal(traj.x_t[0], x_T)
  # DDIM's last step lands on its pred_x0 (alpha_bar_prev = 1); the image is that, mapped to [0, 1].
  x0 = traj.pred_x0[-1]
  np.testing.assert_allclose(images, jnp.clip((x0 + 1) / 2, 0, 1), atol=1e-6)
  # The same thing composed by hand from the parts: encode, CFG, DDIM. (An untrained model's
  # images saturate, so the unclipped samples are compared.)
  s = schedules.from_diffusers_config(pix.scheduler_config)
  model_fn = lambda x, t, c: pix.unet.apply({'params': pix.unet_params}, x, t, c)
  eps_fn = guidance.cfg_eps_fn(model_fn, pipeline.encode_prompts(pix, prompts),
                               pipeline.encode_prompts(pix, negs), 2.0)
  err, _ = oracles.assert_close_to_reference(x0, samplers.ddim(eps_fn, x_T, s, 4), rel=1e-5,
                                             what='pixel-space text_to_image')
  report.record('pixel-space text_to_image vs hand-composed CFG+DDIM max error', err)
  # image_to_image in pixel space: x0 = 2 * image - 1, noised to the start step, then DDIM.
  images = jnp.asarray(np.random.RandomState(0).rand(2, 8, 8, 3), jnp.float32)
  noise = jax.random.normal(jax.random.key(2), (2, 8, 8, 3))
  edited, traj = pipeline.image_to_image(pix, images, prompts, jax.random.key(3), strength=0.5,
                                         num_steps=4, guidance=2.0, negative_prompts=negs,
                                         noise=noise, return_trajectory=True)
  first = pipeline.start_step(4, 0.5)
  x_t = s.add_noise(2 * images - 1, noise, s.inference_timesteps(4)[first])
  assert first == 2 and traj.x_t.shape[0] == 2
  err, _ = oracles.assert_close_to_reference(
      traj.pred_x0[-1], samplers.ddim(eps_fn, x_t, s, 4, first_step=first), rel=1e-5,
      what='pixel-space image_to_image')
  report.record('pixel-space image_to_image vs hand-composed max error', err)
  assert float(edited.min()) >= 0 and float(edited.max()) <= 1


def test_too_long_prompt_warns_and_is_cut(pipe):
  long = 'a very long prompt about many red digits'
  limit = pipeline.max_prompt_tokens(pipe)
  n = len(pipe.tokenizer(long).input_ids)
  assert limit == 16 and n > limit
  with pytest.warns(UserWarning, match=f"'{long}'.*last {n - limit} tokens were dropped"):
    emb = pipeline.encode_prompts(pipe, ['digit', long])
  assert emb.shape == (2, limit, 24)
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # a prompt that fits gives no warning
    short = pipeline.encode_prompts(pipe, 'digit')
  np.testing.assert_allclose(emb[0], short[0], atol=1e-6)


def test_bad_arguments_raise(pipe):
  img = np.zeros((2, 32, 32, 3), np.float32)
  with pytest.raises(ValueError, match='negative_prompts'):
    pipeline.text_to_image(pipe, ['a', 'b'], jax.random.key(0), negative_prompts=['x'])
  with pytest.raises(ValueError, match='^images'):
    pipeline.image_to_image(pipe, img, ['a', 'b', 'c'], jax.random.key(0))
  with pytest.raises(ValueError, match='^images'):
    pipeline.image_to_image(pipe, img[..., :1], ['a', 'b'], jax.random.key(0))
  for strength in (0.0, 1.5):
    with pytest.raises(ValueError, match='strength'):
      pipeline.image_to_image(pipe, img, ['a', 'b'], jax.random.key(0), strength=strength)
  with pytest.raises(ValueError, match='strength'):  # 3 * 0.2 < 1: no step left
    pipeline.image_to_image(pipe, img, ['a', 'b'], jax.random.key(0), strength=0.2, num_steps=3)
  with pytest.raises(ValueError, match='prompts'):
    pipeline.text_to_image(pipe, ['a', 3], jax.random.key(0))
  with pytest.raises(ValueError, match='latents'):
    pipeline.text_to_image(pipe, ['a'], jax.random.key(0), latents=jnp.zeros((1, 8, 8, 4)))


_SHARDED = r'''
import sys, jax, jax.numpy as jnp, numpy as np
jax.config.update('jax_default_matmul_precision', 'highest')
from diffgeo_jax import models
from diffgeo_jax.diffusion import pipeline
folder, prompts, out = sys.argv[1], sys.argv[2].split('|'), sys.argv[3]
pipe = pipeline.replicate(models.load_pipeline(folder))
latents = jax.random.normal(jax.random.key(3), (len(prompts), 16, 16, 4))
full = pipeline.text_to_image(pipe, prompts, jax.random.key(0), num_steps=5, guidance=3.0,
                              latents=latents)
# 6 does not divide 8: padded to 8 and cut back.
part = pipeline.text_to_image(pipe, prompts[:6], jax.random.key(0), num_steps=5,
                              guidance=3.0, latents=latents[:6])
np.savez(out, full=np.asarray(full), part=np.asarray(part), devices=jax.device_count(),
         shards=len(full.sharding.device_set),
         param_copies=len(jax.tree.leaves(pipe.unet_params)[0].sharding.device_set))
'''


def test_sharded_over_eight_devices_matches_one(tmp_path, diffusers_pipeline_dir, ours_t2i):
  out = tmp_path / 'sharded.npz'
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=8',
             PYTHONPATH=ROOT)
  proc = subprocess.run([sys.executable, '-c', _SHARDED, str(diffusers_pipeline_dir),
                         '|'.join(PROMPTS), str(out)], capture_output=True, text=True, timeout=300,
                        env=env, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = np.load(out)
  assert int(got['devices']) == 8 and int(got['shards']) == 8 and int(got['param_copies']) == 8
  err_full = float(np.abs(got['full'] - ours_t2i).max())
  err_part = float(np.abs(got['part'] - ours_t2i[:6]).max())
  report.record('8-device sharded vs 1-device text_to_image max error', err_full)
  report.record('8-device padded batch of 6 vs 1-device max error', err_part)
  assert err_full < 1e-5 and err_part < 1e-5
