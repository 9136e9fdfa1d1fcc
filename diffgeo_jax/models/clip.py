"""The CLIP text encoder of Stable Diffusion (transformers `CLIPTextModel[WithProjection]`), linen.

Attribute names equal the PyTorch ones, so a checkpoint maps onto the params tree by the rule of
`convert.py`. The tree always has the `text_model/` level of the checkpoints on disk (SD 1.x/2.x
`text_encoder`, SDXL `text_encoder_2`). transformers 5 drops that prefix from an in-memory
`CLIPTextModel.state_dict()` (and adds it back when loading): `TORCH_RENAMES` accepts both.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from diffgeo_jax.models import config_utils, convert
from diffgeo_jax.models.attention import dot_product_attention
from diffgeo_jax.models.layers import Dtype, get_activation, layer_norm

WEIGHTS_NAME = 'model.safetensors'
# Checkpoints written before transformers 4.31 saved the `position_ids` buffer.
TORCH_IGNORE_KEYS = (r'position_ids$',)
# transformers 5 state dicts of a bare `CLIPTextModel` have no `text_model.` prefix.
TORCH_RENAMES = ((r'^(?!text_model\.|text_projection\.)', 'text_model.'),)

# Config keys that do not change the forward pass: regularisation, init, bookkeeping, and the
# generation / head options every transformers 4 `PretrainedConfig.to_dict()` wrote out.
_IGNORED_KEYS = frozenset({
    'dropout', 'attention_dropout', 'initializer_range', 'initializer_factor', 'architectures',
    'torch_dtype', 'dtype', 'transformers_version', 'output_attentions',
    'output_hidden_states', 'return_dict', 'use_return_dict', 'torchscript', 'use_bfloat16',
    'gradient_checkpointing', 'chunk_size_feed_forward', 'is_encoder_decoder', 'is_decoder',
    'add_cross_attention', 'cross_attention_hidden_size', 'tie_encoder_decoder',
    'tie_word_embeddings', 'id2label', 'label2id', 'num_labels', 'problem_type', 'finetuning_task',
    'tokenizer_class', 'prefix', 'task_specific_params', 'sep_token_id', 'decoder_start_token_id',
    'bad_words_ids', 'begin_suppress_tokens', 'suppress_tokens', 'diversity_penalty', 'do_sample',
    'early_stopping', 'encoder_no_repeat_ngram_size', 'exponential_decay_length_penalty',
    'forced_bos_token_id', 'forced_eos_token_id', 'length_penalty', 'max_length', 'min_length',
    'no_repeat_ngram_size', 'num_beam_groups', 'num_beams', 'num_return_sequences', 'output_scores',
    'remove_invalid_values', 'repetition_penalty', 'return_dict_in_generate', 'temperature',
    'top_k', 'top_p', 'typical_p', 'tf_legacy_loss', 'name_or_path',
})
# Pruned heads change the weight shapes; we only build the unpruned model.
_UNSUPPORTED = {'model_type': 'clip_text_model', 'pruned_heads': ({}, None)}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """The fields of transformers' `CLIPTextConfig` that shape the forward pass (same defaults)."""
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  projection_dim: int = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  pad_token_id: int = 1
  bos_token_id: int = 49406
  eos_token_id: int = 49407

  def __post_init__(self):
    get_activation(self.hidden_act)  # ValueError (-> ConfigError) for an activation we lack
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f'hidden_size={self.hidden_size} is not a multiple of '
                       f'num_attention_heads={self.num_attention_heads}')
    if not isinstance(self.eos_token_id, int):
      raise ValueError(f'eos_token_id must be an integer, got {self.eos_token_id!r}')

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], source: str = 'config') -> CLIPTextConfig:
    if isinstance(d, Mapping) and 'text_config' in d:
      raise config_utils.ConfigError(
          f'{source} is a full CLIPConfig; pass its "text_config" entry instead')
    return config_utils.from_dict(cls, d, source, ignored=_IGNORED_KEYS, unsupported=_UNSUPPORTED)

  def to_dict(self, architecture: str = 'CLIPTextModel') -> dict:
    """A config.json dict that transformers loads (`CLIPTextConfig(**d)` / `from_pretrained`)."""
    return {'architectures': [architecture], 'model_type': 'clip_text_model',
            **dataclasses.asdict(self)}


