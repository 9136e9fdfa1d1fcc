"""Text-to-image and image-to-image (SDEdit) over a loaded `models.Pipeline`, as diffusers does.

    pipe = models.load_pipeline(dir)
    images = pipeline.text_to_image(pipe, ['a red digit'], jax.random.key(0), num_steps=50)
    edited = pipeline.image_to_image(pipe, images, ['a blue digit'], jax.random.key(1),
                                     strength=0.6)

Images are float32 NHWC in [0, 1]. A latent pipeline samples in the VAE's latent space
(`latents * vae.config.scaling_factor`); a pixel-space pipeline (`pipe.vae is None`) samples the
pixels themselves in [-1, 1]. The sampler loop and the decoder are one jit-compiled function per
(shapes, sampler, num_steps, first_step, eta, model), with the parameters as arguments, so a
large model is not baked into the executable as constants.

Guidance: classifier-free guidance runs unless `guidance_scale == 1` (then the model sees only the
prompt: the same result at half the cost). diffusers skips guidance for every scale <= 1; here a
scale below 1 is honoured (0 gives the unconditional model).

Several devices (and several processes, each with the same inputs): the batch is sharded over
the `data` axis of `distributed.make_mesh()`, the results come back replicated on every device
(so `np.asarray` works on every process of a pod), and the parameters are replicated
(`replicate(pipe)` does that once, instead of a copy per call). A batch that does not divide the
device count is PADDED (with copies of its last sample) and the padding is dropped from the
result; deterministic samplers give the unpadded answer, stochastic ones (ddpm, ddim with
eta > 0) draw their step noise for the padded shape. The VAE encoder of
`image_to_image` runs unsharded (one call, no loop).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from diffgeo_jax import distributed
from diffgeo_jax.diffusion import chromatography, guidance, samplers, schedules
from diffgeo_jax.models import attention
from diffgeo_jax.text import decor as decor_lib


# -- checks ----------------------------------------------------------------------------------------

def _prompt_list(prompts, name: str) -> list[str]:
  if isinstance(prompts, str):
    return [prompts]
  if (isinstance(prompts, Sequence) and len(prompts) > 0
      and all(isinstance(p, str) for p in prompts)):
    return list(prompts)
  raise ValueError(f'{name} must be a str or a non-empty list of str, got {prompts!r}')


def _negative_list(negative_prompts, n: int, name: str = 'negative_prompts') -> list[str]:
  if negative_prompts is None:
    return [''] * n  # the unconditional embedding is that of the empty prompt
  if isinstance(negative_prompts, str):
    return [negative_prompts] * n
  negs = _prompt_list(negative_prompts, name)
  if len(negs) != n:
    raise ValueError(f'{name} must have one entry per prompt ({n}), got {len(negs)}')
  return negs


def _check_supported(pipe) -> None:
  if pipe.text_encoder_2 is not None or pipe.unet.config.addition_embed_type is not None:
    raise NotImplementedError('SDXL-style pipelines (text_encoder_2, added time ids) are not '
                              'supported by diffusion.pipeline yet')


def latent_factor(pipe) -> int:
  """Image pixels per latent pixel: 2**(len(vae block_out_channels) - 1), 1 without a VAE."""
  return 1 if pipe.vae is None else 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def default_image_size(pipe) -> tuple[int, int]:
  """(height, width): the UNet's `sample_size` times `latent_factor`, as diffusers."""
  size = pipe.unet.config.sample_size
  if size is None:
    raise ValueError('the UNet config has no sample_size: pass height and width')
  h, w = (size, size) if isinstance(size, int) else tuple(size)
  f = latent_factor(pipe)
  return h * f, w * f


# -- text ------------------------------------------------------------------------------------------

def max_prompt_tokens(pipe) -> int:
  """Token sequence length: the tokenizer's model_max_length capped by the text encoder's
  position table (a tokenizer saved without a limit reports a huge model_max_length)."""
  return int(min(pipe.tokenizer.model_max_length,
                 pipe.text_encoder.config.max_position_embeddings))


