"""RoBERTa and XLM-RoBERTa text encoders (HF `RobertaModel`, `XLMRobertaModel`).

Both are BERT (mmtl.models.bert: same layers, pooler, param and HF names) but for
the position ids, which transformers derives from `input_ids` (fairseq's
`make_positions`): real tokens are numbered from `pad_token_id + 1` in order,
skipping padding, and padding tokens take row `pad_token_id`. So left- and
right-padded batches give every real token the position it has unpadded.
Inputs: `input_ids`, `attention_mask` (1 = real token), `token_type_ids`, all int32 (B, L).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from mmtl.models import bert


@dataclasses.dataclass(frozen=True)
class RobertaConfig(bert.BertConfig):
  model_type: ClassVar[str] = "roberta"
  vocab_size: int = 50265
  pad_token_id: int | None = 1

  def __post_init__(self) -> None:
    super().__post_init__()
    if self.pad_token_id is None:
      raise ValueError(
        f"{self.model_type} numbers positions from pad_token_id + 1, but this config has "
        "pad_token_id=None: set it to the tokenizer's pad token id (1 for the released models)."
      )

  @property
  def max_length(self) -> int:
    """Longest input the position table covers: rows 0 .. pad_token_id are not positions."""
    return self.max_position_embeddings - self.pad_token_id - 1


@dataclasses.dataclass(frozen=True)
class XLMRobertaConfig(RobertaConfig):
  model_type: ClassVar[str] = "xlm-roberta"
  vocab_size: int = 30522


class RobertaEmbeddings(bert.BertEmbeddings):
  config: RobertaConfig

  def position_ids(self, input_ids: jax.Array) -> jax.Array:
    """transformers' `create_position_ids_from_input_ids`, (B, L)."""
    pad = self.config.pad_token_id
    real = (input_ids != pad).astype(jnp.int32)
    return jnp.cumsum(real, axis=1) * real + pad


class RobertaModel(bert.BertModel):
  """HF `RobertaModel`: BERT with RoBERTa's position ids."""

  config: RobertaConfig

  config_class: ClassVar[type[RobertaConfig]] = RobertaConfig
  hf_architecture: ClassVar[str] = "RobertaModel"
  hf_base_prefix: ClassVar[str] = "roberta"  # RobertaForX and XLMRobertaForX checkpoints
  embeddings_class: ClassVar[type[bert.BertEmbeddings]] = RobertaEmbeddings


class XLMRobertaModel(RobertaModel):
  """HF `XLMRobertaModel`: the RoBERTa architecture under its own model_type."""

  config: XLMRobertaConfig

  config_class: ClassVar[type[RobertaConfig]] = XLMRobertaConfig
  hf_architecture: ClassVar[str] = "XLMRobertaModel"
