"""DECOR at sampling time in the pipeline, on the shipped digits model: strength 0 is the plain
pipeline bit for bit; any strength equals sampling from the closed-form projected embeddings
(float64 numpy SVD) passed as `prompt_embeds`; a per-prompt strength sweep in one batch equals one
call per strength; the unconditional branch is not touched; bad settings raise."""

import chex
import jax
import numpy as np
import pytest

from diffgeo_jax import digits, models
from diffgeo_jax.diffusion import pipeline
from diffgeo_jax.text import decor

PROMPTS = ['a sks digit five', 'a red digit seven']
UNDESIRED = 'a digit three'
KW = dict(num_steps=4, guidance=1.5)


@pytest.fixture(scope='module')
def pipe():
  return models.load_pipeline(digits.pipeline_dir())


def _decor(pipe, settings):
  """DECOR is a prompt-embedding transform: its embeddings go in as `prompt_embeds`."""
  return pipeline.decor_prompts(pipe, PROMPTS, settings)


def _closed_form(x, xu, strength, rank):
  """float64: X - strength * X V V^T, V the top-`rank` right singular vectors of X~."""
  x, xu = np.asarray(x, np.float64), np.asarray(xu, np.float64)[0]
  v = np.linalg.svd(xu, full_matrices=False)[2][:rank].T
  return x - np.asarray(strength, np.float64).reshape(-1, 1, 1) * (x @ v @ v.T)


def test_strength_zero_is_the_plain_pipeline(pipe):
  key = jax.random.key(0)
  plain = pipeline.text_to_image(pipe, PROMPTS, key, **KW)
  chex.assert_trees_all_equal(
      pipeline.text_to_image(pipe, PROMPTS, key, prompt_embeds=_decor(pipe, decor.Settings(UNDESIRED, 0.0)), **KW),
      plain)


@pytest.mark.parametrize('strength,rank', [(1.0, 2), (0.5, None)])
def test_equals_sampling_the_closed_form_projection(pipe, strength, rank):
  key = jax.random.key(1)
  got = pipeline.text_to_image(pipe, PROMPTS, key, prompt_embeds=_decor(pipe, decor.Settings(UNDESIRED, strength, rank)),
                               **KW)
  x = pipeline.encode_prompts(pipe, PROMPTS)
  xu = pipeline.encode_prompts(pipe, [UNDESIRED])
  embeds = _closed_form(x, xu, strength, rank or xu.shape[1]).astype(np.float32)
  want = pipeline.text_to_image(pipe, PROMPTS, key, prompt_embeds=embeds, **KW)
  chex.assert_trees_all_close(got, want, atol=2e-4)
  # ... and the projection changed the images (the test can fail).
  plain = pipeline.text_to_image(pipe, PROMPTS, key, **KW)
  assert float(np.abs(np.asarray(got) - np.asarray(plain)).max()) > 1e-2


def test_per_prompt_strengths_equal_one_call_per_strength(pipe):
  key = jax.random.key(2)
  strengths = [0.25, 1.0]
  swept = pipeline.text_to_image(pipe, PROMPTS, key,
                                 prompt_embeds=_decor(pipe, decor.Settings(UNDESIRED, strengths, 2)), **KW)
  x = pipeline.encode_prompts(pipe, PROMPTS)
  xu = pipeline.encode_prompts(pipe, [UNDESIRED])
  for i, s in enumerate(strengths):
    one = pipeline.text_to_image(pipe, PROMPTS, key, prompt_embeds=_decor(pipe, decor.Settings(UNDESIRED, s, 2)), **KW)
    chex.assert_trees_all_close(swept[i], one[i], atol=1e-5)
    chex.assert_trees_all_close(pipeline.decor_prompts(pipe, PROMPTS, decor.Settings(
        UNDESIRED, strengths, 2))[i], _closed_form(x, xu, s, 2)[i].astype(np.float32), atol=2e-5)


def test_unconditional_branch_is_untouched(pipe):
  # guidance 0 samples the unconditional model alone: DECOR on the prompts changes nothing.
  key = jax.random.key(3)
  kw = dict(num_steps=4, guidance=0.0)
  chex.assert_trees_all_equal(
      pipeline.text_to_image(pipe, PROMPTS, key, prompt_embeds=_decor(pipe, decor.Settings(UNDESIRED, 1.0)), **kw),
      pipeline.text_to_image(pipe, PROMPTS, key, **kw))


def test_image_to_image_takes_decor(pipe):
  key = jax.random.key(4)
  images = pipeline.text_to_image(pipe, PROMPTS, key, **KW)
  kw = dict(strength=0.75, **KW)
  plain = pipeline.image_to_image(pipe, images, PROMPTS, key, **kw)
  chex.assert_trees_all_equal(pipeline.image_to_image(
      pipe, images, PROMPTS, key, prompt_embeds=_decor(pipe, decor.Settings(UNDESIRED, 0.0)), **kw), plain)
  moved = pipeline.image_to_image(pipe, images, PROMPTS, key,
                                  prompt_embeds=_decor(pipe, decor.Settings(UNDESIRED, 1.0, 2)), **kw)
  assert float(np.abs(np.asarray(moved) - np.asarray(plain)).max()) > 1e-2


def test_bad_arguments_raise(pipe):
  key = jax.random.key(0)
  with pytest.raises(ValueError, match='settings must be a decor.Settings'):
    pipeline.decor_prompts(pipe, PROMPTS, ('a digit three', 1.0))
  with pytest.raises(ValueError, match='decor.undesired'):
    pipeline.decor_prompts(pipe, PROMPTS, decor.Settings(['a', 'b', 'c']))
  with pytest.raises(ValueError, match='prompt_embeds must have shape'):
    pipeline.text_to_image(pipe, PROMPTS, key, prompt_embeds=np.zeros((2, 5, 64)), **KW)
