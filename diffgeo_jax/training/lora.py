"""LoRA (Hu et al. 2021) as a pure transform of a Flax parameter tree, in diffusers + peft files.

    lp = lora.init(key, params, rank=32, targets=r'attn1/to_(q|k|v|out_0)$')  # B = 0: identity
    merged = lora.merge(params, lp, scale=1.0)       # W + scale * (alpha / r) * A @ B per target
    merged = lora.merge_many(params, [(lp1, 1.0), (lp2, 0.5)])
    lora.save('out_dir', lp)                          # out_dir/pytorch_lora_weights.safetensors
    lp = lora.load('out_dir', params)                 # also files of diffusers, peft, kohya-ss

Layout of `lora_params`: a nested dict that mirrors the *module* paths of `params` (the path of a
kernel without its final 'kernel'), with a `LoRA` node where the kernel would be:

    {'down_blocks_0': {'attentions_0': {...: {'attn1': {'to_q': LoRA(a, b, alpha)}}}}}

`LoRA` is a pytree whose only leaves are the factors `a` and `b`; `alpha` is static (aux data), so
`jax.grad`, optax (weight decay included) and sharding rules see just the trainable factors, and
the leaf paths read '<module path>/a' and '<module path>/b'. Factor shapes, in our kernel layouts:

    dense kernel (in, out):          a (in, r),          b (r, out)
    conv kernel (kh, kw, in, out):   a (kh, kw, in, r),  b (1, 1, r, out)   (peft's Conv2d LoRA:
                                     a conv with the base layer's geometry, then a 1x1 conv)

The update is delta_W = (alpha / r) * A @ B (conv: the composed kernel, summed over r), peft's
scaling without rsLoRA.

File layout (what `StableDiffusionPipeline.save_lora_weights` writes to
`pytorch_lora_weights.safetensors`): keys `<prefix>.<torch module>.lora_A.weight` and
`.lora_B.weight` in torch layouts (Linear: lora_A (r, in), lora_B (out, r); Conv2d: lora_A
(r, in, kh, kw), lora_B (out, r, 1, 1)); torch module names come from `models.convert`, the same
rule the model loaders use.
There are no alpha tensors: diffusers (0.42 checked) reads alpha and rank from the JSON string
under `lora_adapter_metadata` in the safetensors header, a flat dict of `LoraConfig` kwargs whose
keys carry the prefix (`unet.r`, `unet.lora_alpha`, `unet.rank_pattern`, `unet.alpha_pattern`, ...).
Without that entry diffusers uses alpha = r for every module (scaling 1), and so does `load`.
`save` writes this layout; `load` also reads peft's and kohya-ss's (`lora_formats`).
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from flax import core, struct, traverse_util

from diffgeo_jax.models import convert
from diffgeo_jax.training import lora_formats

WEIGHT_NAME = 'pytorch_lora_weights.safetensors'  # diffusers' LORA_WEIGHT_NAME_SAFE
METADATA_KEY = 'lora_adapter_metadata'  # diffusers' LORA_ADAPTER_METADATA_KEY

Path = tuple[str, ...]


@struct.dataclass
class LoRA:
  """Low-rank factors of one kernel: delta = (alpha / rank) * A @ B. Only `a`, `b` are leaves."""
  a: jax.Array
  b: jax.Array
  alpha: float = struct.field(pytree_node=False)

  @property
  def rank(self) -> int:
    return self.a.shape[-1]

  @property
  def scaling(self) -> float:
    return self.alpha / self.rank

  def delta(self) -> jax.Array:
    """(alpha / r) * A @ B in the kernel's layout, in float32 (or wider)."""
    dtype = jnp.promote_types(jnp.result_type(self.a, self.b), jnp.float32)
    a, b = self.a.astype(dtype), self.b.astype(dtype)
    # HIGHEST: the product is tiny, and a bf16 pass (the TPU default) would put ~1e-3 relative
    # error into every merged weight.
    hi = jax.lax.Precision.HIGHEST
    if a.ndim == 2:
      d = jnp.matmul(a, b, precision=hi)
    else:
      d = jnp.einsum('hwir,ro->hwio', a, b[0, 0], precision=hi)
    return d * jnp.asarray(self.scaling, dtype)


