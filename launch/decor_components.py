r"""DECOR's component analysis (arXiv 2412.09169) of a text encoder's prompt embeddings: the SVD
of each prompt's (tokens x width) output matrix, how its energy spreads over components and token
positions, the share the padding rows carry, and images generated from top-k reconstructions.
SDXL: the matrix is the UNet's context, both encoders' hidden states side by side
(tokens x (D1 + D2)); the reconstructions keep the pooled embedding.

    python launch/decor_components.py --workdir=/tmp/decor_components            # the digits
    python launch/decor_components.py --pipeline_dir=/ckpt/sd-v1-5 \
      --prompts='a photo of a cat,a dog in the style of van gogh' --workdir=/tmp/sd_components

Writes to --workdir (a local folder or gs://bucket/path): `config.json` (the flags),
`components.json` (per prompt: energy per component, token energy, padding share per component,
and the padding rows' share of the tokens), `results.json` (metrics: the means over the prompts)
and `components.png` (energy spectra; the first prompt's component x token map with its padding
positions; padding share per component against the uniform share). With `--reconstruct_samples`
> 0 also `reconstructions.png`: samples of the first prompt from its top-k reconstructions
(`decor.reconstruct`), one row per k, the same noise in every row. Multi-host: the samples are
split over every process's devices (`pipeline.text_to_image`); process 0 writes.
"""

from __future__ import annotations

import os

import jax
import matplotlib
import numpy as np
from absl import app, flags, logging

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

from diffgeo_jax import digits, images as images_lib, models, runs  # noqa: E402
from diffgeo_jax.diffusion import guidance, pipeline  # noqa: E402
from diffgeo_jax.text import decor  # noqa: E402

DIGITS_PROMPTS = ('a red digit three', 'a blue digit seven', 'a sks digit', 'a digit three')

_PIPELINE = flags.DEFINE_string('pipeline_dir', '', "A pipeline folder ('' = the digits model).")
_PROMPTS = flags.DEFINE_list('prompts', [], 'Prompts (default: digits captions).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Output folder.', required=True)
_TOP = flags.DEFINE_integer('top', 8, 'Components shown in the plots.')
_SAMPLES = flags.DEFINE_integer('reconstruct_samples', 6, 'Samples per top-k row (0: none).')
_STEPS = flags.DEFINE_integer('num_steps', 30, 'Sampler steps of the reconstructions.')
_GUIDANCE = flags.DEFINE_float('guidance_scale', 1.5, 'Guidance scale of the reconstructions.')


def token_matrix(embeds):
  """The (B, tokens, width) matrices the UNet cross-attends to: SD's encoder output, SDXL's
  'context' (both encoders' hidden states side by side; the pooled embedding is not a token)."""
  return embeds['context'] if isinstance(embeds, dict) else embeds


def analyse(pipe, prompts: list[str]) -> tuple[list[dict], list[list[str]]]:
  """Per prompt: the decomposition's arrays (numpy) and the tokens of its rows."""
  x = token_matrix(pipeline.encode_prompts(pipe, prompts))
  limit = x.shape[1]
  ids = [pipe.tokenizer(p, truncation=True, max_length=limit).input_ids for p in prompts]
  # PAD rows: the positions after the end-of-text token (the pad id may equal EOS, as in SD 1.x).
  padding = np.arange(limit)[None, :] >= np.array([len(i) for i in ids])[:, None]
  dec = decor.decompose(x, padding)
  out = []
  for b in range(len(prompts)):
    out.append({'prompt': prompts[b], 'energy': np.asarray(dec.energy[b]),
                'token_energy': np.asarray(dec.token_energy[b]),
                'padding_share': np.asarray(dec.padding_share[b]),
                'component_token_share': np.asarray(dec.component_token_share[b]),
                'singular_values': np.asarray(dec.s[b]),
                'padding_fraction': float(padding[b].mean())})
  tokens = [[t.replace('</w>', '') for t in pipe.tokenizer.convert_ids_to_tokens(i)] +
            ['[PAD]'] * (limit - len(i)) for i in ids]
  return out, tokens


