r"""DUO on the digits model: unlearn "digit eight" (the digits classifier is the detector).

    python launch/train_duo.py --config=configs/duo/digits.py --workdir=/tmp/duo_digits

The official SD-1.4 nudity script's settings scaled to the digits world: LoRA rank 32 on the
self-attention projections, beta 500 with lr = 3e-4 * 100 / beta and lambda = 1e6 * beta / 100,
independent timesteps in [0, 750), AdamW (wd 1e-2), constant lr, grad-clip 1, no EMA. The pairs:
unsafe = samples of "a <colour> digit eight" the classifier reads as 8; safe = their SDEdit with
"a <colour> digit" and the unsafe prompt as the negative, strength 0.75, read as anything but 8.
`get_config('tiny')` is the test setting (under a minute).
"""

import ml_collections

from diffgeo_jax.training import trainer


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.pipeline_dir = ''  # '' = the shipped digits pipeline
  config.classifier_dir = ''  # '' = the shipped digits classifier (the detector)
  config.data = ml_collections.ConfigDict(dict(
      concept='eight', num_pairs=64, safe_prompt='a {colour} digit {other}', safe_strength=0.75,
      num_steps=30, guidance_scale=1.5, max_attempts=20, seed=42))
  config.lora = ml_collections.ConfigDict(dict(rank=32, alpha=32.0,
                                               targets=r'attn1/to_(q|k|v|out_0)$'))
  config.duo = ml_collections.ConfigDict(dict(
      beta=500.0, base_learning_rate=3e-4, base_prior_weight=1e6, t_min=1, t_max=750,
      condition='empty'))
  config.mesh = ml_collections.ConfigDict(dict(model=1))  # > 1: FSDP over the 'model' axis

  config.train = trainer.default_train_config()
  config.train.num_steps = 1000
  config.train.batch_size = 4
  config.train.learning_rate = 0.0  # set from duo.* (lr = base_lr * 100 / beta)
  config.train.schedule = 'constant'
  config.train.warmup_steps = 0
  config.train.weight_decay = 1e-2
  config.train.ema_decay = 0.0
  config.train.log_every = 50
  config.train.checkpoint_every = 250
  config.eval = ml_collections.ConfigDict(dict(
      concept_samples=50, samples_per_digit=10, num_steps=30, guidance_scale=1.5, seed=0))
  if arg == 'tiny':
    config.data.num_pairs = 4
    config.data.num_steps = 10  # enough for the detector to read an eight
    config.data.max_attempts = 50
    config.lora.rank = 2
    config.lora.alpha = 2.0
    config.train.num_steps = 4
    config.train.batch_size = 2
    config.train.log_every = 2
    config.train.checkpoint_every = 2
    config.eval.concept_samples = 4
    config.eval.samples_per_digit = 1
    config.eval.num_steps = 10
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; supported: tiny')
  return config
