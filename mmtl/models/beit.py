"""BEiT (HF `BeitModel`): a pre-LN ViT with relative position biases in the attention.

Input: `pixel_values` float (B, H, W, C) NHWC, normalized with the checkpoint's mean/std.
What differs from `mmtl.models.vit.ViTModel` (transformers' modeling_beit.py is the spec):
- Relative position bias: a learned table of (2h-1)(2w-1) relative offsets on the (h, w)
  patch grid plus [CLS]->patch, patch->[CLS], [CLS]->[CLS], per head, gathered into a
  (heads, T, T) bias added to the attention logits. One table per layer
  (`use_relative_position_bias`, param `encoder/layer_{i}/attn/relative_position_bias`)
  and/or one for all layers (`use_shared_relative_position_bias`,
  `encoder/relative_position_bias`).
- Absolute position embeddings only with `use_absolute_position_embeddings`.
- Layer scale (`attn_scale`, `mlp_scale`) when `layer_scale_init_value > 0`; the key
  projection has no bias; stochastic depth rising linearly from 0 in the first layer to
  `drop_path_rate` in the last, in training only.
- `use_mean_pooling`: no final LayerNorm, `pooler_output` is the LayerNorm (`pooler/layernorm`)
  of the mean of the patch tokens; otherwise a final LayerNorm and the [CLS] token.
Any image size runs, as in transformers: the offset tables are resized to the image's grid
(torch bilinear, as transformers' `BeitRelativePositionBias`) and the absolute positions
bicubically. As a fusion tower (`embed` -> `run_layers`) a relative bias needs the config's
image size, and tokens after the image's (bottleneck fusion) get no bias.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmtl.models import dinov2, layers, vit


@dataclasses.dataclass(frozen=True)
class BeitLayerSpec(layers.LayerSpec):
  # The patch grid the layer's own relative position table was learned on; None: no table.
  relative_position_window: tuple[int, int] | None = None


@dataclasses.dataclass(frozen=True)
class BeitConfig(layers.HFConfig):
  model_type: ClassVar[str] = "beit"
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.0
  attention_probs_dropout_prob: float = 0.0
  layer_norm_eps: float = 1e-12
  image_size: int | tuple[int, int] = 224  # the size the position tables were learned at
  patch_size: int | tuple[int, int] = 16
  num_channels: int = 3
  use_mask_token: bool = False
  use_absolute_position_embeddings: bool = False
  use_relative_position_bias: bool = False
  use_shared_relative_position_bias: bool = False
  layer_scale_init_value: float = 0.1  # <= 0: no layer scale
  drop_path_rate: float = 0.1  # the last layer's; layer i has drop_path_rate * i / (L - 1)
  use_mean_pooling: bool = True

  @property
  def grid(self) -> tuple[int, int]:
    (h, w), (ph, pw) = layers.pair(self.image_size), layers.pair(self.patch_size)
    return h // ph, w // pw

  def layer_spec(self) -> BeitLayerSpec:
    return BeitLayerSpec(
      hidden_size=self.hidden_size,
      num_heads=self.num_attention_heads,
      mlp_dim=self.intermediate_size,
      activation=self.hidden_act,
      layer_norm_eps=self.layer_norm_eps,
      pre_norm=True,
      dropout=self.hidden_dropout_prob,
      attention_dropout=self.attention_probs_dropout_prob,
      layer_scale=self.layer_scale_init_value if self.layer_scale_init_value > 0 else None,
      relative_position_window=self.grid if self.use_relative_position_bias else None,
    )

  def drop_path_rates(self) -> tuple[float, ...]:
    n = self.num_hidden_layers
    return tuple(self.drop_path_rate * i / max(n - 1, 1) for i in range(n))


# --- Relative position bias ----------------------------------------------------------


def num_relative_positions(window: tuple[int, int]) -> int:
  """Rows of a relative position table on `window`: the offsets, then 3 [CLS] entries."""
  return (2 * window[0] - 1) * (2 * window[1] - 1) + 3


def relative_position_index(grid: tuple[int, int]) -> np.ndarray:
  """(T, T) table row of each (query, key) pair of [CLS] + the row-major patches of `grid`,
  as transformers' `generate_relative_position_index`."""
  h, w = grid
  coords = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij")).reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)  # (N, N, 2)
  n = num_relative_positions(grid)
  index = np.zeros((h * w + 1,) * 2, np.int32)
  index[1:, 1:] = (rel[..., 0] + h - 1) * (2 * w - 1) + rel[..., 1] + w - 1
  index[0, :] = n - 3  # [CLS] -> patch
  index[:, 0] = n - 2  # patch -> [CLS]
  index[0, 0] = n - 1  # [CLS] -> [CLS]
  return index


