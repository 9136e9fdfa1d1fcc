"""The `model` block of the training configs: activation dtype and rematerialisation.

    config.model = precision.default_model_config()        # dtype='float32', remat=False
    unet = precision.configure_unet(pipe.unet, config.model)
    frozen = precision.frozen_params(pipe.unet_params, config.model)

bf16 follows diffusers' mixed-precision training scripts: activations in bfloat16, the trained
parameters (and the optimizer state) in float32, the frozen weights (a LoRA's base UNet) stored in
bfloat16, which halves the largest array a LoRA step holds. `remat` recomputes each resnet and
transformer block's activations in the backward pass (`nn.remat`) instead of keeping them all.
`attention='flash'` uses the Pallas flash-attention kernel on TPU (models.attention).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffgeo_jax.models import attention
from diffgeo_jax.training import defaults

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


default_model_config = defaults.model_config


def _block(c) -> ml_collections.ConfigDict:
  return default_model_config() if c is None else c


def compute_dtype(c) -> Any:
  """The activation dtype named by `model.dtype`."""
  c = _block(c)
  if c.dtype not in DTYPES:
    raise ValueError(f'model.dtype must be one of {sorted(DTYPES)}, got {c.dtype!r}')
  return DTYPES[c.dtype]


def configure_unet(unet, c):
  """`unet` (a `models.UNet2DConditionModel`) with `model.dtype` activations, `model.remat` and
  `model.attention` (absent: the module's own)."""
  c = _block(c)
  if not isinstance(c.remat, bool):
    raise ValueError(f'model.remat must be true or false, got {c.remat!r}')
  impl = c.get('attention', unet.attention_impl)
  attention.check_attention_impl(impl)
  return unet.clone(dtype=compute_dtype(c), remat=c.remat, attention_impl=impl)


def frozen_params(params: Any, c) -> Any:
  """Frozen weights in the compute dtype when it is narrower than float32 (floating leaves only;
  arrays or `jax.ShapeDtypeStruct`s)."""
  dtype = compute_dtype(c)
  if dtype == jnp.float32:
    return params

  def one(x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(x.shape, dtype, sharding=getattr(x, 'sharding', None))
    return jnp.asarray(x, dtype) if isinstance(x, jax.Array) else np.asarray(x).astype(dtype)
  return jax.tree.map(one, params)
