"""DeiT (HF `DeiTModel`): a ViT with a distillation token after [CLS].

Same layers, param names, input (NHWC `pixel_values`) and tanh pooler on [CLS] as
`mmtl.models.vit.ViTModel`; only the embeddings differ: [CLS], [DIST], patches, with one
more position embedding. Any image size runs, as transformers with
`interpolate_pos_encoding=True`: the patch position embeddings are resized to the image's
patch grid (torch bicubic), the [CLS] and [DIST] ones kept; at the config's size that is
transformers' default forward.
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
  any_image_size: ClassVar[bool] = True


class DeiTModel(vit.ViTModel):
  """HF `DeiTModel`: [CLS] + [DIST] + patches -> pre-LN encoder -> final LN -> optional pooler."""

  config: DeiTConfig

  config_class: ClassVar[type[DeiTConfig]] = DeiTConfig
  hf_architecture: ClassVar[str] = "DeiTModel"
  hf_base_prefix: ClassVar[str] = "deit"  # DeiTForImageClassification(WithTeacher) nest it here
  embeddings_class: ClassVar[type[vit.ViTEmbeddings]] = DeiTEmbeddings
