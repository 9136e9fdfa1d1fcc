r"""Train a masked (absorbing) discrete-diffusion denoiser: Countdown or the 8x8 digits as tokens.

    python launch/train_discrete.py --config=configs/discrete/countdown.py \
      --workdir=/tmp/discrete_countdown [--config.export_dir=...]
    python launch/train_discrete.py --config=configs/discrete/digits.py --workdir=/tmp/discrete_digits

The denoiser (`discrete.model.Transformer`) is trained on the continuous-time ELBO of
`processes.Absorbing` with the log-linear schedule (`model.loss`); the global batch of step i is a
function of (seed, i) alone and each process feeds its rows of it, so a resumed run is the run that
never stopped and N processes compute what one does. After training, the EMA weights are evaluated
(on every process) on a fixed held-out set (Countdown: seeded fresh sequences; digits: the
test split): the ELBO in nats per token, the masked cross-entropy and the masked-token accuracy,
each averaged over `eval.repeats` fixed noise draws. For Countdown the same noisy batches are also
scored with the exact posterior (`data.countdown_posterior`): the Bayes limits. Writes to
--workdir (local or gs://): `config.json`, `checkpoints/` (orbax; a rerun resumes from the latest),
`tensorboard/`, `model/` (the model folder: config.json, model.safetensors, results.json with the
metrics; also copied to `export_dir` when set) and `results.json`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from diffgeo_jax import runs
from diffgeo_jax.digits import digit_tokens
from diffgeo_jax.discrete import data, processes
from diffgeo_jax.discrete import model as model_lib
from diffgeo_jax.training import trainer

_FLAGS = {}  # defined when run as a binary only: tests import Job/evaluate next to other launchers


def _define_flags():
  _FLAGS['config'] = config_flags.DEFINE_config_file(
      'config', None, 'Training config (configs/discrete/countdown.py or digits.py).')
  _FLAGS['workdir'] = flags.DEFINE_string('workdir', None,
                                          'Output folder (resumes from its checkpoints).',
                                          required=True)

DATASETS = ('countdown', 'digits')
# The held-out Countdown set is drawn from (eval.seed, HELDOUT_STEP, 0): a step no run reaches, so
# it is never a training batch (numpy's SeedSequence pads entropy with zeros, so [s] = [s, 0, 0]).
HELDOUT_STEP = 2**32 - 1


class Job:
  """The data, model and loss of one discrete training config."""

  def __init__(self, config):
    self.config = config
    d = config.data
    if d.name not in DATASETS:
      raise ValueError(f'config.data.name must be one of {DATASETS}, got {d.name!r}')
    if d.name == 'digits':
      if (d.length, d.vocab_size) != (digit_tokens.LENGTH, digit_tokens.VOCAB):
        raise ValueError(f'digits sequences have config.data.length={digit_tokens.LENGTH} and '
                         f'config.data.vocab_size={digit_tokens.VOCAB}, got {d.length} and '
                         f'{d.vocab_size}')
      self.train_tokens = digit_tokens.load('train', d.split_seed)[0]
    self.model_config = model_lib.TransformerConfig(
        vocab_size=d.vocab_size, length=d.length, **config.model.to_dict())
    self.model = model_lib.Transformer(self.model_config)
    self.process = processes.Absorbing(d.vocab_size, processes.LogLinear(config.process.eps))

  def init_fn(self, key: jax.Array) -> dict:
    return model_lib.init(key, self.model_config)[1]

  def loss_fn(self, params: dict, batch: dict, key: jax.Array):
    return model_lib.loss(self.model, params, batch['tokens'], key, self.process,
                          self.config.process.t_min)

  def batch_fn(self, step: int) -> dict:
    """The global batch of step `step`, a function of (seed, step) alone (the Trainer feeds each
    process's rows of it)."""
    c, d = self.config.train, self.config.data
    rng = np.random.default_rng([c.seed, step])
    if d.name == 'countdown':
      tokens = data.countdown(rng, c.batch_size, d.length, d.vocab_size)
    else:
      tokens = self.train_tokens[rng.integers(0, len(self.train_tokens), c.batch_size)]
    return {'tokens': tokens}

  def heldout_tokens(self) -> np.ndarray:
    """The fixed held-out set: seeded fresh Countdown sequences, or the digits test split."""
    d, e = self.config.data, self.config.eval
    if d.name == 'countdown':
      return data.countdown(np.random.default_rng([e.seed, HELDOUT_STEP, 0]), e.num_sequences,
                            d.length, d.vocab_size)
    return digit_tokens.load('test', d.split_seed)[0]


def _keys(seed: int, repeats: int) -> list[jax.Array]:
  return [jax.random.fold_in(jax.random.key(seed), r) for r in range(repeats)]


def _combine(rows: list[tuple[float, dict]], n_tokens: int) -> dict:
  """Means over repeats: the ELBO per repeat, the masked metrics per masked token."""
  masked = np.array([m['masked_fraction'] * n_tokens for _, m in rows])
  out = {'elbo': float(np.mean([v for v, _ in rows]))}
  for k in ('masked_ce', 'masked_accuracy'):
    out[k] = float(np.sum(np.array([m[k] for _, m in rows]) * masked) / max(masked.sum(), 1))
  out['masked_fraction'] = float(masked.sum() / (n_tokens * len(rows)))
  return out


def evaluate(model, params, tokens, process, t_min: float, seed: int, repeats: int,
             bayes: bool = False) -> dict:
  """ELBO (nats/token), masked cross-entropy and masked accuracy of `tokens` (N, L), each noise
  draw r of `repeats` from fold_in(key(seed), r) through `model.loss`, so a reloaded model
  reproduces them exactly. bayes=True (Countdown only) adds the exact posterior's numbers on the
  same noisy batches under 'bayes'."""
  loss = jax.jit(lambda p, x, k: model_lib.loss(model, p, x, k, process, t_min))
  x0 = jnp.asarray(tokens, jnp.int32)
  rows, bayes_rows = [], []
  for key in _keys(seed, repeats):
    value, metrics = jax.device_get(loss(params, x0, key))
    rows.append((float(value), {k: float(v) for k, v in metrics.items()}))
    if bayes:
      t, x_t = model_lib.noise(key, x0, process, t_min)
      post = data.countdown_posterior(np.asarray(x_t), process.vocab_size)
      logp = jnp.asarray(np.log(np.maximum(post, 1e-30)), jnp.float32)
      value, metrics = jax.device_get(model_lib.masked_elbo(logp, x0, x_t, t, process))
      bayes_rows.append((float(value), {k: float(v) for k, v in metrics.items()}))
  out = {**_combine(rows, x0.size), 'sequences': int(x0.shape[0]), 'repeats': int(repeats)}
  if bayes:
    out['bayes'] = _combine(bayes_rows, x0.size)
  return out


def main(argv):
  # config_file=None: the Trainer writes config.json
  config, run = runs.start_main(argv, _FLAGS['config'], _FLAGS['workdir'], config_file=None)
  job = Job(config)
  params, result = trainer.train_job(config, run, job)
  e, d = config.eval, config.data
  is_countdown = d.name == 'countdown'
  with run.timed('evaluation'):
    heldout = evaluate(job.model, params, job.heldout_tokens(), job.process,
                       config.process.t_min, e.seed, e.repeats, bayes=is_countdown)
    result = {'data': d.name, 'heldout': heldout, 'training': result,
              'parameters': model_lib.num_parameters(params),
              'process': {'name': 'absorbing', 'schedule': 'loglinear', 'eps': config.process.eps,
                          't_min': config.process.t_min}}
    if is_countdown:
      result['entropy_per_token'] = data.countdown_entropy(d.length, d.vocab_size) / d.length
    else:
      result['train'] = evaluate(job.model, params, job.train_tokens, job.process,
                                 config.process.t_min, e.seed, e.repeats)
  if run.is_main:
    with run.folder('model', config.export_dir) as out:
      model_lib.save(out, params, job.model_config, result)  # results.json: the metrics
  run.finish(result)


if __name__ == '__main__':
  _define_flags()
  flags.mark_flag_as_required('config')
  app.run(main)