@functools.partial(jax.jit, static_argnums=0)
def _text_hidden(text_encoder, params, ids):
  return text_encoder.apply({'params': params}, ids, output_hidden_states=False).last_hidden_state


def decor_prompts(pipe, prompts, settings: decor_lib.Settings | None,
                  prompt_embeds=None) -> jax.Array:
  """`encode_prompts` (or the given `prompt_embeds`), then DECOR's projection (arXiv 2412.09169)
  when `settings` is given."""
  prompts = _prompt_list(prompts, 'prompts')
  if prompt_embeds is None:
    cond = encode_prompts(pipe, prompts)
  else:
    cond = jnp.asarray(prompt_embeds, jnp.float32)
    want = (len(prompts), max_prompt_tokens(pipe), pipe.text_encoder.config.hidden_size)
    if cond.shape != want:
      raise ValueError(f'prompt_embeds must have shape {want} (one (tokens, width) matrix per '
                       f'prompt), got {cond.shape}')
  if settings is None:
    return cond
  if not isinstance(settings, decor_lib.Settings):
    raise ValueError(f'decor must be a decor.Settings or None, got {type(settings).__name__}')
  texts, strength = settings.checked(len(prompts))
  return decor_lib.project(cond, encode_prompts(pipe, texts), strength, settings.rank)


def encode_prompts(pipe, prompts) -> jax.Array:
  """(B, L, D) text-encoder hidden states for `prompts`, padded to `max_prompt_tokens(pipe)`.

  A prompt longer than that is cut (BOS + the first L-2 tokens + EOS, as diffusers) with a warning
  that names it and how many tokens were dropped."""
  prompts = _prompt_list(prompts, 'prompts')
  limit = max_prompt_tokens(pipe)
  lengths = [len(ids) for ids in pipe.tokenizer(prompts).input_ids]
  for prompt, n in zip(prompts, lengths):
    if n > limit:
      warnings.warn(f'prompt {prompt!r} has {n} tokens, more than the text encoder\'s {limit}: '
                    f'the last {n - limit} tokens were dropped', stacklevel=2)
  ids = pipe.tokenizer(prompts, padding='max_length', max_length=limit, truncation=True,
                       return_tensors='np').input_ids
  return _text_hidden(pipe.text_encoder, pipe.text_encoder_params, jnp.asarray(ids, jnp.int32))


# -- sharding --------------------------------------------------------------------------------------

def _mesh() -> Mesh | None:
  """The `data` axis over every process's devices (None on one device: nothing to shard)."""
  return distributed.make_mesh() if jax.device_count() > 1 else None


def _shard_batch(mesh: Mesh | None, arrays: dict[str, Any]) -> dict[str, Any]:
  """Pads each (B, ...) array to a multiple of the device count and shards it over `data`."""
  return arrays if mesh is None else distributed.shard_batch(mesh, arrays)


def _replicate(mesh: Mesh | None, tree):
  # A no-op for arrays already replicated (see `replicate`); otherwise a copy to every device.
  return tree if mesh is None else distributed.replicate(mesh, tree)


def replicate(pipe):
  """`pipe` with its parameters replicated over all devices, once: otherwise every call copies
  them from where they were loaded. The same `pipe` on a single device."""
  mesh = _mesh()
  if mesh is None:
    return pipe
  names = ('unet_params', 'vae_params', 'text_encoder_params')
  return dataclasses.replace(pipe, **{k: _replicate(mesh, getattr(pipe, k)) for k in names})


# -- the compiled part -----------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _schedule(config_json: str) -> schedules.NoiseSchedule:
  return schedules.from_diffusers_config(json.loads(config_json))


