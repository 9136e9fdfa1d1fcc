"""A small bidirectional transformer denoiser for absorbing (masked) diffusion, SEDD-DDiT style.

    model, params = model_lib.init(key, TransformerConfig(vocab_size=V, length=L))
    logits = model.apply({'params': params}, x_t, t)    # (B, L) in [0, V], (B,) -> (B, L, V)
    denoise = model_lib.denoiser(model, params)          # (x_t, t) -> p(x_0^i | x_t): (B, L, V)
    value, metrics = model_lib.loss(model, params, x0, key, process)   # ELBO, nats per token

The network sees V + 1 input states (MASK = V, as `processes.Absorbing`) and predicts logits over
the V real tokens only: a clean token's posterior is known exactly (absorbing tokens never change
once clean), so `denoiser` returns its one-hot instead of the network's guess. Time enters through
adaLN (DiT / DDiT): a sinusoidal embedding of t sets per-block scale, shift and gate, all
zero-initialised, so the untrained network is the identity plus a zero head (uniform logits).
Positions are a learned embedding (the official DDiT uses rotary). No dropout; float32 throughout.

A model folder holds `config.json` (`TransformerConfig`), `model.safetensors` (flat '/'-joined
parameter names: `model_folder`) and `results.json` (how it was trained). Trained
Countdown and digits folders ship with the package: `load(pretrained_dir('countdown'))`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffgeo_jax import model_folder
from diffgeo_jax.discrete import processes
# Model folders shipped inside the package (pretrained/README.md: how they were trained).
PRETRAINED = ('countdown', 'digits')
_HERE = os.path.dirname(os.path.abspath(__file__))


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Sizes of the denoiser. `cond_dim` is the width of the time embedding feeding every adaLN
  (DDiT uses 128; each block's modulation layer has cond_dim * 6 * hidden weights, so a smaller
  one keeps a small model small: time is one scalar)."""
  vocab_size: int  # V real tokens; MASK = V is an input state only
  length: int  # L
  hidden: int = 128
  heads: int = 4
  layers: int = 4
  mlp_ratio: int = 4
  cond_dim: int = 128
  time_features: int = 256  # sinusoidal features of t before the time MLP

  def __post_init__(self):
    for name in ('vocab_size', 'length', 'hidden', 'heads', 'layers', 'mlp_ratio', 'cond_dim',
                 'time_features'):
      v = getattr(self, name)
      low = 2 if name == 'vocab_size' else 1
      if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < low:
        raise ValueError(f'{name} must be an integer >= {low}, got {v!r}')
    if self.hidden % self.heads:
      raise ValueError(f'hidden={self.hidden} must be divisible by heads={self.heads}')
    if self.time_features % 2:
      raise ValueError(f'time_features must be even, got {self.time_features}')

  @property
  def mask_id(self) -> int:
    return self.vocab_size

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> TransformerConfig:
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f'unknown transformer config fields {unknown}; known: {sorted(fields)}')
    return cls(**d)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# -- the network -----------------------------------------------------------------------------------

def time_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
  """(B,) t in [0, 1] -> (B, dim) [cos, sin] features (DiT's), t scaled to [0, 1000] so that the
  geometric frequency range of max_period resolves the unit interval."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = 1000.0 * t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _modulate(x, shift, scale):
  return x * (1.0 + scale) + shift


class Block(nn.Module):
  """Pre-LN transformer block with adaLN-Zero modulation from the time condition."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    cfg = self.config
    b, length, h = x.shape
    d = h // cfg.heads
    mod = nn.Dense(6 * h, kernel_init=nn.initializers.zeros, name='adaln')(c)[:, None, :]
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mod, 6, axis=-1)

    y = _modulate(nn.LayerNorm(use_bias=False, name='norm1')(x), shift_a, scale_a)
    qkv = nn.Dense(3 * h, use_bias=False, name='qkv')(y).reshape(b, length, 3, cfg.heads, d)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    att = jax.nn.softmax(jnp.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(d), axis=-1)
    y = jnp.einsum('bhqk,bkhd->bqhd', att, v).reshape(b, length, h)
    x = x + gate_a * nn.Dense(h, use_bias=False, name='out')(y)

    y = _modulate(nn.LayerNorm(use_bias=False, name='norm2')(x), shift_m, scale_m)
    y = nn.Dense(cfg.mlp_ratio * h, name='mlp_in')(y)
    y = nn.Dense(h, name='mlp_out')(nn.gelu(y, approximate=True))
    return x + gate_m * y


