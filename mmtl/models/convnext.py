"""ConvNeXt (HF `ConvNextModel`) and ConvNeXt V2 (HF `ConvNextV2Model`, with GRN).

Input: `pixel_values` float (B, H, W, C) NHWC at any size, normalized with the
checkpoint's mean/std (HF processors give NCHW: transpose with `x.transpose(0, 2, 3, 1)`).
`last_hidden_state` is the last stage's NHWC map; `pooler_output` the final
LayerNorm of its mean over positions. As a fusion tower (`mmtl.models.layers.ConvTower`)
the map's positions are the tokens.

Param names: the stem is `embeddings/{patch_embeddings,norm}`; block k (the global
index over all stages) is `encoder/stage_{s}/layer_{k}/{dwconv,norm,fc1,fc2}` plus
`layer_scale` (V1, layer_scale_init_value > 0) or `grn/{gamma,beta}` (V2). A stage's
downsampling layer (stages after the first) lives under the stage's first block,
`encoder/stage_{s}/layer_{k}/downsample/{norm,conv}`: layer-wise LR decay (which counts
`layer_{i}` segments) and freezing the early blocks treat it with the block it feeds, and
one regex freezes the stem and stages 0-1: `image_encoder/(embeddings|encoder/stage_[01])/.*`.
Stochastic depth (`drop_path_rate`, rising linearly over the blocks as in HF) drops a
block's residual branch per example in training, with the "dropout" rng.
"""

from __future__ import annotations

from collections.abc import Iterator
import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmtl.models import layers

# transformers hard-codes eps 1e-6 in every ConvNeXt LayerNorm but the final one
# (config.layer_norm_eps).
_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class _StagesConfig(layers.HFConfig):
  """The fields ConvNextConfig and ConvNextV2Config share (HF defaults: ConvNeXt-T)."""

  num_channels: int = 3
  patch_size: int | tuple[int, int] = 4
  num_stages: int = 4
  hidden_sizes: tuple[int, ...] = (96, 192, 384, 768)
  depths: tuple[int, ...] = (3, 3, 9, 3)
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12  # the final LayerNorm's only
  drop_path_rate: float = 0.0

  grn: ClassVar[bool] = False  # V2: global response normalization after the activation

  def __post_init__(self) -> None:
    if not self.num_stages == len(self.hidden_sizes) == len(self.depths):
      raise ValueError(
        f"num_stages={self.num_stages} but hidden_sizes has {len(self.hidden_sizes)} entries "
        f"and depths {len(self.depths)}: give one hidden size and one depth per stage."
      )
    if 0 in self.depths[1:]:
      raise ValueError(
        f"depths={list(self.depths)}: mmtl keeps a stage's downsampling layer in its first "
        "block, so every stage after the first needs at least one block."
      )

  def blocks(self) -> Iterator[tuple[int, int, int]]:
    """(stage, index within the stage, global index) of every block, in order."""
    k = 0
    for s, depth in enumerate(self.depths):
      for j in range(depth):
        yield s, j, k
        k += 1


@dataclasses.dataclass(frozen=True)
class ConvNextConfig(_StagesConfig):
  model_type: ClassVar[str] = "convnext"
  layer_scale_init_value: float = 1e-6  # <= 0: no layer scale


@dataclasses.dataclass(frozen=True)
class ConvNextV2Config(_StagesConfig):
  model_type: ClassVar[str] = "convnextv2"
  layer_scale_init_value: ClassVar[float] = 0.0  # V2 has GRN instead of layer scale
  grn: ClassVar[bool] = True


class GRN(nn.Module):
  """Global response normalization (ConvNeXt V2) over NHWC features."""

  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    # (1, 1, 1, C), as HF stores them: no reshape between the layouts.
    shape = (1, 1, 1, x.shape[-1])
    gamma = self.param("gamma", nn.initializers.zeros, shape, self.param_dtype)
    beta = self.param("beta", nn.initializers.zeros, shape, self.param_dtype)
    x32 = x.astype(jnp.float32)  # a sum of squares over every position
    gx = jnp.sqrt(jnp.square(x32).sum((1, 2), keepdims=True))
    nx = gx / (gx.mean(-1, keepdims=True) + 1e-6)
    return (gamma * (x32 * nx) + beta + x32).astype(x.dtype)


class Downsample(nn.Module):
  """A stage's entry: LayerNorm, then a 2x2 stride-2 conv to the stage's width."""

  features: int
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = layers.layer_norm(_EPS, self.dtype, self.param_dtype, "norm")(x)
    conv = nn.Conv(
      self.features,
      (2, 2),
      strides=(2, 2),
      padding="VALID",
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="conv",
    )
    return conv(x)


class ConvNextLayer(nn.Module):
  """One block: [downsample,] 7x7 depthwise conv, LN, fc1, act, [GRN,] fc2, [layer scale],
  drop path, residual."""

  config: _StagesConfig
  features: int
  drop_path: float
  downsample: bool
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    c, d = self.config, self.features
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.downsample:
      x = Downsample(d, **kw, name="downsample")(x)
    h = nn.Conv(d, (7, 7), padding=3, feature_group_count=d, **kw, name="dwconv")(x)
    h = layers.layer_norm(_EPS, self.dtype, self.param_dtype, "norm")(h)
    h = layers.activation(c.hidden_act)(nn.Dense(4 * d, **kw, name="fc1")(h))
    if c.grn:
      h = GRN(self.param_dtype, name="grn")(h)
    h = nn.Dense(d, **kw, name="fc2")(h)
    if c.layer_scale_init_value > 0:
      init = nn.initializers.constant(c.layer_scale_init_value)
      h = h * self.param("layer_scale", init, (d,), self.param_dtype).astype(self.dtype)
    # Stochastic depth: the whole branch of an example is dropped (kept ones scaled up).
    h = layers.DropPath(self.drop_path)(h, deterministic)
    return x + h


