"""Text-to-image and image-to-image (SDEdit) over a loaded `models.Pipeline`, as diffusers does.

    pipe = models.load_pipeline(dir)
    images = pipeline.text_to_image(pipe, ['a red digit'], jax.random.key(0), num_steps=50,
                                    guidance=guidance.CFG(7.5))
    edited = pipeline.image_to_image(pipe, images, ['a blue digit'], jax.random.key(1),
                                     strength=0.6)
    # upsample guidance, prompt switching, DECOR: a guidance object, or edited prompt embeddings
    big = pipeline.text_to_image(pipe, prompts, key, height=2 * h, width=2 * w,
                                 guidance=guidance.UpsampleGuidance(inner=guidance.CFG(7.5)))
    mixed = pipeline.text_to_image(pipe, prompts, key, late_prompts=later,
                                   guidance=chromatography.PromptSwitch(500.0))
    custom = pipeline.text_to_image(pipe, prompts, key,
                                    prompt_embeds=pipeline.decor_prompts(pipe, prompts, settings))

Images are float32 NHWC in [0, 1]. A latent pipeline samples in the VAE's latent space
(`latents * vae.config.scaling_factor`); a pixel-space pipeline (`pipe.vae is None`) samples the
pixels themselves in [-1, 1]. The sampler loop and the decoder are one jit-compiled function
(`_generate`) whose static arguments are the model, the sampler's settings and the mesh, and whose
traced arguments are the parameters (a large model is not baked into the executable as
constants), the inputs and the guidance object: a pytree whose settings (its class, an upsample
factor) key the compiled program and whose numbers (the CFG scale, a switch time) are traced, so
a sweep over them compiles once.

Guidance (`guidance.Guidance`): `guidance.CFG(scale)` (the default, 7.5; a number is shorthand
for it) runs classifier-free guidance unless scale == 1 (then the model sees only the prompt: the
same result at half the cost). diffusers skips guidance for every scale <= 1; here a scale below
1 is honoured (0 gives the unconditional model). The pipeline encodes the prompt sets the
guidance `reads`: `negative_prompts` for CFG, `late_prompts` for `chromatography.PromptSwitch`.

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
from diffgeo_jax.diffusion import guidance as guidance_lib
from diffgeo_jax.diffusion import samplers, schedules
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


def is_sdxl(pipe) -> bool:
  """An SDXL-style pipeline: its UNet takes added conditioning (`addition_embed_type='text_time'`:
  the second encoder's pooled text embedding and the size/crop time ids)."""
  return pipe.unet.config.addition_embed_type == 'text_time'


def _check_supported(pipe) -> None:
  if is_sdxl(pipe):
    missing = [n for n in ('text_encoder', 'tokenizer', 'text_encoder_2', 'tokenizer_2')
               if getattr(pipe, n) is None]
    if missing:
      raise ValueError(f'an SDXL pipeline needs both text encoders and tokenizers; this one has no '
                       f'{", ".join(missing)} (an SDXL refiner, which has one encoder and '
                       'aesthetic-score time ids, is not supported)')
    want = (pipe.unet.config.addition_time_embed_dim * len(_TIME_ID_NAMES)
            + pipe.text_encoder_2.config.projection_dim)
    if want != pipe.unet.config.projection_class_embeddings_input_dim:
      raise ValueError(f'the UNet expects projection_class_embeddings_input_dim='
                       f'{pipe.unet.config.projection_class_embeddings_input_dim} added features; '
                       f'6 time ids x addition_time_embed_dim '
                       f'{pipe.unet.config.addition_time_embed_dim} + text_encoder_2 '
                       f'projection_dim {pipe.text_encoder_2.config.projection_dim} give {want}')
  elif pipe.text_encoder_2 is not None:
    raise ValueError('the pipeline has a text_encoder_2 but its UNet takes no added conditioning '
                     '(addition_embed_type is not text_time): not a pipeline this library knows')


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

def _token_limit(tokenizer, text_encoder) -> int:
  return int(min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings))


