"""BERT-family text encoder (HF `BertModel`, post-LN) and its HF name mapping.

Covers BERT and the sentence-transformers MiniLM/bge/e5 checkpoints that use
`model_type: bert`. Inputs: `input_ids`, `attention_mask` (1 = real token),
`token_type_ids`, all int32 (B, L).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmtl.models import layers


@dataclasses.dataclass(frozen=True)
class BertConfig(layers.HFConfig):
  model_type: ClassVar[str] = "bert"
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  pad_token_id: int | None = 0
  position_embedding_type: str = "absolute"
  is_decoder: bool = False

  def __post_init__(self) -> None:
    if self.position_embedding_type != "absolute" or self.is_decoder:
      raise ValueError(
        f"mmtl's BertModel is a bidirectional encoder with absolute positions; this config has "
        f"position_embedding_type={self.position_embedding_type!r}, is_decoder={self.is_decoder}. "
        "Use a checkpoint with absolute positions (like transformers 5, which dropped the others)."
      )

  @property
  def max_length(self) -> int:
    """Longest input the position table covers."""
    return self.max_position_embeddings

  def layer_spec(self) -> layers.LayerSpec:
    return layers.LayerSpec(
      hidden_size=self.hidden_size,
      num_heads=self.num_attention_heads,
      mlp_dim=self.intermediate_size,
      activation=self.hidden_act,
      layer_norm_eps=self.layer_norm_eps,
      pre_norm=False,
      dropout=self.hidden_dropout_prob,
      attention_dropout=self.attention_probs_dropout_prob,
    )


class BertEmbeddings(nn.Module):
  config: BertConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  def position_ids(self, input_ids: jax.Array) -> jax.Array:
    """Rows of the position table, (1 or B, L): BERT numbers the tokens 0 .. L-1."""
    return jnp.arange(input_ids.shape[1])[None]

  @nn.compact
  def __call__(
    self, input_ids: jax.Array, token_type_ids: jax.Array, deterministic: bool
  ) -> jax.Array:
    c = self.config
    length = input_ids.shape[1]
    if length > c.max_length:
      raise ValueError(
        f"Sequence length {length} > {c.max_length}, the longest the position embeddings cover "
        f"(max_position_embeddings {c.max_position_embeddings}): truncate the inputs (tokenizer "
        "max_length)."
      )
    embed = lambda num, name: nn.Embed(
      num, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name=name
    )
    x = embed(c.vocab_size, "word_embeddings")(input_ids)
    x = x + embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids)
    x = x + embed(c.max_position_embeddings, "position_embeddings")(self.position_ids(input_ids))
    x = layers.layer_norm(c.layer_norm_eps, self.dtype, self.param_dtype, "layer_norm")(x)
    return nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)


class BertModel(layers.EncoderTower):
  """HF `BertModel`: embeddings -> post-LN encoder -> optional tanh pooler on [CLS]."""

  config: BertConfig
  add_pooling_layer: bool = True

  config_class: ClassVar[type[BertConfig]] = BertConfig
  inputs: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask", "token_type_ids")
  hf_architecture: ClassVar[str] = "BertModel"
  hf_base_prefix: ClassVar[str] = "bert"  # task checkpoints (BertForX) nest the encoder here
  embeddings_class: ClassVar[type[BertEmbeddings]] = BertEmbeddings  # RoBERTa: its position ids

  def dummy_inputs(self) -> dict[str, jax.Array]:
    """Smallest valid inputs, for `init` and shape evaluation."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return dict(input_ids=ids, attention_mask=jnp.ones_like(ids), token_type_ids=ids)

  def setup(self) -> None:
    c = self.config
    self.embeddings = self.embeddings_class(c, self.dtype, self.param_dtype)
    self.encoder = self.make_encoder()
    if self.add_pooling_layer:
      self.pooler = layers.Pooler(c.hidden_size, "tanh", self.dtype, self.param_dtype)

  def embed(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    token_type_ids: jax.Array | None = None,
    *,
    deterministic: bool = True,
  ) -> tuple[jax.Array, jax.Array]:
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    return self.embeddings(input_ids, token_type_ids, deterministic), attention_mask.astype(bool)

  def finalize(self, x: jax.Array, mask: jax.Array) -> dict[str, jax.Array | None]:
    del mask  # BERT pools the [CLS] token, which is never padding.
    pooled = self.pooler(x) if self.add_pooling_layer else None
    return dict(last_hidden_state=x, pooler_output=pooled)

  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    token_type_ids: jax.Array | None = None,
    *,
    deterministic: bool = True,
  ) -> dict[str, jax.Array | None]:
    x, mask = self.embed(input_ids, attention_mask, token_type_ids, deterministic=deterministic)
    x = self.run_layers(x, mask, 0, self.num_layers, deterministic=deterministic)
    return self.finalize(x, mask)

  def hf_names(self) -> dict[str, str]:
    """{mmtl param path: HF state-dict key}, pooler included (see mmtl.hf)."""
    c = self.config
    names = {}
    names.update(layers.hf_embed("embeddings/word_embeddings", "embeddings.word_embeddings"))
    names.update(
      layers.hf_embed("embeddings/token_type_embeddings", "embeddings.token_type_embeddings")
    )
    names.update(
      layers.hf_embed("embeddings/position_embeddings", "embeddings.position_embeddings")
    )
    names.update(layers.hf_norm("embeddings/layer_norm", "embeddings.LayerNorm"))
    spec = c.layer_spec()
    names.update(
      layers.hf_layers(
        spec,
        c.num_hidden_layers,
        "encoder.layer",
        dict(
          query="attention.self.query",
          key="attention.self.key",
          value="attention.self.value",
          out="attention.output.dense",
          attn_norm="attention.output.LayerNorm",
          fc1="intermediate.dense",
          fc2="output.dense",
          mlp_norm="output.LayerNorm",
        ),
      )
    )
    names.update(layers.hf_dense("pooler/dense", "pooler.dense"))
    return names