def _block_cls(remat: str) -> type[ConvNextLayer]:
  if remat == "none":
    return ConvNextLayer
  # static_argnums counts `self`: (self, x, deterministic).
  return nn.remat(ConvNextLayer, policy=layers.REMAT_POLICIES[remat], static_argnums=(2,))


class ConvNextStage(nn.Module):
  """Stage `stage`'s blocks, `layer_{k}` with k the global block index."""

  config: _StagesConfig
  stage: int
  remat: str = "none"
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    c = self.config
    rates = np.linspace(0.0, c.drop_path_rate, sum(c.depths))  # over all blocks, as HF
    for s, j, k in c.blocks():
      if s == self.stage:
        block = _block_cls(self.remat)(
          c,
          c.hidden_sizes[s],
          float(rates[k]),
          s > 0 and j == 0,
          self.dtype,
          self.param_dtype,
          name=f"layer_{k}",
        )
        x = block(x, deterministic)
    return x


class ConvNextEncoder(nn.Module):
  """The stages, `stage_{s}`."""

  config: _StagesConfig
  remat: str = "none"
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    for s in range(self.config.num_stages):
      stage = ConvNextStage(
        self.config, s, self.remat, self.dtype, self.param_dtype, name=f"stage_{s}"
      )
      x = stage(x, deterministic)
    return x


class ConvNextEmbeddings(nn.Module):
  """The stem: patch_size x patch_size stride-patch_size conv, then LayerNorm."""

  config: _StagesConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    c = self.config
    x = layers.patchify(
      pixel_values,
      image_size=None,
      patch_size=c.patch_size,
      num_channels=c.num_channels,
      features=c.hidden_sizes[0],
      use_bias=True,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="patch_embeddings",
    )
    (ph, pw), (b, h, w, _) = layers.pair(c.patch_size), pixel_values.shape
    x = x.reshape(b, h // ph, w // pw, c.hidden_sizes[0])
    f = 2 ** (c.num_stages - 1)  # each stage after the first halves the map
    if min(x.shape[1:3]) < f:
      raise ValueError(
        f"pixel_values has shape {tuple(pixel_values.shape)}: this ConvNeXt downsamples by "
        f"{ph * f}x{pw * f}, so images need at least that many pixels (H, W)."
      )
    return layers.layer_norm(_EPS, self.dtype, self.param_dtype, "norm")(x)


class ConvNextModel(layers.ConvTower):
  """HF `ConvNextModel`: stem -> stages -> NHWC map; pooler = LayerNorm(mean over positions)."""

  config: ConvNextConfig

  config_class: ClassVar[type[_StagesConfig]] = ConvNextConfig
  hf_architecture: ClassVar[str] = "ConvNextModel"
  hf_base_prefix: ClassVar[str] = "convnext"  # ConvNextForImageClassification nests it here

  def setup(self) -> None:
    layers.check_remat(self.remat)
    c = self.config
    self.embeddings = ConvNextEmbeddings(c, self.dtype, self.param_dtype)
    self.encoder = ConvNextEncoder(c, self.remat, self.dtype, self.param_dtype)
    self.layernorm = layers.layer_norm(c.layer_norm_eps, self.dtype, self.param_dtype)

  def features(self, pixel_values: jax.Array, deterministic: bool) -> jax.Array:
    return self.encoder(self.embeddings(pixel_values), deterministic)

  def pool_features(self, mean: jax.Array) -> jax.Array:
    return self.layernorm(mean)

  def hf_names(self) -> dict[str, layers.HFName]:
    """{mmtl param path: HF state-dict key} (the names transformers saves and the hub has)."""
    c = self.config
    names = dict(layers.hf_conv("embeddings/patch_embeddings", "embeddings.patch_embeddings"))
    names.update(layers.hf_norm("embeddings/norm", "embeddings.layernorm"))
    for s, j, k in c.blocks():
      path, stage = f"encoder/stage_{s}/layer_{k}", f"encoder.stages.{s}"
      if s > 0 and j == 0:
        names.update(layers.hf_norm(f"{path}/downsample/norm", f"{stage}.downsampling_layer.0"))
        names.update(layers.hf_conv(f"{path}/downsample/conv", f"{stage}.downsampling_layer.1"))
      hf = f"{stage}.layers.{j}"
      names.update(layers.hf_conv(f"{path}/dwconv", f"{hf}.dwconv"))
      names.update(layers.hf_norm(f"{path}/norm", f"{hf}.layernorm"))
      names.update(layers.hf_dense(f"{path}/fc1", f"{hf}.pwconv1"))
      names.update(layers.hf_dense(f"{path}/fc2", f"{hf}.pwconv2"))
      if c.layer_scale_init_value > 0:
        names[f"{path}/layer_scale"] = layers.HFName(f"{hf}.layer_scale_parameter")
      if c.grn:
        names[f"{path}/grn/gamma"] = layers.HFName(f"{hf}.grn.weight")
        names[f"{path}/grn/beta"] = layers.HFName(f"{hf}.grn.bias")
    names.update(layers.hf_norm("layernorm", "layernorm"))
    return names


class ConvNextV2Model(ConvNextModel):
  """HF `ConvNextV2Model`: ConvNeXt with GRN in every block and no layer scale."""

  config: ConvNextV2Config

  config_class: ClassVar[type[_StagesConfig]] = ConvNextV2Config
  hf_architecture: ClassVar[str] = "ConvNextV2Model"
  hf_base_prefix: ClassVar[str] = "convnextv2"  # ConvNextV2ForImageClassification nests it here
