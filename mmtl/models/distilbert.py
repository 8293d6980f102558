"""DistilBERT text encoder (HF `DistilBertModel`, post-LN) and its HF name mapping.

A 6-layer BERT without token types or pooler: its layers are BERT's math (LN eps
fixed at 1e-12) except that no dropout follows the attention output. It has no
pooled output (`pooler_output` is None, as from an encoder built without a pooler):
transformers' DistilBertForSequenceClassification uses the first token, so give a
fusion text tower `pool="cls"` (or the default "mean"), not "pooler".
Inputs: `input_ids`, `attention_mask` (1 = real token), int32 (B, L).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Self

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmtl.models import layers

# transformers' `DistilBertConfig.attribute_map`: the common names config dicts may use.
_ATTRIBUTE_MAP = {
  "hidden_size": "dim",
  "num_attention_heads": "n_heads",
  "num_hidden_layers": "n_layers",
}


@dataclasses.dataclass(frozen=True)
class DistilBertConfig(layers.HFConfig):
  model_type: ClassVar[str] = "distilbert"
  layer_norm_eps: ClassVar[float] = 1e-12  # not configurable in transformers
  vocab_size: int = 30522
  max_position_embeddings: int = 512
  sinusoidal_pos_embds: bool = False
  n_layers: int = 6
  n_heads: int = 12
  dim: int = 768
  hidden_dim: int = 3072
  dropout: float = 0.1
  attention_dropout: float = 0.1
  activation: str = "gelu"

  @classmethod
  def from_hf(cls, d: dict[str, Any]) -> Self:
    return super().from_hf({_ATTRIBUTE_MAP.get(k, k): v for k, v in d.items()})

  @property
  def hidden_size(self) -> int:
    return self.dim

  @property
  def num_hidden_layers(self) -> int:
    return self.n_layers

  def layer_spec(self) -> layers.LayerSpec:
    return layers.LayerSpec(
      hidden_size=self.dim,
      num_heads=self.n_heads,
      mlp_dim=self.hidden_dim,
      activation=self.activation,
      layer_norm_eps=self.layer_norm_eps,
      pre_norm=False,
      dropout=self.dropout,
      attention_dropout=self.attention_dropout,
      attn_output_dropout=False,
    )


def sinusoidal_init(key: jax.Array, shape: tuple[int, int], dtype: layers.Dtype) -> jax.Array:
  """transformers' `create_sinusoidal_embeddings` table (sin on even, cos on odd channels).

  Used to initialize the position table of `sinusoidal_pos_embds` models: their
  checkpoints hold the table (PyTorch) or leave it out (HF Flax, where it was a constant;
  load those with `dont_load=["embeddings/position_embeddings/.*"]`).
  """
  del key
  num, dim = shape
  angles = np.arange(num)[:, None] / np.power(10000, 2 * (np.arange(dim) // 2) / dim)
  table = np.where(np.arange(dim) % 2 == 0, np.sin(angles), np.cos(angles))
  return jnp.asarray(table.astype(np.float32), dtype)


class DistilBertEmbeddings(nn.Module):
  config: DistilBertConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jax.Array, deterministic: bool) -> jax.Array:
    c = self.config
    length = input_ids.shape[1]
    if length > c.max_position_embeddings:
      raise ValueError(
        f"Sequence length {length} > max_position_embeddings {c.max_position_embeddings}: "
        "truncate the inputs (tokenizer max_length)."
      )
    embed = lambda num, name, **kw: nn.Embed(
      num, c.dim, dtype=self.dtype, param_dtype=self.param_dtype, name=name, **kw
    )
    positions = embed(
      c.max_position_embeddings,
      "position_embeddings",
      **({"embedding_init": sinusoidal_init} if c.sinusoidal_pos_embds else {}),
    )
    x = embed(c.vocab_size, "word_embeddings")(input_ids) + positions(jnp.arange(length)[None])
    x = layers.layer_norm(c.layer_norm_eps, self.dtype, self.param_dtype, "layer_norm")(x)
    return nn.Dropout(c.dropout)(x, deterministic=deterministic)


class DistilBertModel(layers.EncoderTower):
  """HF `DistilBertModel`: embeddings -> post-LN encoder; no pooler."""

  config: DistilBertConfig

  config_class: ClassVar[type[DistilBertConfig]] = DistilBertConfig
  inputs: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask")
  hf_architecture: ClassVar[str] = "DistilBertModel"
  hf_base_prefix: ClassVar[str] = "distilbert"  # DistilBertForX checkpoints nest the encoder here

  def dummy_inputs(self) -> dict[str, jax.Array]:
    """Smallest valid inputs, for `init` and shape evaluation."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return dict(input_ids=ids, attention_mask=jnp.ones_like(ids))

  def setup(self) -> None:
    self.embeddings = DistilBertEmbeddings(self.config, self.dtype, self.param_dtype)
    self.encoder = self.make_encoder()

  def embed(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    deterministic: bool = True,
  ) -> tuple[jax.Array, jax.Array]:
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    return self.embeddings(input_ids, deterministic), attention_mask.astype(bool)

  def finalize(self, x: jax.Array, mask: jax.Array) -> dict[str, jax.Array | None]:
    del mask  # No pooler: nothing to pool.
    return dict(last_hidden_state=x, pooler_output=None)

  def __call__(
    self,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    deterministic: bool = True,
  ) -> dict[str, jax.Array | None]:
    x, mask = self.embed(input_ids, attention_mask, deterministic=deterministic)
    x = self.run_layers(x, mask, 0, self.num_layers, deterministic=deterministic)
    return self.finalize(x, mask)

  def hf_names(self) -> dict[str, layers.HFName]:
    """{mmtl param path: HF state-dict key} (see mmtl.hf)."""
    c = self.config
    names = {}
    for name in ("word_embeddings", "position_embeddings"):
      names.update(layers.hf_embed(f"embeddings/{name}", f"embeddings.{name}"))
    names.update(layers.hf_norm("embeddings/layer_norm", "embeddings.LayerNorm"))
    spec = c.layer_spec()
    names.update(
      layers.hf_layers(
        spec,
        c.n_layers,
        "transformer.layer",
        dict(
          query="attention.q_lin",
          key="attention.k_lin",
          value="attention.v_lin",
          out="attention.out_lin",
          attn_norm="sa_layer_norm",
          fc1="ffn.lin1",
          fc2="ffn.lin2",
          mlp_norm="output_layer_norm",
        ),
      )
    )
    return names
