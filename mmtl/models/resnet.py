"""ResNet (HF `ResNetModel`): the CNN tower, with BatchNorm running statistics.

Input: `pixel_values` float (B, H, W, C) NHWC at any size, normalized with the
checkpoint's mean/std. `last_hidden_state` is the last stage's map (B, h, w, C)
(transformers gives NCHW), `pooler_output` its mean over positions (B, C).
Variables are {"params", "batch_stats"}; see `layers.BatchNorm` for when the
statistics are used and updated.

Param names: the stem under `embeddings/{conv,norm}`, block k (counted over all
stages) under `encoder/stage_{s}/layer_{k}/{conv_i,norm_i}` with the projection
shortcut at `.../shortcut/{conv,norm}`. `layer_{k}` is what layer-wise LR decay
counts as depth and `embeddings` what it treats as the embedding, as for the ViTs;
`image_encoder/(embeddings|encoder/stage_[01])/.*` freezes the stem and stages 0-1.
"""

from __future__ import annotations

from collections.abc import Iterator
import dataclasses
from typing import ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmtl.models import layers

LAYER_TYPES = ("basic", "bottleneck")
BOTTLENECK_REDUCTION = 4  # transformers' ResNetBottleNeckLayer default
# transformers' conv init (kaiming_normal_, mode="fan_out", relu gain), for training from scratch.
KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class Block(NamedTuple):
  """Where a residual block sits and what it maps."""

  stage: int
  index: int  # over all stages: the `layer_{index}` of its param path
  index_in_stage: int  # transformers' `encoder.stages.{stage}.layers.{index_in_stage}`
  in_channels: int
  out_channels: int
  stride: int

  @property
  def shortcut(self) -> bool:
    """A projection shortcut (1x1 conv + BatchNorm) instead of the identity."""
    return self.in_channels != self.out_channels or self.stride != 1


@dataclasses.dataclass(frozen=True)
class ResNetConfig(layers.HFConfig):
  model_type: ClassVar[str] = "resnet"
  num_channels: int = 3
  embedding_size: int = 64
  hidden_sizes: tuple[int, ...] = (256, 512, 1024, 2048)
  depths: tuple[int, ...] = (3, 4, 6, 3)
  layer_type: str = "bottleneck"
  hidden_act: str = "relu"  # stem and block outputs; convs inside a block always use relu (as HF)
  downsample_in_first_stage: bool = False
  downsample_in_bottleneck: bool = False  # stride in a bottleneck's first 1x1 instead of its 3x3

  def __post_init__(self) -> None:
    if self.layer_type not in LAYER_TYPES:
      raise ValueError(f"layer_type={self.layer_type!r}: use one of {LAYER_TYPES}.")
    if len(self.hidden_sizes) != len(self.depths):
      raise ValueError(
        f"hidden_sizes {self.hidden_sizes} and depths {self.depths} must list the same stages."
      )

  def blocks(self) -> Iterator[Block]:
    """Every block, in order, as transformers' ResNetEncoder builds them."""
    k = 0
    in_channels = self.embedding_size
    for s, (out_channels, depth) in enumerate(zip(self.hidden_sizes, self.depths)):
      stride = 2 if s > 0 or self.downsample_in_first_stage else 1
      for j in range(depth):
        yield Block(s, k, j, in_channels, out_channels, stride if j == 0 else 1)
        in_channels = out_channels
        k += 1

  def convs(self, block: Block) -> list[tuple[int, int, int]]:
    """(features, kernel size, stride) of each conv of `block`'s residual branch."""
    out, stride = block.out_channels, block.stride
    if self.layer_type == "basic":
      return [(out, 3, stride), (out, 3, 1)]
    reduced = out // BOTTLENECK_REDUCTION
    first, middle = (stride, 1) if self.downsample_in_bottleneck else (1, stride)
    return [(reduced, 1, first), (reduced, 3, middle), (out, 1, 1)]


def _conv_norm(
  x: jax.Array,
  features: int,
  kernel: int,
  stride: int,
  deterministic: bool,
  *,
  suffix: str,
  dtype: layers.Dtype,
  param_dtype: layers.Dtype,
) -> jax.Array:
  """torch Conv2d(padding=kernel // 2, bias=False) + BatchNorm2d as `conv{suffix}`,
  `norm{suffix}` of the calling (compact) module."""
  pad = kernel // 2
  x = nn.Conv(
    features,
    (kernel, kernel),
    strides=stride,
    padding=((pad, pad), (pad, pad)),
    use_bias=False,
    kernel_init=KAIMING_FAN_OUT,
    dtype=dtype,
    param_dtype=param_dtype,
    name=f"conv{suffix}",
  )(x)
  return layers.BatchNorm(dtype=dtype, param_dtype=param_dtype, name=f"norm{suffix}")(
    x, deterministic
  )


class ResNetEmbeddings(nn.Module):
  """The stem: 7x7 stride-2 conv, BatchNorm, activation, 3x3 stride-2 max pool."""

  config: ResNetConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: jax.Array, deterministic: bool) -> jax.Array:
    c = self.config
    x = _conv_norm(
      pixel_values.astype(self.dtype),
      c.embedding_size,
      7,
      2,
      deterministic,
      suffix="",
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )
    x = layers.activation(c.hidden_act)(x)
    # Padding with -inf, as torch's MaxPool2d.
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class ResNetShortcut(nn.Module):
  """1x1 conv + BatchNorm onto the block's output channels and stride."""

  features: int
  stride: int
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    return _conv_norm(
      x,
      self.features,
      1,
      self.stride,
      deterministic,
      suffix="",
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )


class ResNetBlock(nn.Module):
  """A basic (two 3x3) or bottleneck (1x1, 3x3, 1x1) residual block."""

  config: ResNetConfig
  block: Block
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    b = self.block
    residual = x
    if b.shortcut:
      residual = ResNetShortcut(
        b.out_channels, b.stride, self.dtype, self.param_dtype, name="shortcut"
      )(x, deterministic)
    convs = self.config.convs(b)
    for i, (features, kernel, stride) in enumerate(convs):
      x = _conv_norm(
        x,
        features,
        kernel,
        stride,
        deterministic,
        suffix=f"_{i}",
        dtype=self.dtype,
        param_dtype=self.param_dtype,
      )
      if i < len(convs) - 1:
        x = jax.nn.relu(x)  # transformers' ResNetConvLayer default, whatever hidden_act is
    return layers.activation(self.config.hidden_act)(x + residual)


class ResNetStage(nn.Module):
  """Stage `stage` of the network: its blocks `layer_{k}` (k counts over all stages)."""

  config: ResNetConfig
  stage: int
  remat: str = "none"
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    block_cls = ResNetBlock
    if self.remat != "none":
      # static_argnums counts `self`: (self, x, deterministic).
      policy = layers.REMAT_POLICIES[self.remat]
      block_cls = nn.remat(ResNetBlock, policy=policy, static_argnums=(2,))
    for b in self.config.blocks():
      if b.stage == self.stage:
        block = block_cls(self.config, b, self.dtype, self.param_dtype, name=f"layer_{b.index}")
        x = block(x, deterministic)
    return x


class ResNetEncoder(nn.Module):
  """The stages `stage_{s}`, in order."""

  config: ResNetConfig
  remat: str = "none"
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    for s in range(len(self.config.depths)):
      stage = ResNetStage(
        self.config, s, self.remat, self.dtype, self.param_dtype, name=f"stage_{s}"
      )
      x = stage(x, deterministic)
    return x


class ResNetModel(layers.ConvTower):
  """HF `ResNetModel`: stem -> stages of residual blocks -> mean-pooled last map."""

  config: ResNetConfig

  config_class: ClassVar[type[ResNetConfig]] = ResNetConfig
  hf_architecture: ClassVar[str] = "ResNetModel"
  hf_base_prefix: ClassVar[str] = "resnet"  # ResNetForImageClassification nests the model here
  # transformers 4.x's Flax basic block listed its convs as `layer.layer_{i}` (torch:
  # `layer.{i}`): its flax_model.msgpack names, renamed to torch's (see mmtl.hf).
  hf_aliases: ClassVar[tuple[tuple[str, str], ...]] = ((r"\.layer\.layer_(\d+)\.", r".layer.\1."),)

  def setup(self) -> None:
    layers.check_remat(self.remat)
    self.embeddings = ResNetEmbeddings(self.config, self.dtype, self.param_dtype)
    self.encoder = ResNetEncoder(self.config, self.remat, self.dtype, self.param_dtype)

  def features(self, pixel_values: jax.Array, deterministic: bool) -> jax.Array:
    channels = self.config.num_channels
    if pixel_values.ndim != 4 or pixel_values.shape[-1] != channels:
      raise ValueError(
        f"pixel_values has shape {tuple(pixel_values.shape)}; the model expects NHWC "
        f"(B, H, W, {channels}). Transpose NCHW inputs (as HF processors return them) with "
        "x.transpose(0, 2, 3, 1)."
      )
    return self.encoder(self.embeddings(pixel_values, deterministic), deterministic)

  def _conv_norms(self) -> Iterator[tuple[str, str, str]]:
    """(conv path, BatchNorm path, HF module prefix) of every conv + BatchNorm pair."""
    yield "embeddings/conv", "embeddings/norm", "embedder.embedder"
    c = self.config
    for b in c.blocks():
      path = f"encoder/stage_{b.stage}/layer_{b.index}"
      hf = f"encoder.stages.{b.stage}.layers.{b.index_in_stage}"
      if b.shortcut:
        yield f"{path}/shortcut/conv", f"{path}/shortcut/norm", f"{hf}.shortcut"
      for i in range(len(c.convs(b))):
        yield f"{path}/conv_{i}", f"{path}/norm_{i}", f"{hf}.layer.{i}"

  def _hf_names(self) -> tuple[dict[str, layers.HFName], dict[str, layers.HFName]]:
    params, stats = {}, {}
    for conv, norm, hf in self._conv_norms():
      params.update(layers.hf_conv(conv, f"{hf}.convolution", bias=False))
      norm_params, norm_stats = layers.hf_batch_norm(norm, f"{hf}.normalization")
      params.update(norm_params)
      stats.update(norm_stats)
    return params, stats

  def hf_names(self) -> dict[str, layers.HFName]:
    """{mmtl param path: HF state-dict key} (see mmtl.hf)."""
    return self._hf_names()[0]

  def hf_batch_stats_names(self) -> dict[str, layers.HFName]:
    """{batch_stats path: HF key} of the BatchNorm running statistics (torch buffers)."""
    return self._hf_names()[1]
