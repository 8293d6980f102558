"""AST, the Audio Spectrogram Transformer (HF `ASTModel`), and its HF name mapping.

Input: `input_features` float (B, max_length, num_mel_bins): the normalized Kaldi-style
log-mel filter bank of `ASTFeatureExtractor` (10 ms frames, padded or cut to the config's
`max_length`; mmtl.log_mel computes it in the pipeline). transformers calls the same
array `input_values`; mmtl names every log-mel input `input_features`, so one modality
(`log_mel`) feeds Whisper and AST.

A ViT over the spectrogram (Gong et al. 2021): 16 x 16 patches taken with overlapping
strides along frequency and time (`frequency_stride`, `time_stride`), [CLS] and
distillation tokens before them, learned positions for exactly the config's patch grid
(so only `max_length` frames are taken, as in transformers), ViT's pre-LN layers and
names, a final layer norm; `pooler_output` is the mean of the two prefix tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmtl.models import layers, vit

# ViTConfig fields that describe images: not in an AST config.json.
_IMAGE_FIELDS = ("image_size", "num_channels", "pooler_output_size", "pooler_act")


@dataclasses.dataclass(frozen=True)
class ASTConfig(vit.ViTConfig):
  model_type: ClassVar[str] = "audio-spectrogram-transformer"
  patch_size: int = 16
  frequency_stride: int = 10
  time_stride: int = 10
  max_length: int = 1024
  num_mel_bins: int = 128

  @property
  def grid(self) -> tuple[int, int]:
    """(frequency, time) patches, transformers' `ASTEmbeddings.get_shape`."""
    p = self.patch_size
    return (
      (self.num_mel_bins - p) // self.frequency_stride + 1,
      (self.max_length - p) // self.time_stride + 1,
    )

  def to_hf(self) -> dict[str, Any]:
    return {k: v for k, v in super().to_hf().items() if k not in _IMAGE_FIELDS}


class ASTEmbeddings(nn.Module):
  """[CLS] + [DIST] + spectrogram patches (frequency-major), plus learned positions."""

  config: ASTConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  prefix_tokens: ClassVar[tuple[str, ...]] = ("cls_token", "distillation_token")

  @nn.compact
  def __call__(self, input_features: jax.Array, deterministic: bool) -> jax.Array:
    c = self.config
    x = input_features.astype(self.dtype).swapaxes(1, 2)[..., None]  # (B, mel, frames, 1)
    x = nn.Conv(
      c.hidden_size,
      (c.patch_size, c.patch_size),
      strides=(c.frequency_stride, c.time_stride),
      padding="VALID",
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="patch_embeddings",
    )(x)
    x = x.reshape(x.shape[0], -1, c.hidden_size)
    init = nn.initializers.truncated_normal(0.02)
    batch = (x.shape[0], 1, c.hidden_size)
    prefix = [
      jnp.broadcast_to(self.param(n, init, (1, 1, c.hidden_size), self.param_dtype), batch)
      for n in self.prefix_tokens
    ]
    num_tokens = c.grid[0] * c.grid[1] + 2
    pos = self.param("position_embeddings", init, (1, num_tokens, c.hidden_size), self.param_dtype)
    x = jnp.concatenate([p.astype(self.dtype) for p in prefix] + [x], 1) + pos.astype(self.dtype)
    return nn.Dropout(c.hidden_dropout_prob)(x, deterministic=deterministic)


class ASTModel(vit.ViTModel):
  """HF `ASTModel`: [CLS] + [DIST] + patches -> pre-LN encoder -> final LN; pooled: the mean
  of [CLS] and [DIST]."""

  config: ASTConfig
  add_pooling_layer: bool = False  # AST has no pooler layer

  config_class: ClassVar[type[ASTConfig]] = ASTConfig
  inputs: ClassVar[tuple[str, ...]] = ("input_features",)
  hf_architecture: ClassVar[str] = "ASTModel"
  hf_base_prefix: ClassVar[str] = "audio_spectrogram_transformer"  # ASTForAudioClassification
  optional_parts: ClassVar[dict[str, str]] = {}
  embeddings_class: ClassVar[type[nn.Module]] = ASTEmbeddings

  def dummy_inputs(self) -> dict[str, jax.Array]:
    c = self.config
    return dict(input_features=jnp.zeros((1, c.max_length, c.num_mel_bins), jnp.float32))

  def embed(
    self, input_features: jax.Array, *, deterministic: bool = True
  ) -> tuple[jax.Array, jax.Array]:
    c = self.config
    if tuple(input_features.shape[1:]) != (c.max_length, c.num_mel_bins):
      raise ValueError(
        f"input_features has shape {tuple(input_features.shape)}; this AST takes (B, "
        f"{c.max_length}, {c.num_mel_bins}): {c.max_length} frames (its position embeddings "
        f"cover that many; pad or cut the spectrogram to it, as ASTFeatureExtractor does) "
        f"of {c.num_mel_bins} mel bins (config.input.log_mel.stats_from gives the "
        "checkpoint's settings)."
      )
    x = self.embeddings(input_features, deterministic)
    return x, jnp.ones(x.shape[:2], bool)

  def finalize(self, x: jax.Array, mask: jax.Array) -> dict[str, jax.Array | None]:
    del mask  # every patch is real
    x = self.layernorm(x)
    return dict(last_hidden_state=x, pooler_output=(x[:, 0] + x[:, 1]) / 2)

  def __call__(
    self, input_features: jax.Array, *, deterministic: bool = True
  ) -> dict[str, jax.Array | None]:
    x, mask = self.embed(input_features, deterministic=deterministic)
    x = self.run_layers(x, mask, 0, self.num_layers, deterministic=deterministic)
    return self.finalize(x, mask)

  def hf_names(self) -> dict[str, layers.HFName]:
    """ViT's names (AST checkpoints use them) without the pooler."""
    return {p: n for p, n in super().hf_names().items() if not p.startswith("pooler/")}