class Transformer(nn.Module):
  """(tokens (B, L) int in [0, V], t (B,)) -> logits (B, L, V) over the V real tokens."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, t: jax.Array) -> jax.Array:
    cfg = self.config
    tokens, t = _check_inputs(tokens, t, cfg)
    x = nn.Embed(cfg.vocab_size + 1, cfg.hidden, name='embed')(tokens)
    pos = self.param('pos_embed', nn.initializers.normal(0.02), (cfg.length, cfg.hidden))
    x = x + pos[None]
    c = nn.Dense(cfg.cond_dim, name='time_in')(time_embedding(t, cfg.time_features))
    c = nn.Dense(cfg.cond_dim, name='time_out')(nn.silu(c))
    c = nn.silu(c)
    for i in range(cfg.layers):
      x = Block(cfg, name=f'block{i}')(x, c)
    shift, scale = jnp.split(
        nn.Dense(2 * cfg.hidden, kernel_init=nn.initializers.zeros, name='final_adaln')(c)[:, None],
        2, axis=-1)
    x = _modulate(nn.LayerNorm(use_bias=False, name='final_norm')(x), shift, scale)
    return nn.Dense(cfg.vocab_size, kernel_init=nn.initializers.zeros, name='head')(x)


def _check_inputs(tokens, t, cfg: TransformerConfig):
  if not hasattr(tokens, 'shape') or tokens.ndim != 2 or tokens.shape[1] != cfg.length:
    raise ValueError(f'tokens must have shape (B, {cfg.length}), got '
                     f'{getattr(tokens, "shape", type(tokens).__name__)}')
  processes._check_tokens(tokens, 'tokens', cfg.vocab_size + 1)
  t = jnp.asarray(t, jnp.float32)
  if t.shape != tokens.shape[:1]:
    raise ValueError(f't must have shape (B,) = {tokens.shape[:1]}, got {t.shape}')
  return tokens.astype(jnp.int32), t


def init(key: jax.Array, config: TransformerConfig) -> tuple[Transformer, dict]:
  """A freshly initialised (model, params)."""
  model = Transformer(config)
  tokens = jnp.zeros((1, config.length), jnp.int32)
  return model, jax.jit(model.init)(key, tokens, jnp.zeros((1,), jnp.float32))['params']


def num_parameters(params) -> int:
  return int(sum(np.size(p) for p in jax.tree.leaves(params)))


# -- the denoiser contract -------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnums=0)
def _posterior(model: Transformer, params, x_t, t):
  probs = jax.nn.softmax(model.apply({'params': params}, x_t, t), axis=-1)
  v = model.config.vocab_size
  clean = jax.nn.one_hot(x_t, v, dtype=probs.dtype)  # a MASK (= V) row is all zero, unused
  return jnp.where((x_t == v)[..., None], probs, clean)


def denoiser(model: Transformer, params):
  """`fn(x_t (B, L) int, t (B,)) -> p(x_0^i | x_t) (B, L, V)`: the network's softmax at masked
  positions and the exact one-hot at clean ones (a clean absorbing token is its x_0). Jitted once
  per model; also traceable inside a caller's jit."""
  def denoise(x_t, t):
    x_t, t = _check_inputs(x_t, t, model.config)
    return _posterior(model, params, x_t, t)
  return denoise


# -- the training objective ------------------------------------------------------------------------

def elbo_weight(process: processes.Absorbing, t) -> jax.Array:
  """w(t) = m'(t) / m(t) with m = 1 - e^{-sigma_bar} the mask probability:
  sigma(t) e^{-sigma_bar} / (1 - e^{-sigma_bar}) = sigma(t) / expm1(sigma_bar). 1/t for
  log-linear (any eps)."""
  sched = process.schedule
  return sched.rate(t) / jnp.expm1(sched.total(t))


def _check_process(process, config):
  if not isinstance(process, processes.Absorbing):
    raise ValueError(f'process must be processes.Absorbing, got {process!r}')
  if process.vocab_size != config.vocab_size:
    raise ValueError(f'process.vocab_size={process.vocab_size} differs from the model\'s '
                     f'vocab_size={config.vocab_size}')


def noise(key: jax.Array, x0, process: processes.Absorbing,
          t_min: float = 1e-3) -> tuple[jax.Array, jax.Array]:
  """(t (B,), x_t (B, L)) as `loss` draws them: `k_t, k_mask = jax.random.split(key)`,
  t ~ U(t_min, 1) per sequence from k_t, x_t = process.sample(k_mask, x0, t)."""
  if not 0.0 <= t_min < 1.0:
    raise ValueError(f't_min must be in [0, 1), got {t_min!r}')
  k_t, k_mask = jax.random.split(key)
  t = jax.random.uniform(k_t, x0.shape[:1], jnp.float32, t_min, 1.0)
  return t, process.sample(k_mask, x0, t)


