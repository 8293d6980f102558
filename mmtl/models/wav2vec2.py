"""wav2vec 2.0 (HF `Wav2Vec2Model`) on raw waveforms, and its HF name mapping.

Input: `input_values` float (B, samples), mono, at the checkpoint's sampling rate (16 kHz)
and normalized as its feature extractor does (`do_normalize`: zero mean, unit variance per
utterance); `attention_mask` (B, samples), 1 for real samples, for padded batches.

A stack of strided 1-D convolutions (the feature encoder: group norm on the first layer, or
layer norm on every layer) turns 20 ms of audio into one frame; the frames are normalized
and projected to the transformer width (`extract_features` is the normalized frames), get a
convolutional relative position embedding (a grouped conv with weight norm) and run
through a post-LN (`do_stable_layer_norm=False`, base models) or pre-LN ("stable layer
norm", large models) transformer. Frames past each waveform's length (transformers'
`_get_feat_extract_output_lengths`) are masked out of attention and zeroed before the
position conv, as in transformers. In training, spans of frames are replaced by the
learned `masked_spec_embed` and spans of channels zeroed (SpecAugment as the config sets
it: `mask_time_prob`, `mask_time_length`, `mask_time_min_masks`, `mask_feature_*`), and
whole layers are skipped with probability `layerdrop`; the random draws use the "dropout"
rng.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmtl.models import layers
from mmtl.models.weights import HFName, Transform


@dataclasses.dataclass(frozen=True)
class SpecAugmentConfig:
  """The SpecAugment keys of a speech config.json (wav2vec2, HuBERT, Whisper), transformers'
  names and defaults: spans of `*_length` frames (time) or channels (feature), drawn by
  `time_mask_spans`."""

  apply_spec_augment: bool = True
  mask_time_prob: float = 0.05
  mask_time_length: int = 10
  mask_time_min_masks: int = 2
  mask_feature_prob: float = 0.0
  mask_feature_length: int = 10
  mask_feature_min_masks: int = 0


@dataclasses.dataclass(frozen=True)
class Wav2Vec2Config(SpecAugmentConfig, layers.HFConfig):
  model_type: ClassVar[str] = "wav2vec2"
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout: float = 0.1
  activation_dropout: float = 0.1
  attention_dropout: float = 0.1
  feat_proj_dropout: float = 0.0
  layerdrop: float = 0.1
  layer_norm_eps: float = 1e-5
  feat_extract_norm: str = "group"
  feat_extract_activation: str = "gelu"
  conv_dim: tuple[int, ...] = (512,) * 7
  conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
  conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
  conv_bias: bool = False
  num_feat_extract_layers: int = 7
  num_conv_pos_embeddings: int = 128
  num_conv_pos_embedding_groups: int = 16
  do_stable_layer_norm: bool = False
  # Read to refuse what mmtl does not implement (an adapter on top of the encoder).
  add_adapter: bool = False
  adapter_attn_dim: int | None = None

  def __post_init__(self) -> None:
    if self.feat_extract_norm not in ("group", "layer"):
      raise ValueError(
        f"{self.model_type} config: feat_extract_norm={self.feat_extract_norm!r}; "
        "transformers (and mmtl) take 'group' or 'layer'."
      )
    if not len(self.conv_dim) == len(self.conv_stride) == len(self.conv_kernel):
      raise ValueError(
        f"{self.model_type} config: conv_dim, conv_stride and conv_kernel have lengths "
        f"{len(self.conv_dim)}, {len(self.conv_stride)}, {len(self.conv_kernel)}; one entry "
        "per feature-encoder layer each."
      )
    # As transformers' config does: the count follows conv_dim (a config dict for a model
    # from scratch need not give it), so an export's config.json is consistent.
    object.__setattr__(self, "num_feat_extract_layers", len(self.conv_dim))
    if self.add_adapter or self.adapter_attn_dim is not None:
      raise ValueError(
        f"{self.model_type} config sets add_adapter or adapter_attn_dim (an adapter after the "
        "encoder or in its layers); mmtl does not implement them. Use a checkpoint without, "
        "or mmtl's LoRA (config.optim.lora) for parameter-efficient tuning."
      )

  def layer_spec(self) -> layers.LayerSpec:
    return layers.LayerSpec(
      hidden_size=self.hidden_size,
      num_heads=self.num_attention_heads,
      mlp_dim=self.intermediate_size,
      activation=self.hidden_act,
      layer_norm_eps=self.layer_norm_eps,
      pre_norm=self.do_stable_layer_norm,
      dropout=self.hidden_dropout,
      attention_dropout=self.attention_dropout,
      activation_dropout=self.activation_dropout,
    )

  def output_lengths(self, lengths: Any) -> Any:
    """Frames the feature encoder gives for waveforms of `lengths` samples (ints or arrays):
    transformers' `_get_feat_extract_output_lengths`, floor((n - kernel) / stride) + 1 per
    conv. Zero or less means the waveform is shorter than `receptive_field`."""
    for kernel, stride in zip(self.conv_kernel, self.conv_stride):
      lengths = (lengths - kernel) // stride + 1
    return lengths

  @property
  def receptive_field(self) -> int:
    """The fewest samples that give one frame (400 for the base models: 25 ms at 16 kHz)."""
    samples = 1
    for kernel, stride in reversed(list(zip(self.conv_kernel, self.conv_stride))):
      samples = (samples - 1) * stride + kernel
    return samples

  @property
  def frame_stride(self) -> int:
    """Samples between frames (320 for the base models: 20 ms at 16 kHz)."""
    return int(np.prod(self.conv_stride))


class FeatureEncoderLayer(nn.Module):
  """Conv1d -> [group or layer norm] -> activation (`feature_extractor/conv_layers_{i}`)."""

  config: Wav2Vec2Config
  index: int
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c, i = self.config, self.index
    x = nn.Conv(
      c.conv_dim[i],
      (c.conv_kernel[i],),
      strides=(c.conv_stride[i],),
      padding="VALID",
      use_bias=c.conv_bias,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="conv",
    )(x)
    if c.feat_extract_norm == "layer":
      x = layers.layer_norm(1e-5, self.dtype, self.param_dtype, name="layer_norm")(x)
    elif i == 0:  # group norm with one group per channel: each channel normalized over time
      x = nn.GroupNorm(
        num_groups=c.conv_dim[0],
        epsilon=1e-5,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        use_fast_variance=False,
        name="layer_norm",
      )(x)
    return layers.activation(c.feat_extract_activation)(x)


class FeatureEncoder(nn.Module):
  """The strided conv stack: (B, samples) -> frames (B, T, conv_dim[-1])."""

  config: Wav2Vec2Config
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_values: jax.Array) -> jax.Array:
    x = input_values.astype(self.dtype)[..., None]
    for i in range(len(self.config.conv_dim)):
      x = FeatureEncoderLayer(
        self.config, i, self.dtype, self.param_dtype, name=f"conv_layers_{i}"
      )(x)
    return x


class WeightNormConv(nn.Module):
  """torch's `weight_norm(nn.Conv1d(..., groups=g, padding=k // 2), dim=2)` + SamePad:
  the kernel is `weight_g * weight_v / |weight_v|`, the norm taken per kernel position."""

  features: int
  kernel_size: int
  groups: int
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k, d = self.kernel_size, self.features
    v = self.param(
      "weight_v", nn.initializers.he_normal(), (k, d // self.groups, d), self.param_dtype
    )
    norm = lambda v: jnp.sqrt(jnp.sum(jnp.square(v.astype(jnp.float32)), (1, 2), keepdims=True))
    # Initialized as torch does: g = |v|, so the kernel starts as v.
    g = self.param("weight_g", lambda *_: norm(v).astype(self.param_dtype), (k, 1, 1))
    b = self.param("bias", nn.initializers.zeros, (d,), self.param_dtype)
    kernel = (v.astype(jnp.float32) * (g.astype(jnp.float32) / norm(v))).astype(self.dtype)
    y = jax.lax.conv_general_dilated(
      x.astype(self.dtype),
      kernel,
      window_strides=(1,),
      padding=[(k // 2, k // 2)],
      dimension_numbers=("NWC", "WIO", "NWC"),
      feature_group_count=self.groups,
    )
    return y[:, : x.shape[1]] + b.astype(self.dtype)  # an even kernel gives one frame more


def time_mask_spans(
  rng: jax.Array,
  lengths: jax.Array,
  size: int,
  *,
  prob: float,
  span: int,
  min_spans: int,
) -> jax.Array:
  """(B, size) bool: SpecAugment spans as transformers' `_compute_mask_indices` draws them.

  Each row of real length L gets n = max(int(prob * L / span + u), min_spans) spans (u ~
  U[0, 1), one draw for the batch), at most what fits, starting at distinct positions in
  [0, L - span]; spans may overlap, so up to n * span positions are masked. Jittable: the
  starts are the n highest of random scores over the valid positions.
  """
  if span < 1 or span > size:
    raise ValueError(
      f"SpecAugment span length {span} must be in [1, {size}] (the frames of this input): "
      "lower the config's mask_time_length / mask_feature_length or give longer inputs."
    )
  rng_u, rng_starts = jax.random.split(rng)
  u = jax.random.uniform(rng_u)
  lengths = jnp.asarray(lengths, jnp.int32)
  n = jnp.maximum(jnp.floor(prob * lengths / span + u).astype(jnp.int32), min_spans)
  n = jnp.minimum(n, size // span)
  n = jnp.minimum(n, jnp.maximum(lengths - (span - 1), 0))
  positions = jnp.arange(size)
  valid = positions[None, :] < (lengths - (span - 1))[:, None]
  scores = jnp.where(valid, jax.random.uniform(rng_starts, (lengths.shape[0], size)), -1.0)
  rank = jnp.argsort(jnp.argsort(-scores, axis=1), axis=1)  # 0 = highest score
  starts = (rank < n[:, None]) & valid
  # A position is masked when a span starts at most span - 1 positions before it.
  covered = jnp.cumsum(starts, axis=1)
  before = jnp.pad(covered, ((0, 0), (span, 0)))[:, :size]
  return (covered - before) > 0


class Wav2Vec2Model(layers.EncoderTower):
  """HF `Wav2Vec2Model`: conv feature encoder -> projection -> conv position embedding ->
  post-LN or pre-LN transformer. An `mmtl.models.encoder.Encoder` whose tokens are frames
  (one per `config.frame_stride` samples); it has no pooler (fusion pools with the mean)."""

  config: Wav2Vec2Config

  config_class: ClassVar[type[Wav2Vec2Config]] = Wav2Vec2Config
  inputs: ClassVar[tuple[str, ...]] = ("input_values", "attention_mask")
  hf_architecture: ClassVar[str] = "Wav2Vec2Model"
  hf_head_architecture: ClassVar[str] = "Wav2Vec2ForCTC"  # the model `head_hf_names` is of
  hf_base_prefix: ClassVar[str] = "wav2vec2"  # Wav2Vec2ForCTC nests the model here
  time_frames: ClassVar[bool] = True  # its tokens are frames in time order (a CTC head's input)
  # Checkpoints saved before torch's weight-norm parametrizations (and HF Flax ones) name the
  # position conv's g and v `weight_g`, `weight_v`.
  hf_aliases: ClassVar[tuple[tuple[str, str], ...]] = (
    (r"pos_conv_embed\.conv\.weight_g$", "pos_conv_embed.conv.parametrizations.weight.original0"),
    (r"pos_conv_embed\.conv\.weight_v$", "pos_conv_embed.conv.parametrizations.weight.original1"),
  )

  @property
  def uses_masked_spec_embed(self) -> bool:
    """transformers creates `masked_spec_embed` only when a SpecAugment probability is set."""
    return self.config.mask_time_prob > 0 or self.config.mask_feature_prob > 0

  def dummy_inputs(self) -> dict[str, jax.Array]:
    n = self.config.receptive_field
    return dict(input_values=jnp.zeros((1, n), jnp.float32), attention_mask=jnp.ones((1, n), bool))

  def setup(self) -> None:
    c = self.config
    norm = lambda eps: layers.layer_norm(eps, self.dtype, self.param_dtype)
    self.feature_extractor = FeatureEncoder(c, self.dtype, self.param_dtype)
    self.feature_norm = norm(c.layer_norm_eps) if self.feature_projection_norm else None
    self.feature_projection = nn.Dense(
      c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype
    )
    if self.uses_masked_spec_embed:
      self.masked_spec_embed = self.param(
        "masked_spec_embed", nn.initializers.uniform(1.0), (c.hidden_size,), self.param_dtype
      )
    self.pos_conv_embed = WeightNormConv(
      c.hidden_size,
      c.num_conv_pos_embeddings,
      c.num_conv_pos_embedding_groups,
      self.dtype,
      self.param_dtype,
    )
    self.encoder_norm = norm(c.layer_norm_eps)
    self.feature_dropout = nn.Dropout(c.feat_proj_dropout)
    self.encoder_dropout = nn.Dropout(c.hidden_dropout)
    self.encoder = self.make_encoder(layerdrop=c.layerdrop)

  @property
  def feature_projection_norm(self) -> bool:
    """Whether the frames are layer-normed before the projection (HuBERT may leave it out)."""
    return True

  def frame_mask(self, num_frames: int, attention_mask: jax.Array | None, batch: int) -> jax.Array:
    """(B, frames) bool: the frames within each waveform's real samples."""
    if attention_mask is None:
      return jnp.ones((batch, num_frames), bool)
    lengths = self.config.output_lengths(jnp.asarray(attention_mask).astype(jnp.int32).sum(-1))
    return jnp.arange(num_frames)[None, :] < lengths[:, None]

  def features(
    self, input_values: jax.Array, attention_mask: jax.Array | None, deterministic: bool
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(projected frames (B, T, D) after SpecAugment, `extract_features` (B, T, C), frame
    mask (B, T))."""
    c = self.config
    if input_values.ndim != 2:
      raise ValueError(
        f"input_values has shape {tuple(input_values.shape)}; {type(self).__name__} takes mono "
        "waveforms (B, samples). Average the channels of a stereo waveform (or pick one)."
      )
    if input_values.shape[1] < c.receptive_field:
      raise ValueError(
        f"Waveforms of {input_values.shape[1]} samples are shorter than the feature encoder's "
        f"receptive field ({c.receptive_field} samples, one frame): pad them to at least "
        f"{c.receptive_field} samples."
      )
    x = self.feature_extractor(input_values)
    extract = self.feature_norm(x) if self.feature_norm is not None else x
    hidden = self.feature_dropout(self.feature_projection(extract), deterministic=deterministic)
    mask = self.frame_mask(x.shape[1], attention_mask, x.shape[0])
    if not deterministic and c.apply_spec_augment:
      hidden = self.spec_augment(hidden, mask)
    return hidden, extract, mask

  def spec_augment(self, hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """Training-time masking of `hidden` (B, T, D): time spans -> `masked_spec_embed`,
    channel spans -> 0."""
    c = self.config
    b, t, d = hidden.shape
    if c.mask_time_prob > 0:
      spans = time_mask_spans(
        self.make_rng("dropout"),
        mask.sum(-1),
        t,
        prob=c.mask_time_prob,
        span=c.mask_time_length,
        min_spans=c.mask_time_min_masks,
      )
      hidden = jnp.where(spans[..., None], self.masked_spec_embed.astype(hidden.dtype), hidden)
    if c.mask_feature_prob > 0:
      channels = time_mask_spans(
        self.make_rng("dropout"),
        jnp.full((b,), d),
        d,
        prob=c.mask_feature_prob,
        span=c.mask_feature_length,
        min_spans=c.mask_feature_min_masks,
      )
      hidden = jnp.where(channels[:, None, :], 0, hidden)
    return hidden

  def embed(
    self,
    input_values: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    deterministic: bool = True,
  ) -> tuple[jax.Array, jax.Array]:
    hidden, _, mask = self.features(input_values, attention_mask, deterministic)
    return self.encoder_input(hidden, mask, deterministic), mask

  def encoder_input(self, hidden: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
    """Padded frames zeroed, + the conv position embedding, [layer norm], dropout."""
    c = self.config
    x = jnp.where(mask[..., None], hidden, 0)
    pos = self.pos_conv_embed(x)
    x = x + layers.activation(c.feat_extract_activation)(pos)
    if not c.do_stable_layer_norm:
      x = self.encoder_norm(x)
    return self.encoder_dropout(x, deterministic=deterministic)

  def finalize(self, x: jax.Array, mask: jax.Array) -> dict[str, jax.Array | None]:
    del mask  # padded frames stay in last_hidden_state, as transformers returns them
    if self.config.do_stable_layer_norm:
      x = self.encoder_norm(x)
    return dict(last_hidden_state=x, pooler_output=None)

  def __call__(
    self,
    input_values: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    deterministic: bool = True,
  ) -> dict[str, jax.Array | None]:
    """As transformers: `last_hidden_state` (B, frames, D), `extract_features` (B, frames,
    conv_dim[-1])."""
    hidden, extract, mask = self.features(input_values, attention_mask, deterministic)
    x = self.encoder_input(hidden, mask, deterministic)
    x = self.run_layers(x, mask, 0, self.num_layers, deterministic=deterministic)
    out = self.finalize(x, mask)
    return dict(last_hidden_state=out["last_hidden_state"], extract_features=extract)

  def head_hf_names(self) -> dict[str, layers.HFName]:
    """{param path in a FusionModel's CTC `head`: HF key}: `Wav2Vec2ForCTC`'s `lm_head`
    (HuBERT's `HubertForCTC` names it the same)."""
    return {"kernel": HFName("lm_head.weight", Transform.LINEAR), "bias": HFName("lm_head.bias")}

  def head_advice(self) -> str:
    """What makes a CTC checkpoint's `lm_head` fit the head (mmtl.hf.load_into)."""
    return (
      "A CTC head loads a *ForCTC checkpoint's lm_head over its own vocabulary: set "
      "config.model.vocab_size to its vocab_size and config.input.target.tokenizer to its "
      "folder; or leave the head out of model_init to train it from scratch."
    )

  def hf_names(self) -> dict[str, layers.HFName]:
    """{mmtl param path: HF state-dict key} (see mmtl.hf)."""
    c = self.config
    names: dict[str, HFName] = {}
    for i in range(len(c.conv_dim)):
      ours, hf = f"feature_extractor/conv_layers_{i}", f"feature_extractor.conv_layers.{i}"
      names.update(
        layers.hf_conv(f"{ours}/conv", f"{hf}.conv", c.conv_bias, transform=Transform.CONV1D)
      )
      if c.feat_extract_norm == "layer" or i == 0:
        names.update(layers.hf_norm(f"{ours}/layer_norm", f"{hf}.layer_norm"))
    if self.feature_projection_norm:
      names.update(layers.hf_norm("feature_norm", "feature_projection.layer_norm"))
    names.update(layers.hf_dense("feature_projection", "feature_projection.projection"))
    if self.uses_masked_spec_embed:
      names["masked_spec_embed"] = HFName("masked_spec_embed")
    conv = "encoder.pos_conv_embed.conv"
    names["pos_conv_embed/weight_g"] = HFName(
      f"{conv}.parametrizations.weight.original0", Transform.CONV1D
    )
    names["pos_conv_embed/weight_v"] = HFName(
      f"{conv}.parametrizations.weight.original1", Transform.CONV1D
    )
    names["pos_conv_embed/bias"] = HFName(f"{conv}.bias")
    names.update(layers.hf_norm("encoder_norm", "encoder.layer_norm"))
    names.update(
      layers.hf_layers(
        c.layer_spec(),
        c.num_hidden_layers,
        "encoder.layers",
        dict(
          query="attention.q_proj",
          key="attention.k_proj",
          value="attention.v_proj",
          out="attention.out_proj",
          attn_norm="layer_norm",
          fc1="feed_forward.intermediate_dense",
          fc2="feed_forward.output_dense",
          mlp_norm="final_layer_norm",
        ),
      )
    )
    return names
