r"""Input config: Imagenette (10 easy ImageNet classes, full-size images).

Prepare once (1.5 GB download):

  tfds build imagenette --config full-size-v2 --data_dir $TFDS_DATA_DIR --file_format array_record

Splits: train (9,469), validation (3,925). Eval resizes the shorter side to
size * 256 / 224 and center-crops; training uses random resized crops and flips.
"""

import ml_collections as mlc


def get_config(arg=None):
  checkpoint = arg or "google/vit-base-patch16-224"
  return mlc.ConfigDict(
    dict(
      dataset="imagenette/full-size-v2",
      split="train",
      fields=dict(image="image", text=None, label="label", audio=None),
      image=dict(size=224, resize=256, stats_from=checkpoint),
      augment=dict(crop_scale=(0.35, 1.0), flip=True, color_jitter=0.0),
      num_threads=8,
      prefetch=8,
    )
  )