def masked_elbo(log_probs, x0, x_t, t, process: processes.Absorbing) -> tuple[jax.Array, dict]:
  """The ELBO estimate of `loss` from any per-token log p(x_0^i | x_t) (B, L, V) (a network's,
  or an exact posterior's): mean_b w(t_b) sum_{i masked} -log p(x0^i | x_t) / L, and metrics."""
  length = x0.shape[-1]
  nll = -jnp.take_along_axis(log_probs, x0[..., None], axis=-1)[..., 0]  # (B, L)
  masked = x_t == process.mask_id
  masked_nll = jnp.where(masked, nll, 0.0)
  value = jnp.mean(elbo_weight(process, t) * masked_nll.sum(-1)) / length
  count = masked.sum()
  denom = jnp.maximum(count, 1)
  correct = masked & (jnp.argmax(log_probs, -1) == x0)
  return value, {'masked_ce': masked_nll.sum() / denom,
                 'masked_accuracy': correct.sum() / denom,
                 'masked_fraction': count / masked.size}


def loss(model: Transformer, params, x0, key: jax.Array, process: processes.Absorbing,
         t_min: float = 1e-3) -> tuple[jax.Array, dict]:
  """Continuous-time ELBO of masked diffusion in nats per token, and metrics.

  (t, x_t) = `noise(key, x0, process, t_min)`: t ~ U(t_min, 1) per sequence. The value is
      mean_b  w(t_b) sum_{i masked} -log p_theta(x0^i | x_t)  / L,   w = `elbo_weight`,
  an unbiased estimate of the ELBO integrand averaged over t in [t_min, 1] (the bound on
  -log p(x0) / L up to the factor 1 - t_min and the part below t_min, both negligible).
  Metrics: `masked_ce` (unweighted cross-entropy per masked token), `masked_accuracy` (argmax)
  and `masked_fraction`."""
  cfg = model.config
  _check_process(process, cfg)
  if not hasattr(x0, 'shape') or x0.ndim != 2 or x0.shape[1] != cfg.length:
    raise ValueError(f'x0 must have shape (B, {cfg.length}), got '
                     f'{getattr(x0, "shape", type(x0).__name__)}')
  processes._check_tokens(x0, 'x0', cfg.vocab_size)
  x0 = x0.astype(jnp.int32)
  t, x_t = noise(key, x0, process, t_min)
  logits = model.apply({'params': params}, x_t, t)
  return masked_elbo(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), x0, x_t, t, process)


# -- files -----------------------------------------------------------------------------------------

def save(folder: str, params: Mapping, config: TransformerConfig,
         results: Mapping[str, Any] | None = None) -> None:
  """Writes `config.json`, `model.safetensors` and (if given) `results.json` into `folder`."""
  if isinstance(config, Mapping):
    config = TransformerConfig.from_dict(config)
  model_folder.save(folder, params, config.to_dict(), results)


def load(folder: str) -> tuple[Transformer, dict, TransformerConfig]:
  """(model, params, config) from a model folder. The stored names and shapes must match the
  config's model exactly; an error lists the missing, unexpected and mis-shaped parameters."""
  folder = os.fspath(folder)
  config = TransformerConfig.from_dict(model_folder.read_config(folder, 'discrete model'))
  model = Transformer(config)
  abstract = jax.eval_shape(lambda: init(jax.random.key(0), config)[1])
  params = model_folder.load_params(
      folder, abstract, f'the transformer of {os.path.join(folder, model_folder.CONFIG)}')
  return model, params, config


def pretrained_dir(name: str) -> str:
  """The shipped model folder `name` ('countdown' or 'digits'), for `load`."""
  if name not in PRETRAINED:
    raise ValueError(f'name must be one of {PRETRAINED}, got {name!r}')
  path = os.path.join(_HERE, 'pretrained', name)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'the shipped {name} model is missing at {path}; the package was '
                            'installed without it. Rebuild it with `python launch/train_discrete.py '
                            f'--config=configs/discrete/{name}.py --workdir=... '
                            f'--config.export_dir={path}`')
  return path


def read_results(folder: str) -> dict:
  """The `results.json` of a model folder ({} if it has none)."""
  return model_folder.read_results(folder)
