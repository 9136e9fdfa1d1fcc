r"""Train the embedded digits text-to-image model (text encoder and UNet jointly, from scratch).

    python launch/train_t2i.py --config=configs/digits/t2i.py --workdir=/tmp/digits_t2i

`get_config('tiny')` is the test setting (a few seconds); `get_config('short')` a quick look.
The shipped model (`diffgeo_jax/digits/pipeline/`) is this config's output, exported with
`--config.export_dir`.
"""

import ml_collections

from diffgeo_jax.digits import tokenizer
from diffgeo_jax import config_files

common = config_files.load('../common.py', __file__)


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.export_dir = ''  # if set, the trained pipeline folder is written here

  # A miniature Stable Diffusion UNet: 16x16 pixels, 3 resolutions (16, 8, 4), cross-attention at
  # 8x8 and 4x4; the 4x4x64 mid-block output is the h-space the geometry work analyses.
  config.unet = ml_collections.ConfigDict(dict(
      sample_size=16, in_channels=3, out_channels=3,
      down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'),
      up_block_types=('CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'),
      block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8,
      cross_attention_dim=64, attention_head_dim=8))
  vocab = tokenizer.vocab_size()
  config.text_encoder = ml_collections.ConfigDict(dict(
      vocab_size=vocab, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=tokenizer.MAX_LENGTH, hidden_act='quick_gelu',
      bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1))
  # The standard DDPM schedule (Ho et al. 2020), epsilon prediction.
  config.scheduler = ml_collections.ConfigDict(dict(
      num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule='linear',
      prediction_type='epsilon', timestep_spacing='leading', steps_offset=1,
      set_alpha_to_one=False, clip_sample=False))
  config.data = ml_collections.ConfigDict(dict(split_seed=0, empty_caption_prob=0.1))

  config.model = common.model()  # dtype, remat, attention
  config.train = common.train(num_steps=6000, batch_size=64, learning_rate=1e-3, warmup_steps=200,
                              ema_decay=0.999, log_every=100, checkpoint_every=500)
  if arg == 'tiny':  # tests: a tiny model and a few steps
    config.unet.block_out_channels = (8, 8, 8)
    config.unet.norm_num_groups = 4
    config.unet.cross_attention_dim = 16
    config.unet.attention_head_dim = 4
    config.text_encoder.hidden_size = 16
    config.text_encoder.intermediate_size = 32
    config.text_encoder.num_hidden_layers = 1
    config.text_encoder.num_attention_heads = 2
    config.train.num_steps = 20
    config.train.batch_size = 8
    config.train.warmup_steps = 2
    config.train.log_every = 5
    config.train.checkpoint_every = 5
  elif arg == 'short':
    config.train.num_steps = 500
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; supported: tiny, short')
  return config