@flax.struct.dataclass
class CLIPTextOutput:
  last_hidden_state: jax.Array  # (B, L, D), after final_layer_norm
  pooled: jax.Array  # (B, D): last_hidden_state at the EOS token (transformers' pooler_output)
  # num_hidden_layers + 1 arrays: the embeddings, then each layer's output (no final_layer_norm).
  hidden_states: tuple[jax.Array, ...] | None = None
  text_embeds: jax.Array | None = None  # (B, projection_dim), WithProjection only


class CLIPTextEmbeddings(nn.Module):
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    c = self.config
    self.token_embedding = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype)
    self.position_embedding = nn.Embed(c.max_position_embeddings, c.hidden_size, dtype=self.dtype)

  def __call__(self, input_ids):
    positions = jnp.arange(input_ids.shape[1])[None, :]
    return self.token_embedding(input_ids) + self.position_embedding(positions)


class CLIPAttention(nn.Module):
  config: CLIPTextConfig
  attention_impl: str = 'softmax'
  dtype: Dtype = jnp.float32

  def setup(self):
    d = self.config.hidden_size
    self.q_proj = nn.Dense(d, dtype=self.dtype)
    self.k_proj = nn.Dense(d, dtype=self.dtype)
    self.v_proj = nn.Dense(d, dtype=self.dtype)
    self.out_proj = nn.Dense(d, dtype=self.dtype)

  def __call__(self, x, mask):
    b, length, d = x.shape
    heads = self.config.num_attention_heads
    split = lambda t: t.reshape(b, length, heads, d // heads)
    out = dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                                scale=(d // heads) ** -0.5, mask=mask, impl=self.attention_impl)
    return self.out_proj(out.reshape(b, length, d))


class CLIPMLP(nn.Module):
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32

  def setup(self):
    self.fc1 = nn.Dense(self.config.intermediate_size, dtype=self.dtype)
    self.fc2 = nn.Dense(self.config.hidden_size, dtype=self.dtype)

  def __call__(self, x):
    return self.fc2(get_activation(self.config.hidden_act)(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
  """Pre-LayerNorm block: x + attn(ln1(x)), then x + mlp(ln2(x))."""
  config: CLIPTextConfig
  attention_impl: str = 'softmax'
  dtype: Dtype = jnp.float32

  def setup(self):
    eps = self.config.layer_norm_eps
    self.self_attn = CLIPAttention(self.config, self.attention_impl, self.dtype)
    self.layer_norm1 = layer_norm(eps, self.dtype)
    self.mlp = CLIPMLP(self.config, self.dtype)
    self.layer_norm2 = layer_norm(eps, self.dtype)

  def __call__(self, x, mask):
    x = x + self.self_attn(self.layer_norm1(x), mask)
    return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
  config: CLIPTextConfig
  attention_impl: str = 'softmax'
  dtype: Dtype = jnp.float32

  def setup(self):
    self.layers = [CLIPEncoderLayer(self.config, self.attention_impl, self.dtype)
                   for _ in range(self.config.num_hidden_layers)]

  def __call__(self, x, mask):
    """Returns the last layer's output and all states (input first), as transformers records."""
    states = [x]
    for layer in self.layers:
      x = layer(x, mask)
      states.append(x)
    return x, tuple(states)


def _check_inputs(config: CLIPTextConfig, input_ids, attention_mask) -> None:
  # Shapes and dtypes are static, so these checks also hold under jit.
  dtype = jnp.result_type(input_ids)
  if not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f'input_ids must hold integer token ids, got dtype {dtype}')
  shape = jnp.shape(input_ids)
  if len(shape) != 2 or not 1 <= shape[1] <= config.max_position_embeddings:
    raise ValueError(f'input_ids must have shape (batch, length) with 1 <= length <= '
                     f'max_position_embeddings={config.max_position_embeddings}, got {shape}')
  if attention_mask is not None and jnp.shape(attention_mask) != shape:
    raise ValueError(f'attention_mask must have the shape of input_ids {shape}, '
                     f'got {jnp.shape(attention_mask)}')


class CLIPTextTransformer(nn.Module):
  """embeddings -> encoder -> final_layer_norm, pooled at the EOS token (the `text_model` level)."""
  config: CLIPTextConfig
  attention_impl: str = 'softmax'
  dtype: Dtype = jnp.float32

  def setup(self):
    self.embeddings = CLIPTextEmbeddings(self.config, self.dtype)
    self.encoder = CLIPEncoder(self.config, self.attention_impl, self.dtype)
    self.final_layer_norm = layer_norm(self.config.layer_norm_eps, self.dtype)

  def __call__(self, input_ids, attention_mask=None, output_hidden_states=True):
    _check_inputs(self.config, input_ids, attention_mask)
    b, length = input_ids.shape
    # The text encoder is causal; a padding mask only hides keys.
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
    if attention_mask is not None:
      mask = mask & (attention_mask != 0)[:, None, None, :]
    x, states = self.encoder(self.embeddings(input_ids), mask)
    last = self.final_layer_norm(x)
    if self.config.eos_token_id == 2:
      # Legacy configs (before transformers PR #24773): EOS is the highest id in the vocabulary.
      eos_pos = jnp.argmax(input_ids, axis=-1)
    else:
      # The first EOS: pad_token may equal eos_token. argmax returns the first maximum, as torch.
      eos_pos = jnp.argmax((input_ids == self.config.eos_token_id).astype(jnp.int32), axis=-1)
    pooled = last[jnp.arange(b), eos_pos]
    return CLIPTextOutput(last_hidden_state=last, pooled=pooled,
                          hidden_states=states if output_hidden_states else None)


class CLIPTextModel(nn.Module):
  """transformers `CLIPTextModel`. `dtype=jnp.bfloat16` computes activations in bf16 (params stay
  float32; LayerNorm statistics and the softmax are float32)."""
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  attention_impl: str = 'softmax'

  def setup(self):
    self.text_model = CLIPTextTransformer(self.config, self.attention_impl, self.dtype)

  def __call__(self, input_ids, attention_mask=None, output_hidden_states=True) -> CLIPTextOutput:
    return self.text_model(input_ids, attention_mask, output_hidden_states)


class CLIPTextModelWithProjection(nn.Module):
  """transformers `CLIPTextModelWithProjection`: adds `text_embeds = text_projection(pooled)`."""
  config: CLIPTextConfig
  dtype: Dtype = jnp.float32
  attention_impl: str = 'softmax'

  def setup(self):
    self.text_model = CLIPTextTransformer(self.config, self.attention_impl, self.dtype)
    self.text_projection = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype)

  def __call__(self, input_ids, attention_mask=None, output_hidden_states=True) -> CLIPTextOutput:
    out = self.text_model(input_ids, attention_mask, output_hidden_states)
    return out.replace(text_embeds=self.text_projection(out.pooled))


def dummy_inputs(config: CLIPTextConfig, batch: int = 1) -> tuple[jax.Array]:
  """The positional args for `model.init(key, *dummy_inputs(config))`."""
  return (jnp.zeros((batch, config.max_position_embeddings), jnp.int32),)


def init_params(model: nn.Module, key: jax.Array) -> dict:
  """Randomly initialised params (tests, shapes); real weights come from `params_from_torch`."""
  return model.init(key, *dummy_inputs(model.config), output_hidden_states=False)['params']


def abstract_params(model: nn.Module) -> dict:
  """The params tree as `ShapeDtypeStruct`s, without allocating it."""
  init = functools.partial(model.init, output_hidden_states=False)  # a static flag, not traced
  return convert.abstract_params(init, jax.random.key(0), *dummy_inputs(model.config))


def params_from_torch(state_dict: Mapping[str, Any], model: nn.Module,
                      source: str = 'state dict') -> dict:
  """A torch-layout (numpy) CLIP text state dict, prefixed or not, -> the params of `model`."""
  return convert.torch_to_flax(state_dict, abstract_params(model), source=source,
                               ignore=TORCH_IGNORE_KEYS, renames=TORCH_RENAMES)
