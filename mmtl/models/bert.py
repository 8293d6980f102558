"""BERT-family text encoder (HF `BertModel`, post-LN), BERT as a decoder (`BertLMHeadModel`)
and their HF name mappings.

Covers BERT and the sentence-transformers MiniLM/bge/e5 checkpoints that use
`model_type: bert`. Inputs: `input_ids`, `attention_mask` (1 = real token),
`token_type_ids`, all int32 (B, L).

`BertLMHeadModel` is the same network made causal, with optional cross-attention
after each self-attention and the MLM head (transform + tied output embedding +
bias) predicting the next token: a decoder warm-started from an encoder checkpoint
(Rothe et al., 2020, "Leveraging Pre-trained Checkpoints for Sequence Generation"),
whose cross-attention starts from init (`mmtl.hf.load_decoder` reports it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmtl.models import decoder, layers


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
  add_cross_attention: bool = False
  tie_word_embeddings: bool = True

  def __post_init__(self) -> None:
    if self.position_embedding_type != "absolute":
      raise ValueError(
        f"mmtl's BERT has absolute positions; this config has position_embedding_type="
        f"{self.position_embedding_type!r}. Use a checkpoint with absolute positions (like "
        "transformers 5, which dropped the others)."
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
    self,
    input_ids: jax.Array,
    token_type_ids: jax.Array,
    deterministic: bool,
    position_ids: jax.Array | None = None,
    prefix_embeds: jax.Array | None = None,
  ) -> jax.Array:
    """Embedded tokens; `prefix_embeds` (B, P, D) stand before them as word embeddings
    (ClipCap-style), with `position_ids` covering prefix + tokens."""
    c = self.config
    length = input_ids.shape[1] + (0 if prefix_embeds is None else prefix_embeds.shape[1])
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
    if prefix_embeds is not None:
      x = jnp.concatenate([prefix_embeds.astype(x.dtype), x], axis=1)
      token_type_ids = jnp.pad(token_type_ids, ((0, 0), (prefix_embeds.shape[1], 0)))
    if position_ids is None:
      position_ids = self.position_ids(input_ids)
    x = x + embed(c.type_vocab_size, "token_type_embeddings")(token_type_ids)
    x = x + embed(c.max_position_embeddings, "position_embeddings")(position_ids)
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
  # Built only if the checkpoint holds it (mmtl.hf): {module attribute: param subtree}.
  optional_parts: ClassVar[dict[str, str]] = {"add_pooling_layer": "pooler"}
  embeddings_class: ClassVar[type[BertEmbeddings]] = BertEmbeddings  # RoBERTa: its position ids

  def dummy_inputs(self) -> dict[str, jax.Array]:
    """Smallest valid inputs, for `init` and shape evaluation."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return dict(input_ids=ids, attention_mask=jnp.ones_like(ids), token_type_ids=ids)

  def setup(self) -> None:
    c = self.config
    if getattr(c, "is_decoder", False):
      raise ValueError(
        "This BERT config has is_decoder=true: it is a decoder (BertLMHeadModel). Load it with "
        "mmtl.hf.load_decoder, or set is_decoder=false to use it as an encoder."
      )
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

  def head_hf_names(self) -> dict[str, layers.HFName]:
    """{param path in a FusionModel's masked_lm `head`: HF key}: `BertForMaskedLM`'s
    `cls.predictions` (its decoder is the tied word embeddings, unless the config unties
    them)."""
    return mlm_head_names(self.config, "")

  def head_advice(self) -> str:
    """What makes a checkpoint's MLM head fit the masked_lm head (mmtl.hf.load_into)."""
    return (
      "The masked_lm head loads a BertForMaskedLM checkpoint's cls.predictions (a BertModel "
      "checkpoint, such as all-MiniLM-L6-v2, has none): point model_init.head at such a "
      "checkpoint, or leave the head out of model_init to initialize it as transformers does."
    )

  def hf_names(self) -> dict[str, layers.HFName]:
    """{mmtl param path: HF state-dict key}, pooler included (see mmtl.hf)."""
    c = self.config
    names = _embedding_names("")
    names.update(
      layers.hf_layers(c.layer_spec(), c.num_hidden_layers, "encoder.layer", HF_LAYER_PARTS)
    )
    names.update(layers.hf_dense("pooler/dense", "pooler.dense"))
    return names


# HF module of each part of a BERT layer (`layers.hf_layers`' `parts`).
HF_LAYER_PARTS = dict(
  query="attention.self.query",
  key="attention.self.key",
  value="attention.self.value",
  out="attention.output.dense",
  attn_norm="attention.output.LayerNorm",
  fc1="intermediate.dense",
  fc2="output.dense",
  mlp_norm="output.LayerNorm",
)


def _embedding_names(prefix: str) -> dict[str, layers.HFName]:
  names = {}
  for table in ("word_embeddings", "token_type_embeddings", "position_embeddings"):
    names.update(layers.hf_embed(f"embeddings/{table}", f"{prefix}embeddings.{table}"))
  names.update(layers.hf_norm("embeddings/layer_norm", f"{prefix}embeddings.LayerNorm"))
  return names


