r"""DECOR on the digits model: a LoRA learns a new colour (orange) from four images of one digit
(three), then other digits are asked for in that colour.

    python launch/train_lora.py --config=configs/decor/digits.py --workdir=/tmp/decor_digits
    python launch/evaluate_customization.py --config=configs/decor/digits.py \
      --workdir=/tmp/decor_digits

Training (`data`, `prior`, `lora`, `train`, `decor.train_strength`): DreamBooth-style LoRA on
"a sks digit" (identifier + class word, as DreamBooth's "a sks dog"; "sks" is a word of the
tokenizer the model never saw in training), rank 8 on the self- and cross-attention projections,
AdamW lr 1e-3, batch 4 (the references drawn with replacement), 1500 steps. The identifier takes in
everything the four references share, the colour and the digit: the content leakage DECOR targets.
(With "a sks digit three" the digit word carries the content and the LoRA hardly leaked: 0.6% of
samples, nothing to remove.) No prior preservation (`prior.weight` > 0 turns it on with the base model's samples of
every palette colour and digit).
Evaluation (`eval`, `decor`): "a sks digit <d>" for the nine other digits from fixed noise, under
plain LoRA, LoRA at reduced scales and DECOR at strengths 0-1 projecting out the reference's
content text "a digit three" (its top `decor.rank` = 2 components; the rank is ablated).
Arguments: `tiny` (the test setting: a few steps and samples).
"""

import ml_collections

from diffgeo_jax.digits import dataset
from diffgeo_jax import config_files

common = config_files.load('../common.py', __file__)


def get_config(arg=None):
  args = [a for a in (arg or '').split(',') if a]
  if [a for a in args if a != 'tiny']:
    raise ValueError(f'unknown config arguments {args}; supported: tiny')
  config = ml_collections.ConfigDict()
  config.pipeline_dir = ''  # '' = the shipped digits pipeline
  config.classifier_dir = ''  # '' = the shipped digits classifier (evaluation)
  config.data = ml_collections.ConfigDict(dict(
      images='',  # '' = the digits references below; else a .npz or a folder of images
      reference_digit='three', num_references=4, colour_name='orange',
      colour_rgb=(1.0, 0.5, 0.0), instance_prompt='a sks digit', seed=0))
  config.prior = ml_collections.ConfigDict(dict(
      weight=0.0, class_prompts=tuple(dataset.caption(d, c) for d in range(10)
                                      for c in dataset.COLOURS),
      num_images=100, num_steps=30, guidance_scale=1.5, generation_batch=0, seed=1))
  config.lora = common.lora(8, common.ATTENTION)
  # DECOR: `undesired` is projected out of the prompts at sampling time (evaluation) and, with
  # train_strength > 0, out of the instance prompt during fine-tuning.
  config.decor = ml_collections.ConfigDict(dict(undesired='a digit three', rank=2,
                                                train_strength=0.0))

  config.model = common.model()  # dtype, remat, attention
  config.train = common.lora_train(num_steps=1500, learning_rate=1e-3, log_every=100,
                                   checkpoint_every=500)

  config.eval = ml_collections.ConfigDict(dict(
      prompt_template='a sks digit {digit}', samples_per_digit=20, num_steps=30,
      guidance_scale=1.5, seed=0, strengths=(0.0, 0.25, 0.5, 0.75, 1.0),
      lora_scales=(0.25, 0.5, 0.75, 1.0), rank_ablation=(1, 4, 0),
      colour_match_tolerance=0.05))
  if 'tiny' in args:
    config.lora.rank = 2
    config.lora.alpha = 2.0
    config.train.num_steps = 4
    config.train.batch_size = 2
    config.train.log_every = 2
    config.train.checkpoint_every = 2
    config.prior.num_images = 2
    config.prior.num_steps = 5
    config.eval.samples_per_digit = 1
    config.eval.num_steps = 5
    config.eval.strengths = (0.0, 1.0)
    config.eval.lora_scales = (0.5, 1.0)
    config.eval.rank_ablation = (0,)
  return config
