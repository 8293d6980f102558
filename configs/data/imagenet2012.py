r"""Input config: ImageNet-1k (ILSVRC 2012), for zero-shot classification and fine-tuning.

Not downloadable by TFDS: place `ILSVRC2012_img_train.tar` and `ILSVRC2012_img_val.tar`
(from image-net.org, after accepting its terms) in `$TFDS_DATA_DIR/downloads/manual/`, then

  pip install tensorflow-cpu   # TFDS needs TensorFlow to build it (not to read it)
  tfds build imagenet2012 --data_dir $TFDS_DATA_DIR --file_format array_record

Splits: train (1,281,167), validation (50,000), test (100,000, unlabeled). The dataset's
own class names are WordNet ids (`n01440764`); zero-shot prompts use CLIP's readable
names instead: `classnames()` (imagenet2012_classnames.txt, in label order) and CLIP's 80
prompt templates `prompts()` (imagenet2012_prompts.txt), both as published with OpenAI's
CLIP and copied from open_clip's `zero_shot_metadata.py` (MIT). Eval resizes the shorter
side to the checkpoint's image size and center-crops it (CLIP's zero-shot protocol).
"""

from pathlib import Path

import ml_collections as mlc

HERE = Path(__file__).parent


def classnames() -> tuple[str, ...]:
  """CLIP's names of the 1000 classes, in the order of the dataset's labels."""
  return tuple((HERE / "imagenet2012_classnames.txt").read_text().splitlines())


def prompts() -> tuple[str, ...]:
  """CLIP's 80 ImageNet prompt templates ("a photo of a {}.", ...)."""
  return tuple((HERE / "imagenet2012_prompts.txt").read_text().splitlines())


def get_config(arg=None):
  checkpoint = arg or "google/vit-base-patch16-224"
  return mlc.ConfigDict(
    dict(
      dataset="imagenet2012",
      split="train",
      fields=dict(image="image", text=None, label="label", audio=None),
      image=dict(stats_from=checkpoint, resize=None),
      augment=dict(crop_scale=(0.08, 1.0), flip=True, color_jitter=0.0),
      num_threads=8,
      prefetch=8,
    )
  )
