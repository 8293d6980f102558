"""Autoregressive text decoders: the layer stack, its KV cache, and the decoder protocol.

GPT-2 (pre-LN) and BERT-as-decoder (post-LN, `BertLMHeadModel`) differ in where the
norms sit, the embeddings and the LM head; their blocks are one `DecoderLayer`
driven by the encoders' `LayerSpec`: causal self-attention, optional
cross-attention over encoder tokens, MLP. Param names follow the encoders'
(`decoder/layer_{i}/{attn/{query,key,value,out},attn_norm,cross_attn/...,
cross_attn_norm,mlp/{fc1,fc2},mlp_norm}`), so one regex (`.*/cross_attn/.*`)
addresses every family's cross-attention for freezing, LoRA or `dont_load`.

The KV cache is an explicit pytree (no mutable Flax collection), so a decoding loop
carries it through `lax.while_loop` and beam search reorders it with a gather:
`{"index": () int32, "mask": (B, max_length) bool, "layer_{i}": {"key", "value"
(B, heads, max_length, head_dim), "cross_key", "cross_value" (B, heads, S, head_dim)}}`:
heads before positions, the layout both attention products read without a transpose
(a transposed copy of every cached key and value per step costs more than the step's
attention itself on CPU).
`index` counts the positions written; `mask` marks which of them are real tokens
(a left-padded prompt's padding is not). Cross-attention keys and values of the
encoder tokens are computed once, by `init_cache`.

A decoder family implements `TextDecoder` (below); `mmtl.generate` drives any of them.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmtl.models import layers

Cache = dict[str, Any]


@runtime_checkable
class TextDecoder(Protocol):
  """What captioning and `mmtl.generate` need of a decoder (structural)."""

  hf_architecture: ClassVar[str]

  @property
  def vocab_size(self) -> int: ...

  @property
  def hidden_size(self) -> int:
    """Width of the token embeddings (a prefix or projected encoder tokens have it)."""

  @property
  def cross_attention(self) -> bool:
    """Whether the layers attend to encoder tokens (else: prefix conditioning only)."""

  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    position_ids: jax.Array | None = None,
    *,
    prefix_embeds: jax.Array | None = None,
    encoder_hidden_states: jax.Array | None = None,
    encoder_attention_mask: jax.Array | None = None,
    cache: Cache | None = None,
    deterministic: bool = True,
  ) -> dict[str, Any]:
    """`logits` (B, P + T, vocab) float32 and the updated `cache` (None without one)."""

  def init_cache(
    self,
    batch_size: int,
    max_length: int,
    encoder_hidden_states: jax.Array | None = None,
    encoder_attention_mask: jax.Array | None = None,
  ) -> Cache:
    """An empty cache for `max_length` positions (run with the params: cross K/V)."""


def _heads(x: jax.Array, num_heads: int) -> jax.Array:
  """(B, T, D) -> (B, heads, T, head_dim)."""
  b, t, d = x.shape
  return x.reshape(b, t, num_heads, d // num_heads).transpose(0, 2, 1, 3)


class MultiHeadAttention(nn.Module):
  """Attention of `x` over given keys/values, with `keys_values` to compute those.

  Separate projections (query, key, value, out) as the encoders' `Attention`;
  `scale` multiplies the usual 1/sqrt(head_dim) (GPT-2's scale_attn_by_inverse_layer_idx).
  """

  spec: layers.LayerSpec
  scale: float = 1.0
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  def setup(self) -> None:
    s = self.spec
    if s.hidden_size % s.num_heads:
      raise ValueError(
        f"hidden_size {s.hidden_size} is not a multiple of num_attention_heads {s.num_heads}."
      )
    dense = lambda bias: nn.Dense(
      s.hidden_size, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype
    )
    self.query, self.key, self.value = dense(s.qkv_bias), dense(s.qkv_bias), dense(s.qkv_bias)
    self.out = dense(True)
    self.attention_dropout = nn.Dropout(s.attention_dropout)

  def keys_values(self, context: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys and values (B, heads, S, head_dim) of the tokens `context`."""
    h = self.spec.num_heads
    return _heads(self.key(context), h), _heads(self.value(context), h)

  def __call__(
    self,
    x: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    mask: jax.Array,
    *,
    deterministic: bool,
  ) -> jax.Array:
    """`x` (B, T, D) attends to `keys`/`values` (B, heads, S, head_dim) where `mask`
    (B, 1, T, S) is True. Softmax in float32; attention dropout on its weights."""
    s = self.spec
    q = _heads(self.query(x), s.num_heads) * (self.scale / (s.hidden_size // s.num_heads) ** 0.5)
    logits = jnp.einsum("bhtd,bhsd->bhts", q, keys.astype(q.dtype)).astype(jnp.float32)
    weights = jax.nn.softmax(jnp.where(mask, logits, jnp.finfo(jnp.float32).min), axis=-1)
    weights = self.attention_dropout(weights, deterministic=deterministic)
    out = jnp.einsum("bhts,bhsd->bthd", weights.astype(self.dtype), values.astype(self.dtype))
    return self.out(out.reshape(*x.shape[:-1], s.hidden_size))


class DecoderLayer(nn.Module):
  """Self-attention (causal, cached), cross-attention (optional), MLP; pre- or post-LN."""

  spec: layers.LayerSpec
  cross_attention: bool
  attn_scale: float = 1.0
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  def setup(self) -> None:
    s = self.spec
    norm = lambda: layers.layer_norm(s.layer_norm_eps, self.dtype, self.param_dtype)
    attn = lambda: MultiHeadAttention(s, self.attn_scale, self.dtype, self.param_dtype)
    self.attn, self.attn_norm = attn(), norm()
    if self.cross_attention:
      self.cross_attn, self.cross_attn_norm = attn(), norm()
    self.mlp, self.mlp_norm = layers.Mlp(s, self.dtype, self.param_dtype), norm()
    self.drop = nn.Dropout(s.dropout)

  def cross_keys_values(self, encoder_hidden_states: jax.Array) -> tuple[jax.Array, jax.Array]:
    return self.cross_attn.keys_values(encoder_hidden_states)

  def _sublayer(self, x, norm, fn, deterministic):
    pre = self.spec.pre_norm
    h = fn(norm(x) if pre else x)
    x = x + self.drop(h, deterministic=deterministic)
    return x if pre else norm(x)

  def __call__(
    self,
    x: jax.Array,
    self_mask: jax.Array,
    cross: tuple[jax.Array, jax.Array, jax.Array] | None,
    cache: dict[str, jax.Array] | None,
    index: jax.Array | None,
    deterministic: bool,
  ) -> tuple[jax.Array, dict[str, jax.Array] | None]:
    """`cross`: (encoder tokens or None when cached K/V are used, their keys/values mask
    (B, 1, 1, S)). `cache`/`index`: this layer's cache and the first position written."""
    new_cache = None

    def self_attention(h):
      nonlocal new_cache
      k, v = self.attn.keys_values(h)
      if cache is not None:
        at = (0, 0, index, 0)
        k = jax.lax.dynamic_update_slice(cache["key"], k.astype(cache["key"].dtype), at)
        v = jax.lax.dynamic_update_slice(cache["value"], v.astype(cache["value"].dtype), at)
        new_cache = {**cache, "key": k, "value": v}
      return self.attn(h, k, v, self_mask, deterministic=deterministic)

    x = self._sublayer(x, self.attn_norm, self_attention, deterministic)
    if self.cross_attention:
      if cross is None:
        raise ValueError(
          "This decoder has cross-attention layers: pass encoder_hidden_states (or a cache "
          "made by init_cache with them)."
        )
      context, cross_mask = cross
      if cache is not None:
        k, v = cache["cross_key"], cache["cross_value"]
      else:
        k, v = self.cross_keys_values(context)
      x = self._sublayer(
        x,
        self.cross_attn_norm,
        lambda h: self.cross_attn(h, k, v, cross_mask, deterministic=deterministic),
        deterministic,
      )
    x = self._sublayer(x, self.mlp_norm, self.mlp, deterministic)
    return x, new_cache


class DecoderStack(nn.Module):
  """`num_layers` DecoderLayers named `layer_{i}`, the masks and the cache bookkeeping."""

  spec: layers.LayerSpec
  num_layers: int
  cross_attention: bool
  attn_scales: tuple[float, ...] | None = None  # per layer; None: all 1
  remat: str = "none"
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  def setup(self) -> None:
    layers.check_remat(self.remat)
    cls = DecoderLayer
    if self.remat != "none":
      # static_argnums counts `self`: (self, x, self_mask, cross, cache, index, deterministic).
      cls = nn.remat(DecoderLayer, policy=layers.REMAT_POLICIES[self.remat], static_argnums=(6,))
    scales = self.attn_scales or (1.0,) * self.num_layers
    self.layers = [
      cls(
        self.spec, self.cross_attention, scales[i], self.dtype, self.param_dtype, name=f"layer_{i}"
      )
      for i in range(self.num_layers)
    ]

  def _check_encoder_tokens(self, encoder_hidden_states: jax.Array | None) -> None:
    """One-line errors for encoder tokens this decoder cannot read."""
    if encoder_hidden_states is None:
      return
    if not self.cross_attention:
      raise ValueError(
        "encoder_hidden_states were passed to a decoder with no cross-attention layers: build "
        "it with them (mmtl.hf.load_decoder / build_decoder(cross_attention=True), "
        "config.model.decoder.cross_attention=True), or condition through prefix_embeds."
      )
    width, want = encoder_hidden_states.shape[-1], self.spec.hidden_size
    if width != want:
      raise ValueError(
        f"The encoder tokens are {width} wide but the decoder's cross-attention reads {want}: "
        "project them to the decoder width first (enc_to_dec_proj, as VisionEncoderDecoder "
        "and the captioning head do)."
      )

  def init_cache(
    self,
    batch_size: int,
    max_length: int,
    encoder_hidden_states: jax.Array | None,
    encoder_attention_mask: jax.Array | None,
    dtype: layers.Dtype,
  ) -> Cache:
    self._check_encoder_tokens(encoder_hidden_states)
    s = self.spec
    shape = (batch_size, s.num_heads, max_length, s.hidden_size // s.num_heads)
    cache: Cache = {
      "index": jnp.zeros((), jnp.int32),
      "mask": jnp.zeros((batch_size, max_length), bool),
    }
    if self.cross_attention:
      if encoder_hidden_states is None:
        raise ValueError(
          "init_cache of a decoder with cross-attention needs encoder_hidden_states."
        )
      if encoder_attention_mask is None:
        encoder_attention_mask = jnp.ones(encoder_hidden_states.shape[:2], bool)
      cache["encoder_mask"] = encoder_attention_mask.astype(bool)
    for i, layer in enumerate(self.layers):
      entry = {"key": jnp.zeros(shape, dtype), "value": jnp.zeros(shape, dtype)}
      if self.cross_attention:
        k, v = layer.cross_keys_values(encoder_hidden_states)
        entry.update(cross_key=k.astype(dtype), cross_value=v.astype(dtype))
      cache[f"layer_{i}"] = entry
    return cache

  def __call__(
    self,
    x: jax.Array,
    mask: jax.Array,
    *,
    encoder_hidden_states: jax.Array | None = None,
    encoder_attention_mask: jax.Array | None = None,
    cache: Cache | None = None,
    deterministic: bool = True,
  ) -> tuple[jax.Array, Cache | None]:
    """Hidden states of the tokens `x` (B, T, D) whose real ones `mask` (B, T) marks.

    Without a cache the T tokens attend causally among themselves. With one they
    are written at positions [index, index + T) and attend to every real position
    up to their own.
    """
    self._check_encoder_tokens(encoder_hidden_states)
    b, t = mask.shape
    if cache is None:
      index = None
      key_mask, key_pos = mask, jnp.arange(t)
    else:
      index = cache["index"]
      key_mask = jax.lax.dynamic_update_slice(cache["mask"], mask.astype(bool), (0, index))
      key_pos = jnp.arange(key_mask.shape[1])
    query_pos = jnp.arange(t) + (0 if index is None else index)
    self_mask = (key_pos[None, :] <= query_pos[:, None])[None, None] & key_mask[:, None, None, :]
    cross = None
    if self.cross_attention and cache is not None:
      cross = (None, cache["encoder_mask"][:, None, None, :])
    elif self.cross_attention and encoder_hidden_states is not None:
      if encoder_attention_mask is None:
        encoder_attention_mask = jnp.ones(encoder_hidden_states.shape[:2], bool)
      cross = (encoder_hidden_states, encoder_attention_mask.astype(bool)[:, None, None, :])
    new_cache = None if cache is None else {**cache, "index": index + t, "mask": key_mask}
    for i, layer in enumerate(self.layers):
      layer_cache = None if cache is None else cache[f"layer_{i}"]
      x, updated = layer(x, self_mask, cross, layer_cache, index, deterministic)
      if cache is not None:
        new_cache[f"layer_{i}"] = updated
    return x, new_cache


def token_mask_and_positions(
  input_ids: jax.Array,
  attention_mask: jax.Array | None,
  position_ids: jax.Array | None,
  prefix_embeds: jax.Array | None,
  cache: Cache | None,
) -> tuple[jax.Array, jax.Array]:
  """The (B, P + T) attention mask and positions of a decoder's inputs: `prefix_embeds`
  (B, P, D) stand first at positions 0..P-1, always attended to, and shift explicit token
  `position_ids` by P; without them the T new tokens take the positions after the cache's
  `index` (0..T-1 without a cache)."""
  mask = (jnp.ones_like(input_ids) if attention_mask is None else attention_mask).astype(bool)
  if prefix_embeds is not None:
    p = prefix_embeds.shape[1]
    mask = jnp.concatenate([jnp.ones(prefix_embeds.shape[:2], bool), mask], axis=1)
    if position_ids is not None:
      prefix_positions = jnp.broadcast_to(jnp.arange(p), (mask.shape[0], p))
      position_ids = jnp.concatenate([prefix_positions, position_ids + p], axis=1)
  if position_ids is None:
    start = 0 if cache is None else cache["index"]
    position_ids = jnp.broadcast_to(start + jnp.arange(mask.shape[1]), mask.shape)
  return mask, position_ids


def dummy_inputs(module: TextDecoder) -> dict[str, jax.Array]:
  """One token (and one encoder token of the decoder's width, with cross-attention): what
  initializes a decoder's params."""
  ids = jnp.zeros((1, 1), jnp.int32)
  out = dict(input_ids=ids, attention_mask=jnp.ones_like(ids))
  if module.cross_attention:
    out["encoder_hidden_states"] = jnp.zeros((1, 1, module.hidden_size), jnp.float32)
  return out