def _torch_bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
  """(size_out, size_in) weights of torch's bilinear resize along one axis (align_corners=False,
  no antialias): source index (i + 0.5) * in / out - 0.5, clamped at 0."""
  src = np.maximum((np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5, 0)
  first = np.minimum(np.floor(src).astype(int), size_in - 1)
  second = np.minimum(first + 1, size_in - 1)
  t = src - first
  weights = np.zeros((size_out, size_in))
  np.add.at(weights, (np.arange(size_out), first), 1 - t)
  np.add.at(weights, (np.arange(size_out), second), t)
  return weights


def _resize_bilinear(grid: jax.Array, size: tuple[int, int]) -> jax.Array:
  """(H, W, D) -> (*size, D) as torch's bilinear `interpolate`, in float32."""
  rows, cols = (
    jnp.asarray(_torch_bilinear_matrix(n, m), jnp.float32) for n, m in zip(grid.shape[:2], size)
  )
  hp = jax.lax.Precision.HIGHEST
  return jnp.einsum("ih,hwd,jw->ijd", rows, grid.astype(jnp.float32), cols, precision=hp)


def relative_position_bias(
  table: jax.Array, window: tuple[int, int], grid: tuple[int, int]
) -> jax.Array:
  """(heads, T, T) attention-logit bias of an image with patch `grid` from a `table` learned on
  `window`, as transformers' `BeitRelativePositionBias` (MiDaS v3.1's resize)."""
  heads = table.shape[-1]
  old = (2 * window[0] - 1, 2 * window[1] - 1)
  new = (2 * grid[0] - 1, 2 * grid[1] - 1)
  offsets, cls = table[: old[0] * old[1]], table[old[0] * old[1] :]
  # transformers reads the offsets as (2w-1, 2h-1) before resizing them to the new
  # (2h-1, 2w-1): the identity for the square grids of every BEiT checkpoint.
  offsets = offsets.reshape(old[1], old[0], heads)
  if offsets.shape[:2] != new:
    offsets = _resize_bilinear(offsets, new).astype(table.dtype)
  table = jnp.concatenate([offsets.reshape(-1, heads), cls])
  index = relative_position_index(grid)
  return table[index.reshape(-1)].reshape(*index.shape, heads).transpose(2, 0, 1)


def _pad_bias(bias: jax.Array, num_tokens: int) -> jax.Array:
  """(heads, T, T) image bias -> (heads, num_tokens, num_tokens): zero for the tokens a
  fusion model appended after the image's."""
  extra = num_tokens - bias.shape[-1]
  if extra < 0:
    raise ValueError(
      f"{num_tokens} tokens but the relative position bias is for an image of "
      f"{bias.shape[-1]} ([CLS] + patches): run_layers needs the image's patch `grid`."
    )
  return jnp.pad(bias, ((0, 0), (0, extra), (0, extra)))


class BeitAttention(nn.Module):
  """Self-attention with the relative position bias added to the logits (a layer's own table
  when `spec.relative_position_window`, plus the encoder's shared one); query and value have
  biases, the key has none."""

  spec: BeitLayerSpec
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    mask: jax.Array,
    deterministic: bool,
    shared_bias: jax.Array | None,
    grid: tuple[int, int],
  ) -> jax.Array:
    s = self.spec
    if s.hidden_size % s.num_heads:
      raise ValueError(
        f"hidden_size {s.hidden_size} is not a multiple of num_attention_heads {s.num_heads}."
      )
    dense = lambda name, bias: nn.Dense(
      s.hidden_size, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name
    )
    split = lambda y: y.reshape(*y.shape[:-1], s.num_heads, s.hidden_size // s.num_heads)
    q, k, v = (split(dense(n, n != "key")(x)) for n in ("query", "key", "value"))
    bias = shared_bias
    if s.relative_position_window is not None:
      window = s.relative_position_window
      shape = (num_relative_positions(window), s.num_heads)
      table = self.param("relative_position_bias", nn.initializers.zeros, shape, self.param_dtype)
      own = relative_position_bias(table, window, grid)
      bias = own if bias is None else own + bias
    if bias is not None:
      bias = _pad_bias(bias, x.shape[1])[None].astype(q.dtype)
    mask = mask[:, None, None, :]
    if s.attention_dropout and not deterministic:
      out = nn.dot_product_attention(
        q,
        k,
        v,
        bias=bias,
        mask=mask,
        dropout_rng=self.make_rng("dropout"),
        dropout_rate=s.attention_dropout,
        deterministic=False,
        dtype=self.dtype,
      )
    else:
      out = jax.nn.dot_product_attention(
        q, k, v, bias=bias, mask=mask, implementation=self.attention_impl
      )
    return dense("out", True)(out.reshape(*x.shape[:-1], s.hidden_size))


class BeitLayer(dinov2.Dinov2Layer):
  """DINOv2's pre-LN layer with drop path, attending with `BeitAttention`."""

  def attention(self, x: jax.Array, mask: jax.Array, deterministic: bool, *args: Any) -> jax.Array:
    shared_bias, grid = args
    attn = BeitAttention(self.spec, self.dtype, self.param_dtype, self.attention_impl, name="attn")
    return attn(x, mask, deterministic, shared_bias, grid)


class BeitEncoder(dinov2.Dinov2Encoder):
  """`BeitLayer`s, plus the table shared by all of them when `shared_window` (its grid) is set."""

  shared_window: tuple[int, int] | None = None

  layer_class: ClassVar[type[dinov2.Dinov2Layer]] = BeitLayer
  # (self, x, mask, deterministic, shared_bias, grid): deterministic and grid are static.
  layer_static_argnums: ClassVar[tuple[int, ...]] = (3, 5)

  def setup(self) -> None:
    super().setup()
    if self.shared_window is not None:
      shape = (num_relative_positions(self.shared_window), self.spec.num_heads)
      self.relative_position_bias = self.param(
        "relative_position_bias", nn.initializers.zeros, shape, self.param_dtype
      )

  def __call__(
    self,
    x: jax.Array,
    mask: jax.Array,
    start: int,
    stop: int,
    grid: tuple[int, int],
    *,
    deterministic: bool = True,
  ) -> jax.Array:
    shared = None
    if self.shared_window is not None:
      shared = relative_position_bias(self.relative_position_bias, self.shared_window, grid)
    return super().__call__(x, mask, start, stop, shared, grid, deterministic=deterministic)


class BeitEmbeddings(nn.Module):
  """[CLS] + patches (masked ones replaced by `mask_token`), plus absolute position embeddings
  resized to the image's patch grid when the config has them."""

  config: BeitConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(
    self, pixel_values: jax.Array, bool_masked_pos: jax.Array | None, deterministic: bool
  ) -> jax.Array:
    c = self.config
    d = c.hidden_size
    x = layers.patchify(
      pixel_values,
      image_size=None,
      patch_size=c.patch_size,
      num_channels=c.num_channels,
      features=d,
      use_bias=True,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="patch_embeddings",
    )
    zeros = nn.initializers.zeros  # transformers' init of the tokens and positions
    mask_token = (
      self.param("mask_token", zeros, (1, 1, d), self.param_dtype) if c.use_mask_token else None
    )
    x = dinov2.mask_patches(x, bool_masked_pos, mask_token)
    cls = self.param("cls_token", zeros, (1, 1, d), self.param_dtype).astype(self.dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, d)), x], 1)
    if c.use_absolute_position_embeddings:
      shape = (1, c.grid[0] * c.grid[1] + 1, d)
      pos = self.param("position_embeddings", zeros, shape, self.param_dtype)
      pos = vit.resize_positions(pos, 1, c.grid, vit.patch_grid(pixel_values, c.patch_size))
      x = x + pos.astype(self.dtype)
    return nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)


