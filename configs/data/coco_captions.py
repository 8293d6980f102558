r"""Input config: COCO Captions (Karpathy splits) for LiT / contrastive training and retrieval.

Not offline: prepare once (about 20 GB download; TFDS needs TensorFlow to *build*
this dataset, not to read it):

  pip install tensorflow-cpu
  tfds build coco_captions --data_dir $TFDS_DATA_DIR --file_format array_record

Splits: train (82,783 images), restval (30,504), val (5,000), test (5,000); each
image has ~5 captions (`captions/text`): training samples one at random, eval
uses the first (`input.eval_text`); a retrieval evaluator with `captions=5` embeds all
five, the protocol of published COCO 5k numbers. Use as
`config.input = coco_captions.get_config("<checkpoint>")`
(`from configs.data import coco_captions`), e.g. `openai/clip-vit-base-patch32` (its
tokenizer, image size and mean/std), and
`config.evals.<name>.input = dict(split="test")` for retrieval.
"""

import ml_collections as mlc


def get_config(arg=None):
  checkpoint = arg or "openai/clip-vit-base-patch32"
  return mlc.ConfigDict(
    dict(
      dataset="coco_captions",
      split="train+restval",
      fields=dict(image="image", text="captions/text", label=None, audio=None),
      image=dict(stats_from=checkpoint, resize=None),  # size/mean/std of the checkpoint
      text=dict(tokenizer=checkpoint, max_length=64),
      augment=dict(crop_scale=(0.8, 1.0), flip=False, color_jitter=0.0),
      num_threads=8,
      prefetch=8,
    )
  )
