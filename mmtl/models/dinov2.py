"""DINOv2 (HF `Dinov2Model`): a pre-LN ViT with layer scale, optional SwiGLU MLP, any image size.

Input: `pixel_values` float (B, H, W, C) NHWC, normalized with the checkpoint's
mean/std, at any H, W: the position embeddings are resized to the (H // patch,
W // patch) grid exactly as transformers' `interpolate_pos_encoding` does (torch
bicubic, in float32), so DINOv2 runs at its 518 px pretraining size and at the 224 px
of its processor alike. `pooler_output` is the final-layer-normed [CLS] token (no
pooler weights). `drop_path_rate` is stochastic depth on every layer's two residual branches
(the same rate in every layer, as transformers), in training only. Register-token checkpoints
(`dinov2_with_registers`) are not this family.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmtl.models import layers, vit


@dataclasses.dataclass(frozen=True)
class Dinov2Config(layers.HFConfig):
  model_type: ClassVar[str] = "dinov2"
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  mlp_ratio: int = 4
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.0  # on the embeddings only (the layers have none)
  attention_probs_dropout_prob: float = 0.0
  layer_norm_eps: float = 1e-6
  image_size: int | tuple[int, int] = 224  # the size the position embeddings were learned at
  patch_size: int | tuple[int, int] = 14
  num_channels: int = 3
  qkv_bias: bool = True
  layerscale_value: float = 1.0  # layer scale init
  use_swiglu_ffn: bool = False  # ViT-g: SwiGLU MLP
  use_mask_token: bool = True  # a `mask_token` param (replaces patches in `bool_masked_pos`)
  drop_path_rate: float = 0.0  # stochastic depth, the same in every layer

  @property
  def grid(self) -> tuple[int, int]:
    (h, w), (ph, pw) = layers.pair(self.image_size), layers.pair(self.patch_size)
    return h // ph, w // pw

  def layer_spec(self) -> layers.LayerSpec:
    mlp_dim = int(self.hidden_size * self.mlp_ratio)
    if self.use_swiglu_ffn:  # 2/3 of the MLP width, rounded up to a multiple of 8 (as HF)
      mlp_dim = (int(mlp_dim * 2 / 3) + 7) // 8 * 8
    return layers.LayerSpec(
      hidden_size=self.hidden_size,
      num_heads=self.num_attention_heads,
      mlp_dim=mlp_dim,
      activation="silu" if self.use_swiglu_ffn else self.hidden_act,
      layer_norm_eps=self.layer_norm_eps,
      pre_norm=True,
      qkv_bias=self.qkv_bias,
      attention_dropout=self.attention_probs_dropout_prob,
      layer_scale=self.layerscale_value,
      gated_mlp=self.use_swiglu_ffn,
    )

  def drop_path_rates(self) -> tuple[float, ...]:
    return (self.drop_path_rate,) * self.num_hidden_layers


class Dinov2Layer(layers.EncoderLayer):
  """Pre-LN `layers.EncoderLayer` with stochastic depth (rate `drop_path`) on both residual
  branches, after dropout and layer scale as in transformers' DINOv2 and BEiT layers.

  `attention` builds the `attn` sublayer; arguments the encoder passes after `deterministic`
  go to it (BEiT's attention bias).
  """

  drop_path: float = 0.0

  def attention(self, x: jax.Array, mask: jax.Array, deterministic: bool, *args: Any) -> jax.Array:
    del args  # DINOv2's attention takes nothing more
    attn = layers.Attention(
      self.spec, self.dtype, self.param_dtype, self.attention_impl, name="attn"
    )
    return attn(x, mask, deterministic)

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool, *args: Any) -> jax.Array:
    s = self.spec
    norm = lambda name: layers.layer_norm(s.layer_norm_eps, self.dtype, self.param_dtype, name)
    drop, drop_path = nn.Dropout(s.dropout), layers.DropPath(self.drop_path)
    branch = lambda scale, h: drop_path(
      self._scaled(scale, drop(h, deterministic=deterministic)), deterministic
    )
    x = x + branch("attn_scale", self.attention(norm("attn_norm")(x), mask, deterministic, *args))
    h = layers.Mlp(s, self.dtype, self.param_dtype, name="mlp")(norm("mlp_norm")(x))
    return x + branch("mlp_scale", h)


class Dinov2Encoder(layers.Encoder):
  """`layers.Encoder` of `layer_class` layers, layer i with drop path rate `drop_path_rates[i]`.

  `__call__` passes any arguments after `stop` on to every layer (its attention).
  """

  drop_path_rates: tuple[float, ...] = ()

  layer_class: ClassVar[type[Dinov2Layer]] = Dinov2Layer
  # Static arguments of the layer's __call__ under remat, counting `self` (deterministic).
  layer_static_argnums: ClassVar[tuple[int, ...]] = (3,)

  def setup(self) -> None:
    layers.check_remat(self.remat)
    if len(self.drop_path_rates) != self.num_layers:
      raise ValueError(
        f"{len(self.drop_path_rates)} drop path rates for {self.num_layers} layers: give one each."
      )
    layer_cls = self.layer_class
    if self.remat != "none":
      policy = layers.REMAT_POLICIES[self.remat]
      layer_cls = nn.remat(layer_cls, policy=policy, static_argnums=self.layer_static_argnums)
    for i, rate in enumerate(self.drop_path_rates):
      layer = layer_cls(self.spec, self.dtype, self.param_dtype, self.attention_impl, rate)
      setattr(self, f"layer_{i}", layer)

  def __call__(
    self,
    x: jax.Array,
    mask: jax.Array,
    start: int,
    stop: int,
    *args: Any,
    deterministic: bool = True,
  ) -> jax.Array:
    if not 0 <= start <= stop <= self.num_layers:
      raise ValueError(
        f"Layer range [{start}, {stop}) is outside the encoder's "
        f"{self.num_layers} layers; need 0 <= start <= stop <= {self.num_layers}."
      )
    for i in range(start, stop):
      x = getattr(self, f"layer_{i}")(x, mask, deterministic, *args)
    return x


def mask_patches(
  x: jax.Array, bool_masked_pos: jax.Array | None, mask_token: jax.Array | None
) -> jax.Array:
  """Patch tokens `x` (B, N, D) with those at `bool_masked_pos` (B, N) replaced by
  `mask_token` (D values in any shape: (1, D), (1, 1, D)); `x` itself when nothing is masked."""
  if bool_masked_pos is None:
    return x
  if mask_token is None:
    raise ValueError("bool_masked_pos needs a mask token: this config has use_mask_token=False.")
  return jnp.where(bool_masked_pos[..., None], mask_token.reshape(-1).astype(x.dtype), x)


class Dinov2Embeddings(nn.Module):
  """[CLS] + patches (masked ones replaced by `mask_token`) + position embeddings resized to
  the image's patch grid."""

  config: Dinov2Config
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
    mask_token = None
    if c.use_mask_token:
      mask_token = self.param("mask_token", nn.initializers.zeros, (1, d), self.param_dtype)
    x = mask_patches(x, bool_masked_pos, mask_token)
    init = nn.initializers.truncated_normal(0.02)
    cls = self.param("cls_token", init, (1, 1, d), self.param_dtype)
    pos = self.param(
      "position_embeddings", init, (1, c.grid[0] * c.grid[1] + 1, d), self.param_dtype
    )
    pos = vit.resize_positions(pos, 1, c.grid, vit.patch_grid(pixel_values, c.patch_size))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (x.shape[0], 1, d)), x], 1)
    x = x + pos.astype(self.dtype)
    return nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)


