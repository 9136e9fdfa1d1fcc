"""Attention and the spatial transformer of Stable Diffusion, mirroring diffusers' modules.

`dot_product_attention` is the one place attention is computed. Its default `impl='softmax'` is a
plain einsum/softmax that supports forward- and reverse-mode AD everywhere (the latent-geometry
work runs `jax.jvp` through the whole UNet); `impl='jax'` hands the same computation to
`jax.nn.dot_product_attention`, which can pick a fused kernel (cuDNN) on GPU. `impl='flash'` is
for TPUs: the Pallas flash-attention kernel (`jax.experimental.pallas.ops.tpu.flash_attention`)
for attention maps whose query and key lengths are multiples of 128 and heads at most 128 wide
(or a multiple of 128) (SD's self-attention), the softmax path elsewhere and off TPU. It never
holds the (Lq, Lk) scores: on the TPU compiler an SD-1.5 64x64 self-attention (batch 2, bf16)
holds 0 bytes of temporaries instead of 1 GiB and reads 0.15 GB instead of 3.3 GB. Under a mesh
(`partitioned`) it runs per device in `shard_map`: XLA cannot partition a Pallas kernel. It has a reverse-mode derivative (training) but
no forward-mode one: the latent-geometry code (jvp, linearize) keeps 'softmax'.
"""

from __future__ import annotations

import contextlib
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffgeo_jax.models.layers import Dtype, conv, group_norm, layer_norm

ATTENTION_IMPLS = ('softmax', 'jax', 'flash')


def check_attention_impl(impl: str) -> None:
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f'attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}')


# Above this many attention scores (B * H * Lq * Lk) per call, queries are processed in chunks.
# The full score tensor (SD-1.5 at 64x64: 8 heads x 4096^2 = 134M floats) would make several
# round trips through main memory; chunks of about 2^21 scores stay in cache. Long keys (Lk >= 4096,
# SD's 64x64 self-attention) get twice the budget: fewer, longer chunks were measurably faster there
# (BENCHMARKS.md: 2^21 vs 2^22 on 2 CPU cores), while 2^22 slowed the 32x32 (Lk = 1024) case.
MAX_SCORES_PER_CHUNK = 2 ** 21

# Under differentiation (jvp, linearize, grad) every score-sized intermediate (dS, P * dS) is
# multiplied by the tangents pushed through at once: the latent-geometry code vmaps 5-10 directions
# through one linearised U-Net. Chunks sized for the forward then fall out of cache, and the JVP
# of a 2^21-score chunk ran 3-4x slower than that of 2^16-score chunks (BENCHMARKS.md, "pullback").
# So derivatives get their own, smaller budget per primal chunk, split over heads as well as
# queries when one query row over all heads is already large (SD's 4096 keys x 8 heads), with at
# least MIN_AD_QUERY_CHUNK queries so that the products stay matrix-matrix.
# Attention maps of at most AD_UNCHUNKED_SCORES per sample (all heads; e.g. 16x16 tokens) keep
# the forward's chunking: a training step's gradient (one tangent) through them gains nothing from
# a loop of small chunks.
AD_SCORES_PER_CHUNK = 2 ** 16
MIN_AD_QUERY_CHUNK = 8
AD_UNCHUNKED_SCORES = 2 ** 18

# GPUs and TPUs have no cache for chunks to fit in, and a `lax.map` over chunks serialises work
# the chip would do at once: with the CPU budgets a DUO step on the SD-1.5 UNet ran 4x slower
# than diffusers on an H100 (BENCHMARKS.md). There the only limit is memory: one chunk of at
# most this many scores (1 GiB in float32), forward and derivatives alike.
ACCELERATOR_SCORES_PER_CHUNK = 2 ** 28


_TARGET_PLATFORM: str | None = None
_MESH = None  # the mesh a jitted program's batch is split over (see `partitioned`)


@contextlib.contextmanager
def partitioned(mesh):
  """While a program over `mesh` is traced (the trainer's step, the pipeline's sampler): a Pallas
  kernel cannot be partitioned by XLA, so the flash path runs it per device under `shard_map`,
  the batch split over the mesh's 'data' axis. None (or one device): called directly."""
  global _MESH
  previous, _MESH = _MESH, mesh
  try:
    yield
  finally:
    _MESH = previous