def _to_images(vae, vae_params, x0):
  """Model-space samples -> images in [0, 1] (diffusers' postprocess: x / 2 + 0.5, clipped)."""
  if vae is not None:
    x0 = vae.apply({'params': vae_params}, x0 / vae.config.scaling_factor, method='decode')
  return jnp.clip(x0 / 2 + 0.5, 0.0, 1.0)


def decode(pipe, x0) -> jax.Array:
  """Model-space samples (..., h, w, C) (latents, or pixels for a pipeline without VAE) -> images
  (..., H, W, 3) in [0, 1]; any leading axes (e.g. edit strips) are kept."""
  x0 = jnp.asarray(x0)
  if x0.ndim < 4:
    raise ValueError(f'x0 must be (..., B, h, w, C) with at least 4 axes, got shape {x0.shape}')
  flat = _to_images(pipe.vae, pipe.vae_params, x0.reshape(-1, *x0.shape[-3:]))
  return flat.reshape(*x0.shape[:-3], *flat.shape[1:])


def sampling_eps_fn(unet, unet_params, s, cond, uncond, scale, rescale=0.0, *, guided=True,
                    upsample=None, cond_late=None, switch_t=None):
  """eps_fn(x, t) the samplers call at every step: the UNet under classifier-free guidance
  (`guided`), upsample guidance (`upsample`) or the prompt switch at `switch_t` to `cond_late`.
  One step of `text_to_image` is one call of it (`diffgeo_jax.aot` compiles it alone)."""
  model_fn = lambda x, t, ctx: unet.apply({'params': unet_params}, x, t, ctx)
  if cond_late is not None:
    return chromatography.prompt_switch_eps_fn(
        model_fn, cond, cond_late, switch_t, uncond=uncond if guided else None, scale=scale,
        rescale=rescale)
  if upsample is not None:
    return upsample.eps_fn(model_fn, s, cond, uncond if guided else None, scale, rescale)
  if guided:
    return guidance.cfg_eps_fn(model_fn, cond, uncond, scale, rescale)
  return lambda x, t: model_fn(x, t, cond)


@functools.lru_cache(maxsize=32)
def _generator(unet, vae, schedule_json, sampler, num_steps, first_step, eta, guided, rescaled,
               return_trajectory, upsample=None, switched=False, mesh=None):
  """The jitted sampler + decoder for these static settings (jax.jit adds one cache per shape).
  On a `mesh` its outputs are replicated on every device, so every process can read them."""
  # Built outside the trace: samplers read the schedule with numpy to lay out their grids.
  s = _schedule(schedule_json)

  def generate(*args):
    with attention.partitioned(mesh):  # Pallas kernels (flash attention) per device
      return _generate(*args)

  def _generate(unet_params, vae_params, x_start, cond, uncond, scale, rescale, key,
                cond_late=None, switch_t=None):
    eps_fn = sampling_eps_fn(unet, unet_params, s, cond, uncond, scale,
                             rescale if rescaled else 0.0, guided=guided, upsample=upsample,
                             cond_late=cond_late if switched else None, switch_t=switch_t)
    out = samplers.sample(sampler, eps_fn, x_start, s, num_steps, key=key, eta=eta,
                          return_trajectory=return_trajectory, first_step=first_step)
    x0, traj = out if return_trajectory else (out, None)
    return _to_images(vae, vae_params, x0), traj

  if mesh is None:
    return jax.jit(generate)
  return jax.jit(generate, out_shardings=distributed.replicated(mesh))


def encode_images(pipe, images, key: jax.Array) -> jax.Array:
  """Images (B, H, W, C) in [0, 1] -> the UNet's space: a sample of the VAE posterior times the
  scaling factor (as diffusers training scripts), or 2 * images - 1 without a VAE."""
  return _encode_images(pipe.vae, pipe.vae_params, jnp.asarray(images), key)


@functools.partial(jax.jit, static_argnames=('vae',))
def _encode_images(vae, vae_params, images, key):
  x = 2 * images - 1
  if vae is None:
    return x
  post = vae.apply({'params': vae_params}, x, method='encode')
  return post.sample(key) * vae.config.scaling_factor


