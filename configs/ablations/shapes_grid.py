r"""Ablation grid on mmtl_shapes: fusion type x text encoder frozen/tuned x
pretrained/scratch x modality.

Every run is `configs/quickstart.py` with config arguments, so a single cell is

  python -m mmtl.train --workdir runs/x \
      --config configs/ablations/shapes_grid.py:fusion=gated,text=frozen,init=pretrained

and the whole grid (`get_sweep()` below; finished runs are skipped on rerun) with
a Markdown + CSV table of every run's final_metrics.json:

  python launch/sweep.py --config configs/ablations/shapes_grid.py --sweep_dir runs/shapes_grid

`get_sweep("small")` is the 4-cell table of README, "Quickstart" (fused / image only /
text only / fused with a scratch text encoder), each cell over seeds 0, 1, 2:

  python launch/sweep.py --config configs/ablations/shapes_grid.py \
      --sweep configs/ablations/shapes_grid.py:small --seeds 3 --sweep_dir runs/small

The full grid has 5 fusions x 3 text settings x 2 inits for the fused model,
plus the single-modality baselines (image only needs no text setting; text
only is run for each text setting and init): 30 + 1 + 6 = 37 runs.

Expected results (the `small` sweep, val / val_iid accuracy, mean ± sd over seeds 0-2;
README, "Quickstart", has the intervals and each seed): fused 0.843 ± 0.010 / 0.996 ±
0.002; image only 0.505 ± 0.001 / 0.506 ± 0.002; text only 0.502 ± 0.005 / 0.498 ± 0.005;
fused with a random-init text encoder 0.637 ± 0.110 / 0.822 ± 0.143.
"""

import importlib.util
import itertools
import os

_spec = importlib.util.spec_from_file_location(
  "_mmtl_quickstart", os.path.join(os.path.dirname(__file__), os.pardir, "quickstart.py")
)
quickstart = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quickstart)

FUSIONS = ("bilinear", "concat", "gated", "cross_attention", "bottleneck")
TEXT = ("frozen", "partial", "tuned")
INITS = ("pretrained", "scratch")


def get_config(arg=None):
  return quickstart.get_config(arg)


def get_sweep(arg=None):
  """Override dicts for launch/sweep.py: `arg.*` keys are config-file arguments."""
  if arg == "small":
    return [
      {"arg.modalities": "image,text", "arg.init": "pretrained"},
      {"arg.modalities": "image"},
      {"arg.modalities": "text", "arg.init": "pretrained"},
      # Same encoder, same (locked) setting, random weights: what pretraining buys.
      {"arg.modalities": "image,text", "arg.init": "scratch", "arg.text": "frozen"},
    ]
  runs = [
    {"arg.fusion": f, "arg.text": t, "arg.init": i}
    for f, t, i in itertools.product(FUSIONS, TEXT, INITS)
  ]
  runs.append({"arg.modalities": "image"})
  runs += [
    {"arg.modalities": "text", "arg.text": t, "arg.init": i}
    for t, i in itertools.product(TEXT, INITS)
  ]
  return runs