@contextlib.contextmanager
def compiling_for(platform: str):
  """Within it, traced attention picks the chunking of `platform` ('cpu', 'tpu', 'gpu') instead of
  the default backend's: ahead-of-time compilation of a TPU program on a CPU host
  (`diffgeo_jax.aot`) must trace what the TPU would run, not the CPU's cache-sized chunks."""
  global _TARGET_PLATFORM
  if platform not in ('cpu', 'tpu', 'gpu'):
    raise ValueError(f"platform must be 'cpu', 'tpu' or 'gpu', got {platform!r}")
  previous, _TARGET_PLATFORM = _TARGET_PLATFORM, platform
  try:
    yield
  finally:
    _TARGET_PLATFORM = previous


def _platform() -> str:
  return _TARGET_PLATFORM or jax.default_backend()


def _on_accelerator() -> bool:
  return _platform() != 'cpu'


FLASH_BLOCK = 128  # the TPU kernel's tile along the sequences


def _flash_applies(q, k, mask) -> bool:
  """The kernel's limits: sequence lengths in whole tiles, a head dimension of at most 128 or a
  multiple of it (SD-1.5's 160-wide heads at 16x16 keep the softmax path: 256 tokens)."""
  d = q.shape[-1]
  return (_platform() == 'tpu' and mask is None and q.shape[1] % FLASH_BLOCK == 0
          and k.shape[1] % FLASH_BLOCK == 0 and (d <= 128 or d % 128 == 0))


# A 'highest' matmul precision (DUO's loss sets it, for float32 passes) asks Mosaic for float32
# passes on bf16 tiles, which it refuses ("Bad lhs type"); for bf16 operands it means nothing. The
# kernels read the precision when they are traced, and the forward and backward kernels are traced
# later than the call (transposition, and remat's recomputation), under whatever context is active
# then: so both rules set it themselves.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _default_precision(fn, q, k, v):
  with jax.default_matmul_precision('default'):
    return fn(q, k, v)


def _default_precision_fwd(fn, q, k, v):
  with jax.default_matmul_precision('default'):
    return jax.vjp(fn, q, k, v)


def _default_precision_bwd(fn, vjp, g):
  with jax.default_matmul_precision('default'):
    return vjp(g)


_default_precision.defvjp(_default_precision_fwd, _default_precision_bwd)


