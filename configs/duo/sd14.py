r"""DUO on Stable Diffusion 1.4, the official nudity script's settings (`naver-ai/DUO`,
`scripts/sd-nudity.sh` + `datasets/SD/generate_datasets.py`), for a TPU pod or a GPU.

    python launch/train_duo.py --config=configs/duo/sd14.py \
      --config.pipeline_dir=/ckpt/stable-diffusion-v1-4 --workdir=/data/duo_sd14 \
      [--jax_distributed]

`pipeline_dir`: a local diffusers folder of CompVis/stable-diffusion-v1-4 (nothing is downloaded).
Settings: 64 pairs of "a naked {white,black} woman, realistic photo" (32 each) and their SDEdit
with "a dressed ... woman, realistic photo", the unsafe prompt as the negative, strength 0.75,
CFG 7.5, 50 steps, 512 px; LoRA rank 32 / alpha 32 on attn1 q, k, v, out; beta 500 with
lr = 3e-4 * 100 / beta = 6e-5 and lambda = 1e6 * beta / 100 = 5e6; t in [0, 750); AdamW
(0.9, 0.999, wd 1e-2), constant lr, grad-clip 1, no EMA; batch 4 pairs; 1000 steps, checkpoints
every 250; every branch under the empty prompt.
Differences from the official code: no NudeNet gating (`detector='none'`: NudeNet has no JAX
port; gate the pairs beforehand and pass them as `workdir/pairs.npz`, keys unsafe, safe, prompts,
safe_prompts, images in [0, 1]); the default sampler is DDIM, not PNDM; fp32 rather than fp16
autocast; one VAE posterior sample per image instead of one per step.
`mesh.model`: the FSDP axis (1 = pure data parallelism, as the official 4-GPU DDP).
"""

import ml_collections

from diffgeo_jax import config_files

common = config_files.load('../common.py', __file__)


def get_config(arg=None):
  if arg:
    raise ValueError(f'unknown config argument {arg!r}; this config takes none')
  config = ml_collections.ConfigDict()
  config.pipeline_dir = ml_collections.config_dict.placeholder(str)  # required
  config.detector = 'none'
  config.classifier_dir = ''
  unsafe = tuple(f'a naked {r} woman, realistic photo' for r in ('white', 'black'))
  safe = tuple(f'a dressed {r} woman, realistic photo' for r in ('white', 'black'))
  config.data = ml_collections.ConfigDict(dict(
      concept='nudity', prompts=unsafe, safe_prompts=safe, num_pairs=64, safe_strength=0.75,
      num_steps=50, guidance_scale=7.5, max_attempts=1, seed=42, image_size=512,
      generation_batch=8, retain_prompts=('a photo of a man', 'a photo of a woman'),
      num_retain=0))  # retain_weight > 0 needs num_retain > 0
  config.lora = common.lora(32, common.SELF_ATTENTION)
  config.duo = ml_collections.ConfigDict(dict(
      beta=500.0, base_learning_rate=3e-4, base_prior_weight=1e6, t_min=1, t_max=750,
      condition='empty', retain_weight=0.0))
  config.duo.adversarial = common.duo_adversarial()  # off; rounds with the embedding attack
  config.mesh = ml_collections.ConfigDict(dict(model=1))

  config.model = common.model()  # dtype, remat, attention
  # learning_rate is set from duo.* (lr = base_lr * 100 / beta)
  config.train = common.lora_train(num_steps=1000, learning_rate=0.0, log_every=50,
                                   checkpoint_every=250)
  config.eval = ml_collections.ConfigDict()  # the digits evaluation does not apply
  return config
