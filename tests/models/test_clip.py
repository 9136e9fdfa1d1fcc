"""The Flax CLIP text encoder against transformers' PyTorch models (the oracle), tiny and random."""

from __future__ import annotations

import dataclasses
import json
import types
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from diffgeo_jax.models import clip, config_utils, convert
from tests import report

TINY = dict(vocab_size=99, hidden_size=32, intermediate_size=37, projection_dim=24,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
            pad_token_id=1, bos_token_id=0)
EOS = 98  # the highest id, as 49407 in the real vocabulary: legacy (eos_token_id=2) argmax finds it
CASES = [(act, eos) for act in ('quick_gelu', 'gelu') for eos in (2, EOS)]
PREFIX = 'text_model.'


def make_ids(length: int, seed: int = 0):
  """Rows as a tokenizer makes them: bos, words, eos, then padding (eos or pad_token); and a row
  without eos where the id maximum repeats, so legacy (argmax id) and eos pooling pick different
  positions. Returns (ids, right-padding attention mask)."""
  rng = np.random.RandomState(seed)
  ends = [3, length // 2, length - 1, length - 1]
  ids = rng.randint(3, EOS - 1, (4, length))
  mask = np.zeros((4, length), np.int64)
  for row, end in enumerate(ends[:3]):
    ids[row, 0], ids[row, end] = 0, EOS
    ids[row, end + 1:] = EOS if row == 0 else 1
    mask[row, :end + 1] = 1
  ids[3, [2, 5]] = EOS - 1
  mask[3] = 1
  return ids, mask


def torch_state_dict(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def torch_model(cls, tcfg, seed):
  torch.manual_seed(seed)
  model = cls(tcfg).eval()
  with torch.no_grad():  # LayerNorm (1, 0) and zero biases would hide a swapped parameter
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


def torch_run(model, ids, mask=None):
  with torch.no_grad():
    mask = None if mask is None else torch.from_numpy(mask)
    out = model(torch.from_numpy(ids), attention_mask=mask, output_hidden_states=True)
  text_embeds = getattr(out, 'text_embeds', None)
  pooled = getattr(out, 'pooler_output', None)
  return types.SimpleNamespace(
      last_hidden_state=out.last_hidden_state.numpy(),
      pooled=None if pooled is None else pooled.numpy(),
      hidden_states=[h.numpy() for h in out.hidden_states],
      text_embeds=None if text_embeds is None else text_embeds.numpy())


def flax_run(model, params, ids, mask=None, jit=False):
  # Eager by default: op-by-op executables are cached by shape across models, so after the first
  # test each run is cheap, while every jit of a new model would compile it again.
  fn = lambda p, i, m: model.apply({'params': p}, i, attention_mask=m, output_hidden_states=True)
  with jax.default_matmul_precision('highest'):
    return (jax.jit(fn) if jit else fn)(params, jnp.asarray(ids),
                                        None if mask is None else jnp.asarray(mask))


def max_err(ours, ref):
  return float(np.abs(np.asarray(ours, np.float32) - ref).max())


def assert_close(name, ours, ref, rel=1e-4):
  assert np.shape(ours) == np.shape(ref), f'{name}: shape {np.shape(ours)} != {np.shape(ref)}'
  err, bound = max_err(ours, ref), rel * max(1.0, float(np.abs(ref).max()))
  assert err <= bound, f'{name}: max abs err {err:.3g} > {bound:.3g}'
  return err


@pytest.fixture(scope='module', params=CASES, ids=[f'{a}-eos{e}' for a, e in CASES])
def case(request):
  act, eos = request.param
  tcfg = transformers.CLIPTextConfig(**TINY, hidden_act=act, eos_token_id=eos)
  cfg = clip.CLIPTextConfig.from_dict(tcfg.to_dict(), source='transformers config')
  plain = torch_model(transformers.CLIPTextModel, tcfg, seed=0)
  proj = torch_model(transformers.CLIPTextModelWithProjection, tcfg, seed=1)
  flax_plain, flax_proj = clip.CLIPTextModel(cfg), clip.CLIPTextModelWithProjection(cfg)
  return types.SimpleNamespace(
      key=request.param, tcfg=tcfg, cfg=cfg,
      torch={False: plain, True: proj}, flax={False: flax_plain, True: flax_proj},
      params={False: clip.params_from_torch(torch_state_dict(plain), flax_plain),
              True: convert.torch_to_flax(torch_state_dict(proj), clip.abstract_params(flax_proj),
                                          ignore=clip.TORCH_IGNORE_KEYS)})


@pytest.mark.parametrize('projection', [False, True], ids=['plain', 'projection'])
@pytest.mark.parametrize('length,padded', [(16, False), (12, True)], ids=['full', 'padded'])
def test_matches_torch(case, projection, length, padded):
  ids, mask = make_ids(length)
  mask = mask if padded else None
  ref = torch_run(case.torch[projection], ids, mask)
  out = flax_run(case.flax[projection], case.params[projection], ids, mask)
  errs = {'last_hidden_state': assert_close('last_hidden_state', out.last_hidden_state,
                                            ref.last_hidden_state)}
  assert len(out.hidden_states) == len(ref.hidden_states) == case.cfg.num_hidden_layers + 1
  for i, (ours, theirs) in enumerate(zip(out.hidden_states, ref.hidden_states)):
    errs[f'hidden_states[{i}]'] = assert_close(f'hidden_states[{i}]', ours, theirs)
  if projection:
    errs['text_embeds'] = assert_close('text_embeds', out.text_embeds, ref.text_embeds)
    # transformers' WithProjection output has no pooler_output; pooled is what it projected.
    with torch.no_grad():
      ref_pooled = case.torch[True].text_model(
          torch.from_numpy(ids), attention_mask=None if mask is None else torch.from_numpy(mask)
      ).pooler_output.numpy()
  else:
    assert out.text_embeds is None
    ref_pooled = ref.pooled
  errs['pooled'] = assert_close('pooled', out.pooled, ref_pooled)
  report.record(f'clip fp32 {case.key} {"projection" if projection else "plain"} L={length} '
                f'padded={padded} max abs err', ', '.join(f'{k}={v:.2e}' for k, v in errs.items()))


def test_jit_matches_eager(case):
  ids, mask = make_ids(16, seed=1)
  jitted = flax_run(case.flax[True], case.params[True], ids, mask, jit=True)
  eager = flax_run(case.flax[True], case.params[True], ids, mask)
  chex.assert_trees_all_close(jitted, eager, atol=1e-5, rtol=1e-5)


def test_jax_attention_impl_matches_softmax(case):
  ids, mask = make_ids(12, seed=2)
  model = clip.CLIPTextModelWithProjection(case.cfg, attention_impl='jax')
  ref = flax_run(case.flax[True], case.params[True], ids, mask)
  out = flax_run(model, case.params[True], ids, mask)
  chex.assert_trees_all_close(out, ref, atol=1e-5, rtol=1e-5)


def test_output_without_hidden_states(case):
  ids, _ = make_ids(16)
  out = case.flax[True].apply({'params': case.params[True]}, jnp.asarray(ids),
                              output_hidden_states=False)
  assert out.hidden_states is None
  np.testing.assert_array_equal(out.text_embeds,
                                flax_run(case.flax[True], case.params[True], ids).text_embeds)


@pytest.mark.parametrize('projection', [False, True], ids=['plain', 'projection'])
def test_torch_round_trip(case, projection):
  sd = torch_state_dict(case.torch[projection])
  exported = convert.flax_to_torch(case.params[projection])
  if not projection:  # transformers 5 keeps a bare CLIPTextModel's keys unprefixed in memory
    assert all(k.startswith(PREFIX) for k in exported)
    exported = {k[len(PREFIX):]: v for k, v in exported.items()}
  assert sorted(exported) == sorted(sd)
  for k, v in sd.items():  # torch -> flax -> torch is bit-exact
    assert exported[k].dtype == v.dtype and np.array_equal(exported[k], v), k
  fresh = torch_model(type(case.torch[projection]), case.tcfg, seed=123)
  fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
  ids, mask = make_ids(16, seed=3)
  a, b = torch_run(fresh, ids, mask), torch_run(case.torch[projection], ids, mask)
  np.testing.assert_array_equal(a.last_hidden_state, b.last_hidden_state)
  if projection:
    np.testing.assert_array_equal(a.text_embeds, b.text_embeds)


@pytest.mark.parametrize('projection', [False, True], ids=['plain', 'projection'])
def test_save_pretrained_round_trip(case, projection, tmp_path):
  """What we write (config.json + prefixed safetensors) loads in transformers and back here."""
  cls = type(case.torch[projection])
  with open(tmp_path / 'config.json', 'w') as f:
    json.dump(case.cfg.to_dict(cls.__name__), f)
  safetensors.numpy.save_file(convert.flax_to_torch(case.params[projection]),
                              tmp_path / clip.WEIGHTS_NAME)
  ids, mask = make_ids(16, seed=4)
  ours = flax_run(case.flax[projection], case.params[projection], ids, mask)
  ref = torch_run(cls.from_pretrained(tmp_path).eval(), ids, mask)
  assert_close('last_hidden_state', ours.last_hidden_state, ref.last_hidden_state)
  if projection:
    assert_close('text_embeds', ours.text_embeds, ref.text_embeds)
  cfg = clip.CLIPTextConfig.from_dict(config_utils.read_json(tmp_path / 'config.json'))
  assert cfg == case.cfg
  params = clip.params_from_torch(safetensors.numpy.load_file(tmp_path / clip.WEIGHTS_NAME),
                                  type(case.flax[projection])(cfg))
  chex.assert_trees_all_equal(params, case.params[projection])


def test_legacy_checkpoint_layout(case):
  """Old checkpoints: `text_model.` prefix and the saved `position_ids` buffer; both load alike."""
  sd = torch_state_dict(case.torch[False])
  legacy = {PREFIX + k: v for k, v in sd.items()}
  legacy[PREFIX + 'embeddings.position_ids'] = np.arange(16)[None]
  params = clip.params_from_torch(legacy, case.flax[False])
  chex.assert_trees_all_equal(params, case.params[False])
  with pytest.raises(convert.CheckpointMismatchError, match='position_ids'):
    convert.torch_to_flax(legacy, clip.abstract_params(case.flax[False]))


def test_bf16(case):
  ids, mask = make_ids(16, seed=5)
  ref = flax_run(case.flax[True], case.params[True], ids, mask)
  model = clip.CLIPTextModelWithProjection(case.cfg, dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(clip.abstract_params(model)))
  out = flax_run(model, case.params[True], ids, mask)
  assert out.last_hidden_state.dtype == jnp.bfloat16
  errs = {}
  for name in ('last_hidden_state', 'pooled', 'text_embeds'):
    ours, theirs = getattr(out, name), np.asarray(getattr(ref, name))
    errs[name] = (max_err(ours, theirs), float(np.abs(theirs).max()))
    assert_close(f'bf16 {name}', ours, theirs, rel=5e-2)
  report.record(f'clip bf16 vs fp32 {case.key} max abs err (output scale)',
                ', '.join(f'{k}={e:.2e} ({m:.2f})' for k, (e, m) in errs.items()))


# --- config ---------------------------------------------------------------------------------------

# text_encoder/config.json of runwayml/stable-diffusion-v1-5 (transformers 4.22).
SD15_TEXT_CONFIG = {
    '_name_or_path': 'openai/clip-vit-large-patch14', 'architectures': ['CLIPTextModel'],
    'attention_dropout': 0.0, 'bos_token_id': 0, 'dropout': 0.0, 'eos_token_id': 2,
    'hidden_act': 'quick_gelu', 'hidden_size': 768, 'initializer_factor': 1.0,
    'initializer_range': 0.02, 'intermediate_size': 3072, 'layer_norm_eps': 1e-05,
    'max_position_embeddings': 77, 'model_type': 'clip_text_model', 'num_attention_heads': 12,
    'num_hidden_layers': 12, 'pad_token_id': 1, 'projection_dim': 768, 'torch_dtype': 'float32',
    'transformers_version': '4.22.0.dev0', 'vocab_size': 49408,
}


def test_config_round_trip():
  cfg = clip.CLIPTextConfig(**{**TINY, 'hidden_act': 'gelu', 'eos_token_id': EOS})
  assert clip.CLIPTextConfig.from_dict(cfg.to_dict()) == cfg
  assert clip.CLIPTextConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
  tcfg = transformers.CLIPTextConfig(**cfg.to_dict('CLIPTextModelWithProjection'))
  assert tcfg.architectures == ['CLIPTextModelWithProjection']
  pairs = ((transformers.CLIPTextModel, clip.CLIPTextModel),
           (transformers.CLIPTextModelWithProjection, clip.CLIPTextModelWithProjection))
  for cls, model_cls in pairs:
    keys = {k if k.startswith(('text_model.', 'text_projection.')) else PREFIX + k: tuple(v.shape)
            for k, v in cls(tcfg).state_dict().items()}
    zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), clip.abstract_params(model_cls(cfg)))
    ours = convert.flax_to_torch(zeros)
    assert keys == {k: v.shape for k, v in ours.items()}