def max_prompt_tokens(pipe) -> int:
  """Token sequence length: the tokenizer's model_max_length capped by the text encoder's
  position table (a tokenizer saved without a limit reports a huge model_max_length). SDXL's two
  tokenizers must agree (both 77 in SDXL)."""
  limits = {_token_limit(tok, enc) for tok, enc, _ in _encoders(pipe)}
  if len(limits) != 1:
    raise ValueError(f'the two tokenizers / text encoders allow different prompt lengths '
                     f'{sorted(limits)}; SDXL concatenates their hidden states token by token')
  return limits.pop()


def _encoders(pipe) -> list[tuple[Any, Any, Any]]:
  """(tokenizer, text encoder, its params) for each encoder a prompt goes through."""
  parts = [(pipe.tokenizer, pipe.text_encoder, pipe.text_encoder_params)]
  if is_sdxl(pipe):
    parts.append((pipe.tokenizer_2, pipe.text_encoder_2, pipe.text_encoder_2_params))
  return parts


@functools.partial(jax.jit, static_argnames=('text_encoder', 'penultimate'))
def _text_outputs(text_encoder, params, ids, penultimate: bool):
  """(hidden states (B, L, D), text_embeds (B, P) or None): the last layer's (normed) states,
  or with `penultimate` the states before the last layer (SDXL's choice, not normed)."""
  out = text_encoder.apply({'params': params}, ids, output_hidden_states=penultimate)
  return (out.hidden_states[-2] if penultimate else out.last_hidden_state), out.text_embeds


def _embeds_shapes(pipe, batch: int) -> Any:
  """The shape(s) of `encode_prompts` for `batch` prompts."""
  widths = [enc.config.hidden_size for _, enc, _ in _encoders(pipe)]
  context = (batch, max_prompt_tokens(pipe), sum(widths))
  if not is_sdxl(pipe):
    return context
  return {'context': context, 'text_embeds': (batch, pipe.text_encoder_2.config.projection_dim)}


def _prompt_embeds(pipe, prompts: list[str], prompt_embeds=None) -> Any:
  """`encode_prompts(prompts)`, or the given `prompt_embeds` checked against its shapes."""
  if prompt_embeds is None:
    return encode_prompts(pipe, prompts)
  want = _embeds_shapes(pipe, len(prompts))
  if is_sdxl(pipe):
    if not isinstance(prompt_embeds, dict) or set(prompt_embeds) != set(want):
      got = (f'a dict with keys {sorted(prompt_embeds)}' if isinstance(prompt_embeds, dict)
             else type(prompt_embeds).__name__)
      raise ValueError(f"prompt_embeds of an SDXL pipeline must be a dict with 'context' "
                       f"{want['context']} and 'text_embeds' {want['text_embeds']} (what "
                       f"encode_prompts returns), got {got}")
    got = {k: jnp.asarray(v, jnp.float32) for k, v in prompt_embeds.items()}
    bad = {k: got[k].shape for k in want if got[k].shape != want[k]}
  else:
    if isinstance(prompt_embeds, dict):
      raise ValueError(f'prompt_embeds must be an array of shape {want} for this (non-SDXL) '
                       f'pipeline, got a dict with keys {sorted(prompt_embeds)}')
    got = jnp.asarray(prompt_embeds, jnp.float32)
    bad = got.shape if got.shape != want else None
  if bad:
    raise ValueError(f'prompt_embeds must have shape {want} (one (tokens, width) matrix per '
                     f'prompt), got {bad}')
  return got


def decor_prompts(pipe, prompts, settings: decor_lib.Settings,
                  prompt_embeds=None) -> Any:
  """DECOR (arXiv 2412.09169) at sampling time, a prompt-embedding transform: `encode_prompts`
  (or the given `prompt_embeds`) projected off the subspace of `settings`' texts. Pass the result
  as `text_to_image(..., prompt_embeds=...)`.

  SDXL: each encoder's part of the token embeddings (the first encoder's 768 columns, the
  second's 1280) is projected off the same encoder's embeddings of the undesired texts (DECOR
  per text-embedding space, as on SD), and the pooled `text_embeds` off the undesired texts'
  pooled embeddings (else the global conditioning would keep the concept)."""
  prompts = _prompt_list(prompts, 'prompts')
  if not isinstance(settings, decor_lib.Settings):
    raise ValueError(f'settings must be a decor.Settings, got {type(settings).__name__}')
  cond = _prompt_embeds(pipe, prompts, prompt_embeds)
  texts, strength = settings.checked(len(prompts))
  undesired = encode_prompts(pipe, texts)
  if not is_sdxl(pipe):
    return decor_lib.project(cond, undesired, strength, settings.rank)
  project = lambda x, xu: decor_lib.project(x, xu, strength, settings.rank)
  edges = np.cumsum([enc.config.hidden_size for _, enc, _ in _encoders(pipe)])[:-1]
  split = lambda c: jnp.split(c, edges, axis=-1)
  context = jnp.concatenate([project(a, b) for a, b in zip(split(cond['context']),
                                                           split(undesired['context']))], -1)
  pooled = project(cond['text_embeds'][:, None], undesired['text_embeds'][:, None])[:, 0]
  return {'context': context, 'text_embeds': pooled}


