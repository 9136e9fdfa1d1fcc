"""Blocks the config files share. A config reads this file by path (absl's config flags do not
import configs/ as a package):

    from diffgeo_jax import config_files
    common = config_files.load('../common.py', __file__)

It imports ml_collections and the library's light `training.defaults` only: reading a config does
not import optax, orbax or the trainer.
"""

import ml_collections

from diffgeo_jax.training import defaults

# LoRA targets (regexes over the UNet's parameter paths): self-attention, or self and cross.
SELF_ATTENTION = r'attn1/to_(q|k|v|out_0)$'
ATTENTION = r'(attn1|attn2)/to_(q|k|v|out_0)$'


def _updated(block: ml_collections.ConfigDict, name: str, overrides: dict):
  unknown = sorted(set(overrides) - set(block))
  if unknown:
    raise ValueError(f'{name} has no fields {unknown}; it has {sorted(block)}')
  block.update(overrides)
  return block


def train(**overrides) -> ml_collections.ConfigDict:
  """The trainer's `train` block (`training.defaults.train_config`) with these fields set."""
  return _updated(defaults.train_config(), 'train', overrides)


def lora_train(**overrides) -> ml_collections.ConfigDict:
  """A LoRA fine-tune's `train` block: AdamW at a constant rate (no warmup), weight decay 1e-2,
  no EMA (the LoRA is the result), batch 4."""
  return train(**{**dict(batch_size=4, schedule='constant', warmup_steps=0, weight_decay=1e-2,
                         ema_decay=0.0), **overrides})


def tiny_train(block: ml_collections.ConfigDict, **overrides) -> ml_collections.ConfigDict:
  """The tests' setting of a small model's `train` block: a few steps, small batches."""
  return _updated(block, 'train', {**dict(num_steps=20, batch_size=16, warmup_steps=2,
                                          ema_decay=0.9, log_every=5, checkpoint_every=10),
                                   **overrides})


def model() -> ml_collections.ConfigDict:
  """The UNet's `model` block: dtype, remat and attention (`training.defaults.model_config`)."""
  return defaults.model_config()


def lora(rank: int, targets: str) -> ml_collections.ConfigDict:
  """LoRA of `rank` with alpha = rank (scale 1) on the parameters `targets` matches."""
  return ml_collections.ConfigDict(dict(rank=rank, alpha=float(rank), targets=targets))


def duo_adversarial() -> ml_collections.ConfigDict:
  """DUO's rounds of `every` steps with the embedding attack in between (0 = off, the official
  code)."""
  return ml_collections.ConfigDict(dict(every=0, steps=100, learning_rate=5e-3, batch_size=4))


def discrete_transformer() -> ml_collections.ConfigDict:
  """The discrete-diffusion denoiser (a small transformer) of the shipped Countdown and digits
  models."""
  return ml_collections.ConfigDict(dict(hidden=64, heads=4, layers=4, mlp_ratio=4, cond_dim=64))


def tiny_discrete_transformer(block: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  block.update(hidden=16, heads=2, layers=1, mlp_ratio=2, cond_dim=8)
  return block


def absorbing_process() -> ml_collections.ConfigDict:
  """Absorbing diffusion with SEDD's log-linear schedule (mask probability (1 - eps) t); the
  ELBO's t is drawn in [t_min, 1]."""
  return ml_collections.ConfigDict(dict(eps=1e-3, t_min=1e-3))


def jys_search(task: str, num_eval_samples: int, arg=None) -> ml_collections.ConfigDict:
  """Jump Your Steps on a shipped discrete model (launch/jys_search.py); `arg='quick'` is the test
  setting."""
  config = ml_collections.ConfigDict()
  config.task = task
  config.model_dir = ''  # '' = the shipped model
  config.process_eps = 1e-3  # the log-linear schedule's eps the model was trained with
  config.nfes = (2, 4, 8, 16, 32)
  config.samplers = ('euler', 'tweedie', 'gillespie')
  config.num_samples = 256  # KLUB Monte Carlo batch (common random numbers)
  config.grid_size = 129  # the parallel search's time grid
  config.compensator = False  # the official estimator: no Girsanov compensator
  config.num_eval_samples = num_eval_samples  # sequences sampled per (sampler, schedule, NFE)
  config.seed = 0
  if arg == 'quick':
    config.nfes = (2, 4)
    config.samplers = ('euler', 'gillespie')
    config.num_samples = 32
    config.grid_size = 17
    config.num_eval_samples = 64
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; supported: quick')
  return config


def attribution(batch: int) -> ml_collections.ConfigDict:
  """GOAR's attribution methods' settings: integrated-gradients steps, SmoothGrad samples and
  noise, examples per batch."""
  return ml_collections.ConfigDict(dict(ig_steps=32, smoothgrad_samples=32, smoothgrad_noise=0.15,
                                        batch=batch, seed=0))


def roar() -> ml_collections.ConfigDict:
  """The removal fractions of (G)ROAR's curves."""
  return ml_collections.ConfigDict(dict(fractions=(0.1, 0.3, 0.5, 0.7, 0.9)))


def tiny_attribution(block: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  block.update(ig_steps=4, smoothgrad_samples=4)
  return block