def _is_lora(x: Any) -> bool:
  return isinstance(x, LoRA)


def flatten(lora_params: Any) -> dict[Path, LoRA]:
  """{module path tuple: LoRA}."""
  if isinstance(lora_params, core.FrozenDict):
    lora_params = core.unfreeze(lora_params)
  flat = traverse_util.flatten_dict(lora_params)
  bad = [k for k, v in flat.items() if not _is_lora(v)]
  if bad:
    raise ValueError(f'not a LoRA parameter tree: {"/".join(bad[0])} holds '
                     f'{type(flat[bad[0]]).__name__}, expected LoRA')
  return flat


def unflatten(flat: Mapping[Path, LoRA]) -> dict:
  return traverse_util.unflatten_dict(dict(flat))


def _kernels(params: Any) -> dict[Path, tuple[int, ...]]:
  """{module path: kernel shape} of each 'kernel' leaf of `params` (arrays or ShapeDtypeStructs)."""
  flat = traverse_util.flatten_dict(params)
  return {k[:-1]: tuple(np.shape(v)) for k, v in flat.items() if k and k[-1] == 'kernel'}


def _compile_targets(targets: str | Sequence[str]) -> list[re.Pattern]:
  patterns = [targets] if isinstance(targets, str) else list(targets)
  if not patterns:
    raise ValueError('targets is empty: give a regex (or a list of regexes) of module paths')
  out = []
  for p in patterns:
    if not isinstance(p, str):
      raise ValueError(f'targets must be regex strings, got {p!r}')
    try:
      out.append(re.compile(p))
    except re.error as e:
      raise ValueError(f'targets regex {p!r} is invalid: {e}') from e
  return out


def _factor_shapes(kernel_shape: tuple[int, ...], rank: int) -> tuple[tuple, tuple]:
  if len(kernel_shape) == 2:
    n_in, n_out = kernel_shape
    return (n_in, rank), (rank, n_out)
  kh, kw, n_in, n_out = kernel_shape
  return (kh, kw, n_in, rank), (1, 1, rank, n_out)


def _check_alpha(alpha: Any) -> float:
  try:
    alpha = float(alpha)
  except (TypeError, ValueError):
    raise ValueError(f'alpha must be a positive number, got {alpha!r}') from None
  if not (math.isfinite(alpha) and alpha > 0):
    raise ValueError(f'alpha must be a positive finite number, got {alpha}')
  return alpha


def init(key: jax.Array, params: Any, rank: int, targets: str | Sequence[str],
         alpha: float | None = None, dtype: Any = jnp.float32) -> dict:
  """LoRA factors for every kernel whose module path matches `targets`, with B = 0.

  `targets`: a regex (or list of regexes, any may match) applied with `re.search` to the '/'-joined
  module path of each kernel, i.e. the parameter path without its final 'kernel', e.g.
  `r'attn1/to_(q|k|v|out_0)$'` for DUO's self-attention-only LoRA. Dense (2-D) and conv (4-D HWIO)
  kernels are supported. A ~ N(0, std=1/r) and B = 0, peft's `init_lora_weights="gaussian"`, so
  `merge(params, init(...)) == params` exactly. `alpha` defaults to `rank` (scaling 1). `params`
  may hold arrays or `jax.ShapeDtypeStruct`s: only shapes are read. `dtype`: of the factors (peft
  keeps LoRA in float32 under an fp16 base)."""
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
    raise ValueError(f'rank must be an integer >= 1, got {rank!r}')
  rank = int(rank)
  alpha = float(rank) if alpha is None else _check_alpha(alpha)
  regexes = _compile_targets(targets)
  kernels = _kernels(params)
  if not kernels:
    raise ValueError('params has no "kernel" leaves to adapt')
  chosen = sorted(p for p in kernels if any(r.search('/'.join(p)) for r in regexes))
  if not chosen:
    names = sorted('/'.join(p) for p in kernels)
    raise ValueError(f'targets {targets!r} match no kernel module path ({len(names)} available, '
                     f'e.g. {", ".join(names[:6])})')
  bad = [f'{"/".join(p)} {kernels[p]}' for p in chosen if len(kernels[p]) not in (2, 4)]
  if bad:
    raise ValueError(f'LoRA supports dense (2-D) and conv (4-D) kernels; targets also match {bad}')
  out = {}
  for k, path in zip(jax.random.split(key, len(chosen)), chosen):
    a_shape, b_shape = _factor_shapes(kernels[path], rank)
    # peft "gaussian": nn.init.normal_(lora_A.weight, std=1 / r); lora_B zeros.
    a = jax.random.normal(k, a_shape, dtype) / jnp.asarray(rank, dtype)
    out[path] = LoRA(a=a, b=jnp.zeros(b_shape, dtype), alpha=alpha)
  return unflatten(out)


