r"""Evaluate a released unlearning LoRA (not a `launch/train_duo.py` workdir) with
`launch/evaluate_unlearning.py`: defence, the embedding attack and preservation, against the base
pipeline it was made for.

    python launch/evaluate_unlearning.py --config=configs/duo/evaluate_release.py \
      --config.runs=/data/duo/Eight/pytorch_lora_weights.safetensors \
      [--config.pipeline_dir=owner/name | /ckpt/pipeline | model.safetensors] \
      --workdir=/tmp/release_eval

`runs`: the LoRA file(s), comma-separated: a `.safetensors` file, or a folder holding
`pytorch_lora_weights.safetensors` (diffusers) or `adapter_model.safetensors` +
`adapter_config.json` (peft). Every layout `training.lora.load` reads is accepted: the DUO
authors' output (`naver-ai/DUO` `train/unlearn-sd.py` saves `pytorch_lora_weights.safetensors`
with `StableDiffusionPipeline.save_lora_weights`, keys `unet.<module>.lora.down.weight` /
`.lora.up.weight`, no alpha: scaling 1), peft, and kohya-ss. A release carries no DUO settings
(beta, variant: '-' in the table) and no training pairs: the attack learns from the base model's
concept samples.
`pipeline_dir`: the base pipeline, a diffusers folder, a hub id resolved through the local hub
cache (`models.hub`; downloaded where HF_HUB_OFFLINE is unset) or a single-file checkpoint; empty:
the shipped digits pipeline.

The detector, prompts and preservation metrics are the digits world's (`configs/duo/evaluate.py`):
the binary refuses a pipeline whose images the digits classifier cannot read. The DUO authors
publish training code, not weights; their SD 1.4 nudity / violence LoRAs load and merge here
(`lora.load(file, pipe.unet_params)`), but measuring them needs a nudity detector (NudeNet) that
has no JAX port in this project. `get_config('quick')` is the test setting.
"""

from diffgeo_jax import config_files

evaluate = config_files.load('evaluate.py', __file__)


def get_config(arg=None):
  config = evaluate.get_config(arg)  # 'quick' or nothing; the same eval / attack settings
  config.runs = ''  # the LoRA file(s), comma-separated
  config.pipeline_dir = ''  # folder, hub id or single file; '' = the shipped digits pipeline
  return config
