"""Flax ports of the Stable Diffusion models (UNet, VAE, CLIP text encoder) and their loading.

    from diffgeo_jax import models
    unet, p = models.load_unet(dir)
    pipe = models.load_pipeline(dir)   # or a single-file checkpoint, or a hub id

The bottom layer: it imports `paths` (folders, local or gs://) and nothing else of the library.
"""

from diffgeo_jax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from diffgeo_jax.models.config_utils import ConfigError
from diffgeo_jax.models.convert import CheckpointMismatchError
from diffgeo_jax.models.hub import HubModelNotFoundError
from diffgeo_jax.models.loading import (Pipeline, load_model, load_pipeline, load_text_encoder,
                                        load_tokenizer, load_unet, load_vae, save_model,
                                        save_pipeline)
from diffgeo_jax.models.single_file import UnknownCheckpointError, UnreadableCheckpointError
from diffgeo_jax.models.unet import UNet2DConditionConfig, UNet2DConditionModel
from diffgeo_jax.models.vae import AutoencoderKL, AutoencoderKLConfig, DiagonalGaussian