class Dinov2Model(layers.EncoderTower):
  """HF `Dinov2Model`: [CLS] + patches -> pre-LN encoder with layer scale -> final LN."""

  config: Dinov2Config

  config_class: ClassVar[type[Dinov2Config]] = Dinov2Config
  inputs: ClassVar[tuple[str, ...]] = ("pixel_values",)
  hf_architecture: ClassVar[str] = "Dinov2Model"
  hf_base_prefix: ClassVar[str] = "dinov2"  # Dinov2ForImageClassification nests the encoder here

  def dummy_inputs(self) -> dict[str, jax.Array]:
    return layers.image_dummy_inputs(self.config)

  def make_encoder(self) -> Dinov2Encoder:
    c = self.config
    return Dinov2Encoder(
      c.layer_spec(),
      c.num_hidden_layers,
      self.remat,
      self.dtype,
      self.param_dtype,
      self.attention_impl,
      drop_path_rates=c.drop_path_rates(),
    )

  def setup(self) -> None:
    c = self.config
    self.embeddings = Dinov2Embeddings(c, self.dtype, self.param_dtype)
    self.encoder = self.make_encoder()
    self.layernorm = layers.layer_norm(c.layer_norm_eps, self.dtype, self.param_dtype)

  def embed(
    self,
    pixel_values: jax.Array,
    *,
    bool_masked_pos: jax.Array | None = None,
    deterministic: bool = True,
  ) -> tuple[jax.Array, jax.Array]:
    """`bool_masked_pos` (B, num_patches) bool, optional: patches to replace by the mask token."""
    x = self.embeddings(pixel_values, bool_masked_pos, deterministic)
    return x, jnp.ones(x.shape[:2], bool)

  def finalize(self, x: jax.Array, mask: jax.Array) -> dict[str, jax.Array | None]:
    del mask  # every image token is real
    x = self.layernorm(x)
    return dict(last_hidden_state=x, pooler_output=x[:, 0])

  def __call__(
    self,
    pixel_values: jax.Array,
    *,
    bool_masked_pos: jax.Array | None = None,
    deterministic: bool = True,
  ) -> dict[str, jax.Array | None]:
    x, mask = self.embed(pixel_values, bool_masked_pos=bool_masked_pos, deterministic=deterministic)
    x = self.run_layers(x, mask, 0, self.num_layers, deterministic=deterministic)
    return self.finalize(x, mask)

  def hf_names(self) -> dict[str, layers.HFName]:
    """{mmtl param path: HF state-dict key} (the names transformers saves and the hub has)."""
    c = self.config
    tokens = ("cls_token", "position_embeddings") + (("mask_token",) if c.use_mask_token else ())
    names = layers.hf_params({f"embeddings/{name}": f"embeddings.{name}" for name in tokens})
    names.update(
      layers.hf_conv("embeddings/patch_embeddings", "embeddings.patch_embeddings.projection")
    )
    # The SwiGLU MLP saves gate and up fused in one Linear, [gate; up]: mmtl's fc1 as is.
    mlp_in, mlp_out = ("weights_in", "weights_out") if c.use_swiglu_ffn else ("fc1", "fc2")
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
          attn_norm="norm1",
          attn_scale="layer_scale1.lambda1",
          fc1=f"mlp.{mlp_in}",
          fc2=f"mlp.{mlp_out}",
          mlp_norm="norm2",
          mlp_scale="layer_scale2.lambda1",
        ),
      )
    )
    names.update(layers.hf_norm("layernorm", "layernorm"))
    return names
