"""Classifier-free guidance: exact end points, the formula, one batched call, and guidance rescale
against diffusers' `rescale_noise_cfg`."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from diffgeo_jax.diffusion import guidance
from tests import report

B, H, W, C, L, D = 3, 4, 5, 2, 6, 7


def _inputs(seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(ks[0], (B, H, W, C))
  cond = jax.random.normal(ks[1], (B, L, D))
  uncond = jax.random.normal(ks[2], (B, L, D))
  return x, cond, uncond


def _nonlinear_model(x, t, ctx):
  """A model whose output depends on x, t and the context, per sample, nonlinearly."""
  t = jnp.broadcast_to(jnp.asarray(t, x.dtype), (x.shape[0],))
  feat = jnp.tanh(ctx.mean(axis=1))[:, None, None, :C]  # (B, 1, 1, C)
  return jnp.sin(x * (1 + feat)) + 0.01 * t[:, None, None, None] * feat


def _lookup_model(out_uncond, out_cond):
  """(model, ctx): a model that returns stored per-sample outputs (B, H, W, C), picked by the
  context ctx(which) (which = 0. for uncond, 1. for cond; the sample index rides along)."""
  table = jnp.stack([jnp.asarray(out_uncond), jnp.asarray(out_cond)])  # (2, B, H, W, C)
  model = lambda x, t, c: table[c[:, 0, 0].astype(jnp.int32), c[:, 0, 1].astype(jnp.int32)]
  idx = jnp.arange(table.shape[1], dtype=jnp.float32)
  ctx = lambda which: jnp.stack([jnp.full(idx.shape, which, jnp.float32), idx], -1)[:, None, :]
  return model, ctx


@pytest.mark.parametrize('t', [jnp.float32(500.0), jnp.array([10.0, 500.0, 999.0])])
def test_scale_one_is_cond_and_scale_zero_is_uncond_exactly(t):
  x, cond, uncond = _inputs()
  want_cond = _nonlinear_model(x, t, cond)
  want_uncond = _nonlinear_model(x, t, uncond)
  got1 = guidance.classifier_free(_nonlinear_model, x, t, cond, uncond, 1.0)
  got0 = guidance.classifier_free(_nonlinear_model, x, t, cond, uncond, 0.0)
  np.testing.assert_array_equal(got1, want_cond)
  np.testing.assert_array_equal(got0, want_uncond)
  # Also with a traced scale (what the pipeline passes); a lookup model, so that XLA's fusion of
  # the model itself at batch 2B vs B cannot differ in the last bit.
  model, ctx = _lookup_model(np.asarray(want_uncond), np.asarray(want_cond))
  cfg = jax.jit(lambda s: guidance.classifier_free(model, x, t, ctx(1.0), ctx(0.0), s))
  np.testing.assert_array_equal(cfg(jnp.float32(1.0)), want_cond)
  np.testing.assert_array_equal(cfg(jnp.float32(0.0)), want_uncond)


def test_linear_model_formula():
  """model = A x + ctx-mean bias: CFG must give x-part + bias_u + s (bias_c - bias_u)."""
  x, cond, uncond = _inputs(1)
  a = jnp.float32(0.7)
  model = lambda x, t, ctx: a * x + ctx.mean(axis=(1, 2))[:, None, None, None]
  scale = 7.5
  bias_c = cond.mean(axis=(1, 2))[:, None, None, None]
  bias_u = uncond.mean(axis=(1, 2))[:, None, None, None]
  want = a * x + bias_u + scale * (bias_c - bias_u)
  got = guidance.classifier_free(model, x, 3.0, cond, uncond, scale)
  err = float(jnp.abs(got - want).max())
  report.record('cfg linear-model max error', err)
  chex.assert_trees_all_close(got, want, atol=1e-5)


def test_one_batched_call():
  calls = []

  def model(x, t, ctx):  # not jitted: Python sees every call
    calls.append((x.shape, jnp.shape(t), ctx.shape))
    return _nonlinear_model(x, t, ctx)

  x, cond, uncond = _inputs(2)
  t = jnp.array([1.0, 2.0, 3.0])
  got = guidance.classifier_free(model, x, t, cond, uncond, 4.0)
  assert calls == [((2 * B, H, W, C), (2 * B,), (2 * B, L, D))]
  # The pairing of rows must be right: compare with two separate calls.
  want = _nonlinear_model(x, t, uncond) + 4.0 * (
      _nonlinear_model(x, t, cond) - _nonlinear_model(x, t, uncond))
  chex.assert_trees_all_close(got, want, atol=1e-5)
  eps_fn = guidance.cfg_eps_fn(model, cond, uncond, 4.0)
  calls.clear()
  chex.assert_trees_all_close(eps_fn(x, t), got, atol=0)
  assert len(calls) == 1


def test_rescale_zero_is_plain_and_one_matches_cond_std():
  x, cond, uncond = _inputs(3)
  t = 100.0
  plain = guidance.classifier_free(_nonlinear_model, x, t, cond, uncond, 5.0)
  np.testing.assert_array_equal(
      guidance.classifier_free(_nonlinear_model, x, t, cond, uncond, 5.0, rescale=0.0), plain)
  full = guidance.classifier_free(_nonlinear_model, x, t, cond, uncond, 5.0, rescale=1.0)
  out_cond = _nonlinear_model(x, t, cond)
  std = lambda a: np.asarray(a, np.float64).reshape(B, -1).std(axis=1)
  rel = np.abs(std(full) / std(out_cond) - 1).max()
  report.record('cfg rescale=1 per-sample std rel. error', float(rel))
  assert rel < 1e-5
  assert np.abs(std(plain) / std(out_cond) - 1).max() > 0.1  # the test would notice no rescale


@pytest.mark.parametrize('rescale', [0.3, 0.7, 1.0])
def test_rescale_matches_diffusers(rescale):
  from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
  rng = np.random.RandomState(4)
  # Per-sample model outputs for uncond and cond, NCHW for torch, NHWC for us.
  out_u = rng.randn(B, C, H, W).astype(np.float32)
  out_c = (1.5 * rng.randn(B, C, H, W) + 0.2).astype(np.float32)
  scale = 7.5
  tu, tc = torch.from_numpy(out_u), torch.from_numpy(out_c)
  ref = rescale_noise_cfg(tu + scale * (tc - tu), tc, guidance_rescale=rescale).numpy()
  model, ctx = _lookup_model(out_u.transpose(0, 2, 3, 1), out_c.transpose(0, 2, 3, 1))
  x = jnp.zeros((B, H, W, C))
  got = guidance.classifier_free(model, x, 0.0, ctx(1.0), ctx(0.0), scale, rescale=rescale)
  got = np.asarray(got).transpose(0, 3, 1, 2)
  err = float(np.abs(got - ref).max() / np.abs(ref).max())
  report.record(f'cfg rescale={rescale} vs diffusers rescale_noise_cfg rel. error', err)
  assert err < 1e-5


def test_batch_mismatch_raises():
  x, cond, uncond = _inputs()
  with pytest.raises(ValueError, match='uncond'):
    guidance.classifier_free(_nonlinear_model, x, 0.0, cond, uncond[:2], 2.0)
  with pytest.raises(ValueError, match='t must be'):
    guidance.classifier_free(_nonlinear_model, x, jnp.zeros((2,)), cond, uncond, 2.0)


def test_guidance_objects_read_what_they_need():
  """`reads` decides on concrete values which prompt sets the pipeline encodes; a number (also a
  numpy scalar) is CFG; anything else is refused by name."""
  from diffgeo_jax.diffusion import chromatography
  assert guidance.as_guidance(np.float32(2.5)) == guidance.CFG(2.5)
  assert guidance.CFG(1.0).reads() == frozenset()  # scale 1: the prompts alone
  assert guidance.CFG(0.0).reads() == {'uncond'}
  assert guidance.Unguided().reads() == frozenset()
  assert guidance.UpsampleGuidance(inner=guidance.CFG(3.0)).reads() == {'uncond'}
  assert chromatography.PromptSwitch(500.0).reads() == {'late', 'uncond'}
  assert chromatography.PromptSwitch(500.0, inner=guidance.Unguided()).reads() == {'late'}
  for bad in (True, 'cfg', None):
    with pytest.raises(ValueError, match='guidance must be a number'):
      guidance.as_guidance(bad)
