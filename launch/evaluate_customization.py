r"""Evaluate a customization LoRA on the digits: content leakage, text alignment and colour
fidelity under plain LoRA, LoRA at reduced scale and DECOR (arXiv 2412.09169) at sampling time.

    python launch/evaluate_customization.py --config=configs/decor/digits.py \
      --workdir=/tmp/decor_digits          # the launch/train_lora.py workdir

Every variant samples the same prompts from the same noise: `eval.prompt_template` ("a sks digit
<d>") for each digit d other than the reference digit, `eval.samples_per_digit` each. Variants:
* `base`: the base model (no LoRA);
* `lora x s`: the LoRA merged at scale s (`eval.lora_scales`; s = 1 is plain LoRA), the usual
  knob against overfitting;
* `decor a`: the LoRA at scale 1 with DECOR strength a (`eval.strengths`) on the prompts'
  embeddings, projecting out `decor.undesired` ("a digit three") through its top `decor.rank`
  components; `decor rank r` (`eval.rank_ablation`, 0 = every component) at strength 1.
Metrics, per variant (the digits classifier reads the digit; colour from the pixels):
* leakage rate: the fraction of samples read as the reference digit instead of the requested one;
* text alignment: the fraction read as the requested digit;
* visual alignment: the mean `metrics.colour_distance` of the stroke colour to the reference
  colour, and the colour match, the fraction of samples whose stroke colour is nearer the
  reference colour than every palette colour.
`comparison` in results.json: for each DECOR strength whose colour match is within
`eval.colour_match_tolerance` of plain LoRA's ("equal colour fidelity"), its leakage relative to
plain LoRA's; and the reduced-scale LoRA's leakage at the same colour distance (interpolated).

Reads the LoRA from --workdir/lora (--workdir local or gs://) and writes to --workdir/evaluation:
`config.json` (this evaluation's config), `results.json` (metrics: `variants`, `comparison`,
`samples`), `table.md`, `pareto.png` (leakage and text alignment against colour distance) and
`samples.png` (a row per variant, a column per digit). Multi-host (--jax_distributed): every
variant's samples are split over every process's devices (`pipeline.text_to_image`); process 0
writes.
"""

from __future__ import annotations

import dataclasses

import jax
import matplotlib
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

from diffgeo_jax import digits, images as images_lib, models, paths, runs  # noqa: E402
from diffgeo_jax.diffusion import guidance, pipeline  # noqa: E402
from diffgeo_jax.digits import dataset, metrics  # noqa: E402
from diffgeo_jax.text import decor  # noqa: E402
from diffgeo_jax.training import lora  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'configs/decor/digits.py')
_WORKDIR = flags.DEFINE_string('workdir', None, 'The launch/train_lora.py workdir.',
                               required=True)


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  family: str  # base | lora_scale | decor | decor_rank
  value: float  # the scale, the strength or the rank
  scale: float  # LoRA merge scale
  decor: decor.Settings | None = None


def variants(config) -> list[Variant]:
  e, d = config.eval, config.decor
  out = [Variant('base', 'base', 0.0, 0.0)]
  out += [Variant(f'lora x {s:g}', 'lora_scale', float(s), float(s)) for s in e.lora_scales]
  out += [Variant(f'decor {a:g}', 'decor', float(a), 1.0,
                  decor.Settings(d.undesired, float(a), d.rank or None)) for a in e.strengths]
  out += [Variant(f'decor rank {r or "all"}', 'decor_rank', float(r), 1.0,
                  decor.Settings(d.undesired, 1.0, r or None)) for r in e.rank_ablation]
  return out


def scores(scorer, imgs: np.ndarray, requested: np.ndarray, reference: int, rgb) -> dict:
  """The metrics of samples in [0, 1] (see the module doc)."""
  x = imgs * 2 - 1
  pred = scorer.predict(x)
  dist = metrics.colour_distance(x, rgb)
  palette = np.stack([metrics.colour_distance(x, c) for c in dataset.PALETTE.values()])
  return {'leakage_rate': float(np.mean(pred == reference)),
          'digit_accuracy': metrics.digit_accuracy(pred, requested),
          'colour_distance': float(np.mean(dist)),
          'colour_match': float(np.mean(dist < palette.min(axis=0)))}


def comparison(rows: dict, tolerance: float) -> dict:
  """DECOR vs plain LoRA at equal colour fidelity, and vs the reduced-scale LoRA curve."""
  plain = rows['lora x 1']
  curve = sorted(((r['colour_distance'], r['leakage_rate']) for r in rows.values()
                  if r['family'] == 'lora_scale'))
  out = {}
  for name, r in rows.items():
    if r['family'] != 'decor' or r['value'] == 0:
      continue
    equal = abs(r['colour_match'] - plain['colour_match']) <= tolerance
    ratio = r['leakage_rate'] / plain['leakage_rate'] if plain['leakage_rate'] else None
    scale_leak = float(np.interp(r['colour_distance'], [c for c, _ in curve],
                                 [l for _, l in curve]))
    out[name] = {'equal_colour_fidelity': bool(equal), 'leakage_vs_plain_lora': ratio,
                 'lora_scale_leakage_at_same_colour_distance': scale_leak}
  return out


