r"""Unsupervised domain adaptation on `mmtl_shapes`: the quickstart's model trained on the
labeled `colour` renders (source) and adapted to the unlabeled `colour_shifted` domain
(target: outlined shapes in another palette on a light background, twice the noise,
paraphrased questions; mmtl/data/shapes.py), by DANN, Deep CORAL or MMD on the fused
features (mmtl/domain_adaptation.py).

Command (offline; ~2 minutes per run on 2 CPU cores):

  python -m mmtl.train --config configs/domain_adaptation.py:method=dann \
      --workdir workdirs/da_dann

Arguments (`--config configs/domain_adaptation.py:key=value,...`):
  method=none | dann | coral | mmd   none: source only (the baseline)
  method=oracle                      trained on the target domain's labels instead (the
                                     reference no unsupervised method can reach)
  weight=W                           lambda (DANN: its final value, Ganin's schedule)
  steps=N, train=N                   as in configs/quickstart.py

Metrics: `target/accuracy` on 1000 labeled examples of the target domain's validation
split (its labels are read only there, but by method=oracle), `val/accuracy` on the
source domain's.

The table of docs/domain_transfer.md (3 seeds each; 24 runs) comes from
  python launch/sweep.py --config configs/domain_adaptation.py \
      --sweep configs/domain_adaptation.py:grid --sweep_dir runs/domain_adaptation
Expected (target/accuracy, mean ± sd over seeds 0-2, 2-core CPU; docs/domain_transfer.md):
  none 0.539 ± 0.018   dann 0.514 ± 0.048 (weight=0.3: 0.588)   coral 0.592 ± 0.031
  (weight=5: 0.618)   mmd 0.641 ± 0.034 (weight=0.3: 0.636)   oracle 0.964 ± 0.014
"""

from configs import quickstart
from mmtl.config import parse_arg

METHODS = ("none", "dann", "coral", "mmd", "oracle")
SOURCE, TARGET = "mmtl_shapes/colour", "mmtl_shapes/colour_shifted"


def get_config(arg=None):
  arg = parse_arg(arg, method="dann", weight=1.0, steps=1000, train=10000)
  if arg.method not in METHODS:
    raise ValueError(f"method={arg.method!r}: use one of {METHODS}.")
  config = quickstart.get_config(f"steps={arg.steps},train={arg.train}")
  if arg.method == "oracle":  # the target domain's own labeled training split
    config.input.dataset, config.input.split = TARGET, "train"
  elif arg.method != "none":
    config.domain_adaptation = dict(
      method=arg.method,
      input=dict(dataset=TARGET, split="train"),
      weight=arg.weight,
    )
  config.model.domain_classifier = 256 if arg.method == "dann" else 0
  config.evals = dict(
    val=dict(type="classification", input=dict(dataset=SOURCE, split="validation[:1000]")),
    target=dict(type="classification", input=dict(dataset=TARGET, split="validation[:1000]")),
  )
  return config


def get_sweep(arg=None):
  """launch/sweep.py's grid: source only, each method at lambda 1 and at another weight
  (DANN 0.3, CORAL 5, MMD 0.3), and the target-supervised reference, seeds 0-2."""
  del arg
  cells = [("none", 1.0), ("dann", 1.0), ("dann", 0.3), ("coral", 1.0), ("coral", 5.0)]
  cells += [("mmd", 1.0), ("mmd", 0.3), ("oracle", 1.0)]
  return [{"arg.method": m, "arg.weight": w, "seed": seed} for m, w in cells for seed in range(3)]
