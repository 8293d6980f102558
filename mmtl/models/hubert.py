"""HuBERT (HF `HubertModel`): wav2vec 2.0's architecture with another pretraining target.

The modules and names are wav2vec2's (mmtl.models.wav2vec2); a HuBERT config may drop the
layer norm before the feature projection (`feat_proj_layer_norm=False`). Its position conv
with batch norm instead of weight norm (`conv_pos_batch_norm=True`) is refused.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from mmtl.models import wav2vec2


@dataclasses.dataclass(frozen=True)
class HubertConfig(wav2vec2.Wav2Vec2Config):
  model_type: ClassVar[str] = "hubert"
  feat_proj_layer_norm: bool = True
  conv_pos_batch_norm: bool = False

  def __post_init__(self) -> None:
    super().__post_init__()
    if self.conv_pos_batch_norm:
      raise ValueError(
        "hubert config sets conv_pos_batch_norm=True (a batch-normed position conv without "
        "weight norm); mmtl implements the weight-normed one. Use a checkpoint without it."
      )


class HubertModel(wav2vec2.Wav2Vec2Model):
  """HF `HubertModel` (transformers returns only `last_hidden_state`; mmtl also gives the
  frames before the projection as `extract_features`)."""

  config: HubertConfig

  config_class: ClassVar[type[HubertConfig]] = HubertConfig
  hf_architecture: ClassVar[str] = "HubertModel"
  hf_head_architecture: ClassVar[str] = "HubertForCTC"
  hf_base_prefix: ClassVar[str] = "hubert"  # HubertForCTC nests the model here

  @property
  def feature_projection_norm(self) -> bool:
    return self.config.feat_proj_layer_norm