def figure(rows: list[dict], tokens: list[str], top: int, title: str):
  fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
  for r in rows:
    k = min(top, len(r['energy']))
    axes[0].semilogy(np.arange(1, k + 1), r['energy'][:k], 'o-', label=r['prompt'][:32])
  axes[0].set_xlabel('component i')
  axes[0].set_ylabel('energy share S_i^2 / sum S^2')
  axes[0].legend(fontsize=7)
  axes[0].grid(alpha=0.3)
  first = rows[0]
  k = min(top, len(first['energy']))
  share = first['component_token_share'][:k]
  im = axes[1].imshow(share, aspect='auto', cmap='viridis', vmin=0, vmax=1)
  axes[1].set_yticks(range(k), [f'{i + 1}' for i in range(k)])
  axes[1].set_xticks(range(len(tokens)), tokens, rotation=70, fontsize=7)
  axes[1].set_ylabel('component')
  axes[1].set_title(f'"{first["prompt"]}": U[:, i]^2 over token rows', fontsize=9)
  fig.colorbar(im, ax=axes[1], fraction=0.04)
  width = 0.8 / len(rows)
  for j, r in enumerate(rows):
    kk = min(top, len(r['padding_share']))
    axes[2].bar(np.arange(1, kk + 1) + (j - (len(rows) - 1) / 2) * width, r['padding_share'][:kk],
                width=width, label=r['prompt'][:32])
  mean_pad = float(np.mean([r['padding_fraction'] for r in rows]))
  axes[2].axhline(mean_pad, color='k', ls='--', lw=1, label='uniform (PAD rows / rows)')
  axes[2].set_xlabel('component i')
  axes[2].set_ylabel('share of the component on PAD rows')
  axes[2].legend(fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  return fig


def reconstructions(pipe, prompt: str, ks: list[int], n: int, num_steps: int,
                    guidance_scale: float) -> np.ndarray:
  """(len(ks) * n, H, W, C): n samples of `prompt` from its top-k reconstruction per k (SDXL:
  of its token matrix; the pooled embedding is kept)."""
  full = pipeline.encode_prompts(pipe, [prompt])
  dec = decor.decompose(token_matrix(full))
  key = jax.random.key(0)  # the same noise in every row
  rows = []
  for k in ks:
    embeds = np.repeat(np.asarray(decor.reconstruct(dec, k)), n, axis=0)
    if isinstance(full, dict):
      embeds = {**{name: np.repeat(np.asarray(v), n, axis=0) for name, v in full.items()},
                'context': embeds}
    rows.append(np.asarray(pipeline.text_to_image(pipe, [prompt] * n, key, num_steps=num_steps,
                                                  guidance=guidance.CFG(guidance_scale),
                                                  prompt_embeds=embeds)))
  return np.concatenate(rows)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _TOP.value < 1 or _SAMPLES.value < 0:
    raise ValueError(f'--top must be >= 1 and --reconstruct_samples >= 0, got {_TOP.value} and '
                     f'{_SAMPLES.value}')
  folder = digits.pipeline_dir(_PIPELINE.value)
  prompts = _PROMPTS.value or (list(DIGITS_PROMPTS) if not _PIPELINE.value else
                               ['a photo of a cat', 'a dog in the style of van gogh'])
  run = runs.start({'pipeline_dir': folder, 'prompts': prompts, 'top': _TOP.value,
                    'reconstruct_samples': _SAMPLES.value, 'num_steps': _STEPS.value,
                    'guidance_scale': _GUIDANCE.value}, _WORKDIR.value)
  with run.timed('load'):
    pipe = pipeline.replicate(models.load_pipeline(folder))
  with run.timed('analysis'):
    rows, tokens = analyse(pipe, prompts)
  name = 'digits model' if not _PIPELINE.value else os.path.basename(os.path.normpath(folder))
  width = sum(enc.config.hidden_size for enc in (pipe.text_encoder, pipe.text_encoder_2)
              if enc is not None)  # SDXL: both encoders' hidden states side by side
  run.save_figure('components.png', figure(
      rows, tokens[0], _TOP.value,
      f'Component analysis of the {name} text encoder outputs '
      f'({rows[0]["energy"].size} components, width {width})'),
      dpi=120)
  metrics = {
      'mean_first_component_energy': float(np.mean([r['energy'][0] for r in rows])),
      'mean_first_component_padding_share': float(np.mean([r['padding_share'][0] for r in rows])),
      'mean_padding_fraction': float(np.mean([r['padding_fraction'] for r in rows]))}
  if _SAMPLES.value:
    k_max = rows[0]['energy'].size
    ks = sorted({k for k in (1, 2, 3, 4, 8, k_max) if k <= k_max})
    with run.timed('sampling'):
      imgs = reconstructions(pipe, prompts[0], ks, _SAMPLES.value, _STEPS.value, _GUIDANCE.value)
    n = _SAMPLES.value
    run.save_figure('reconstructions.png', images_lib.labelled_rows(
        [(f'top {k}' if k < ks[-1] else f'all {k}', imgs[i * n:(i + 1) * n])
         for i, k in enumerate(ks)],
        f'"{prompts[0]}" from its top-k components (same noise per column)'), dpi=120)
    metrics['reconstruction_ks'] = ks
  run.write_json('components.json', {'pipeline_dir': folder, 'prompts': [
      {**{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items()
          if k != 'component_token_share'}, 'tokens': t} for r, t in zip(rows, tokens)],
      **metrics})
  logging.info('first component: %.3f of the energy, %.3f of it on PAD rows (PAD rows: %.3f)',
               metrics['mean_first_component_energy'],
               metrics['mean_first_component_padding_share'], metrics['mean_padding_fraction'])
  run.finish(metrics)


if __name__ == '__main__':
  app.run(main)