def _check_fits(path: Path, lp: LoRA, kernel_shape: tuple[int, ...] | None) -> str | None:
  name = '/'.join(path)
  if kernel_shape is None:
    return f'{name} (no kernel there)'
  expected = _factor_shapes(kernel_shape, lp.rank) if len(kernel_shape) in (2, 4) else None
  if expected is None or (tuple(lp.a.shape), tuple(lp.b.shape)) != expected:
    return f'{name} (kernel {kernel_shape}, factors a {tuple(lp.a.shape)} b {tuple(lp.b.shape)})'
  return None


def merge_many(params: Any, loras: Iterable[tuple[Any, Any]]) -> Any:
  """params with W + sum_i weight_i * (alpha_i / r_i) * A_i @ B_i on every adapted kernel.

  The deltas are summed in float32 and added once, then cast back to W's dtype, so a low-precision
  base is rounded once. Pure; weights may be traced. Kernels that no LoRA touches are returned as
  they are (same objects)."""
  frozen = isinstance(params, core.FrozenDict)
  flat = traverse_util.flatten_dict(core.unfreeze(params) if frozen else params,
                                    keep_empty_nodes=True)
  kernels = {k[:-1]: tuple(np.shape(v)) for k, v in flat.items()
             if k and k[-1] == 'kernel' and v is not traverse_util.empty_node}
  deltas: dict[Path, jax.Array] = {}
  problems = []
  for lora_params, weight in loras:
    for path, lp in flatten(lora_params).items():
      problem = _check_fits(path, lp, kernels.get(path))
      if problem:
        problems.append(problem)
        continue
      d = weight * lp.delta()
      deltas[path] = d if path not in deltas else deltas[path] + d
  if problems:
    raise ValueError(f'LoRA factors do not fit params: {", ".join(problems)}')
  for path, d in deltas.items():
    w = flat[path + ('kernel',)]
    flat[path + ('kernel',)] = (w.astype(jnp.promote_types(w.dtype, d.dtype)) + d).astype(w.dtype)
  out = traverse_util.unflatten_dict(flat)
  return core.freeze(out) if frozen else out


def merge(params: Any, lora_params: Any, scale: Any = 1.0) -> Any:
  """params with W + scale * (alpha / r) * A @ B on every kernel that `lora_params` adapts."""
  return merge_many(params, [(lora_params, scale)])


# -- files -----------------------------------------------------------------------------------------

def _file_path(path: str | os.PathLike) -> str:
  path = os.fspath(path)
  return path if path.endswith('.safetensors') else os.path.join(path, WEIGHT_NAME)


def _number(x: float) -> int | float:
  return int(x) if float(x).is_integer() else float(x)


def _torch_module(path: Path) -> str:
  return convert.flax_prefix_to_torch_key(path)


