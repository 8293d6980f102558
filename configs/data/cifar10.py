r"""Input config: CIFAR-10 for linear probes, fine-tuning and zero-shot classification.

Prepare once (170 MB download):

  tfds build cifar10 --data_dir $TFDS_DATA_DIR --file_format array_record

Splits: train (50,000), test (10,000). Images are 32x32, upsampled to the
checkpoint's size; `mmtl.data.class_names(cfg)` gives the 10 names for zero-shot
prompts. Use as `config.input = cifar10.get_config("<image checkpoint>")`, e.g.
`google/vit-base-patch16-224`, and evaluate on `split="test"`.
"""

import ml_collections as mlc


def get_config(arg=None):
  checkpoint = arg or "google/vit-base-patch16-224"
  return mlc.ConfigDict(
    dict(
      dataset="cifar10",
      split="train",
      fields=dict(image="image", text=None, label="label", audio=None),
      image=dict(stats_from=checkpoint),
      augment=dict(crop_scale=(0.7, 1.0), flip=True, color_jitter=0.0),
      num_threads=8,
      prefetch=8,
    )
  )
