r"""Image captioning on COCO Captions: ViT-B/16 (ImageNet-21k) + GPT-2, as HF's Flax example.

Compared with: transformers 4.x `examples/flax/image-captioning/run_image_captioning_flax.py`
(FlaxVisionEncoderDecoderModel from google/vit-base-patch16-224-in21k + gpt2, COCO 2017,
1 epoch): validation loss 2.0153, ROUGE-2 14.64. This config reads TFDS `coco_captions`
(the Karpathy splits of COCO 2014: 113k training images with restval, 5k val) and
reports BLEU-1..4, CIDEr-D and ROUGE-L of beam-4 captions on val (pycocoevalcap has
ROUGE-L, not the example's ROUGE-2) and `val/loss`, the teacher-forced cross-entropy per
caption token that the example reports (here on each image's first caption). This recipe
has not been run in full (no COCO, no accelerator here): tests/test_captioning.py trains it
with tiny checkpoints for 4 steps and evaluates it on mock `coco_captions` examples.

Not offline: prepare the dataset once (configs/data/coco_captions.py says how), and the
two checkpoints download from the hub on first use. Command:

  python -m mmtl.train --config configs/coco_captioning.py --workdir workdirs/coco_captioning

Arguments (`--config configs/coco_captioning.py:key=value,...`):
  encoder=ID, decoder=ID, tokenizer=ID   checkpoints (hub ids or folders); the tokenizer
                                          defaults to the decoder's
  batch=N, epochs=F                       global batch (examples) and training length
  eval_examples=N                         validation examples scored (default: all 5000)
"""

import ml_collections as mlc

from mmtl.config import parse_arg

TRAIN_EXAMPLES = 82_783 + 30_504  # coco_captions train + restval


def get_config(arg=None):
  arg = parse_arg(
    arg,
    encoder="google/vit-base-patch16-224-in21k",
    decoder="gpt2",
    tokenizer="",
    batch=256,
    epochs=1.0,
    eval_examples=5000,
  )
  tokenizer = arg.tokenizer or arg.decoder
  config = mlc.ConfigDict()
  config.seed = 0
  config.batch_size = arg.batch
  config.total_steps = max(1, int(arg.epochs * TRAIN_EXAMPLES / arg.batch))
  config.input = dict(
    dataset="coco_captions",
    split="train+restval",
    fields=dict(image="image", text=None, label=None, audio=None, target="captions/text"),
    image=dict(stats_from=arg.encoder, resize=None),  # the ViT's size, mean and std
    # GPT-2 has no pad token; it pads with <|endoftext|>, its BOS and EOS too.
    target=dict(tokenizer=tokenizer, max_length=32, pad_token="<|endoftext|>"),
    num_threads=8,
    prefetch=8,
  )
  config.model = dict(
    towers=dict(image=dict(name=arg.encoder, pool="cls")),
    head="captioning",
    decoder=dict(name=arg.decoder, cross_attention=True),
    conditioning="cross_attention",
  )
  # GPT-2's self-attention, MLP and embeddings load; its cross-attention starts from init.
  config.model_init = dict(image_encoder=arg.encoder, decoder=dict(name=arg.decoder))
  config.optim = dict(
    name="adamw",
    lr=3e-5,
    wd=0.0,
    schedule=dict(warmup_steps=0, decay="linear"),
  )
  val = dict(split=f"val[:{arg.eval_examples}]")
  config.evals = dict(
    val=dict(type="captioning", num_beams=4, max_new_tokens=32, every=1000, input=val),
  )
  config.log_every = 50
  config.ckpt_every = 1000
  return config