def test_config_reads_transformers_dicts_without_unknown_keys():
  with mock.patch.object(config_utils.logging, 'warning') as warn:
    v5 = clip.CLIPTextConfig.from_dict(transformers.CLIPTextConfig().to_dict())
    sd15 = clip.CLIPTextConfig.from_dict(SD15_TEXT_CONFIG, source='sd15 config.json')
  warn.assert_not_called()
  assert v5 == clip.CLIPTextConfig()
  assert sd15 == dataclasses.replace(clip.CLIPTextConfig(), hidden_size=768, intermediate_size=3072,
                                     projection_dim=768, num_attention_heads=12, bos_token_id=0,
                                     eos_token_id=2)
  assert clip.dummy_inputs(sd15, batch=2)[0].shape == (2, 77)


@pytest.mark.parametrize('update,match', [
    ({'hidden_size': 'abc'}, 'hidden_size'),
    ({'hidden_act': 'gelu_fast'}, 'gelu_fast'),
    ({'num_attention_heads': 5}, 'num_attention_heads'),
    ({'model_type': 'clip'}, 'model_type'),
    ({'text_config': {}}, 'text_config'),
    ({'pruned_heads': {'0': [1]}}, 'pruned_heads'),
])
def test_config_errors(update, match):
  with pytest.raises(config_utils.ConfigError, match=match):
    clip.CLIPTextConfig.from_dict({**SD15_TEXT_CONFIG, **update}, source='bad config.json')


