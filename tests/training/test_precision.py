"""The training configs' `model` block (training/precision.py) and the objectives built with it:
bf16 activations and frozen weights, float32 trained weights, remat, flash attention."""

import math

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from diffgeo_jax.aot import shapes
from diffgeo_jax.diffusion import schedules
from diffgeo_jax.models import unet as unet_lib
from diffgeo_jax.training import precision, trainer
from diffgeo_jax.unlearning import duo
from tests import report


def _model(dtype='float32', remat=False, attention='softmax'):
  return ml_collections.ConfigDict(dict(dtype=dtype, remat=remat, attention=attention))


def test_configure_unet_and_frozen_params():
  m = shapes.abstract_model('tiny')
  u = precision.configure_unet(m.unet, _model('bfloat16', True, 'flash'))
  assert (u.dtype, u.remat, u.attention_impl) == (jnp.bfloat16, True, 'flash')
  assert precision.configure_unet(m.unet, None).dtype == jnp.float32  # no block: float32
  frozen = precision.frozen_params({'w': m.unet_params, 'step': jnp.zeros((), jnp.int32)},
                                   _model('bfloat16'))
  assert {x.dtype for x in jax.tree.leaves(frozen['w'])} == {jnp.dtype(jnp.bfloat16)}
  assert frozen['step'].dtype == jnp.int32  # integers untouched
  assert precision.frozen_params(m.unet_params, _model()) is m.unet_params
  for bad, match in ((_model('float16'), 'model.dtype'), (_model(remat='yes'), 'model.remat'),
                     (_model(attention='fused'), 'attention_impl')):
    with pytest.raises(ValueError, match=match):
      precision.configure_unet(m.unet, bad)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_duo_step_in_each_precision_starts_at_ln2_and_trains_float32_factors(dtype):
  """B = 0: policy and reference are the same network, so the DUO loss is ln 2: exactly in float32;
  in bf16 the two passes (compiled apart) round apart by ~1e-8 and beta = 500 magnifies that to
  ~5e-6. The LoRA factors and Adam state stay float32 under a bf16 base."""
  m = shapes.abstract_model('tiny')
  unet = m.unet
  params = unet_lib.init_params(unet, jax.random.key(0))
  config = ml_collections.ConfigDict(dict(
      lora=dict(rank=2, alpha=2.0, targets=r'attn1/to_(q|k|v|out_0)$'),
      duo=dict(beta=500.0, base_learning_rate=3e-4, base_prior_weight=1e6, t_min=1, t_max=750,
               retain_weight=0.0),
      mesh=dict(model=1), model=_model(dtype, remat=dtype == 'bfloat16')))
  config.train = trainer.default_train_config()
  config.train.batch_size = 2
  config.train.ema_decay = 0.0
  obj = duo.Objective.from_config(config, precision.configure_unet(unet, config.model),
                                  schedules.linear(), params)
  frozen = precision.frozen_params(params, config.model)
  tr = trainer.Trainer(config, '/tmp/unused', obj.init_fn, obj.loss_fn, None, frozen=frozen)
  state = jax.jit(tr._init_state)(jax.random.key(1))
  rng = np.random.default_rng(0)
  batch = {'positive': rng.normal(size=(2, 16, 16, 3)).astype(np.float32),
           'negative': rng.normal(size=(2, 16, 16, 3)).astype(np.float32),
           'context': rng.normal(size=(2, *m.context.shape)).astype(np.float32)}
  step = tr.compiled_step()
  new, metrics = step(state, batch, jax.random.key(2), *tr.put_frozen())
  tol = 1e-6 if dtype == 'float32' else 1e-4
  report.record(f'DUO loss at B = 0 minus ln 2, {dtype}', float(metrics['loss_duo']) - math.log(2))
  assert float(metrics['loss_duo']) == pytest.approx(math.log(2), abs=tol)
  assert {x.dtype for x in jax.tree.leaves(new.params)} == {jnp.dtype(jnp.float32)}
  assert np.isfinite(float(metrics['loss'])) and float(metrics['grad_norm']) > 0
  chex.assert_trees_all_equal_shapes(new.params, state.params)
