"""SDXL (two text encoders, pooled text embeddings, size/crop time ids) and SD-2.x v-prediction
through `pipeline.text_to_image` / `image_to_image`, against diffusers' StableDiffusionXL(Img2Img)
Pipeline and StableDiffusionPipeline on tiny random folders written by diffusers, same noise."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from diffgeo_jax import models
from diffgeo_jax.diffusion import chromatography, guidance, pipeline
from diffgeo_jax.text import decor
from tests import report
from tests.models import oracles

PROMPTS = ['a red digit', 'digit', 'red red', '']
NEGATIVES = ['red', 'digit 7', '', 'a digit']
STEPS, SCALE = 5, 3.0
LATENT_SHAPE = (len(PROMPTS), 16, 16, 4)  # 32x32 images, VAE factor 2


@pytest.fixture(scope='module')
def xl(diffusers_sdxl_pipeline_dir):
  return models.load_pipeline(diffusers_sdxl_pipeline_dir)


@pytest.fixture(scope='module')
def latents():
  return np.asarray(jax.random.normal(jax.random.key(3), LATENT_SHAPE))


def _diffusers(cls, folder, ddim: bool = True):
  from diffusers import DDIMScheduler
  dp = cls.from_pretrained(folder, add_watermarker=False) if 'XL' in cls.__name__ else \
      cls.from_pretrained(folder, safety_checker=None)
  if ddim:
    # The folder's config (Euler) has no clip_sample, which DDIMScheduler would default to True;
    # ours reads the config as the folder's scheduler does: no clipping.
    dp.scheduler = DDIMScheduler.from_config(dp.scheduler.config,
                                             clip_sample=dp.scheduler.config.get('clip_sample',
                                                                                 False))
  # The tiny tokenizers were saved without a length limit; ours caps them at the position table.
  for name in ('tokenizer', 'tokenizer_2'):
    tok = getattr(dp, name, None)
    if tok is not None:
      tok.model_max_length = dp.text_encoder.config.max_position_embeddings
  dp.set_progress_bar_config(disable=True)
  return dp


def test_encode_prompts_is_diffusers_encode_prompt(xl, diffusers_sdxl_pipeline_dir):
  from diffusers import StableDiffusionXLPipeline
  dp = _diffusers(StableDiffusionXLPipeline, diffusers_sdxl_pipeline_dir)
  with torch.no_grad():
    embeds, neg, pooled, neg_pooled = dp.encode_prompt(
        PROMPTS, do_classifier_free_guidance=True, negative_prompt=NEGATIVES)
    _, zero, _, zero_pooled = dp.encode_prompt(PROMPTS, do_classifier_free_guidance=True)
  ours = pipeline.encode_prompts(xl, PROMPTS)
  chex_close = lambda a, b: np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=1e-5)
  chex_close(ours['context'], embeds)
  chex_close(ours['text_embeds'], pooled)
  theirs_neg = pipeline.encode_prompts(xl, NEGATIVES)
  chex_close(theirs_neg['context'], neg)
  chex_close(theirs_neg['text_embeds'], neg_pooled)
  # force_zeros_for_empty_prompt: no negative prompt means zeros, not the empty prompt's encoding.
  assert float(torch.abs(zero).max()) == 0 and float(torch.abs(zero_pooled).max()) == 0
  assert ours['context'].shape == (4, 16, 48) and ours['text_embeds'].shape == (4, 16)
  # The two halves are the two encoders: the second tokenizer pads with '!', not EOS.
  assert xl.tokenizer_2.pad_token == '!' and xl.tokenizer.pad_token != '!'


@pytest.mark.parametrize('negatives, rescale', [(None, 0.0), (NEGATIVES, 0.7)])
def test_text_to_image_matches_diffusers(xl, diffusers_sdxl_pipeline_dir, latents, negatives,
                                         rescale):
  from diffusers import StableDiffusionXLPipeline
  ours = np.asarray(pipeline.text_to_image(
      xl, PROMPTS, jax.random.key(0), num_steps=STEPS, negative_prompts=negatives,
      guidance=guidance.CFG(SCALE, rescale=rescale), latents=jnp.asarray(latents)))
  dp = _diffusers(StableDiffusionXLPipeline, diffusers_sdxl_pipeline_dir)
  with torch.no_grad(), oracles.one_torch_thread():
    ref = dp(PROMPTS, negative_prompt=negatives, num_inference_steps=STEPS, guidance_scale=SCALE,
             guidance_rescale=rescale, latents=oracles.nchw(latents), height=32, width=32,
             output_type='np').images
  err, _ = oracles.assert_close_to_reference(ours, ref, rel=1e-4, what='SDXL text_to_image')
  report.record(f'SDXL text_to_image (DDIM {STEPS}, CFG {SCALE}, rescale {rescale}, '
                f'negatives {negatives is not None}) vs diffusers max abs error', err)
  assert 0.5 < np.mean((ref > 0) & (ref < 1))  # not saturated: the comparison means something


def test_text_to_image_with_the_folders_euler_scheduler(xl, diffusers_sdxl_pipeline_dir, latents):
  # The SDXL scheduler config as saved (Euler, 'leading' spacing, steps_offset 1), unswapped.
  from diffusers import StableDiffusionXLPipeline
  assert xl.scheduler_config['_class_name'] == 'EulerDiscreteScheduler'
  ours = np.asarray(pipeline.text_to_image(xl, PROMPTS, jax.random.key(0), num_steps=STEPS,
                                           guidance=SCALE, sampler='euler',
                                           latents=jnp.asarray(latents)))
  dp = _diffusers(StableDiffusionXLPipeline, diffusers_sdxl_pipeline_dir, ddim=False)
  with torch.no_grad(), oracles.one_torch_thread():
    ref = dp(PROMPTS, num_inference_steps=STEPS, guidance_scale=SCALE, height=32, width=32,
             latents=oracles.nchw(latents), output_type='np').images
  err, _ = oracles.assert_close_to_reference(ours, ref, rel=1e-4, what='SDXL euler')
  report.record('SDXL text_to_image (Euler, the folder\'s scheduler) vs diffusers', err)


def test_image_to_image_matches_diffusers(xl, diffusers_sdxl_pipeline_dir):
  from diffusers import StableDiffusionXLImg2ImgPipeline
  from diffusers.pipelines.stable_diffusion_xl import \
      pipeline_stable_diffusion_xl_img2img as i2i
  prompts, strength, key = PROMPTS[:2], 0.6, jax.random.key(5)
  rng = np.random.RandomState(0)
  images = rng.rand(2, 32, 32, 3).astype(np.float32)
  noise = rng.randn(2, 16, 16, 4).astype(np.float32)
  ours = np.asarray(pipeline.image_to_image(xl, images, prompts, key, strength=strength,
                                            num_steps=STEPS, guidance=SCALE, noise=noise,
                                            negative_prompts=NEGATIVES[:2]))
  dp = _diffusers(StableDiffusionXLImg2ImgPipeline, diffusers_sdxl_pipeline_dir)
  with oracles.img2img_noise(i2i, key, noise), torch.no_grad(), oracles.one_torch_thread():
    ref = dp(prompts, image=oracles.nchw(images), strength=strength, num_inference_steps=STEPS,
             guidance_scale=SCALE, negative_prompt=NEGATIVES[:2], output_type='np').images
  err, _ = oracles.assert_close_to_reference(ours, ref, rel=1e-4, what='SDXL image_to_image')
  report.record('SDXL image_to_image (strength 0.6) vs diffusers max abs error', err)
  assert np.abs(ours - images).mean() > 0.01


def test_sd2_v_prediction_matches_diffusers(diffusers_sd2_pipeline_dir, latents):
  from diffusers import StableDiffusionPipeline
  pipe = models.load_pipeline(diffusers_sd2_pipeline_dir)
  assert pipe.scheduler_config['prediction_type'] == 'v_prediction'
  ours = np.asarray(pipeline.text_to_image(pipe, PROMPTS, jax.random.key(0), num_steps=STEPS,
                                           guidance=guidance.CFG(SCALE, rescale=0.7),
                                           latents=jnp.asarray(latents)))
  dp = _diffusers(StableDiffusionPipeline, diffusers_sd2_pipeline_dir)
  with torch.no_grad(), oracles.one_torch_thread():
    ref = dp(PROMPTS, num_inference_steps=STEPS, guidance_scale=SCALE, guidance_rescale=0.7,
             latents=oracles.nchw(latents), output_type='np').images
  err, _ = oracles.assert_close_to_reference(ours, ref, rel=1e-4, what='SD-2 v-prediction')
  report.record('SD-2.x v-prediction text_to_image (DDIM, CFG, rescale 0.7) vs diffusers', err)
  assert 0.5 < np.mean((ref > 0) & (ref < 1))


def test_decor_projects_each_encoders_part_and_the_pooled_embedding(xl):
  prompts = PROMPTS[:2]
  plain = pipeline.encode_prompts(xl, prompts)
  same = pipeline.decor_prompts(xl, prompts, decor.Settings('red', strength=0.0))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               same, plain)
  out = pipeline.decor_prompts(xl, prompts, decor.Settings('red', strength=1.0))
  red = pipeline.encode_prompts(xl, ['red'])
  for lo, hi in ((0, 24), (24, 48)):  # each encoder's columns: nothing left in red's row space
    _, sv, vt = np.linalg.svd(np.asarray(red['context'][0, :, lo:hi]), full_matrices=False)
    basis = vt[sv > 1e-6 * sv[0]]  # red's row space in this encoder's columns (numpy's SVD)
    left = np.asarray(out['context'][..., lo:hi]) @ basis.T
    assert np.abs(left).max() < 1e-4 * np.abs(np.asarray(plain['context'])).max()
  pooled = np.asarray(red['text_embeds'][0])
  assert np.abs(np.asarray(out['text_embeds']) @ pooled).max() < 1e-4 * pooled @ pooled
  # The projection is per encoder: projecting the 48 joint columns at once gives another answer.
  joint = decor.project(plain['context'], red['context'], 1.0)
  assert np.abs(np.asarray(joint) - np.asarray(out['context'])).max() > 1e-3


def test_prompt_switch_and_upsample_guidance_run_on_the_added_conditioning(xl, latents):
  x = jnp.asarray(latents[:2])
  run = lambda prompts, **kw: np.asarray(pipeline.text_to_image(
      xl, prompts, jax.random.key(0), num_steps=3, latents=x, **kw))
  early, late = run(PROMPTS[:2]), run(NEGATIVES[:2])
  # The prompts hold while t > switch: a switch above every timestep gives the late prompts
  # throughout, one below every timestep the early ones.
  np.testing.assert_allclose(run(PROMPTS[:2], late_prompts=NEGATIVES[:2],
                                 guidance=chromatography.PromptSwitch(2000.0)), late, atol=1e-6)
  np.testing.assert_allclose(run(PROMPTS[:2], late_prompts=NEGATIVES[:2],
                                 guidance=chromatography.PromptSwitch(-1.0)), early, atol=1e-6)
  big = pipeline.text_to_image(xl, PROMPTS[:2], jax.random.key(0), num_steps=3, height=64,
                               width=64, guidance=guidance.UpsampleGuidance(
                                   inner=guidance.CFG(SCALE), order='before'))
  assert big.shape == (2, 64, 64, 3) and np.all(np.isfinite(np.asarray(big)))


def test_bad_sdxl_inputs_are_named(xl):
  with pytest.raises(ValueError, match="prompt_embeds of an SDXL pipeline must be a dict"):
    pipeline.text_to_image(xl, PROMPTS[:1], jax.random.key(0), num_steps=2,
                           prompt_embeds=np.zeros((1, 16, 48), np.float32))
  good = pipeline.encode_prompts(xl, PROMPTS[:1])
  with pytest.raises(ValueError, match='text_embeds'):
    pipeline.text_to_image(xl, PROMPTS[:1], jax.random.key(0), num_steps=2,
                           prompt_embeds={**good, 'text_embeds': np.zeros((1, 8), np.float32)})
  import dataclasses
  refiner = dataclasses.replace(xl, text_encoder=None, text_encoder_params=None)
  with pytest.raises(ValueError, match='needs both text encoders.*text_encoder'):
    pipeline.text_to_image(refiner, PROMPTS[:1], jax.random.key(0), num_steps=2)
