r"""DreamBooth-style LoRA customization of Stable Diffusion 1.5 with DECOR, diffusers'
`examples/dreambooth/train_dreambooth_lora.py` defaults, for a TPU pod or a GPU.

    python launch/train_lora.py --config=configs/decor/sd15.py \
      --config.pipeline_dir=/ckpt/stable-diffusion-v1-5 --config.data.images=/data/style_refs \
      --config.data.instance_prompt='a cat in sks style' --workdir=/data/decor_sd15

`pipeline_dir`: a local diffusers folder (nothing is downloaded); `data.images`: a folder of
512x512 PNG/JPEG references (or a .npz), not resized or cropped here (the diffusers script random-
crops; crop them beforehand). Settings: LoRA rank 4 (alpha 4) on the UNet attention projections
(to_q, to_k, to_v, to_out.0 of attn1 and attn2, diffusers' default targets), AdamW lr 5e-4
(0.9, 0.999, wd 1e-2), constant lr, batch 4, grad-clip 1, 500 steps, no EMA. The script's
`lr_warmup_steps=500` would make a 500-step run all warm-up; there is none here. Prior preservation is off (`prior.weight=1` with
`prior.class_prompts=('a photo of a cat',)` and `prior.num_images=100` turns it on, the script's
`--with_prior_preservation`). DECOR: `decor.undesired` is the reference's content (e.g.
'a cat') for `launch/evaluate_customization.py`-style sampling, or at fine-tuning with
`decor.train_strength`.
"""

import ml_collections

from diffgeo_jax import config_files

common = config_files.load('../common.py', __file__)


def get_config(arg=None):
  if arg:
    raise ValueError(f'unknown config argument {arg!r}; this config takes none')
  config = ml_collections.ConfigDict()
  config.pipeline_dir = ml_collections.config_dict.placeholder(str)  # required
  config.classifier_dir = ''
  config.data = ml_collections.ConfigDict(dict(
      images=ml_collections.config_dict.placeholder(str),  # required: the references
      reference_digit='', num_references=0, colour_name='', colour_rgb=(0.0, 0.0, 0.0),
      instance_prompt='a photo of sks dog', seed=0))
  config.prior = ml_collections.ConfigDict(dict(
      weight=0.0, class_prompts=('a photo of dog',), num_images=100, num_steps=50,
      guidance_scale=7.5, generation_batch=4, seed=1))
  config.lora = common.lora(4, common.ATTENTION)
  config.decor = ml_collections.ConfigDict(dict(undesired='a dog', rank=0, train_strength=0.0))

  config.model = common.model()  # dtype, remat, attention
  config.train = common.lora_train(num_steps=500, learning_rate=5e-4, log_every=50,
                                   checkpoint_every=250)
  return config
