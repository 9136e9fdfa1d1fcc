"""The digits training job: its exported pipeline loads in our loader and in diffusers /
transformers PyTorch with the same outputs; its loss is the DDPM epsilon MSE."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import torch

from configs.digits import t2i
from diffgeo_jax import digits, models
from diffgeo_jax.digits import dataset, tokenizer
from launch import train_t2i


def test_exported_pipeline_loads_in_pytorch_with_same_outputs(tiny_digits_pipeline_dir):
  from diffusers import UNet2DConditionModel
  from transformers import CLIPTextModel
  pipe = models.load_pipeline(tiny_digits_pipeline_dir)
  assert pipe.class_name == digits.PIPELINE_CLASS and pipe.vae is None
  assert pipe.scheduler_config['beta_schedule'] == 'linear'
  ids = pipe.tokenizer([dataset.caption(3, 0), ''], padding='max_length',
                       max_length=tokenizer.MAX_LENGTH, return_tensors='np').input_ids
  ours_text = pipe.text_encoder.apply({'params': pipe.text_encoder_params}, jnp.asarray(ids))
  torch_text = CLIPTextModel.from_pretrained(tiny_digits_pipeline_dir / 'text_encoder').eval()
  with torch.no_grad():
    ref_text = torch_text(torch.from_numpy(ids).long()).last_hidden_state.numpy()
  np.testing.assert_allclose(ours_text.last_hidden_state, ref_text, atol=1e-5)

  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  t = jnp.array([10, 900])
  eps = pipe.unet.apply({'params': pipe.unet_params}, x, t, ours_text.last_hidden_state)
  torch_unet = UNet2DConditionModel.from_pretrained(tiny_digits_pipeline_dir / 'unet').eval()
  with torch.no_grad():
    ref = torch_unet(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2), torch.tensor([10, 900]),
                     torch.from_numpy(ref_text)).sample.permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(eps, ref, atol=1e-4)


def test_loss_is_the_epsilon_mse_and_batches_are_deterministic(tmp_path):
  job = train_t2i.Job(t2i.get_config('tiny'))
  params = job.init_fn(jax.random.key(0))
  batch = job.batch_fn(5)
  chex.assert_trees_all_equal(batch, job.batch_fn(5))
  assert not np.array_equal(batch['images'], job.batch_fn(6)['images'])
  key = jax.random.key(3)
  loss, _ = job.loss_fn(params, jax.tree.map(jnp.asarray, batch), key)
  # The same computation written out: t and noise from the same key split.
  k_t, k_noise = jax.random.split(key)
  x0 = jnp.asarray(batch['images'])
  t = jax.random.randint(k_t, (x0.shape[0],), 0, 1000)
  noise = jax.random.normal(k_noise, x0.shape)
  ab = job.schedule.alphas_cumprod[t][:, None, None, None]
  x_t = jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * noise
  ctx = job.text.apply({'params': params['text_encoder']},
                       jnp.asarray(batch['input_ids'])).last_hidden_state
  eps = job.unet.apply({'params': params['unet']}, x_t, t, ctx)
  np.testing.assert_allclose(loss, jnp.mean((eps - noise) ** 2), rtol=1e-5)
  # Token ids are the tokenizer's.
  caption = dataset.caption(7, 2)
  np.testing.assert_array_equal(job.ids[caption], job.tokenizer(
      caption, padding='max_length', max_length=tokenizer.MAX_LENGTH).input_ids)
