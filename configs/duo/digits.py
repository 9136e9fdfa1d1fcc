r"""DUO on the digits model: unlearn "digit eight" (the digits classifier is the detector).

    python launch/train_duo.py --config=configs/duo/digits.py --workdir=/tmp/duo_digits
    python launch/train_duo.py --config=configs/duo/digits.py:seven ...   # another digit

The official SD-1.4 nudity script's settings scaled to the digits world: LoRA rank 32 on the
self-attention projections, lr = 3e-4 * 100 / beta and lambda = 1e6 * beta / 100, independent
timesteps in [0, 750), AdamW (wd 1e-2), constant lr, grad-clip 1, no EMA, 64 pairs, batch 4,
1000 steps. Three choices differ from the official script, each measured (README, DUO):
  * beta = 50 (the official sweep list goes from 2000 down to 100; the script uses 500);
  * `duo.condition = 'prompt'`: every branch under the pair's unsafe prompt (the code's unused
    --given_prompt option) instead of the empty prompt. Under the empty prompt the plain-prompt
    defence stalled near 0.75 at any beta that kept the other digits;
  * `duo.retain_weight = 1e3`: the retain term on the base model's own samples of the other
    digits (beyond the paper); without it the prompted run lost 13% of other-digit accuracy.
`configs/duo/digits.py` with `--config.duo.beta=500 --config.duo.condition=empty
--config.duo.retain_weight=0` is the official recipe. The pairs:
unsafe = samples of "a <colour> digit eight" the classifier reads as 8; safe = their SDEdit with
"a <colour> digit <other>" (the nine other digits in turn; with a generic "a <colour> digit" the
SDEdit of an eight is a three two times in three, and DUO then learns "prefer three") and the
unsafe prompt as the negative, strength 0.75, read as anything but 8.
Arguments (comma-separated): a digit word (the concept; default eight), `tiny` (the test setting,
under a minute).
"""

import ml_collections

from diffgeo_jax.digits import dataset
from diffgeo_jax import config_files

common = config_files.load('../common.py', __file__)


def prompts_for(concept: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(unsafe prompts, safe prompts): one colour per unsafe prompt; 5 colours x 9 other digits
  for the safe side, aligned so that pair i keeps its colour (45 is a multiple of 5)."""
  colours = dataset.COLOURS
  others = [w for w in dataset.DIGIT_WORDS if w != concept]
  unsafe = tuple(f'a {c} digit {concept}' for c in colours)
  safe = tuple(f'a {colours[i % len(colours)]} digit {others[i % len(others)]}'
               for i in range(len(colours) * len(others)))
  return unsafe, safe


def get_config(arg=None):
  args = [a for a in (arg or '').split(',') if a]
  unknown = [a for a in args if a != 'tiny' and a not in dataset.DIGIT_WORDS]
  if unknown:
    raise ValueError(f'unknown config arguments {unknown}; supported: tiny and a digit word')
  concept = next((a for a in args if a in dataset.DIGIT_WORDS), 'eight')
  unsafe, safe = prompts_for(concept)
  config = ml_collections.ConfigDict()
  config.pipeline_dir = ''  # '' = the shipped digits pipeline
  config.detector = 'digits'
  config.classifier_dir = ''  # '' = the shipped digits classifier (the detector)
  config.data = ml_collections.ConfigDict(dict(
      concept=concept, prompts=unsafe, safe_prompts=safe, num_pairs=64, safe_strength=0.75,
      num_steps=30, guidance_scale=1.5, max_attempts=20, seed=42, image_size=0,
      generation_batch=0, retain_prompts=safe, num_retain=90))
  config.lora = common.lora(32, common.SELF_ATTENTION)
  config.duo = ml_collections.ConfigDict(dict(
      beta=50.0, base_learning_rate=3e-4, base_prior_weight=1e6, t_min=1, t_max=750,
      condition='prompt', retain_weight=1e3))
  config.duo.adversarial = common.duo_adversarial()  # off; rounds with the embedding attack
  config.mesh = ml_collections.ConfigDict(dict(model=1))  # > 1: FSDP over the 'model' axis

  config.model = common.model()  # dtype, remat, attention
  # learning_rate is set from duo.* (lr = base_lr * 100 / beta)
  config.train = common.lora_train(num_steps=1000, learning_rate=0.0, log_every=50,
                                   checkpoint_every=250)
  # concept_samples=0 skips the digits evaluation (e.g. when evaluate_unlearning.py follows).
  config.eval = ml_collections.ConfigDict(dict(
      concept_samples=50, samples_per_digit=10, num_steps=30, guidance_scale=1.5, seed=0))
  if 'tiny' in args:
    config.data.num_pairs = 4
    config.data.num_steps = 10  # enough for the detector to read an eight
    config.data.max_attempts = 50
    config.lora.rank = 2
    config.lora.alpha = 2.0
    config.data.num_retain = 4
    config.train.num_steps = 4
    config.train.batch_size = 2
    config.train.log_every = 2
    config.train.checkpoint_every = 2
    config.eval.concept_samples = 4
    config.eval.samples_per_digit = 1
    config.eval.num_steps = 10
  return config