def encode_prompts(pipe, prompts) -> Any:
  """The text conditioning of `prompts`, padded to `max_prompt_tokens(pipe)` tokens.

  SD: the text encoder's last hidden states (B, L, D). SDXL (as diffusers'
  StableDiffusionXLPipeline with clip_skip None): a dict with 'context' (B, L, D1 + D2), both
  encoders' penultimate hidden states side by side, and 'text_embeds' (B, P), the second
  encoder's projected pooled output. (The size/crop time ids depend on the image, not the prompt:
  `add_time_ids`.)

  A prompt longer than L is cut (BOS + the first L-2 tokens + EOS, as diffusers) with a warning
  that names it and how many tokens were dropped."""
  _check_supported(pipe)
  prompts = _prompt_list(prompts, 'prompts')
  limit = max_prompt_tokens(pipe)
  lengths = [len(ids) for ids in pipe.tokenizer(prompts).input_ids]
  for prompt, n in zip(prompts, lengths):
    if n > limit:
      warnings.warn(f'prompt {prompt!r} has {n} tokens, more than the text encoder\'s {limit}: '
                    f'the last {n - limit} tokens were dropped', stacklevel=2)
  sdxl = is_sdxl(pipe)
  hidden, text_embeds = [], None
  for tokenizer, encoder, params in _encoders(pipe):
    ids = tokenizer(prompts, padding='max_length', max_length=limit, truncation=True,
                    return_tensors='np').input_ids
    h, text_embeds = _text_outputs(encoder, params, jnp.asarray(ids, jnp.int32), penultimate=sdxl)
    hidden.append(h)
  if not sdxl:
    return hidden[0]
  return {'context': jnp.concatenate(hidden, axis=-1), 'text_embeds': text_embeds}


_TIME_ID_NAMES = ('original_height', 'original_width', 'crop_top', 'crop_left', 'target_height',
                  'target_width')


def add_time_ids(batch: int, height: int, width: int) -> jax.Array:
  """SDXL's micro-conditioning (B, 6): original size, crop top-left, target size, with diffusers'
  defaults (original = target = the generated size, no crop)."""
  row = jnp.asarray([height, width, 0, 0, height, width], jnp.float32)
  return jnp.broadcast_to(row, (batch, len(_TIME_ID_NAMES)))


def zeros_for_empty_prompt(pipe) -> bool:
  """Whether the unconditional conditioning without a negative prompt is zeros rather than the
  empty prompt's encoding: SDXL's `force_zeros_for_empty_prompt` (a pipeline setting, True unless
  the folder's model_index.json says otherwise), as diffusers' StableDiffusionXLPipeline."""
  return is_sdxl(pipe) and bool(pipe.settings.get('force_zeros_for_empty_prompt', True))


def _zero_negative(pipe, negative_prompts) -> bool:
  return negative_prompts is None and zeros_for_empty_prompt(pipe)


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
  names = ('unet_params', 'vae_params', 'text_encoder_params', 'text_encoder_2_params')
  return dataclasses.replace(pipe, **{k: _replicate(mesh, getattr(pipe, k)) for k in names})


# -- the compiled part -----------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _schedule(config_json: str) -> schedules.NoiseSchedule:
  # Concrete arrays even when first asked for inside a trace (`_generate`): samplers lay out
  # their timestep grids from it with numpy, and the cache must not keep tracers.
  with jax.ensure_compile_time_eval():
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