class BeitPooler(nn.Module):
  """LayerNorm of the mean of the patch tokens (BEiT's `use_mean_pooling`)."""

  eps: float
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return layers.layer_norm(self.eps, self.dtype, self.param_dtype, "layernorm")(x[:, 1:].mean(1))


class BeitModel(layers.EncoderTower):
  """HF `BeitModel`: [CLS] + patches -> pre-LN encoder with relative position biases ->
  final LN and [CLS], or mean-pooled patches and their LN (`use_mean_pooling`)."""

  config: BeitConfig
  add_pooling_layer: bool = True

  config_class: ClassVar[type[BeitConfig]] = BeitConfig
  inputs: ClassVar[tuple[str, ...]] = ("pixel_values",)
  hf_architecture: ClassVar[str] = "BeitModel"
  hf_base_prefix: ClassVar[str] = "beit"  # BeitForImageClassification nests the encoder here
  # Built only if the checkpoint holds it (mmtl.hf): {module attribute: param subtree}.
  optional_parts: ClassVar[dict[str, str]] = {"add_pooling_layer": "pooler"}

  def dummy_inputs(self) -> dict[str, jax.Array]:
    return layers.image_dummy_inputs(self.config)

  def make_encoder(self) -> BeitEncoder:
    c = self.config
    return BeitEncoder(
      c.layer_spec(),
      c.num_hidden_layers,
      self.remat,
      self.dtype,
      self.param_dtype,
      self.attention_impl,
      drop_path_rates=c.drop_path_rates(),
      shared_window=c.grid if c.use_shared_relative_position_bias else None,
    )

  def setup(self) -> None:
    c = self.config
    self.embeddings = BeitEmbeddings(c, self.dtype, self.param_dtype)
    self.encoder = self.make_encoder()
    if not c.use_mean_pooling:
      self.layernorm = layers.layer_norm(c.layer_norm_eps, self.dtype, self.param_dtype)
    elif self.add_pooling_layer:
      self.pooler = BeitPooler(c.layer_norm_eps, self.dtype, self.param_dtype)

  def embed(
    self,
    pixel_values: jax.Array,
    *,
    bool_masked_pos: jax.Array | None = None,
    deterministic: bool = True,
  ) -> tuple[jax.Array, jax.Array]:
    """`bool_masked_pos` (B, num_patches) bool, optional: patches to replace by the mask token.

    With a relative position bias, images of the config's size only: `run_layers` biases
    the config's patch grid (call the model itself for other sizes)."""
    c = self.config
    grid = vit.patch_grid(pixel_values, c.patch_size)
    relative = c.use_relative_position_bias or c.use_shared_relative_position_bias
    if relative and grid != c.grid:
      raise ValueError(
        f"pixel_values of shape {tuple(pixel_values.shape)} give a {grid} patch grid, but as "
        f"a tower BEiT's relative position bias is for the config's {c.grid} "
        f"(image_size {c.image_size}): resize the images to it."
      )
    x = self.embeddings(pixel_values, bool_masked_pos, deterministic)
    return x, jnp.ones(x.shape[:2], bool)

  def run_layers(
    self,
    x: jax.Array,
    mask: jax.Array,
    start: int,
    stop: int,
    *,
    deterministic: bool = True,
    grid: tuple[int, int] | None = None,
  ) -> jax.Array:
    """`grid`: the image's patch grid for the relative position bias (default the config's)."""
    grid = grid or self.config.grid
    return self.encoder(x, mask, start, stop, grid, deterministic=deterministic)

  def finalize(self, x: jax.Array, mask: jax.Array) -> dict[str, jax.Array | None]:
    del mask  # every image token is real
    c = self.config
    if not c.use_mean_pooling:
      x = self.layernorm(x)
    pooled = None
    if self.add_pooling_layer:
      pooled = self.pooler(x) if c.use_mean_pooling else x[:, 0]
    return dict(last_hidden_state=x, pooler_output=pooled)

  def __call__(
    self,
    pixel_values: jax.Array,
    *,
    bool_masked_pos: jax.Array | None = None,
    deterministic: bool = True,
  ) -> dict[str, jax.Array | None]:
    """As transformers' `BeitModel` at any image size (with or without
    `interpolate_pos_encoding`, which changes nothing there)."""
    x = self.embeddings(pixel_values, bool_masked_pos, deterministic)
    mask = jnp.ones(x.shape[:2], bool)
    grid = vit.patch_grid(pixel_values, self.config.patch_size)
    x = self.run_layers(x, mask, 0, self.num_layers, deterministic=deterministic, grid=grid)
    return self.finalize(x, mask)

  def hf_names(self) -> dict[str, layers.HFName]:
    """{mmtl param path: HF state-dict key} (the names transformers saves and the hub has)."""
    c = self.config
    tokens = ("cls_token",)
    tokens += ("mask_token",) if c.use_mask_token else ()
    tokens += ("position_embeddings",) if c.use_absolute_position_embeddings else ()
    names = layers.hf_params({f"embeddings/{name}": f"embeddings.{name}" for name in tokens})
    names.update(
      layers.hf_conv("embeddings/patch_embeddings", "embeddings.patch_embeddings.projection")
    )
    names.update(
      layers.hf_layers(
        c.layer_spec(),
        c.num_hidden_layers,
        "encoder.layer",
        dict(
          query="attention.attention.query",
          key="attention.attention.key",
          value="attention.attention.value",
          out="attention.output.dense",
          attn_norm="layernorm_before",
          attn_scale="lambda_1",
          fc1="intermediate.dense",
          fc2="output.dense",
          mlp_norm="layernorm_after",
          mlp_scale="lambda_2",
        ),
      )
    )
    table = "relative_position_bias.relative_position_bias_table"
    for i in range(c.num_hidden_layers):
      del names[f"encoder/layer_{i}/attn/key/bias"]  # BEiT's key has no bias
      if c.use_relative_position_bias:
        names[f"encoder/layer_{i}/attn/relative_position_bias"] = layers.HFName(
          f"encoder.layer.{i}.attention.attention.{table}"
        )
    if c.use_shared_relative_position_bias:
      names["encoder/relative_position_bias"] = layers.HFName(f"encoder.{table}")
    if c.use_mean_pooling:
      names.update(layers.hf_norm("pooler/layernorm", "pooler.layernorm"))
    else:
      names.update(layers.hf_norm("layernorm", "layernorm"))
    return names
