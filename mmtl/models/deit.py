"""DeiT (HF `DeiTModel`): a ViT with a distillation token after [CLS].

Same layers, param names, input (NHWC `pixel_values` at the config's image size)
and tanh pooler on [CLS] as `mmtl.models.vit.ViTModel`; only the embeddings
differ: [CLS], [DIST], patches, with one more position embedding. As transformers
does without `interpolate_pos_encoding`, other image sizes are an error.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from mmtl.models import vit


@dataclasses.dataclass(frozen=True)
class DeiTConfig(vit.ViTConfig):
  model_type: ClassVar[str] = "deit"  # DeiTConfig has ViTConfig's fields and defaults


class DeiTEmbeddings(vit.ViTEmbeddings):
  prefix_tokens: ClassVar[tuple[str, ...]] = ("cls_token", "distillation_token")


class DeiTModel(vit.ViTModel):
  """HF `DeiTModel`: [CLS] + [DIST] + patches -> pre-LN encoder -> final LN -> optional pooler."""

  config: DeiTConfig

  config_class: ClassVar[type[DeiTConfig]] = DeiTConfig
  hf_architecture: ClassVar[str] = "DeiTModel"
  hf_base_prefix: ClassVar[str] = "deit"  # DeiTForImageClassification(WithTeacher) nest it here
  embeddings_class: ClassVar[type[vit.ViTEmbeddings]] = DeiTEmbeddings
