"""SigLIP (HF `SiglipModel`) and its towers, with the HF name mapping.

SigLIP's towers are CLIP's with three changes, so they subclass them (same
embedding and encoder-layer names): the vision tower has no class token and no
pre-LN, and pools with a MAP head (a learned probe attends to every patch,
then an MLP); the text tower is not causal and pools its last token (padding
included: SigLIP is trained on max_length padding) through a Dense `head`.
Embeddings are these poolers, L2-normalized, without projections; the logits
are `exp(logit_scale) * cosine + logit_bias`, trained with the pairwise
sigmoid loss (mmtl.losses.sigmoid_per_example).

Params: `vision/...`, `text/...`, `logit_scale` (1,), `logit_bias` (1,).
`SiglipVisionModel` / `SiglipTextModel` params are exactly the subtrees.
Inputs: `pixel_values` float (B, H, W, 3) NHWC; `input_ids`, `attention_mask` int32.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmtl.models import clip, layers


@dataclasses.dataclass(frozen=True)
class _SiglipTowerConfig(layers.HFConfig):
  """Fields and layer of both towers (HF defaults)."""

  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  hidden_act: str = "gelu_pytorch_tanh"
  layer_norm_eps: float = 1e-6
  attention_dropout: float = 0.0

  def layer_spec(self) -> layers.LayerSpec:
    return layers.LayerSpec(
      hidden_size=self.hidden_size,
      num_heads=self.num_attention_heads,
      mlp_dim=self.intermediate_size,
      activation=self.hidden_act,
      layer_norm_eps=self.layer_norm_eps,
      pre_norm=True,
      attention_dropout=self.attention_dropout,
    )


@dataclasses.dataclass(frozen=True)
class SiglipTextConfig(_SiglipTowerConfig):
  model_type: ClassVar[str] = "siglip_text_model"
  vocab_size: int = 32000
  max_position_embeddings: int = 64
  pad_token_id: int | None = 1
  bos_token_id: int | None = 49406
  eos_token_id: int | None = 49407
  projection_size: int | None = None  # the `head`'s output width; None: hidden_size


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig(_SiglipTowerConfig):
  model_type: ClassVar[str] = "siglip_vision_model"
  num_channels: int = 3
  image_size: int | tuple[int, int] = 224
  patch_size: int | tuple[int, int] = 16
  vision_use_head: bool = True


@dataclasses.dataclass(frozen=True)
class SiglipConfig(clip.DualEncoderConfig):
  model_type: ClassVar[str] = "siglip"
  text_config: SiglipTextConfig = SiglipTextConfig()
  vision_config: SiglipVisionConfig = SiglipVisionConfig()


class SiglipVisionEmbeddings(clip.CLIPVisionEmbeddings):
  """Patches (a biased conv) + one position embedding per patch; no class token."""

  patch_bias: ClassVar[bool] = True
  class_token: ClassVar[bool] = False


class PackedInProjection(nn.Module):
  """torch.nn.MultiheadAttention's `in_proj`: q, k, v packed in one kernel (D, 3D) and bias
  (as HF stores it), applied to `parts` (0 q, 1 k, 2 v) only: the probe needs only q, the
  tokens only k and v."""

  features: int
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, parts: slice) -> jax.Array:
    d = self.features
    kernel = self.param("kernel", nn.initializers.xavier_uniform(), (d, 3 * d), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (3 * d,), self.param_dtype)
    cols = slice(parts.start * d, parts.stop * d)
    return x.astype(self.dtype) @ kernel[:, cols].astype(self.dtype) + bias[cols].astype(self.dtype)


class ProbeAttention(nn.Module):
  """torch.nn.MultiheadAttention of queries over tokens (no mask), under HF's param names."""

  num_heads: int
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, queries: jax.Array, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    in_proj = PackedInProjection(d, self.dtype, self.param_dtype, name="in_proj")
    split = lambda y: y.reshape(*y.shape[:-1], self.num_heads, d // self.num_heads)
    k, v = jnp.split(in_proj(x, slice(1, 3)), 2, axis=-1)
    h = jax.nn.dot_product_attention(split(in_proj(queries, slice(0, 1))), split(k), split(v))
    out = nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype, name="out_proj")
    return out(h.reshape(*h.shape[:-2], d))


class MultiheadAttentionPooling(nn.Module):
  """HF `SiglipMultiheadAttentionPoolingHead` (MAP): a learned probe attends to every token,
  then a residual MLP on the layer-normed result."""

  config: SiglipVisionConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    d = c.hidden_size
    probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, d), self.param_dtype)
    probe = jnp.broadcast_to(probe.astype(self.dtype), (x.shape[0], 1, d))
    h = ProbeAttention(c.num_attention_heads, self.dtype, self.param_dtype, name="attention")(
      probe, x
    )
    y = layers.layer_norm(c.layer_norm_eps, self.dtype, self.param_dtype, name="layernorm")(h)
    return (h + layers.Mlp(c.layer_spec(), self.dtype, self.param_dtype, name="mlp")(y))[:, 0]


