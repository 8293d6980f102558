"""GPT-2 decoder (HF `GPT2LMHeadModel`, pre-LN, optional cross-attention) and its HF names.

With `add_cross_attention` (as in a `VisionEncoderDecoderModel` decoder) every block
attends to encoder tokens after its self-attention. The LM head is tied to the token
embeddings unless `tie_word_embeddings` is false. Inputs: `input_ids`,
`attention_mask` (1 = real token), optional `position_ids`, all int32 (B, T).

HF stores GPT-2's projections as `Conv1D` weights (in, out) and fuses query, key
and value into one `c_attn`; mmtl keeps the uniform separate `query`/`key`/`value`
Dense params of every family (one LoRA regex for all), and its name map reads each as a
slice of `c_attn` (mmtl.models.weights: exported fused again).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmtl.models import decoder, layers


@dataclasses.dataclass(frozen=True)
class GPT2Config(layers.HFConfig):
  model_type: ClassVar[str] = "gpt2"
  vocab_size: int = 50257
  n_positions: int = 1024
  n_embd: int = 768
  n_layer: int = 12
  n_head: int = 12
  n_inner: int | None = None
  activation_function: str = "gelu_new"
  resid_pdrop: float = 0.1
  embd_pdrop: float = 0.1
  attn_pdrop: float = 0.1
  layer_norm_epsilon: float = 1e-5
  scale_attn_weights: bool = True
  scale_attn_by_inverse_layer_idx: bool = False
  add_cross_attention: bool = False
  tie_word_embeddings: bool = True
  bos_token_id: int | None = 50256
  eos_token_id: int | None = 50256
  pad_token_id: int | None = None

  @property
  def hidden_size(self) -> int:
    return self.n_embd

  @property
  def num_hidden_layers(self) -> int:
    return self.n_layer

  @property
  def max_length(self) -> int:
    return self.n_positions

  def layer_spec(self) -> layers.LayerSpec:
    return layers.LayerSpec(
      hidden_size=self.n_embd,
      num_heads=self.n_head,
      mlp_dim=self.n_inner or 4 * self.n_embd,
      activation=self.activation_function,
      layer_norm_eps=self.layer_norm_epsilon,
      pre_norm=True,
      dropout=self.resid_pdrop,
      attention_dropout=self.attn_pdrop,
      causal=True,
    )

  def attn_scales(self) -> tuple[float, ...]:
    """Per layer, the factor on 1/sqrt(head_dim) of the attention logits."""
    base = 1.0 if self.scale_attn_weights else (self.n_embd // self.n_head) ** 0.5
    if self.scale_attn_by_inverse_layer_idx:
      return tuple(base / (i + 1) for i in range(self.n_layer))
    return (base,) * self.n_layer


class GPT2LMHeadModel(nn.Module):
  """HF `GPT2LMHeadModel`: token + position embeddings -> pre-LN blocks -> ln_f -> LM head.

  Implements `mmtl.models.decoder.TextDecoder`.
  """

  config: GPT2Config
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  remat: str = "none"
  attention_impl: str | None = None  # accepted for build_module's uniform kwargs; XLA attention

  config_class: ClassVar[type[GPT2Config]] = GPT2Config
  hf_architecture: ClassVar[str] = "GPT2LMHeadModel"
  hf_base_prefix: ClassVar[str] = "transformer"  # a bare GPT2Model checkpoint lacks it

  @property
  def vocab_size(self) -> int:
    return self.config.vocab_size

  @property
  def hidden_size(self) -> int:
    return self.config.n_embd

  @property
  def cross_attention(self) -> bool:
    return self.config.add_cross_attention

  @property
  def max_length(self) -> int:
    """Longest sequence (prefix + prompt + generated) the position table covers."""
    return self.config.n_positions

  def dummy_inputs(self) -> dict[str, jax.Array]:
    return decoder.dummy_inputs(self)

  def setup(self) -> None:
    c = self.config
    embed = lambda num: nn.Embed(num, c.n_embd, dtype=self.dtype, param_dtype=self.param_dtype)
    self.word_embeddings = embed(c.vocab_size)
    self.position_embeddings = embed(c.n_positions)
    self.embed_dropout = nn.Dropout(c.embd_pdrop)
    self.decoder = decoder.DecoderStack(
      c.layer_spec(),
      c.n_layer,
      c.add_cross_attention,
      c.attn_scales(),
      self.remat,
      self.dtype,
      self.param_dtype,
    )
    self.final_norm = layers.layer_norm(c.layer_norm_epsilon, self.dtype, self.param_dtype)
    if not c.tie_word_embeddings:
      self.lm_head = nn.Dense(
        c.vocab_size, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype
      )

  def init_cache(
    self,
    batch_size: int,
    max_length: int,
    encoder_hidden_states: jax.Array | None = None,
    encoder_attention_mask: jax.Array | None = None,
  ) -> decoder.Cache:
    if max_length > self.config.n_positions:
      raise ValueError(
        f"max_length {max_length} > n_positions {self.config.n_positions}, the longest "
        "sequence GPT-2's position table covers: lower max_new_tokens or the prompt length."
      )
    return self.decoder.init_cache(
      batch_size, max_length, encoder_hidden_states, encoder_attention_mask, self.dtype
    )

  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    position_ids: jax.Array | None = None,
    *,
    prefix_embeds: jax.Array | None = None,
    encoder_hidden_states: jax.Array | None = None,
    encoder_attention_mask: jax.Array | None = None,
    cache: decoder.Cache | None = None,
    deterministic: bool = True,
  ) -> dict[str, Any]:
    """`logits` (B, P + T, vocab) float32, `last_hidden_state`, and the updated `cache`.

    `prefix_embeds` (B, P, D): embeddings placed before the tokens (ClipCap-style
    conditioning); they take positions 0..P-1 and are always attended to.
    """
    c = self.config
    mask, position_ids = decoder.token_mask_and_positions(
      input_ids, attention_mask, position_ids, prefix_embeds, cache
    )
    x = self.word_embeddings(input_ids)
    if prefix_embeds is not None:
      x = jnp.concatenate([prefix_embeds.astype(x.dtype), x], axis=1)
    if x.shape[1] > c.n_positions and cache is None:
      raise ValueError(
        f"Sequence length {x.shape[1]} > n_positions {c.n_positions}: truncate the inputs."
      )
    x = x + self.position_embeddings(position_ids)
    x = self.embed_dropout(x, deterministic=deterministic)
    x, cache = self.decoder(
      x,
      mask,
      encoder_hidden_states=encoder_hidden_states,
      encoder_attention_mask=encoder_attention_mask,
      cache=cache,
      deterministic=deterministic,
    )
    x = self.final_norm(x)
    if c.tie_word_embeddings:
      logits = self.word_embeddings.attend(x)
    else:
      logits = self.lm_head(x)
    return dict(logits=logits.astype(jnp.float32), last_hidden_state=x, cache=cache)

  def hf_names(self) -> dict[str, layers.HFName]:
    """{mmtl param path: HF name}: Conv1D weights are already (in, out) (`IN_OUT`); the
    fused `c_attn` gives query, key and value as its three slices along the outputs."""
    c = self.config
    p = self.hf_base_prefix
    conv1d = functools.partial(layers.hf_dense, transform=layers.Transform.IN_OUT)
    names = {}
    names.update(layers.hf_embed("word_embeddings", f"{p}.wte"))
    names.update(layers.hf_embed("position_embeddings", f"{p}.wpe"))
    for i in range(c.n_layer):
      at, hf = f"decoder/layer_{i}", f"{p}.h.{i}"
      names.update(layers.hf_norm(f"{at}/attn_norm", f"{hf}.ln_1"))
      names.update(_fused(f"{at}/attn", f"{hf}.attn.c_attn", ("query", "key", "value")))
      names.update(conv1d(f"{at}/attn/out", f"{hf}.attn.c_proj"))
      if c.add_cross_attention:
        names.update(layers.hf_norm(f"{at}/cross_attn_norm", f"{hf}.ln_cross_attn"))
        names.update(conv1d(f"{at}/cross_attn/query", f"{hf}.crossattention.q_attn"))
        names.update(_fused(f"{at}/cross_attn", f"{hf}.crossattention.c_attn", ("key", "value")))
        names.update(conv1d(f"{at}/cross_attn/out", f"{hf}.crossattention.c_proj"))
      names.update(layers.hf_norm(f"{at}/mlp_norm", f"{hf}.ln_2"))
      names.update(conv1d(f"{at}/mlp/fc1", f"{hf}.mlp.c_fc"))
      names.update(conv1d(f"{at}/mlp/fc2", f"{hf}.mlp.c_proj"))
    names.update(layers.hf_norm("final_norm", f"{p}.ln_f"))
    if not c.tie_word_embeddings:
      names.update(layers.hf_dense("lm_head", "lm_head", bias=False))
    return names


def _fused(path: str, hf: str, parts: tuple[str, ...]) -> dict[str, layers.HFName]:
  """Dense params `path/{part}` read from the slices of one fused Conv1D at `hf`."""
  names = {}
  for i, part in enumerate(parts):
    names.update(
      layers.hf_dense(f"{path}/{part}", hf, transform=layers.Transform.IN_OUT, part=(i, len(parts)))
    )
  return names
