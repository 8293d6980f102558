r"""LiT on COCO Captions: a locked ViT-B/16 image tower, a BERT-base text tower tuned to it.

Reproduces big_vision's `configs/proj/image_text/lit_coco.py` (Zhai et al. 2022,
"LiT: Zero-Shot Transfer with Locked-image text Tuning"), whose published `coco_B16B`
model (big_vision README_lit) scores:

  ImageNet zero-shot top-1 20.7 | COCO 5k image->text recall@1 47.2 | text->image 32.1

Same recipe: COCO Captions train split, batch 4096, 5000 steps, Adam with decoupled weight
decay 0.01, LR 1e-3 with 150 warmup steps then cosine, gradient clipping at 1.0, text
length 16, temperature initialized at 0.1, the image tower locked (forward only, in
inference mode). Differences, stated: big_vision starts from the AugReg ViT-B/16
(ImageNet-21k) checkpoint, which has no transformers port; this config starts from
`google/vit-base-patch16-224-in21k`, the original ViT paper's ImageNet-21k B/16 (the
ViT paper's weights, converted by HF); big_vision's image side has no projection
(`img_head=False`), while mmtl's contrastive head projects both towers to `width` (the
768x768 image projection trains, the tower stays locked); training samples one of the
image's captions and evaluation uses the first, as big_vision does. This recipe has
not been run in full here (no COCO, no accelerator): tests/test_recipes.py trains it
for a few steps with tiny checkpoints on mock `coco_captions` and `imagenet2012` and
runs both evaluators.

Not offline: prepare `coco_captions` and `imagenet2012` once (configs/data/coco_captions.py
and configs/data/imagenet2012.py say how); the checkpoints download on first use.

  python -m mmtl.train --config configs/lit_coco.py --workdir workdirs/lit_coco

Metrics: `coco/i2t_recall@1`, `coco/t2i_recall@1` (the COCO 5k test images, 5 captions
each: the published protocol), `imagenet/accuracy` (50,000 validation images, CLIP's
class names and 80 prompts) and `val/...` (recall on the 5k val images, first caption:
the metric for searches and early stopping).

Arguments (`--config configs/lit_coco.py:key=value,...`):
  image=ID, text=ID     checkpoints of the towers (hub ids or folders)
  batch=N, steps=N      global batch and training steps
  every=N               evaluation interval (steps)
  eval_examples=N       COCO test images and ImageNet validation images scored (0: all)
"""

import ml_collections as mlc

from configs.data import coco_captions, imagenet2012
from mmtl.config import parse_arg


def get_config(arg=None):
  arg = parse_arg(
    arg,
    image="google/vit-base-patch16-224-in21k",
    text="google-bert/bert-base-uncased",
    batch=4096,
    steps=5000,
    every=500,
    eval_examples=0,
  )
  config = mlc.ConfigDict()
  config.seed = 0
  config.batch_size = arg.batch
  config.total_steps = arg.steps
  config.input = coco_captions.get_config(arg.image)
  config.input.split = "train"
  config.input.text = dict(tokenizer=arg.text, max_length=16)
  config.input.augment = dict(crop_scale=(1.0, 1.0), flip=True, color_jitter=0.0)
  config.model = dict(
    towers=dict(image=dict(name=arg.image, pool="cls"), text=dict(name=arg.text, pool="cls")),
    fusion="contrastive",
    head="contrastive",
    width=768,
    temperature_init=0.1,  # big_vision's temperature_init=10 is the logit scale, 1 / 0.1
  )
  config.model_init = dict(image_encoder=arg.image, text_encoder=arg.text)
  config.optim = dict(
    name="adamw",
    lr=1e-3,
    wd=0.01,
    grad_clip_norm=1.0,
    frozen=(r"image_encoder/.*",),  # the locked image tower
    # big_vision's warmup: 3% of the steps, at least 100 (no more than the run).
    schedule=dict(warmup_steps=min(max(int(0.03 * arg.steps), 100), arg.steps), decay="cosine"),
  )
  sliced = f"[:{arg.eval_examples}]" if arg.eval_examples else ""
  config.evals = dict(
    # The held-out split a search or sweep scores (the first caption of each image).
    val=dict(type="retrieval", every=arg.every, input=dict(split=f"val{sliced}")),
    coco=dict(type="retrieval", captions=5, every=arg.every, input=dict(split=f"test{sliced}")),
    imagenet=dict(
      type="zeroshot",
      classnames=imagenet2012.classnames(),
      prompts=imagenet2012.prompts(),
      tokenizer=arg.text,
      max_len=16,
      every=arg.every,
      input=dict(
        dataset="imagenet2012",
        split=f"validation{sliced}",
        fields=dict(image="image", text=None, label="label"),
      ),
    ),
  )
  config.log_every = 50
  config.ckpt_every = 1000
  return config