class SiglipVisionModel(clip.CLIPVisionModel):
  """HF `SiglipVisionModel`: pooler_output = MAP head of post_layernorm(last_hidden_state)
  (None with vision_use_head=False)."""

  config: SiglipVisionConfig

  config_class: ClassVar[type[SiglipVisionConfig]] = SiglipVisionConfig
  hf_architecture: ClassVar[str] = "SiglipVisionModel"

  def setup(self) -> None:
    c = self.config
    self.embeddings = SiglipVisionEmbeddings(c, self.dtype, self.param_dtype)
    self.encoder = self.make_encoder()
    self.post_layernorm = layers.layer_norm(c.layer_norm_eps, self.dtype, self.param_dtype)
    if c.vision_use_head:
      self.head = MultiheadAttentionPooling(c, self.dtype, self.param_dtype)

  def embed(
    self, pixel_values: jax.Array, *, deterministic: bool = True
  ) -> tuple[jax.Array, jax.Array]:
    del deterministic  # SigLIP has no embedding dropout
    x = self.embeddings(pixel_values)
    return x, jnp.ones(x.shape[:2], bool)

  def finalize(self, x: jax.Array, mask: jax.Array) -> dict[str, jax.Array | None]:
    del mask
    x = self.post_layernorm(x)
    return dict(
      last_hidden_state=x, pooler_output=self.head(x) if self.config.vision_use_head else None
    )

  def hf_names(self) -> dict[str, layers.HFName]:
    """{mmtl param path: HF state-dict key} (see mmtl.hf)."""
    p = self.hf_base_prefix
    names = dict(layers.hf_conv("embeddings/patch_embedding", f"{p}.embeddings.patch_embedding"))
    names.update(
      layers.hf_embed("embeddings/position_embedding", f"{p}.embeddings.position_embedding")
    )
    names.update(layers.hf_norm("post_layernorm", f"{p}.post_layernorm"))
    if self.config.vision_use_head:
      h = f"{p}.head"
      names["head/probe"] = layers.HFName(f"{h}.probe")
      names["head/attention/in_proj/kernel"] = layers.HFName(
        f"{h}.attention.in_proj_weight", layers.Transform.LINEAR
      )
      names["head/attention/in_proj/bias"] = layers.HFName(f"{h}.attention.in_proj_bias")
      names.update(layers.hf_dense("head/attention/out_proj", f"{h}.attention.out_proj"))
      names.update(layers.hf_norm("head/layernorm", f"{h}.layernorm"))
      names.update(layers.hf_dense("head/mlp/fc1", f"{h}.mlp.fc1"))
      names.update(layers.hf_dense("head/mlp/fc2", f"{h}.mlp.fc2"))
    return clip.encoder_layer_names(self, p, names)


class SiglipTextModel(clip.CLIPTextModel):
  """HF `SiglipTextModel`: bidirectional; pooler_output = head(final state at the last
  position), which is padding for max_length-padded text, as SigLIP is trained."""

  config: SiglipTextConfig

  config_class: ClassVar[type[SiglipTextConfig]] = SiglipTextConfig
  hf_architecture: ClassVar[str] = "SiglipTextModel"

  def setup(self) -> None:
    super().setup()
    c = self.config
    self.head = nn.Dense(
      c.projection_size or c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype
    )

  def finalize(
    self, x: jax.Array, mask: jax.Array, input_ids: jax.Array | None = None
  ) -> dict[str, jax.Array]:
    del mask, input_ids  # the last position, whatever it holds
    x = self.final_layer_norm(x)
    return dict(last_hidden_state=x, pooler_output=self.head(x[:, -1]))

  def hf_names(self) -> dict[str, layers.HFName]:
    """{mmtl param path: HF state-dict key} (see mmtl.hf)."""
    return {**super().hf_names(), **dict(layers.hf_dense("head", f"{self.hf_base_prefix}.head"))}


class SiglipModel(clip.DualEncoder):
  """HF `SiglipModel`: both towers and the learned `logit_scale` and `logit_bias`."""

  config: SiglipConfig

  config_class: ClassVar[type[SiglipConfig]] = SiglipConfig
  towers: ClassVar[dict[str, tuple[str, type[layers.EncoderTower]]]] = {
    "vision": ("vision_config", SiglipVisionModel),
    "text": ("text_config", SiglipTextModel),
  }
  hf_architecture: ClassVar[str] = "SiglipModel"

  def setup(self) -> None:
    self.setup_towers()
    # The paper's init (t = 10, b = -10): the ~B^2 negatives do not swamp the first steps.
    scalar = lambda name, value: self.param(
      name, nn.initializers.constant(value), (1,), self.param_dtype
    )
    self.logit_scale = scalar("logit_scale", jnp.log(10.0))
    self.logit_bias = scalar("logit_bias", -10.0)

  def __call__(
    self,
    input_ids: jax.Array,
    pixel_values: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    deterministic: bool = True,
  ) -> dict[str, Any]:
    vision_out = self.vision(pixel_values, deterministic=deterministic)
    text_out = self.text(input_ids, attention_mask, deterministic=deterministic)
    image_embeds = clip.l2_normalize(vision_out["pooler_output"])
    text_embeds = clip.l2_normalize(text_out["pooler_output"])
    logits_per_text = text_embeds @ image_embeds.T * jnp.exp(self.logit_scale) + self.logit_bias
    return dict(
      logits_per_image=logits_per_text.T,
      logits_per_text=logits_per_text,
      image_embeds=image_embeds,
      text_embeds=text_embeds,
      vision_model_output=vision_out,
      text_model_output=text_out,
    )

  def hf_names(self) -> dict[str, layers.HFName]:
    """{mmtl param path: HF state-dict key}, both towers included (see mmtl.hf)."""
    return {**self.head_hf_names(), **self.tower_hf_names()}

  def head_hf_names(self) -> dict[str, layers.HFName]:
    """{param path in a contrastive FusionModel's `head`: HF key}: the temperature and bias
    (SigLIP has no projections: the head takes `config.model.width=0`)."""
    return layers.hf_params({"logit_scale": "logit_scale", "logit_bias": "logit_bias"})