class BertLMHeadModel(nn.Module):
  """HF `BertLMHeadModel` (is_decoder): causal post-LN layers, optional cross-attention,
  MLM head on every position. Implements `mmtl.models.decoder.TextDecoder`."""

  config: BertConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  remat: str = "none"
  attention_impl: str | None = None  # accepted for build_module's uniform kwargs; XLA attention

  config_class: ClassVar[type[BertConfig]] = BertConfig
  hf_architecture: ClassVar[str] = "BertLMHeadModel"
  hf_base_prefix: ClassVar[str] = "bert"  # a BertModel checkpoint (MiniLM) lacks it
  embeddings_class: ClassVar[type[BertEmbeddings]] = BertEmbeddings

  @property
  def vocab_size(self) -> int:
    return self.config.vocab_size

  @property
  def hidden_size(self) -> int:
    return self.config.hidden_size

  @property
  def cross_attention(self) -> bool:
    return self.config.add_cross_attention

  @property
  def max_length(self) -> int:
    return self.config.max_position_embeddings

  def dummy_inputs(self) -> dict[str, jax.Array]:
    return decoder.dummy_inputs(self)

  def setup(self) -> None:
    c = self.config
    self.embeddings = self.embeddings_class(c, self.dtype, self.param_dtype)
    self.decoder = decoder.DecoderStack(
      c.layer_spec(),
      c.num_hidden_layers,
      c.add_cross_attention,
      remat=self.remat,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )
    self.lm_head = BertLMHead(c, self.dtype, self.param_dtype)

  def init_cache(
    self,
    batch_size: int,
    max_length: int,
    encoder_hidden_states: jax.Array | None = None,
    encoder_attention_mask: jax.Array | None = None,
  ) -> decoder.Cache:
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
    """`logits` (B, P + T, vocab) float32, `last_hidden_state` and the updated `cache`."""
    mask, position_ids = decoder.token_mask_and_positions(
      input_ids, attention_mask, position_ids, prefix_embeds, cache
    )
    x = self.embeddings(
      input_ids, jnp.zeros_like(input_ids), deterministic, position_ids, prefix_embeds
    )
    x, cache = self.decoder(
      x,
      mask,
      encoder_hidden_states=encoder_hidden_states,
      encoder_attention_mask=encoder_attention_mask,
      cache=cache,
      deterministic=deterministic,
    )
    logits = self.lm_head(x, self.embeddings.variables["params"]["word_embeddings"]["embedding"])
    return dict(logits=logits, last_hidden_state=x, cache=cache)

  def hf_names(self) -> dict[str, layers.HFName]:
    c = self.config
    names = _embedding_names("bert.")
    parts = dict(HF_LAYER_PARTS)
    if c.add_cross_attention:
      parts.update(
        cross_query="crossattention.self.query",
        cross_key="crossattention.self.key",
        cross_value="crossattention.self.value",
        cross_out="crossattention.output.dense",
        cross_norm="crossattention.output.LayerNorm",
      )
    for i in range(c.num_hidden_layers):
      at, hf = f"decoder/layer_{i}", f"bert.encoder.layer.{i}"
      for part in ("query", "key", "value", "out"):
        names.update(layers.hf_dense(f"{at}/attn/{part}", f"{hf}.{parts[part]}"))
        if c.add_cross_attention:
          names.update(layers.hf_dense(f"{at}/cross_attn/{part}", f"{hf}.{parts['cross_' + part]}"))
      names.update(layers.hf_norm(f"{at}/attn_norm", f"{hf}.{parts['attn_norm']}"))
      if c.add_cross_attention:
        names.update(layers.hf_norm(f"{at}/cross_attn_norm", f"{hf}.{parts['cross_norm']}"))
      names.update(layers.hf_dense(f"{at}/mlp/fc1", f"{hf}.{parts['fc1']}"))
      names.update(layers.hf_dense(f"{at}/mlp/fc2", f"{hf}.{parts['fc2']}"))
      names.update(layers.hf_norm(f"{at}/mlp_norm", f"{hf}.{parts['mlp_norm']}"))
    names.update(mlm_head_names(c, "lm_head/"))
    return names


def mlm_head_names(c: BertConfig, prefix: str) -> dict[str, layers.HFName]:
  """{`BertLMHead` param path under `prefix`: HF key} of `cls.predictions`."""
  names = dict(layers.hf_dense(f"{prefix}transform", "cls.predictions.transform.dense"))
  names.update(layers.hf_norm(f"{prefix}transform_norm", "cls.predictions.transform.LayerNorm"))
  names[f"{prefix}bias"] = layers.HFName("cls.predictions.bias")
  if not c.tie_word_embeddings:
    names.update(layers.hf_dense(f"{prefix}decoder", "cls.predictions.decoder", bias=False))
  return names


class BertLMHead(nn.Module):
  """`cls.predictions`: dense + activation + LayerNorm, then the (tied) output embedding + bias."""

  config: BertConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, word_embeddings: jax.Array) -> jax.Array:
    c = self.config
    dense = lambda n, name, bias=True: nn.Dense(
      n, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name
    )
    x = layers.activation(c.hidden_act)(dense(c.hidden_size, "transform")(x))
    x = layers.layer_norm(c.layer_norm_eps, self.dtype, self.param_dtype, "transform_norm")(x)
    if c.tie_word_embeddings:
      logits = x @ word_embeddings.astype(self.dtype).T
    else:
      logits = dense(c.vocab_size, "decoder", bias=False)(x)
    bias = self.param("bias", nn.initializers.zeros, (c.vocab_size,), self.param_dtype)
    return (logits + bias.astype(self.dtype)).astype(jnp.float32)