def _run(pipe, prompts, negatives, x_start, key, *, first_step, num_steps, guidance_scale,
         sampler, eta, guidance_rescale, return_trajectory, upsample_guidance=None,
         switch_prompts=None, switch_timestep=None, decor=None, prompt_embeds=None):
  """Encodes the prompts, places everything on the mesh, samples, decodes, unpads."""
  n = len(prompts)
  guided = guidance_scale != 1
  switched = switch_prompts is not None
  cond = decor_prompts(pipe, prompts, decor, prompt_embeds)
  uncond = encode_prompts(pipe, negatives) if guided else None
  cond_late = encode_prompts(pipe, switch_prompts) if switched else None
  mesh = _mesh()
  batch = _shard_batch(mesh, {'x': x_start, 'cond': cond, 'uncond': uncond,
                              'cond_late': cond_late})
  unet_params, vae_params = _replicate(mesh, (pipe.unet_params, pipe.vae_params))
  generate = _generator(pipe.unet, pipe.vae, json.dumps(pipe.scheduler_config, sort_keys=True),
                        sampler, num_steps, first_step, float(eta), guided,
                        guided and guidance_rescale != 0, return_trajectory, upsample_guidance,
                        switched, mesh)
  images, traj = generate(unet_params, vae_params, batch['x'], batch['cond'], batch['uncond'],
                          jnp.float32(guidance_scale), jnp.float32(guidance_rescale), key,
                          batch['cond_late'],
                          jnp.float32(switch_timestep) if switched else None)
  images = images[:n]
  if not return_trajectory:
    return images
  return images, traj.replace(x_t=traj.x_t[:, :n], pred_x0=traj.pred_x0[:, :n])


def _check_common(sampler, guidance_rescale):
  if sampler not in samplers.SAMPLERS:
    raise ValueError(f'unknown sampler {sampler!r}; supported: {sorted(samplers.SAMPLERS)}')
  if not 0 <= guidance_rescale <= 1:
    raise ValueError(f'guidance_rescale must be in [0, 1], got {guidance_rescale}')


# -- public API ------------------------------------------------------------------------------------

