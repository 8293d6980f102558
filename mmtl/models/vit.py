"""Vision Transformer (HF `ViTModel`, pre-LN) and its HF name mapping.

Input: `pixel_values` float (B, H, W, C) NHWC, normalized with the checkpoint's
mean/std (HF processors give NCHW: transpose with `x.transpose(0, 2, 3, 1)`).
Also the audio encoder: `num_channels=1` and `image_size=[F, T]` over a
log-mel spectrogram (B, F, T, 1).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmtl.models import layers


@dataclasses.dataclass(frozen=True)
class ViTConfig(layers.HFConfig):
  model_type: ClassVar[str] = "vit"
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.0
  attention_probs_dropout_prob: float = 0.0
  layer_norm_eps: float = 1e-12
  image_size: int | tuple[int, int] = 224
  patch_size: int | tuple[int, int] = 16
  num_channels: int = 3
  qkv_bias: bool = True
  pooler_output_size: int | None = None  # None: hidden_size
  pooler_act: str = "tanh"

  @property
  def grid(self) -> tuple[int, int]:
    (h, w), (ph, pw) = layers.pair(self.image_size), layers.pair(self.patch_size)
    return h // ph, w // pw

  def layer_spec(self) -> layers.LayerSpec:
    return layers.LayerSpec(
      hidden_size=self.hidden_size,
      num_heads=self.num_attention_heads,
      mlp_dim=self.intermediate_size,
      activation=self.hidden_act,
      layer_norm_eps=self.layer_norm_eps,
      pre_norm=True,
      qkv_bias=self.qkv_bias,
      dropout=self.hidden_dropout_prob,
      attention_dropout=self.attention_probs_dropout_prob,
    )


def patch_grid(pixel_values: jax.Array, patch_size: int | tuple[int, int]) -> tuple[int, int]:
  """The (rows, columns) of whole patches in NHWC `pixel_values`."""
  (ph, pw), (h, w) = layers.pair(patch_size), pixel_values.shape[1:3]
  return h // ph, w // pw


def resize_positions(
  pos: jax.Array, num_prefix: int, grid: tuple[int, int], new_grid: tuple[int, int]
) -> jax.Array:
  """Position embeddings (1, num_prefix + rows * cols, D) learned on the patch `grid`, for an
  image whose patches form `new_grid`: the prefix tokens' kept, the patches' resized as
  transformers' `interpolate_pos_encoding` does (torch bicubic, in float32)."""
  if new_grid == grid:
    return pos
  d = pos.shape[-1]
  patches = layers.resize_grid(pos[0, num_prefix:].reshape(*grid, d), new_grid)
  return jnp.concatenate([pos[:, :num_prefix], patches.reshape(1, -1, d).astype(pos.dtype)], 1)


class ViTEmbeddings(nn.Module):
  """[prefix tokens] + patches, plus position embeddings (one per token)."""

  config: ViTConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  # Learned tokens put before the patches, in order (DeiT adds "distillation_token").
  prefix_tokens: ClassVar[tuple[str, ...]] = ("cls_token",)
  # True: any image size, the position embeddings resized to its patch grid (DeiT, as
  # transformers with `interpolate_pos_encoding=True`); False: the config's size only.
  any_image_size: ClassVar[bool] = False

  @nn.compact
  def __call__(self, pixel_values: jax.Array, deterministic: bool) -> jax.Array:
    c = self.config
    x = layers.patchify(
      pixel_values,
      image_size=None if self.any_image_size else c.image_size,
      patch_size=c.patch_size,
      num_channels=c.num_channels,
      features=c.hidden_size,
      use_bias=True,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="patch_embeddings",
    )
    init = nn.initializers.truncated_normal(0.02)
    prefix = [
      self.param(name, init, (1, 1, c.hidden_size), self.param_dtype).astype(self.dtype)
      for name in self.prefix_tokens
    ]
    num_tokens = c.grid[0] * c.grid[1] + len(prefix)
    pos = self.param("position_embeddings", init, (1, num_tokens, c.hidden_size), self.param_dtype)
    if self.any_image_size:
      pos = resize_positions(pos, len(prefix), c.grid, patch_grid(pixel_values, c.patch_size))
    batch = (x.shape[0], 1, c.hidden_size)
    x = jnp.concatenate([*(jnp.broadcast_to(t, batch) for t in prefix), x], 1)
    x = x + pos.astype(self.dtype)
    return nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)


