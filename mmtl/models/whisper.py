"""The Whisper encoder (the audio half of HF `WhisperModel`) and its HF name mapping.

Input: `input_features` float (B, frames, num_mel_bins): the log-mel spectrogram of
`WhisperFeatureExtractor` (10 ms frames; mmtl.log_mel computes it in the pipeline), laid out
channels-last like mmtl's NHWC images (transformers takes (B, num_mel_bins, frames):
transpose with `x.swapaxes(1, 2)`).

Two GELU convolutions (the second with stride 2: one token per 20 ms), fixed sinusoidal
position embeddings, a pre-LN transformer (no bias on the key projection) and a final
layer norm. transformers takes exactly 30 s (2 * max_source_positions frames); mmtl also
takes shorter inputs, adding the first positions (the encoder then sees no padding beyond
the clip, as Whisper fine-tuned on short clips does), and refuses longer ones. Whisper has
no attention mask: padded frames (the log-mel of silence) are attended to, as in
pretraining. In training, `apply_spec_augment` masks frame and mel-bin spans of the input
to zero (`WhisperModel._mask_input_features`) with the "dropout" rng.

A checkpoint's encoder loads from a `WhisperModel`, `WhisperForConditionalGeneration` or
`WhisperForAudioClassification` folder (the decoder's weights are not read). Export
writes a `WhisperModel` folder holding the encoder; transformers initializes the decoder
it lacks (and says so): read the encoder with `WhisperModel.from_pretrained(out).encoder`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmtl.models import layers, wav2vec2
from mmtl.models.weights import HFName, Transform

# The sinusoidal position table: read from the checkpoint (torch `requires_grad_(False)`),
# never trained; mmtl.optim keeps every param this rule matches frozen.
FIXED_POSITIONS = r"(.*/)?position_sinusoids"


@dataclasses.dataclass(frozen=True)
class WhisperConfig(wav2vec2.SpecAugmentConfig, layers.HFConfig):
  model_type: ClassVar[str] = "whisper"
  d_model: int = 384
  encoder_layers: int = 4
  encoder_attention_heads: int = 6
  encoder_ffn_dim: int = 1536
  num_mel_bins: int = 80
  max_source_positions: int = 1500
  activation_function: str = "gelu"
  dropout: float = 0.0
  attention_dropout: float = 0.0
  activation_dropout: float = 0.0
  encoder_layerdrop: float = 0.0
  apply_spec_augment: bool = False  # Whisper's default (SpecAugment's keys: the base's)
  # The decoder's shape: not built by mmtl, kept so an exported folder describes the model
  # the checkpoint came from.
  vocab_size: int = 51865
  decoder_layers: int = 4
  decoder_attention_heads: int = 6
  decoder_ffn_dim: int = 1536
  max_target_positions: int = 448
  pad_token_id: int | None = 50256
  bos_token_id: int | None = 50256
  eos_token_id: int | None = 50256
  decoder_start_token_id: int = 50257

  @property
  def hidden_size(self) -> int:
    return self.d_model

  @property
  def num_hidden_layers(self) -> int:
    return self.encoder_layers

  @property
  def max_frames(self) -> int:
    """The most log-mel frames the positions cover (3000: 30 s of 10 ms frames)."""
    return 2 * self.max_source_positions

  def layer_spec(self) -> layers.LayerSpec:
    return layers.LayerSpec(
      hidden_size=self.d_model,
      num_heads=self.encoder_attention_heads,
      mlp_dim=self.encoder_ffn_dim,
      activation=self.activation_function,
      layer_norm_eps=1e-5,
      pre_norm=True,
      key_bias=False,
      dropout=self.dropout,
      attention_dropout=self.attention_dropout,
      activation_dropout=self.activation_dropout,
    )


def sinusoids(length: int, channels: int, max_timescale: float = 10_000) -> np.ndarray:
  """(length, channels) [sin | cos] table, transformers' (and OpenAI's) `sinusoids`."""
  if channels % 2:
    raise ValueError(f"Sinusoidal positions need an even width; d_model is {channels}.")
  increment = math.log(max_timescale) / (channels // 2 - 1)
  inv_timescales = np.exp(-increment * np.arange(channels // 2, dtype=np.float32))
  scaled = np.arange(length, dtype=np.float32)[:, None] * inv_timescales[None, :]
  return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1).astype(np.float32)


class WhisperEncoder(layers.EncoderTower):
  """HF `WhisperModel`'s encoder: conv stem -> + sinusoids -> pre-LN layers -> layer norm.

  An `mmtl.models.encoder.Encoder` with one token per 2 input frames; no pooler (fusion
  pools with the mean, as `WhisperForAudioClassification` does)."""

  config: WhisperConfig

  config_class: ClassVar[type[WhisperConfig]] = WhisperConfig
  inputs: ClassVar[tuple[str, ...]] = ("input_features",)
  hf_architecture: ClassVar[str] = "WhisperModel"
  hf_base_prefix: ClassVar[str] = "model"  # WhisperForConditionalGeneration nests it here
  time_frames: ClassVar[bool] = True  # its tokens are frames in time order (a CTC head's input)

  def dummy_inputs(self) -> dict[str, jax.Array]:
    return dict(input_features=jnp.zeros((1, 2, self.config.num_mel_bins), jnp.float32))

  def setup(self) -> None:
    c = self.config
    conv = lambda stride: nn.Conv(
      c.d_model,
      (3,),
      strides=(stride,),
      padding=[(1, 1)],
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )
    self.conv1, self.conv2 = conv(1), conv(2)
    self.position_sinusoids = self.param(
      "position_sinusoids",
      lambda *_: jnp.asarray(sinusoids(c.max_source_positions, c.d_model), self.param_dtype),
    )
    self.dropout = nn.Dropout(c.dropout)
    self.encoder = self.make_encoder(layerdrop=c.encoder_layerdrop)
    self.layer_norm = layers.layer_norm(1e-5, self.dtype, self.param_dtype)

  def check_input(self, input_features: jax.Array) -> None:
    c = self.config
    shape = tuple(input_features.shape)
    if len(shape) != 3 or shape[2] != c.num_mel_bins:
      hint = (
        " It looks channels-first, as transformers' feature extractor returns it: transpose "
        "with x.swapaxes(1, 2)."
        if len(shape) == 3 and shape[1] == c.num_mel_bins
        else " Compute the features with the checkpoint's feature extractor settings "
        "(mmtl: config.input.log_mel.stats_from)."
      )
      raise ValueError(
        f"input_features has shape {shape}; the Whisper encoder takes (B, frames, "
        f"{c.num_mel_bins}) log-mel features ({c.num_mel_bins} mel bins).{hint}"
      )
    if shape[1] > c.max_frames:
      raise ValueError(
        f"input_features has {shape[1]} frames; the encoder's {c.max_source_positions} "
        f"positions cover {c.max_frames} ({c.max_frames / 100:g} s of 10 ms frames): crop "
        "the audio (config.input.log_mel.max_seconds) or split it into chunks."
      )

  def spec_augment(self, x: jax.Array) -> jax.Array:
    """Training-time masking of (B, frames, mel) features: frame spans and mel-bin spans
    set to 0."""
    c = self.config
    b, t, f = x.shape
    for prob, span, min_spans, size, axis in (
      (c.mask_time_prob, c.mask_time_length, c.mask_time_min_masks, t, 1),
      (c.mask_feature_prob, c.mask_feature_length, c.mask_feature_min_masks, f, 2),
    ):
      if prob > 0:
        spans = wav2vec2.time_mask_spans(
          self.make_rng("dropout"),
          jnp.full((b,), size),
          size,
          prob=prob,
          span=span,
          min_spans=min_spans,
        )
        x = jnp.where(jnp.expand_dims(spans, 3 - axis), 0, x)
    return x

  def embed(
    self, input_features: jax.Array, *, deterministic: bool = True
  ) -> tuple[jax.Array, jax.Array]:
    self.check_input(input_features)
    x = input_features.astype(self.dtype)
    if not deterministic and self.config.apply_spec_augment:
      x = self.spec_augment(x)
    x = jax.nn.gelu(self.conv1(x), approximate=False)
    x = jax.nn.gelu(self.conv2(x), approximate=False)
    x = x + self.position_sinusoids[: x.shape[1]].astype(self.dtype)
    x = self.dropout(x, deterministic=deterministic)
    return x, jnp.ones(x.shape[:2], bool)

  def finalize(self, x: jax.Array, mask: jax.Array) -> dict[str, jax.Array | None]:
    del mask  # every frame is attended to
    return dict(last_hidden_state=self.layer_norm(x), pooler_output=None)

  def __call__(
    self, input_features: jax.Array, *, deterministic: bool = True
  ) -> dict[str, jax.Array | None]:
    """As transformers' `WhisperEncoder`: `last_hidden_state` (B, frames / 2, d_model)."""
    x, mask = self.embed(input_features, deterministic=deterministic)
    x = self.run_layers(x, mask, 0, self.num_layers, deterministic=deterministic)
    return self.finalize(x, mask)

  def hf_names(self) -> dict[str, HFName]:
    """{mmtl param path: HF state-dict key} (see mmtl.hf)."""
    c = self.config
    names = dict(layers.hf_conv("conv1", "encoder.conv1", transform=Transform.CONV1D))
    names.update(layers.hf_conv("conv2", "encoder.conv2", transform=Transform.CONV1D))
    names["position_sinusoids"] = HFName("encoder.embed_positions.weight")
    names.update(
      layers.hf_layers(
        c.layer_spec(),
        c.encoder_layers,
        "encoder.layers",
        dict(
          query="self_attn.q_proj",
          key="self_attn.k_proj",
          value="self_attn.v_proj",
          out="self_attn.out_proj",
          attn_norm="self_attn_layer_norm",
          fc1="fc1",
          fc2="fc2",
          mlp_norm="final_layer_norm",
        ),
      )
    )
    names.update(layers.hf_norm("layer_norm", "encoder.layer_norm"))
    return names