def model_fn(unet, unet_params):
  """model_fn(x, t, context) of the guidance objects: the UNet with these parameters."""
  return lambda x, t, ctx: unet.apply({'params': unet_params}, x, t, ctx)


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """The static settings of one compiled sampling loop."""
  sampler: str
  num_steps: int
  first_step: int = 0
  eta: float | None = None  # None: the sampler's own
  return_trajectory: bool = False


@functools.partial(jax.jit, static_argnames=('unet', 'vae', 'schedule_json', 'settings', 'mesh'))
def _generate(unet_params, vae_params, x_start, contexts: guidance_lib.Contexts, guidance, key,
              *, unet, vae, schedule_json: str, settings: SamplerSettings, mesh: Mesh | None):
  """The sampler loop and the decoder in one program. On a `mesh` its outputs are replicated on
  every device, so every process can read them."""
  s = _schedule(schedule_json)  # a constant of the program (a static argument)
  with attention.partitioned(mesh):  # Pallas kernels (flash attention) per device
    eps_fn = guidance.eps_fn(model_fn(unet, unet_params), s, contexts)
    out = samplers.sample(settings.sampler, eps_fn, x_start, s, settings.num_steps, key=key,
                          eta=settings.eta, return_trajectory=settings.return_trajectory,
                          first_step=settings.first_step)
    x0, traj = out if settings.return_trajectory else (out, None)
    out = _to_images(vae, vae_params, x0), traj
  if mesh is not None:
    out = jax.lax.with_sharding_constraint(out, distributed.replicated(mesh))
  return out


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


def _contexts(pipe, prompts, guidance, negative_prompts, late_prompts, prompt_embeds,
              size: tuple[int, int]) -> guidance_lib.Contexts:
  """Encodes the prompt sets `guidance` reads; refuses a prompt set it would not read. SDXL:
  each set is a dict with the added conditioning, the time ids of the image `size` included."""
  n = len(prompts)
  reads = guidance.reads()
  if late_prompts is not None and 'late' not in reads:
    raise ValueError('late_prompts are read only by a guidance that switches prompts '
                     f'(chromatography.PromptSwitch); guidance is {type(guidance).__name__}')
  if 'late' in reads and late_prompts is None:
    raise ValueError(f'{type(guidance).__name__} switches to late_prompts: pass them (a str for '
                     'all, or one per prompt)')
  cond = _prompt_embeds(pipe, prompts, prompt_embeds)
  uncond = late = None
  if 'uncond' in reads:
    uncond = (jax.tree.map(jnp.zeros_like, cond) if _zero_negative(pipe, negative_prompts)
              else encode_prompts(pipe, _negative_list(negative_prompts, n)))
  if 'late' in reads:
    late = encode_prompts(pipe, _negative_list(late_prompts, n, 'late_prompts'))
  if is_sdxl(pipe):
    ids = add_time_ids(n, *size)
    cond, uncond, late = (None if c is None else {**c, 'time_ids': ids}
                          for c in (cond, uncond, late))
  return guidance_lib.Contexts(cond, uncond, late)


def _run(pipe, prompts, x_start, key, *, guidance, negative_prompts, late_prompts, prompt_embeds,
         settings: SamplerSettings, size: tuple[int, int]):
  """Encodes the prompts, places everything on the mesh, samples, decodes, unpads."""
  n = len(prompts)
  contexts = _contexts(pipe, prompts, guidance, negative_prompts, late_prompts, prompt_embeds,
                       size)
  mesh = _mesh()
  batch = _shard_batch(mesh, {'x': x_start, 'contexts': contexts})
  unet_params, vae_params = _replicate(mesh, (pipe.unet_params, pipe.vae_params))
  images, traj = _generate(unet_params, vae_params, batch['x'], batch['contexts'], guidance, key,
                           unet=pipe.unet, vae=pipe.vae,
                           schedule_json=json.dumps(pipe.scheduler_config, sort_keys=True),
                           settings=settings, mesh=mesh)
  images = images[:n]
  if not settings.return_trajectory:
    return images
  return images, traj.replace(x_t=traj.x_t[:, :n], pred_x0=traj.pred_x0[:, :n])


def _settings(sampler, num_steps, first_step, eta, return_trajectory) -> SamplerSettings:
  if sampler not in samplers.SAMPLERS:
    raise ValueError(f'unknown sampler {sampler!r}; supported: {sorted(samplers.SAMPLERS)}')
  return SamplerSettings(sampler, int(num_steps), int(first_step),
                         None if eta is None else float(eta), bool(return_trajectory))


