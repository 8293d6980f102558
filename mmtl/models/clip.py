"""CLIP (HF `CLIPModel`) and its towers, with the HF name mapping.

Params: `vision/...`, `text/...`, `visual_projection/kernel`,
`text_projection/kernel`, `logit_scale`. `CLIPVisionModel` / `CLIPTextModel`
params are exactly the `vision` / `text` subtrees, so a tower loads from a full
CLIP checkpoint and its params drop into a CLIPModel unchanged; the projections
and `logit_scale` load into a contrastive FusionModel's head (`head_hf_names`).
Inputs: `pixel_values` float (B, H, W, 3) NHWC normalized with the checkpoint's
mean/std; `input_ids`, `attention_mask` int32 (B, L).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Self

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmtl.models import layers


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(layers.HFConfig):
  model_type: ClassVar[str] = "clip_text_model"
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  projection_dim: int = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  attention_dropout: float = 0.0
  pad_token_id: int | None = 1
  bos_token_id: int | None = 49406
  eos_token_id: int = 49407

  def layer_spec(self) -> layers.LayerSpec:
    return layers.LayerSpec(
      hidden_size=self.hidden_size,
      num_heads=self.num_attention_heads,
      mlp_dim=self.intermediate_size,
      activation=self.hidden_act,
      layer_norm_eps=self.layer_norm_eps,
      pre_norm=True,
      attention_dropout=self.attention_dropout,
      causal=True,
    )


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(layers.HFConfig):
  model_type: ClassVar[str] = "clip_vision_model"
  hidden_size: int = 768
  intermediate_size: int = 3072
  projection_dim: int = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int | tuple[int, int] = 224
  patch_size: int | tuple[int, int] = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
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


class DualEncoderConfig(layers.HFConfig):
  """Mixin for the config of a two-tower model (CLIP, SigLIP): `text_config` and
  `vision_config` fields, each its own HFConfig, nested in config.json as HF nests them."""

  sub_configs: ClassVar[tuple[str, ...]] = ("text_config", "vision_config")

  @classmethod
  def from_hf(cls, d: dict[str, Any]) -> Self:
    own = {k: v for k, v in d.items() if k not in cls.sub_configs}
    # A sub-config's class is its default's: the field's type annotation is a string here.
    subs = {k: type(getattr(cls, k)).from_hf(d.get(k) or {}) for k in cls.sub_configs}
    return dataclasses.replace(super().from_hf(own), **subs)

  def to_hf(self) -> dict[str, Any]:
    return {**super().to_hf(), **{k: getattr(self, k).to_hf() for k in self.sub_configs}}


@dataclasses.dataclass(frozen=True)
class CLIPConfig(DualEncoderConfig):
  model_type: ClassVar[str] = "clip"
  text_config: CLIPTextConfig = CLIPTextConfig()
  vision_config: CLIPVisionConfig = CLIPVisionConfig()
  projection_dim: int = 512
  logit_scale_init_value: float = 2.6592


def encoder_layer_names(
  tower: layers.EncoderTower, hf_prefix: str, embeddings: dict[str, layers.HFName]
) -> dict[str, layers.HFName]:
  """`embeddings` + the encoder-layer names of a CLIP-style tower (HF `CLIPEncoderLayer`,
  which SigLIP's copies)."""
  names = dict(embeddings)
  spec = tower.config.layer_spec()
  names.update(
    layers.hf_layers(
      spec,
      tower.config.num_hidden_layers,
      f"{hf_prefix}.encoder.layers",
      dict(
        query="self_attn.q_proj",
        key="self_attn.k_proj",
        value="self_attn.v_proj",
        out="self_attn.out_proj",
        attn_norm="layer_norm1",
        fc1="mlp.fc1",
        fc2="mlp.fc2",
        mlp_norm="layer_norm2",
      ),
    )
  )
  return names


class CLIPVisionEmbeddings(nn.Module):
  """Patches + a class token + one learned position embedding per token."""

  config: Any
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  patch_bias: ClassVar[bool] = False  # the patch conv's bias (SigLIP has one)
  class_token: ClassVar[bool] = True  # `class_embedding` first (SigLIP has none)

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    c = self.config
    x = layers.patchify(
      pixel_values,
      image_size=c.image_size,
      patch_size=c.patch_size,
      num_channels=c.num_channels,
      features=c.hidden_size,
      use_bias=self.patch_bias,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="patch_embedding",
    )
    if self.class_token:
      cls = self.param(
        "class_embedding",
        nn.initializers.normal(c.hidden_size**-0.5),
        (c.hidden_size,),
        self.param_dtype,
      )
      cls = jnp.broadcast_to(cls.astype(self.dtype), (x.shape[0], 1, c.hidden_size))
      x = jnp.concatenate([cls, x], axis=1)
    pos = nn.Embed(
      x.shape[1],
      c.hidden_size,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="position_embedding",
    )
    return x + pos(jnp.arange(x.shape[1])[None])


class CLIPVisionModel(layers.EncoderTower):
  """HF `CLIPVisionModel`: pooler_output = post_layernorm(last_hidden_state[:, 0])."""

  config: CLIPVisionConfig

  config_class: ClassVar[type[CLIPVisionConfig]] = CLIPVisionConfig
  inputs: ClassVar[tuple[str, ...]] = ("pixel_values",)
  hf_architecture: ClassVar[str] = "CLIPVisionModel"
  hf_base_prefix: ClassVar[str] = "vision_model"

  def dummy_inputs(self) -> dict[str, jax.Array]:
    return layers.image_dummy_inputs(self.config)

  def setup(self) -> None:
    c = self.config
    self.embeddings = CLIPVisionEmbeddings(c, self.dtype, self.param_dtype)
    self.pre_layernorm = layers.layer_norm(c.layer_norm_eps, self.dtype, self.param_dtype)
    self.encoder = self.make_encoder()
    self.post_layernorm = layers.layer_norm(c.layer_norm_eps, self.dtype, self.param_dtype)

  def embed(
    self, pixel_values: jax.Array, *, deterministic: bool = True
  ) -> tuple[jax.Array, jax.Array]:
    del deterministic  # CLIP has no embedding dropout
    x = self.pre_layernorm(self.embeddings(pixel_values))
    return x, jnp.ones(x.shape[:2], bool)

  def finalize(self, x: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
    del mask
    return dict(last_hidden_state=x, pooler_output=self.post_layernorm(x[:, 0]))

  def __call__(
    self, pixel_values: jax.Array, *, deterministic: bool = True
  ) -> dict[str, jax.Array]:
    x, mask = self.embed(pixel_values)
    x = self.run_layers(x, mask, 0, self.num_layers, deterministic=deterministic)
    return self.finalize(x, mask)

  def hf_names(self) -> dict[str, layers.HFName]:
    """{mmtl param path: HF state-dict key} (see mmtl.hf)."""
    p = self.hf_base_prefix
    emb = {"embeddings/class_embedding": layers.HFName(f"{p}.embeddings.class_embedding")}
    emb.update(
      layers.hf_conv("embeddings/patch_embedding", f"{p}.embeddings.patch_embedding", bias=False)
    )
    emb.update(
      layers.hf_embed("embeddings/position_embedding", f"{p}.embeddings.position_embedding")
    )
    # HF spells it "pre_layrnorm".
    emb.update(layers.hf_norm("pre_layernorm", f"{p}.pre_layrnorm"))
    emb.update(layers.hf_norm("post_layernorm", f"{p}.post_layernorm"))
    return encoder_layer_names(self, p, emb)


class CLIPTextModel(layers.EncoderTower):
  """HF `CLIPTextModel`: causal encoder; pooler_output = final state at the EOS token."""

  config: CLIPTextConfig

  config_class: ClassVar[type[CLIPTextConfig]] = CLIPTextConfig
  inputs: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask")
  hf_architecture: ClassVar[str] = "CLIPTextModel"
  hf_base_prefix: ClassVar[str] = "text_model"

  def dummy_inputs(self) -> dict[str, jax.Array]:
    """Smallest valid inputs, for `init` and shape evaluation."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return dict(input_ids=ids, attention_mask=jnp.ones_like(ids))

  def setup(self) -> None:
    c = self.config
    embed = lambda num, name: nn.Embed(
      num, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name=name
    )
    self.token_embedding = embed(c.vocab_size, "token_embedding")
    self.position_embedding = embed(c.max_position_embeddings, "position_embedding")
    self.encoder = self.make_encoder()
    self.final_layer_norm = layers.layer_norm(c.layer_norm_eps, self.dtype, self.param_dtype)

  def embed(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    deterministic: bool = True,
  ) -> tuple[jax.Array, jax.Array]:
    del deterministic  # CLIP has no embedding dropout
    length, max_len = input_ids.shape[1], self.config.max_position_embeddings
    if length > max_len:
      raise ValueError(
        f"Sequence length {length} > max_position_embeddings {max_len}: "
        "truncate the inputs (tokenizer max_length)."
      )
    x = self.token_embedding(input_ids) + self.position_embedding(jnp.arange(length)[None])
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    return x, attention_mask.astype(bool)

  def finalize(
    self, x: jax.Array, mask: jax.Array, input_ids: jax.Array | None = None
  ) -> dict[str, jax.Array]:
    """Final LN and EOS pooling.

    With `input_ids`, the EOS position follows transformers exactly: the first
    `eos_token_id` token, or the largest id when eos_token_id == 2 (configs from
    before transformers PR #24773). Without them (fusion passes only x, mask) it
    is the last real token, which is the EOS for right-padded tokenizer output.
    """
    x = self.final_layer_norm(x)
    eos = self.config.eos_token_id
    if input_ids is None:
      pos = mask.sum(-1) - 1
    elif eos == 2:
      pos = jnp.argmax(input_ids, -1)
    else:
      pos = jnp.argmax(input_ids == eos, -1)
    pooled = jnp.take_along_axis(x, pos[:, None, None], axis=1)[:, 0]
    return dict(last_hidden_state=x, pooler_output=pooled)

  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    deterministic: bool = True,
  ) -> dict[str, jax.Array]:
    x, mask = self.embed(input_ids, attention_mask)
    x = self.run_layers(x, mask, 0, self.num_layers, deterministic=deterministic)
    return self.finalize(x, mask, input_ids)

  def hf_names(self) -> dict[str, layers.HFName]:
    """{mmtl param path: HF state-dict key} (see mmtl.hf)."""
    p = self.hf_base_prefix
    emb = {}
    emb.update(layers.hf_embed("token_embedding", f"{p}.embeddings.token_embedding"))
    emb.update(layers.hf_embed("position_embedding", f"{p}.embeddings.position_embedding"))
    emb.update(layers.hf_norm("final_layer_norm", f"{p}.final_layer_norm"))
    return encoder_layer_names(self, p, emb)


# A contrastive FusionModel's head projections (mmtl.models.fusion.ContrastiveHead) -> CLIP's.
HEAD_PROJECTIONS = {"image_proj": "visual_projection", "text_proj": "text_projection"}


def l2_normalize(x: jax.Array) -> jax.Array:
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class DualEncoder(nn.Module):
  """What CLIP-style models share: their `towers`, built from the config's sub-configs."""

  config: DualEncoderConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  remat: str = "none"
  attention_impl: str | None = None

  # Each tower: (its sub-config's key in config.json and field of the config, its class). The
  # name is the tower's param subtree here and the `tower=` that mmtl.hf builds it alone for.
  towers: ClassVar[dict[str, tuple[str, type[layers.EncoderTower]]]]
  hf_base_prefix: ClassVar[str | None] = None  # the checkpoints don't nest the model

  def setup_towers(self) -> None:
    """Create each tower as the submodule of its name (call from `setup`)."""
    kw = dict(
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      remat=self.remat,
      attention_impl=self.attention_impl,
    )
    for name, (key, cls) in self.towers.items():
      setattr(self, name, cls(getattr(self.config, key), **kw))

  def _unbound_towers(self) -> dict[str, layers.EncoderTower]:
    return {
      name: cls(getattr(self.config, key), parent=None) for name, (key, cls) in self.towers.items()
    }

  def dummy_inputs(self) -> dict[str, jax.Array]:
    """Smallest valid inputs, for `init` and shape evaluation."""
    return {
      k: x for tower in self._unbound_towers().values() for k, x in tower.dummy_inputs().items()
    }

  def tower_hf_names(self) -> dict[str, layers.HFName]:
    """{mmtl param path: HF state-dict key} of both towers (see mmtl.hf)."""
    return {
      f"{path}/{k}": v
      for path, tower in self._unbound_towers().items()
      for k, v in tower.hf_names().items()
    }

  def head_advice(self) -> str:
    """What makes a dual encoder's head fit a contrastive FusionModel's (mmtl.hf.load_into)."""
    dim = getattr(self.config, "projection_dim", None)
    width = (
      f"config.model.width must equal the checkpoint's projection_dim ({dim})"
      if dim
      else "config.model.width must be 0 (no projections: the towers' poolers are the embeddings)"
    )
    bias = (
      " and config.model.contrastive_loss='sigmoid'" if "logit_bias" in self.head_hf_names() else ""
    )
    return (
      f"{width}{bias}, and the towers must be this checkpoint's (tower='vision' / 'text'); or "
      "leave the head out of model_init (or list its params in dont_load) to train it from "
      "scratch."
    )


class CLIPModel(DualEncoder):
  """HF `CLIPModel`: both towers, projections and the learned `logit_scale`."""

  config: CLIPConfig

  config_class: ClassVar[type[CLIPConfig]] = CLIPConfig
  towers: ClassVar[dict[str, tuple[str, type[layers.EncoderTower]]]] = {
    "vision": ("vision_config", CLIPVisionModel),
    "text": ("text_config", CLIPTextModel),
  }
  hf_architecture: ClassVar[str] = "CLIPModel"

  def setup(self) -> None:
    c = self.config
    self.setup_towers()
    proj = lambda: nn.Dense(
      c.projection_dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype
    )
    self.visual_projection = proj()
    self.text_projection = proj()
    self.logit_scale = self.param(
      "logit_scale", nn.initializers.constant(c.logit_scale_init_value), (), self.param_dtype
    )

  def get_image_features(self, pixel_values: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """Projected (not normalized) image embeddings, as HF's get_image_features."""
    return self.visual_projection(
      self.vision(pixel_values, deterministic=deterministic)["pooler_output"]
    )

  def get_text_features(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    deterministic: bool = True,
  ) -> jax.Array:
    """Projected (not normalized) text embeddings, as HF's get_text_features."""
    out = self.text(input_ids, attention_mask, deterministic=deterministic)
    return self.text_projection(out["pooler_output"])

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
    image_embeds = l2_normalize(self.visual_projection(vision_out["pooler_output"]))
    text_embeds = l2_normalize(self.text_projection(text_out["pooler_output"]))
    logits_per_text = text_embeds @ image_embeds.T * jnp.exp(self.logit_scale)
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
    names = {"logit_scale": layers.HFName("logit_scale")}
    for hf_name in HEAD_PROJECTIONS.values():
      names.update(layers.hf_dense(hf_name, hf_name, bias=False))
    return {**names, **self.tower_hf_names()}

  def head_hf_names(self) -> dict[str, layers.HFName]:
    """{param path in a contrastive FusionModel's `head`: HF key}: the projections and the
    temperature, so a CLIP checkpoint gives the whole dual encoder (zero-shot at step 0).

    Both store `logit_scale` = log(1 / temperature); logits are exp(logit_scale) * cosine.
    """
    names = {"logit_scale": layers.HFName("logit_scale")}
    for ours, hf_name in HEAD_PROJECTIONS.items():
      names.update(layers.hf_dense(ours, hf_name, bias=False))
    return names
