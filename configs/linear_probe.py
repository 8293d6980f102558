r"""A probe over a locked ViT: how many objects an `mmtl_shapes` scene holds, from its image.

The image tower (a ViT-S-width, 6-layer ViT on 32x32 renders, 8x8 patches) is locked
(`preset="linear_probe"`: every encoder frozen; the fusion projection and the classifier
train) and runs in inference mode, so its features for an example are the same every
epoch: with `cache=True` (`config.feature_cache.enable`) the run computes them once per
example of the training and validation splits and the training steps read them
(docs/scaling.md, "Feature cache"). The label is `count` (1, 2 or 3 objects). No image
checkpoint is available offline, so the tower is random unless `init` names one (an HF
ViT folder, e.g. `python -m mmtl.export --tower image` of a trained run): a random-features
probe, which is what the cache's benchmark needs (the tower's cost), not a result to cite.

Commands (offline):

  python -m mmtl.train --config configs/linear_probe.py --workdir workdirs/probe
  python -m mmtl.train --config configs/linear_probe.py:cache=False --workdir workdirs/probe_plain
  python launch/search.py --config configs/linear_probe.py --study_dir runs/probe_search \
      --trials 6 --metric val/accuracy

Arguments (`--config configs/linear_probe.py:key=value,...`):
  cache=True | False     locked tower computed once per example (default True)
  init=FOLDER            HF ViT checkpoint for the tower ('' = random)
  steps=N, train=N       train steps, training examples used

Expected results (2-core CPU; docs/scaling.md, "Feature cache", has the table): the same
metrics with and without the cache; with it, the whole run about 3x faster.
"""

import ml_collections as mlc

from mmtl.config import parse_arg

# ViT-S width (384, 6 heads) at half its depth, on 32x32 images: 16 patches of 8x8.
PROBE_VIT = dict(
  model_type="vit",
  image_size=32,
  patch_size=8,
  num_channels=3,
  hidden_size=384,
  num_hidden_layers=6,
  num_attention_heads=6,
  intermediate_size=1536,
  hidden_dropout_prob=0.0,
  attention_probs_dropout_prob=0.0,
)


def get_config(arg=None):
  arg = parse_arg(arg, cache=True, init="", steps=1000, train=4000)
  config = mlc.ConfigDict()
  config.seed = 0
  config.total_steps = arg.steps
  config.batch_size = 64
  config.input = dict(
    dataset="mmtl_shapes/colour",
    split=f"train[:{arg.train}]",
    fields=dict(image="image", text=None, label="count"),
    cache=True,
  )
  config.model = dict(
    towers=dict(image=dict(name=PROBE_VIT, pool="cls")),
    fusion="concat",
    head="classification",
    num_classes=3,
    width=256,
  )
  config.model_init = dict(image_encoder=arg.init)
  config.optim = dict(
    name="adamw",
    lr=1e-3,
    wd=1e-4,
    preset="linear_probe",
    schedule=dict(warmup_steps=arg.steps // 20, decay="cosine"),
  )
  config.evals = dict(
    val=dict(type="classification", input=dict(split="validation[:1000]"), every=250)
  )
  config.feature_cache = dict(enable=arg.cache)
  config.log_every = 50
  config.ckpt_every = 1000
  return config


def get_search_space():
  """launch/search.py's space: each trial is get_config() with these set."""
  return {
    "optim.lr": dict(low=1e-4, high=1e-2, log=True),
    "model.width": dict(low=64, high=512, step=64),
  }