class ViTModel(layers.EncoderTower):
  """HF `ViTModel`: [CLS] + patches -> pre-LN encoder -> final LN -> optional pooler."""

  config: ViTConfig
  add_pooling_layer: bool = True

  config_class: ClassVar[type[ViTConfig]] = ViTConfig
  inputs: ClassVar[tuple[str, ...]] = ("pixel_values",)
  hf_architecture: ClassVar[str] = "ViTModel"
  hf_base_prefix: ClassVar[str] = "vit"  # ViTForImageClassification nests the encoder here
  # Built only if the checkpoint holds it (mmtl.hf): {module attribute: param subtree}.
  optional_parts: ClassVar[dict[str, str]] = {"add_pooling_layer": "pooler"}
  embeddings_class: ClassVar[type[ViTEmbeddings]] = ViTEmbeddings

  def dummy_inputs(self) -> dict[str, jax.Array]:
    return layers.image_dummy_inputs(self.config)

  def setup(self) -> None:
    c = self.config
    self.embeddings = self.embeddings_class(c, self.dtype, self.param_dtype)
    self.encoder = self.make_encoder()
    self.layernorm = layers.layer_norm(c.layer_norm_eps, self.dtype, self.param_dtype)
    if self.add_pooling_layer:
      self.pooler = layers.Pooler(
        c.pooler_output_size or c.hidden_size, c.pooler_act, self.dtype, self.param_dtype
      )

  def embed(
    self, pixel_values: jax.Array, *, deterministic: bool = True
  ) -> tuple[jax.Array, jax.Array]:
    x = self.embeddings(pixel_values, deterministic)
    return x, jnp.ones(x.shape[:2], bool)

  def finalize(self, x: jax.Array, mask: jax.Array) -> dict[str, jax.Array | None]:
    del mask  # every image token is real
    x = self.layernorm(x)
    return dict(
      last_hidden_state=x, pooler_output=self.pooler(x) if self.add_pooling_layer else None
    )

  def __call__(
    self, pixel_values: jax.Array, *, deterministic: bool = True
  ) -> dict[str, jax.Array | None]:
    x, mask = self.embed(pixel_values, deterministic=deterministic)
    x = self.run_layers(x, mask, 0, self.num_layers, deterministic=deterministic)
    return self.finalize(x, mask)

  def hf_names(self) -> dict[str, layers.HFName]:
    """{mmtl param path: HF state-dict key}, pooler included (see mmtl.hf)."""
    c = self.config
    names = layers.hf_params(
      {
        f"embeddings/{name}": f"embeddings.{name}"
        for name in (*self.embeddings_class.prefix_tokens, "position_embeddings")
      }
    )
    names.update(
      layers.hf_conv("embeddings/patch_embeddings", "embeddings.patch_embeddings.projection")
    )
    spec = c.layer_spec()
    names.update(
      layers.hf_layers(
        spec,
        c.num_hidden_layers,
        "encoder.layer",
        dict(
          query="attention.attention.query",
          key="attention.attention.key",
          value="attention.attention.value",
          out="attention.output.dense",
          attn_norm="layernorm_before",
          fc1="intermediate.dense",
          fc2="output.dense",
          mlp_norm="layernorm_after",
        ),
      )
    )
    names.update(layers.hf_norm("layernorm", "layernorm"))
    names.update(layers.hf_dense("pooler/dense", "pooler.dense"))
    return names
