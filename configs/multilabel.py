r"""Multi-label classification on `mmtl_shapes`: which colours (or shapes) appear in the
image, each present or not, from the quickstart's small ViT trained from scratch.

Each image holds 1-3 objects, so a label is a set of classes: the label field is the
list `objects/colour` (4 colours) or `objects/shape` (3 shapes), which the input
pipeline turns into multi-hot rows; the `multilabel` head has one sigmoid per class
(binary cross-entropy, optax), and the `multilabel` evaluator reports mAP (the mean
over classes of scikit-learn's average precision, as MBT reports AudioSet), ROC-AUC,
micro and macro F1 and exact match at a 0.5 threshold.

Command (offline; about a minute on 2 CPU cores):

  python -m mmtl.train --config configs/multilabel.py --workdir workdirs/multilabel

Arguments (`--config configs/multilabel.py:key=value,...`):
  label=colour | shape    which objects' classes to name
  steps=N, train=N        as in configs/quickstart.py

The table of docs/evaluation.md comes from
  python launch/sweep.py --config configs/multilabel.py --grid arg.label=colour,shape \
      --seeds 3 --sweep_dir runs/multilabel
Expected (val, mean ± sd over seeds 0-2): colour map 0.9999 ± 0.0002, exact_match 0.993 ±
0.003; shape map 0.617 ± 0.008, exact_match 0.108 ± 0.022.
"""

from configs import quickstart
from mmtl.config import parse_arg
from mmtl.data import shapes

LABELS = {"colour": len(shapes.COLOURS), "shape": len(shapes.SHAPES)}


def get_config(arg=None):
  arg = parse_arg(arg, label="colour", steps=500, train=10000)
  if arg.label not in LABELS:
    raise ValueError(f"label={arg.label!r}: use one of {tuple(LABELS)}.")
  config = quickstart.get_config(f"modalities=image,steps={arg.steps},train={arg.train}")
  config.input.fields.label = f"objects/{arg.label}"
  config.model.head = "multilabel"
  config.model.num_classes = LABELS[arg.label]
  config.evals = dict(val=dict(type="multilabel", input=dict(split="validation[:1000]")))
  return config
