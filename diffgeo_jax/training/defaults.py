"""The default `train` and `model` blocks of the training configs, with ml_collections only: a
config file reads them without importing optax, orbax or the trainer."""

import ml_collections


def train_config() -> ml_collections.ConfigDict:
  """The `train` section every training config carries (override fields as needed)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_steps = 1000
  c.batch_size = 64  # global batch
  c.learning_rate = 1e-3
  c.end_learning_rate = 1e-5
  c.warmup_steps = 100
  c.schedule = 'cosine'  # cosine (after warmup) or constant
  c.weight_decay = 0.0
  c.b1 = 0.9
  c.b2 = 0.999
  c.grad_clip = 1.0  # global-norm clipping; 0 disables
  c.ema_decay = 0.999  # 0 disables the EMA (ema_params then track params)
  c.log_every = 50
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  c.async_checkpoints = True
  return c


def model_config() -> ml_collections.ConfigDict:
  """The UNet's activation dtype ('float32' | 'bfloat16': bf16 activations and frozen weights,
  float32 trained weights), rematerialisation of its blocks (less memory, ~1 more forward) and
  attention ('softmax' everywhere, or 'flash': the Pallas kernel on TPU for SD's self-attention,
  softmax elsewhere; see models.attention)."""
  return ml_collections.ConfigDict(dict(dtype='float32', remat=False, attention='softmax'))