# -- public API ------------------------------------------------------------------------------------

def text_to_image(pipe, prompts, key, num_steps: int = 50, guidance=guidance_lib.CFG(7.5),
                  negative_prompts=None, sampler: str = 'ddim', eta: float | None = None,
                  height: int | None = None, width: int | None = None,
                  return_trajectory: bool = False, latents=None, late_prompts=None,
                  prompt_embeds=None):
  """Images (B, H, W, C) in [0, 1], one per prompt; with `return_trajectory` also the sampler's
  `Trajectory` (in model space: latents for a latent pipeline).

  `key` draws the initial noise x_T (unless `latents` gives it: unit Gaussian of shape
  (B, H/f, W/f, unet in_channels), f = `latent_factor(pipe)`) and the step noise of stochastic
  samplers (`eta`: DDIM's, None for the sampler's own). `guidance`: a `guidance.Guidance` (CFG,
  Unguided, UpsampleGuidance, chromatography.PromptSwitch) or a number (CFG's scale).
  `negative_prompts` (read by CFG): None (the empty prompt), a str for all, or one per prompt.
  `late_prompts` (read by PromptSwitch): the prompts after the switch, a str for all or one per
  prompt.
  `prompt_embeds` (B, L, D), or for SDXL the dict `encode_prompts` returns: text-encoder outputs
  used instead of encoding `prompts` (which still give the batch size), e.g. DECOR's projection
  (`decor_prompts`) or a reconstructed embedding. SDXL pipelines add the size/crop time ids of
  the generated image (`add_time_ids`) themselves.
  With upsample guidance give `height`/`width` = factor x the model's default."""
  _check_supported(pipe)
  guidance = guidance_lib.as_guidance(guidance)
  settings = _settings(sampler, num_steps, 0, eta, return_trajectory)
  prompts = _prompt_list(prompts, 'prompts')
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
  return _run(pipe, prompts, jnp.asarray(latents, jnp.float32), key_steps, guidance=guidance,
              negative_prompts=negative_prompts, late_prompts=late_prompts,
              prompt_embeds=prompt_embeds, settings=settings, size=(height, width))


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
                   guidance=guidance_lib.CFG(7.5), negative_prompts=None, sampler: str = 'ddim',
                   eta: float | None = None, return_trajectory: bool = False, noise=None,
                   late_prompts=None, prompt_embeds=None):
  """SDEdit (arXiv 2108.01073): noise `images` (B, H, W, C) in [0, 1] to the grid timestep
  `start_step(num_steps, strength)` and run the sampler from there; strength 1 starts from the
  first timestep (almost pure noise). `key` splits into (posterior sample, noise, step noise);
  `noise` (model-space shape) replaces the drawn noise; `guidance`, `negative_prompts`,
  `late_prompts` and `prompt_embeds` as in `text_to_image`."""
  _check_supported(pipe)
  guidance = guidance_lib.as_guidance(guidance)
  first_step = start_step(num_steps, strength)
  settings = _settings(sampler, num_steps, first_step, eta, return_trajectory)
  prompts = _prompt_list(prompts, 'prompts')
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
  return _run(pipe, prompts, x_start, key_steps, guidance=guidance,
              negative_prompts=negative_prompts, late_prompts=late_prompts,
              prompt_embeds=prompt_embeds, settings=settings, size=images.shape[1:3])


# -- many prompts ------------------------------------------------------------------------------------

def generate(pipe, prompts: Sequence[str], latents, key: jax.Array, batch_size: int = 0,
             **kwargs) -> tuple[np.ndarray, dict[str, float]]:
  """`text_to_image` over many prompts in batches of one size, with timings.

  `latents` (N, h, w, C) fixes each image's initial noise, so an image does not depend on the
  batch it ran in (the step noise of stochastic samplers does: batch i uses `fold_in(key, i)`).
  The last batch is padded with its last prompt (dropped afterwards) so that one executable
  serves every batch. The first batch runs once untimed to compile: `compile_s` is that call's
  time minus the same batch's steady-state time, `sampling_s` covers every batch. `kwargs` go to
  `text_to_image` (num_steps, guidance, sampler, ...)."""
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