def table(rows: dict) -> str:
  lines = ['| variant | leakage rate | digit accuracy | colour distance | colour match |',
           '|---|---|---|---|---|']
  for name, r in rows.items():
    lines.append(f'| {name} | {r["leakage_rate"]:.3f} | {r["digit_accuracy"]:.3f} | '
                 f'{r["colour_distance"]:.3f} | {r["colour_match"]:.3f} |')
  return '\n'.join(lines) + '\n'


def pareto_figure(rows: dict, reference_word: str):
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  styles = {'lora_scale': ('LoRA at reduced scale', 'tab:blue', 'o-'),
            'decor': ('DECOR (strength)', 'tab:red', 's-'),
            'decor_rank': ('DECOR rank ablation (strength 1)', 'tab:gray', '^')}
  for ax, key, label in ((axes[0], 'leakage_rate', f'leakage rate (reads as {reference_word})'),
                         (axes[1], 'digit_accuracy', 'text alignment (requested digit)')):
    for family, (name, colour, style) in styles.items():
      pts = [(r['colour_distance'], r[key], r['value']) for r in rows.values()
             if r['family'] == family]
      if not pts:
        continue
      if family != 'decor_rank':
        pts.sort(key=lambda p: p[2])
      ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=colour, label=name)
      for x, y, v in pts:
        label = f'{v:g}' if family != 'decor_rank' else 'all' if v == 0 else f'r{v:g}'
        ax.annotate(label, (x, y), textcoords='offset points', xytext=(4, 4), fontsize=7)
    b = rows['base']
    ax.plot([b['colour_distance']], [b[key]], 'k*', label='base (no LoRA)')
    ax.set_xlabel('colour distance to the reference (visual alignment; lower is better)')
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle('DECOR vs LoRA scale on the digits: leakage and text alignment against colour')
  fig.tight_layout()
  return fig


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  workdir = paths.resolve(_WORKDIR.value, '--workdir')
  if not (workdir / 'lora').exists():
    raise FileNotFoundError(f'{workdir} is not a finished launch/train_lora.py workdir: lora/ '
                            'is missing')
  e, d = config.eval, config.data
  if 1.0 not in [float(s) for s in e.lora_scales]:
    raise ValueError(f'eval.lora_scales must include 1 (plain LoRA), got {e.lora_scales}')
  if d.reference_digit not in dataset.DIGIT_WORDS:
    raise ValueError(f'data.reference_digit must be a digit word, got {d.reference_digit!r}')
  if '{digit}' not in e.prompt_template:
    raise ValueError(f'eval.prompt_template must contain {{digit}}, got {e.prompt_template!r}')
  run = runs.start(config, workdir / 'evaluation')  # train_lora's own files stay as they are
  with run.timed('load'):
    pipe = models.load_pipeline(digits.pipeline_dir(config.pipeline_dir))
    digits.require_pipeline(pipe, 'launch/evaluate_customization.py')
    scorer = metrics.Scorer.load(digits.classifier_dir(config.classifier_dir))
    lp = lora.load(paths.local_folder(workdir / 'lora', 'the LoRA folder'), pipe.unet_params)
  reference = dataset.DIGIT_WORDS.index(d.reference_digit)
  others = [k for k in range(10) if k != reference]
  n = e.samples_per_digit
  prompts = [e.prompt_template.format(digit=dataset.DIGIT_WORDS[k]) for k in others
             for _ in range(n)]
  requested = np.repeat(others, n)
  key = jax.random.key(e.seed)  # the same noise for every variant
  rows, firsts = {}, []
  for v in variants(config):
    unet = pipe.unet_params if v.scale == 0 else lora.merge(pipe.unet_params, lp, v.scale)
    with run.timed('sampling'):
      embeds = None if v.decor is None else pipeline.decor_prompts(pipe, prompts, v.decor)
      imgs = np.asarray(pipeline.text_to_image(
          dataclasses.replace(pipe, unet_params=unet), prompts, key, num_steps=e.num_steps,
          guidance=guidance.CFG(e.guidance_scale), prompt_embeds=embeds))
    rows[v.name] = {'family': v.family, 'value': v.value, 'lora_scale': v.scale,
                    **scores(scorer, imgs, requested, reference, d.colour_rgb)}
    logging.info('%s: %s', v.name, rows[v.name])
    firsts.append((v.name, imgs[::n]))  # one sample of every requested digit
  run.write_text('table.md', table(rows))
  run.save_figure('pareto.png', pareto_figure(rows, d.reference_digit), dpi=120)
  run.save_figure('samples.png', images_lib.labelled_rows(
      firsts, 'prompts "' + e.prompt_template.format(digit='<d>') + '", d = ' +
      ', '.join(dataset.DIGIT_WORDS[k] for k in others) + ' (first sample of each, same noise)'),
      dpi=120)
  logging.info('wrote %s:\n%s', run.workdir, table(rows))
  run.finish({'variants': rows, 'comparison': comparison(rows, e.colour_match_tolerance),
              'samples': len(prompts)})


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  app.run(main)