def save(path: str | os.PathLike, lora_params: Any, prefix: str | None = 'unet',
         dtype: Any = None) -> str:
  """Writes `lora_params` in the diffusers + peft layout; returns the file written.

  `path`: a '.safetensors' file, or a folder that gets `pytorch_lora_weights.safetensors`.
  `prefix`: 'unet' / 'text_encoder' as the pipeline's `save_lora_weights` writes, or None for the
  bare keys of `ModelMixin.save_lora_adapter`. Rank and alpha go into the header's
  `lora_adapter_metadata` (most common r / alpha plus `rank_pattern` / `alpha_pattern` exceptions,
  keyed '^<torch module>' as diffusers does), so diffusers restores the same scaling.
  `dtype`: e.g. np.float16 to store smaller factors."""
  flat = flatten(jax.device_get(lora_params))
  if not flat:
    raise ValueError('lora_params is empty: nothing to save')
  tree = {}
  for p, lp in flat.items():
    tree[p + ('lora_A', 'kernel')] = np.asarray(lp.a)
    tree[p + ('lora_B', 'kernel')] = np.asarray(lp.b)
  # The models' own Flax -> torch rule gives names and layouts (dense .T, conv HWIO -> OIHW).
  state = convert.flax_to_torch(traverse_util.unflatten_dict(tree), dtype=dtype)
  pre = f'{prefix}.' if prefix else ''
  state = {pre + k: v for k, v in state.items()}

  ranks = {_torch_module(p): lp.rank for p, lp in flat.items()}
  alphas = {_torch_module(p): lp.alpha for p, lp in flat.items()}
  r = collections.Counter(ranks.values()).most_common(1)[0][0]
  alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
  config = {
      'r': r, 'lora_alpha': _number(alpha),
      'rank_pattern': {f'^{m}': v for m, v in sorted(ranks.items()) if v != r},
      'alpha_pattern': {f'^{m}': _number(v) for m, v in sorted(alphas.items()) if v != alpha},
      'target_modules': sorted(ranks), 'use_rslora': False, 'use_dora': False, 'lora_bias': False,
      'peft_type': 'LORA',
  }
  metadata = {'format': 'pt',
              METADATA_KEY: json.dumps({pre + k: v for k, v in config.items()}, indent=2,
                                       sort_keys=True)}
  file = _file_path(path)
  os.makedirs(os.path.dirname(file) or '.', exist_ok=True)
  safetensors.numpy.save_file(state, file, metadata=metadata)
  return file


def _pattern_key(patterns: Mapping[str, Any], name: str) -> str | None:
  """peft's `get_pattern_key`: the first pattern that matches a dotted suffix of `name`."""
  for key in patterns:
    if re.match(rf'(.*\.)?({key})$', name):
      return key
  return None


def read_file(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict | None]:
  """(tensors as stored, parsed `lora_adapter_metadata` header or None) of a LoRA safetensors file,
  or of the one in a folder (`pytorch_lora_weights.safetensors`, else peft's
  `adapter_model.safetensors`)."""
  file, _ = lora_formats.find(path, WEIGHT_NAME)
  try:
    tensors = safetensors.numpy.load_file(file)
    with safetensors.safe_open(file, framework='np') as f:
      header = f.metadata() or {}
  except Exception as e:  # safetensors raises several types for a corrupt file
    raise ValueError(f'cannot read safetensors file {file}: {e}') from e
  raw = header.get(METADATA_KEY)
  try:
    return tensors, (json.loads(raw) if raw else None)
  except json.JSONDecodeError as e:
    raise ValueError(f'{file}: {METADATA_KEY} in the header is not JSON: {e}') from e