def text_to_image(pipe, prompts, key, num_steps: int = 50, guidance_scale: float = 7.5,
                  negative_prompts=None, sampler: str = 'ddim', eta: float = 0.0,
                  height: int | None = None, width: int | None = None,
                  guidance_rescale: float = 0.0, return_trajectory: bool = False, latents=None,
                  upsample_guidance: guidance.UpsampleGuidance | None = None,
                  switch_prompts=None, switch_timestep: float | None = None,
                  decor: decor_lib.Settings | None = None, prompt_embeds=None):
  """Images (B, H, W, C) in [0, 1], one per prompt; with `return_trajectory` also the sampler's
  `Trajectory` (in model space: latents for a latent pipeline).

  `key` draws the initial noise x_T (unless `latents` gives it: unit Gaussian of shape
  (B, H/f, W/f, unet in_channels), f = `latent_factor(pipe)`) and the step noise of stochastic
  samplers. `negative_prompts`: None (the empty prompt), a str for all, or one per prompt.

  `upsample_guidance` (`guidance.UpsampleGuidance`): sample above the model's resolution (give
  `height`/`width` = factor x its default) with upsample guidance (arXiv 2404.01709).
  `switch_prompts` + `switch_timestep`: time-dependent prompt composition (arXiv 2401.10247),
  `prompts` while t > switch_timestep, then `switch_prompts` (one per prompt, or a str for all);
  `chromatography.switch_time` picks the time for a resolution. Not combinable with each other.
  `decor` (`decor.Settings`): DECOR (arXiv 2412.09169) on the prompts' embeddings (not on the
  negative prompts'); with `switch_prompts` it applies to the early prompts only.
  `prompt_embeds` (B, L, D): text-encoder outputs used instead of encoding `prompts` (which still
  give the batch size), e.g. an edited or reconstructed embedding matrix."""
  _check_supported(pipe)
  _check_common(sampler, guidance_rescale)
  prompts = _prompt_list(prompts, 'prompts')
  negatives = _negative_list(negative_prompts, len(prompts))
  if upsample_guidance is not None and not isinstance(upsample_guidance,
                                                      guidance.UpsampleGuidance):
    raise ValueError('upsample_guidance must be a guidance.UpsampleGuidance or None, got '
                     f'{type(upsample_guidance).__name__}')
  if (switch_prompts is None) != (switch_timestep is None):
    raise ValueError('switch_prompts and switch_timestep go together: give both or neither')
  if switch_prompts is not None:
    if upsample_guidance is not None:
      raise ValueError('switch_prompts cannot be combined with upsample_guidance')
    switch_prompts = _negative_list(switch_prompts, len(prompts), 'switch_prompts')
    if not np.isfinite(switch_timestep):
      raise ValueError(f'switch_timestep must be a finite timestep, got {switch_timestep!r}')
  dh, dw = default_image_size(pipe) if height is None or width is None else (0, 0)
  height, width = height or dh, width or dw
  f = latent_factor(pipe)
  if height % f or width % f:
    raise ValueError(f'height and width must be multiples of {f}, got {height}x{width}')
  shape = (len(prompts), height // f, width // f, pipe.unet.config.in_channels)
  key_x, key_steps = jax.random.split(key)
  if latents is None:
    latents = jax.random.normal(key_x, shape, jnp.float32)
  elif tuple(latents.shape) != shape:
    raise ValueError(f'latents must have shape {shape} (B, H/{f}, W/{f}, C), got {latents.shape}')
  return _run(pipe, prompts, negatives, jnp.asarray(latents, jnp.float32), key_steps,
              first_step=0, num_steps=num_steps, guidance_scale=guidance_scale, sampler=sampler,
              eta=eta, guidance_rescale=guidance_rescale, return_trajectory=return_trajectory,
              upsample_guidance=upsample_guidance, switch_prompts=switch_prompts,
              switch_timestep=switch_timestep, decor=decor, prompt_embeds=prompt_embeds)


def start_step(num_steps: int, strength: float) -> int:
  """The first grid step of image-to-image, as diffusers' img2img `get_timesteps`."""
  if not 0 < strength <= 1:
    raise ValueError(f'strength must be in (0, 1], got {strength}')
  init = min(int(num_steps * strength), num_steps)
  if init == 0:
    raise ValueError(f'strength={strength} with num_steps={num_steps} leaves no step to run: '
                     f'raise one of them (num_steps * strength >= 1)')
  return num_steps - init


def image_to_image(pipe, images, prompts, key, strength: float = 0.8, num_steps: int = 50,
                   guidance_scale: float = 7.5, negative_prompts=None, sampler: str = 'ddim',
                   eta: float = 0.0, guidance_rescale: float = 0.0,
                   return_trajectory: bool = False, noise=None,
                   decor: decor_lib.Settings | None = None):
  """SDEdit (arXiv 2108.01073): noise `images` (B, H, W, C) in [0, 1] to the grid timestep
  `start_step(num_steps, strength)` and run the sampler from there; strength 1 starts from the
  first timestep (almost pure noise). `key` splits into (posterior sample, noise, step noise);
  `noise` (model-space shape) replaces the drawn noise; `decor` as in `text_to_image`."""
  _check_supported(pipe)
  _check_common(sampler, guidance_rescale)
  prompts = _prompt_list(prompts, 'prompts')
  negatives = _negative_list(negative_prompts, len(prompts))
  first_step = start_step(num_steps, strength)
  images = jnp.asarray(images, jnp.float32)
  channels = pipe.unet.config.in_channels if pipe.vae is None else pipe.vae.config.in_channels
  f = latent_factor(pipe)
  if images.ndim != 4 or images.shape[-1] != channels:
    raise ValueError(f'images must be (B, H, W, {channels}) NHWC in [0, 1], got shape '
                     f'{images.shape}')
  if images.shape[0] != len(prompts):
    raise ValueError(f'images has batch size {images.shape[0]} but there are {len(prompts)} '
                     'prompts: pass one image per prompt')
  if images.shape[1] % f or images.shape[2] % f:
    raise ValueError(f'images spatial size {images.shape[1:3]} must be a multiple of {f}')
  key_post, key_noise, key_steps = jax.random.split(key, 3)
  x0 = _encode_images(pipe.vae, pipe.vae_params, images, key_post)
  if noise is None:
    noise = jax.random.normal(key_noise, x0.shape, x0.dtype)
  elif tuple(noise.shape) != x0.shape:
    raise ValueError(f'noise must have shape {x0.shape}, got {noise.shape}')
  s = _schedule(json.dumps(pipe.scheduler_config, sort_keys=True))
  t_start = samplers.timesteps(sampler, s, num_steps)[first_step]
  x_start = s.add_noise(x0, jnp.asarray(noise, jnp.float32), t_start)
  return _run(pipe, prompts, negatives, x_start, key_steps, first_step=first_step,
              num_steps=num_steps, guidance_scale=guidance_scale, sampler=sampler, eta=eta,
              guidance_rescale=guidance_rescale, return_trajectory=return_trajectory,
              decor=decor)


# -- many prompts ------------------------------------------------------------------------------------

def generate(pipe, prompts: Sequence[str], latents, key: jax.Array, batch_size: int = 0,
             **kwargs) -> tuple[np.ndarray, dict[str, float]]:
  """`text_to_image` over many prompts in batches of one size, with timings.

  `latents` (N, h, w, C) fixes each image's initial noise, so an image does not depend on the
  batch it ran in (the step noise of stochastic samplers does: batch i uses `fold_in(key, i)`).
  The last batch is padded with its last prompt (dropped afterwards) so that one executable
  serves every batch. The first batch runs once untimed to compile: `compile_s` is that call's
  time minus the same batch's steady-state time, `sampling_s` covers every batch. `kwargs` go to
  `text_to_image` (num_steps, guidance_scale, sampler, ...)."""
  from absl import logging  # noqa: PLC0415 (progress lines only here)
  prompts = _prompt_list(prompts, 'prompts')
  n = len(prompts)
  if latents.shape[0] != n:
    raise ValueError(f'latents must have one row per prompt ({n}), got shape {latents.shape}')
  batch_size = min(batch_size or n, n)
  batches = [np.minimum(np.arange(s, s + batch_size), n - 1) for s in range(0, n, batch_size)]

  def run(i, idx):
    return np.asarray(text_to_image(pipe, [prompts[j] for j in idx], jax.random.fold_in(key, i),
                                    latents=latents[idx], **kwargs))

  start = time.perf_counter()
  run(0, batches[0])
  first_call_s = time.perf_counter() - start
  logging.info('compiled and ran the first batch of %d in %.1f s', batch_size, first_call_s)
  outputs, batch_s, start = [], [], time.perf_counter()
  for i, idx in enumerate(batches):
    t0 = time.perf_counter()
    outputs.append(run(i, idx))
    batch_s.append(time.perf_counter() - t0)
    done = min((i + 1) * batch_size, n)
    rate = done / (time.perf_counter() - start)
    logging.info('batch %d/%d: %d/%d images, %.2f images/s, ETA %.0f s', i + 1, len(batches),
                 done, n, rate, (n - done) / rate)
  sampling_s = time.perf_counter() - start
  timing = {'first_call_s': first_call_s, 'compile_s': max(first_call_s - batch_s[0], 0.0),
            'sampling_s': sampling_s, 'images_per_s': n / sampling_s}
  return np.concatenate(outputs)[:n], timing
