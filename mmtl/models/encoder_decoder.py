"""HF `VisionEncoderDecoderModel`: any mmtl encoder tower + any mmtl text decoder.

The checkpoint layout transformers uses for image captioning (ViT-GPT2, TrOCR-style
models): config.json holds the `encoder` and `decoder` configs, the weights are the
encoder's under `encoder.`, the decoder LM's under `decoder.`, and
`enc_to_dec_proj` (a Linear) maps encoder tokens to the decoder width when the two
differ. The encoder runs through the tower protocol (`embed` -> `run_layers` ->
`finalize`), so every registered tower can encode; the decoder cross-attends to the
(projected) tokens. `mmtl.generate.generate` drives it through `encode`,
`init_cache` and `decode`.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
from typing import Any, ClassVar, Self

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmtl.models import decoder as decoder_lib
from mmtl.models import layers

# {"encoder": registry.MODELS, "decoder": registry.DECODERS}, filled in by
# mmtl.models.registry (which imports this module, so this module cannot import it).
FAMILIES: dict[str, dict[str, type[nn.Module]]] = {}


def _sub_config(d: dict[str, Any], what: str) -> layers.HFConfig:
  model_type, families = d.get("model_type"), FAMILIES[what]
  if model_type not in families:
    raise ValueError(
      f"The vision-encoder-decoder's {what} has model_type {model_type!r}; mmtl implements "
      f"{what}s {sorted(families)}."
    )
  if what == "decoder":
    d = {**d, "is_decoder": True, "add_cross_attention": d.get("add_cross_attention", True)}
  return families[model_type].config_class.from_hf(d)


@dataclasses.dataclass(frozen=True)
class VisionEncoderDecoderConfig(layers.HFConfig):
  model_type: ClassVar[str] = "vision-encoder-decoder"
  encoder: layers.HFConfig
  decoder: layers.HFConfig
  decoder_start_token_id: int | None = None
  pad_token_id: int | None = None
  eos_token_id: int | None = None

  @classmethod
  def from_hf(cls, d: dict[str, Any]) -> Self:
    if "encoder" not in d or "decoder" not in d:
      raise ValueError(
        "A vision-encoder-decoder config.json needs `encoder` and `decoder` sub-configs."
      )
    return cls(
      encoder=_sub_config(d["encoder"], "encoder"),
      decoder=_sub_config(d["decoder"], "decoder"),
      decoder_start_token_id=d.get("decoder_start_token_id"),
      pad_token_id=d.get("pad_token_id"),
      eos_token_id=d.get("eos_token_id"),
    )

  def to_hf(self) -> dict[str, Any]:
    decoder = {**self.decoder.to_hf(), "is_decoder": True, "add_cross_attention": True}
    return {
      "model_type": self.model_type,
      "encoder": self.encoder.to_hf(),
      "decoder": decoder,
      "is_encoder_decoder": True,
      "tie_word_embeddings": False,
      "decoder_start_token_id": self.decoder_start_token_id,
      "pad_token_id": self.pad_token_id,
      "eos_token_id": self.eos_token_id,
    }


class VisionEncoderDecoderModel(nn.Module):
  """Encoder tokens -> (enc_to_dec_proj) -> cross-attending decoder LM."""

  config: VisionEncoderDecoderConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32
  remat: str = "none"
  attention_impl: str | None = None

  config_class: ClassVar[type[VisionEncoderDecoderConfig]] = VisionEncoderDecoderConfig
  hf_architecture: ClassVar[str] = "VisionEncoderDecoderModel"
  hf_base_prefix: ClassVar[None] = None

  @property
  def needs_projection(self) -> bool:
    c = self.config
    return c.encoder.hidden_size != c.decoder.hidden_size and not getattr(
      c.decoder, "cross_attention_hidden_size", None
    )

  @property
  def vocab_size(self) -> int:
    return self.config.decoder.vocab_size

  @property
  def max_length(self) -> int:
    return self.config.decoder.max_length

  def _modules(self, detached: bool = True) -> tuple[nn.Module, nn.Module]:
    """The encoder and decoder modules; `detached` ones (no parent) for their class methods."""
    c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat)
    if detached:
      kw["parent"] = None
    enc = FAMILIES["encoder"][c.encoder.model_type](
      c.encoder, attention_impl=self.attention_impl, **kw
    )
    dec = FAMILIES["decoder"][c.decoder.model_type](c.decoder, **kw)
    return enc, dec

  def setup(self) -> None:
    self.encoder, self.decoder = self._modules(detached=False)
    if not getattr(self.config.decoder, "add_cross_attention", True):
      raise ValueError(
        "The vision-encoder-decoder's decoder has add_cross_attention=false: set it to true "
        "in config.json's decoder (its cross-attention weights then start from init)."
      )
    if self.needs_projection:
      self.enc_to_dec_proj = nn.Dense(
        self.config.decoder.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype
      )

  def dummy_inputs(self) -> dict[str, jax.Array]:
    enc, _ = self._modules()
    ids = jnp.zeros((1, 1), jnp.int32)
    return dict(**enc.dummy_inputs(), decoder_input_ids=ids)

  def encode(
    self, inputs: Mapping[str, jax.Array], *, deterministic: bool = True
  ) -> dict[str, jax.Array]:
    """The decoder's conditioning from `inputs["pixel_values"]`: `encoder_hidden_states`
    (projected) and their mask."""
    x, mask = self.encoder.embed(inputs["pixel_values"], deterministic=deterministic)
    x = self.encoder.run_layers(x, mask, 0, self.encoder.num_layers, deterministic=deterministic)
    x = self.encoder.finalize(x, mask)["last_hidden_state"]
    if self.needs_projection:
      x = self.enc_to_dec_proj(x)
    return dict(encoder_hidden_states=x, encoder_attention_mask=mask)

  def decode(self, input_ids: jax.Array, attention_mask=None, position_ids=None, **kw) -> dict:
    """The decoder on `input_ids` given `encode`'s outputs or a cache (TextDecoder.__call__)."""
    return self.decoder(input_ids, attention_mask, position_ids, **kw)

  def init_cache(self, batch_size: int, max_length: int, **conditioning) -> decoder_lib.Cache:
    return self.decoder.init_cache(batch_size, max_length, **conditioning)

  def __call__(
    self,
    pixel_values: jax.Array,
    decoder_input_ids: jax.Array,
    decoder_attention_mask: jax.Array | None = None,
    *,
    deterministic: bool = True,
  ) -> dict[str, Any]:
    """As transformers' forward: decoder `logits` (B, T, vocab) given the images."""
    cond = self.encode({"pixel_values": pixel_values}, deterministic=deterministic)
    return self.decoder(
      decoder_input_ids, decoder_attention_mask, **cond, deterministic=deterministic
    )

  def hf_names(self) -> dict[str, layers.HFName]:
    enc, dec = self._modules()
    names = {f"encoder/{p}": n.prefixed("encoder.") for p, n in enc.hf_names().items()}
    names.update({f"decoder/{p}": n.prefixed("decoder.") for p, n in dec.hf_names().items()})
    if self.needs_projection:
      names.update(layers.hf_dense("enc_to_dec_proj", "enc_to_dec_proj"))
    return names