def _flash_attention(q, k, v, scale):
  """The Pallas TPU flash-attention kernel on (B, L, H, D) arrays (it takes (B, H, L, D)); its
  softmax statistics are float32 whatever the input dtype."""
  from jax.experimental.pallas.ops.tpu import flash_attention as fa  # noqa: PLC0415 (TPU only)
  heads_first = lambda t: jnp.swapaxes(t, 1, 2)
  flash = functools.partial(fa.flash_attention, sm_scale=scale)
  if jnp.finfo(q.dtype).bits < 32:
    flash = functools.partial(_default_precision, flash)

  def kernel(q, k, v):
    out = flash(heads_first(q), heads_first(k), heads_first(v))
    return heads_first(out).astype(q.dtype)

  mesh = _MESH
  if mesh is None or mesh.devices.size == 1:
    return kernel(q, k, v)
  if q.shape[0] % mesh.shape['data']:
    return _attention(q, k, v, scale, True)  # a batch the data axis does not split
  spec = jax.sharding.PartitionSpec('data')
  return jax.shard_map(kernel, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(q, k, v)


def score_budget(lk: int) -> int:
  """Scores per query chunk of the forward pass for keys of length `lk`."""
  return MAX_SCORES_PER_CHUNK * (2 if lk >= 4096 else 1)


def forward_chunks(b: int, lq: int, h: int, lk: int) -> tuple[int, int]:
  """(heads, queries) per chunk of the forward pass: all heads, queries up to `score_budget`
  (`ACCELERATOR_SCORES_PER_CHUNK` off the CPU)."""
  budget = ACCELERATOR_SCORES_PER_CHUNK if _on_accelerator() else score_budget(lk)
  return h, min(lq, max(1, budget // (b * h * lk)))


def ad_chunks(b: int, lq: int, h: int, lk: int) -> tuple[int, int]:
  """(heads, queries) per chunk under differentiation (see AD_SCORES_PER_CHUNK; off the CPU the
  forward's chunks)."""
  if h * lq * lk <= AD_UNCHUNKED_SCORES or _on_accelerator():
    return forward_chunks(b, lq, h, lk)
  rows = max(1, AD_SCORES_PER_CHUNK // (b * lk))  # (head, query) rows per chunk
  heads = h if rows >= h * MIN_AD_QUERY_CHUNK else 1
  return heads, min(lq, max(MIN_AD_QUERY_CHUNK, rows // heads))


def _softmax_attention(q, k, v, scale, mask, upcast):
  """Plain softmax attention; the normalisation divides the (.., Lq, D) output rather than the
  (.., Lq, Lk) weights, one pass less over the scores."""
  dtype = q.dtype
  wide = jnp.promote_types(dtype, jnp.float32)  # at least float32; float64 stays float64
  if upcast:
    q, k = q.astype(wide), k.astype(wide)
  scores = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(wide) * scale
  if mask is not None:
    scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
  scores = scores - jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True))
  p = jnp.exp(scores)
  denom = jnp.swapaxes(p.sum(axis=-1), 1, 2)[..., None]  # (B, Lq, H, 1)
  out = jnp.einsum('bhqk,bkhd->bqhd', p.astype(v.dtype), v)
  return (out / denom.astype(out.dtype)).astype(dtype)


def _chunked_attention(q, k, v, scale, upcast, heads: int, queries: int):
  """`_softmax_attention` over chunks of `heads` heads x `queries` queries (`lax.map`; one call if
  the chunk is everything). Same maths in any AD mode; only the memory traffic differs."""
  b, lq, h, d = q.shape
  if heads >= h and queries >= lq:
    return _softmax_attention(q, k, v, scale, None, upcast)
  nh, nq = h // heads, -(-lq // queries)
  q = jnp.pad(q, ((0, 0), (0, nq * queries - lq), (0, 0), (0, 0)))
  # (nh, nq, B, queries, heads, D) and (nh, B, Lk, heads, D): head groups outside, then queries.
  qs = q.reshape(b, nq, queries, nh, heads, d).transpose(3, 1, 0, 2, 4, 5)
  split = lambda t: t.reshape(b, t.shape[1], nh, heads, t.shape[-1]).transpose(2, 0, 1, 3, 4)
  ks, vs = split(k), split(v)

  def head_group(args):
    qg, kg, vg = args
    return jax.lax.map(lambda qc: _softmax_attention(qc, kg, vg, scale, None, upcast), qg)

  out = head_group((qs[0], ks[0], vs[0]))[None] if nh == 1 else jax.lax.map(head_group,
                                                                             (qs, ks, vs))
  dv = out.shape[-1]
  return out.transpose(2, 1, 3, 0, 4, 5).reshape(b, nq * queries, h, dv)[:, :lq]


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _attention(q, k, v, scale, upcast):
  return _chunked_attention(q, k, v, scale, upcast, *forward_chunks(q.shape[0], q.shape[1],
                                                                    q.shape[2], k.shape[1]))


@functools.partial(_attention.defjvp, symbolic_zeros=True)
def _attention_jvp(scale, upcast, primals, tangents):
  # The same function, chunked for derivatives; inputs without a tangent (k and v of
  # cross-attention, whose context is not differentiated) stay constants instead of zeros.
  chunks = ad_chunks(primals[0].shape[0], primals[0].shape[1], primals[0].shape[2],
                     primals[1].shape[1])
  live = [i for i, t in enumerate(tangents)
          if not isinstance(t, jax.custom_derivatives.SymbolicZero)]
  if not live:  # nothing differentiated: the value and a zero tangent
    out = _chunked_attention(*primals, scale, upcast, *chunks)
    return out, jnp.zeros_like(out)

  def f(*args):
    full = list(primals)
    for i, a in zip(live, args):
      full[i] = a
    return _chunked_attention(*full, scale, upcast, *chunks)

  return jax.jvp(f, tuple(primals[i] for i in live), tuple(tangents[i] for i in live))


def dot_product_attention(q, k, v, *, scale: float, mask=None, upcast: bool = True,
                          impl: str = 'softmax'):
  """q (B, Lq, H, D), k/v (B, Lk, H, D) -> (B, Lq, H, D). `mask` (B, 1 or H, Lq, Lk) boolean, True
  = attend. Scores and softmax are computed in float32 when `upcast` (the default, so bf16
  activations keep a stable softmax). Long sequences are processed in chunks with `lax.map`:
  `forward_chunks` for the value, `ad_chunks` (smaller) for its derivatives."""
  if impl == 'jax':
    return jax.nn.dot_product_attention(q, k, v, scale=scale, mask=mask)
  check_attention_impl(impl)
  if impl == 'flash' and _flash_applies(q, k, mask):
    return _flash_attention(q, k, v, scale)
  if mask is not None:
    return _softmax_attention(q, k, v, scale, mask, upcast)
  return _attention(q, k, v, scale, upcast)


class Attention(nn.Module):
  """diffusers `Attention` (the subset SD uses): multi-head attention with optional cross-attention
  context, and the VAE variant with an input GroupNorm and a residual connection."""
  query_dim: int
  heads: int = 8
  dim_head: int = 64
  cross_attention_dim: int | None = None
  bias: bool = False
  out_bias: bool = True
  upcast_attention: bool = False
  norm_num_groups: int | None = None
  eps: float = 1e-5
  residual_connection: bool = False
  rescale_output_factor: float = 1.0
  attention_impl: str = 'softmax'
  dtype: Dtype = jnp.float32

  def setup(self):
    inner = self.heads * self.dim_head
    if self.norm_num_groups is not None:
      self.group_norm = group_norm(self.norm_num_groups, self.eps, self.dtype)
    self.to_q = nn.Dense(inner, use_bias=self.bias, dtype=self.dtype)
    self.to_k = nn.Dense(inner, use_bias=self.bias, dtype=self.dtype)
    self.to_v = nn.Dense(inner, use_bias=self.bias, dtype=self.dtype)
    self.to_out_0 = nn.Dense(self.query_dim, use_bias=self.out_bias, dtype=self.dtype)

  def __call__(self, x, context=None):
    residual, spatial = x, x.shape
    if x.ndim == 4:  # (B, H, W, C) -> (B, HW, C)
      x = x.reshape(spatial[0], -1, spatial[-1])
    if self.norm_num_groups is not None:
      x = self.group_norm(x)
    context = x if context is None else context
    b = x.shape[0]
    split = lambda t: t.reshape(b, t.shape[1], self.heads, self.dim_head)
    q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
    out = dot_product_attention(q, k, v, scale=self.dim_head ** -0.5, impl=self.attention_impl)
    out = self.to_out_0(out.reshape(b, -1, self.heads * self.dim_head))
    if len(spatial) == 4:
      out = out.reshape(spatial)
    if self.residual_connection:
      out = out + residual
    return out / self.rescale_output_factor


class GEGLU(nn.Module):
  """Gated GELU: proj to 2*dim_out, value * gelu(gate) (exact gelu, as torch's F.gelu)."""
  dim_out: int
  bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h, gate = jnp.split(nn.Dense(2 * self.dim_out, use_bias=self.bias, dtype=self.dtype,
                                 name='proj')(x), 2, axis=-1)
    return h * nn.gelu(gate, approximate=False)


class GELU(nn.Module):
  dim_out: int
  approximate: bool = False
  bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(self.dim_out, use_bias=self.bias, dtype=self.dtype, name='proj')(x)
    return nn.gelu(h, approximate=self.approximate)


class FeedForward(nn.Module):
  """net.0 = (GEGLU | GELU), net.1 = dropout (no parameters), net.2 = Linear."""
  dim: int
  mult: int = 4
  activation_fn: str = 'geglu'
  inner_dim: int | None = None
  bias: bool = True
  dtype: Dtype = jnp.float32

  def setup(self):
    inner = self.inner_dim or self.dim * self.mult
    if self.activation_fn == 'geglu':
      self.net_0 = GEGLU(inner, bias=self.bias, dtype=self.dtype)
    elif self.activation_fn in ('gelu', 'gelu-approximate'):
      self.net_0 = GELU(inner, approximate=self.activation_fn == 'gelu-approximate', bias=self.bias,
                        dtype=self.dtype)
    else:
      raise NotImplementedError(f'feed-forward activation_fn={self.activation_fn!r} is not supported')
    self.net_2 = nn.Dense(self.dim, use_bias=self.bias, dtype=self.dtype)

  def __call__(self, x):
    return self.net_2(self.net_0(x))


class BasicTransformerBlock(nn.Module):
  """Self-attention, cross-attention, feed-forward; each pre-LayerNorm with a residual."""
  dim: int
  heads: int
  dim_head: int
  cross_attention_dim: int | None = None
  activation_fn: str = 'geglu'
  attention_bias: bool = False
  only_cross_attention: bool = False
  upcast_attention: bool = False
  norm_eps: float = 1e-5
  attention_impl: str = 'softmax'
  dtype: Dtype = jnp.float32

  def setup(self):
    attn = dict(query_dim=self.dim, heads=self.heads, dim_head=self.dim_head, bias=self.attention_bias,
                upcast_attention=self.upcast_attention, attention_impl=self.attention_impl,
                dtype=self.dtype)
    self.norm1 = layer_norm(self.norm_eps, self.dtype)
    self.attn1 = Attention(
        cross_attention_dim=self.cross_attention_dim if self.only_cross_attention else None, **attn)
    self.norm2 = layer_norm(self.norm_eps, self.dtype)
    self.attn2 = Attention(cross_attention_dim=self.cross_attention_dim, **attn)
    self.norm3 = layer_norm(self.norm_eps, self.dtype)
    self.ff = FeedForward(self.dim, activation_fn=self.activation_fn, dtype=self.dtype)

  def __call__(self, x, context):
    x = self.attn1(self.norm1(x), context if self.only_cross_attention else None) + x
    x = self.attn2(self.norm2(x), context) + x
    return self.ff(self.norm3(x)) + x


class Transformer2DModel(nn.Module):
  """GroupNorm -> proj_in (1x1 conv, or Linear when `use_linear_projection`) -> transformer
  blocks -> proj_out, plus the input as residual. Input and output (B, H, W, C)."""
  num_attention_heads: int
  attention_head_dim: int
  in_channels: int
  num_layers: int = 1
  cross_attention_dim: int | None = None
  norm_num_groups: int = 32
  use_linear_projection: bool = False
  only_cross_attention: bool = False
  upcast_attention: bool = False
  attention_impl: str = 'softmax'
  dtype: Dtype = jnp.float32

  def setup(self):
    inner = self.num_attention_heads * self.attention_head_dim
    self.norm = group_norm(self.norm_num_groups, 1e-6, self.dtype)
    if self.use_linear_projection:
      self.proj_in = nn.Dense(inner, dtype=self.dtype)
      self.proj_out = nn.Dense(self.in_channels, dtype=self.dtype)
    else:
      self.proj_in = conv(inner, 1, self.dtype)
      self.proj_out = conv(self.in_channels, 1, self.dtype)
    self.transformer_blocks = [
        BasicTransformerBlock(inner, self.num_attention_heads, self.attention_head_dim,
                              cross_attention_dim=self.cross_attention_dim,
                              only_cross_attention=self.only_cross_attention,
                              upcast_attention=self.upcast_attention,
                              attention_impl=self.attention_impl, dtype=self.dtype)
        for _ in range(self.num_layers)
    ]

  def __call__(self, x, context):
    b, h, w, c = x.shape
    residual = x
    x = self.norm(x)
    # A 1x1 conv and a Linear are the same map on NHWC; only the parameter layout differs.
    x = self.proj_in(x).reshape(b, h * w, -1)
    for block in self.transformer_blocks:
      x = block(x, context)
    x = self.proj_out(x.reshape(b, h, w, -1))
    return x + residual