def load(path: str | os.PathLike, params: Any, prefix: str | None = 'unet',
         dtype: Any = jnp.float32) -> dict:
  """LoRA params from a LoRA file or folder as diffusers, peft or kohya-ss write them, for the model
  whose `params` (arrays or ShapeDtypeStructs) are given. The layouts (`lora_formats`):

  - diffusers pipeline files: `<prefix>.<module>.lora_A.weight`; keys under other prefixes (e.g.
    'text_encoder.' when prefix='unet') are ignored; older names (`.lora.down` / `.lora.up`,
    `to_q_lora.down`, `lora_linear_layer`) are read too. Alpha from the header's
    `lora_adapter_metadata` (`lora_alpha`, `alpha_pattern`; `use_rslora` is folded into alpha),
    else alpha = r, as diffusers assumes.
  - bare peft keys `<module>.lora_A.weight` (`get_peft_model_state_dict`, `save_lora_adapter`),
    and peft's `save_pretrained` folder (`adapter_model.safetensors`, keys
    `base_model.model.<module>...`, with r / lora_alpha / patterns from `adapter_config.json`):
    one model's adapter, loaded whatever `prefix` says.
  - kohya-ss files (`lora_unet_<module>.lora_down.weight` / `.lora_up.weight` / `.alpha`, module
    names underscored, SD or sgm block names): the keys of `prefix` ('unet': `lora_unet_`,
    'text_encoder': `lora_te_` / `lora_te1_`, 'text_encoder_2': `lora_te2_`; the others are
    ignored), resolved against the module names of `params`; alpha from each `.alpha`, else r.

  Rank comes from the tensor shapes. Raises `convert.CheckpointMismatchError` listing every unknown
  module, missing factor and wrong shape (`lora_formats.KohyaKeyError` for kohya names)."""
  file, peft_config = lora_formats.find(path, WEIGHT_NAME)
  tensors, metadata = read_file(file)
  kernels = _kernels(params)
  state, config, kohya_alphas = lora_formats.select(
      tensors, metadata, peft_config, prefix, [_torch_module(p) for p in kernels], file)
  if config.get('use_dora'):
    raise ValueError(f'{file} holds a DoRA adapter (use_dora), which is not plain LoRA')

  key_re = re.compile(r'^(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$')
  modules: dict[str, dict[str, np.ndarray]] = {}
  for k, v in state.items():
    m = key_re.match(k)
    if m:
      modules.setdefault(m.group('module'), {})[m.group('factor')] = v
  target = {}
  for module, factors in modules.items():
    path = convert.torch_key_to_flax_prefix(f'{module}.weight')
    shape = kernels.get(path)
    if shape is None or len(shape) not in (2, 4):
      continue  # its keys stay unmatched and are reported as unexpected
    some = factors.get('A', factors.get('B'))
    rank = int(some.shape[0] if 'A' in factors else some.shape[1])
    a_shape, b_shape = _factor_shapes(shape, rank)
    target[path + ('lora_A', 'kernel')] = jax.ShapeDtypeStruct(a_shape, dtype)
    target[path + ('lora_B', 'kernel')] = jax.ShapeDtypeStruct(b_shape, dtype)
  # The models' torch -> Flax rule: names, transposes, dtype cast, and one error for all problems.
  flat = traverse_util.flatten_dict(convert.torch_to_flax(
      state, traverse_util.unflatten_dict(target), source=f'LoRA file {file} (prefix {prefix!r})'))

  rank_pattern = config.get('rank_pattern') or {}
  alpha_pattern = config.get('alpha_pattern') or {}
  out, inconsistent = {}, []
  for key in sorted(flat):
    if key[-2] != 'lora_A':
      continue
    path = key[:-2]
    a, b = flat[key], flat[path + ('lora_B', 'kernel')]
    rank, name = a.shape[-1], _torch_module(path)
    if kohya_alphas is not None:
      out[path] = LoRA(a=jnp.asarray(a), b=jnp.asarray(b),
                       alpha=_check_alpha(kohya_alphas.get(name, rank)))
      continue
    if 'r' in config:
      rk = _pattern_key(rank_pattern, name)
      if int(rank_pattern[rk] if rk is not None else config['r']) != rank:
        inconsistent.append(f'{name} (tensors rank {rank})')
    if config:
      # diffusers builds LoraConfig(**metadata), so a missing lora_alpha is peft's default, 8.
      ak = _pattern_key(alpha_pattern, name)
      alpha = float(alpha_pattern[ak] if ak is not None else config.get('lora_alpha', 8))
      if config.get('use_rslora'):
        alpha *= math.sqrt(rank)  # rsLoRA scales by alpha / sqrt(r) = (alpha * sqrt(r)) / r
    else:
      alpha = float(rank)
    out[path] = LoRA(a=jnp.asarray(a), b=jnp.asarray(b), alpha=_check_alpha(alpha))
  if inconsistent:
    raise ValueError(f'{file}: the adapter config (header metadata or adapter_config.json) gives '
                     f'other ranks than the tensors for {", ".join(inconsistent)}')
  return unflatten(out)