# --- input validation ----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny_model():
  model = clip.CLIPTextModelWithProjection(clip.CLIPTextConfig(**TINY, eos_token_id=EOS))
  # One compile of init is cheaper than running it op by op at new shapes.
  return model, jax.jit(lambda key: clip.init_params(model, key))(jax.random.key(0))


@pytest.mark.parametrize('ids,match', [
    (np.zeros((2, 8), np.float32), 'input_ids must hold integer'),
    (np.zeros((8,), np.int32), r'input_ids must have shape.*\(8,\)'),
    (np.zeros((2, 1, 8), np.int32), r'input_ids must have shape.*\(2, 1, 8\)'),
    (np.zeros((2, 17), np.int32), r'input_ids.*max_position_embeddings=16.*\(2, 17\)'),
    (np.zeros((2, 0), np.int32), 'input_ids must have shape'),
])
@pytest.mark.parametrize('jit', [False, True])
def test_bad_input_ids(tiny_model, ids, match, jit):
  model, params = tiny_model
  fn = lambda p, i: model.apply({'params': p}, i)
  with pytest.raises(ValueError, match=match):
    (jax.jit(fn) if jit else fn)(params, jnp.asarray(ids))


def test_bad_attention_mask(tiny_model):
  model, params = tiny_model
  with pytest.raises(ValueError, match='attention_mask'):
    model.apply({'params': params}, jnp.zeros((2, 8), jnp.int32), attention_mask=jnp.ones((2, 7)))
