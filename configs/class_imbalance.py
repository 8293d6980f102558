r"""Class imbalance on `mmtl_shapes`: the quickstart's model on colour questions whose
answer is "yes" only 10% of the time (training and evaluation splits alike), trained
plainly, with a class-weighted loss, or on class-balanced batches.

Command (offline; ~2 minutes per run on 2 CPU cores; the first run generates the
imbalanced dataset, ~15 s):

  python -m mmtl.train --config configs/class_imbalance.py:balance=sampling \
      --workdir workdirs/imbalance_sampling

Arguments (`--config configs/class_imbalance.py:key=value,...`):
  balance=none | weights | sampling   none: plain shuffled epochs and loss;
                                      weights: config.input.class_weights="balanced"
                                      (each example weighted N / (K n_c));
                                      sampling: config.input.class_sampling="balanced"
                                      (each class half of every epoch, mmtl.data.sampling)
  steps=N, train=N                    as in configs/quickstart.py

Metrics: `val/macro_f1` (and accuracy) on 1000 examples of `validation` (new wording,
10% yes), `val_iid/...` on `validation_iid` (training wording).

The table of docs/domain_transfer.md (3 seeds each) comes from
  python launch/sweep.py --config configs/class_imbalance.py \
      --grid arg.balance=none,weights,sampling --grid seed=0,1,2 --sweep_dir runs/imbalance
Expected (val_iid/macro_f1, mean ± sd over seeds 0-2): none 0.736 ± 0.090, weights
0.840 ± 0.190, sampling 0.993 ± 0.006; val/macro_f1 0.648 / 0.614 / 0.664.
"""

from configs import quickstart
from mmtl.config import parse_arg

BALANCE = ("none", "weights", "sampling")
# mmtl_shapes/colour with P(yes) = 0.1 in every split.
IMBALANCED = dict(
  name="colour_rare_yes",
  num_train=10_000,
  num_eval=1_000,
  question_types=("colour",),
  positive_fraction=0.1,
)


def get_config(arg=None):
  arg = parse_arg(arg, balance="none", steps=1000, train=10000)
  if arg.balance not in BALANCE:
    raise ValueError(f"balance={arg.balance!r}: use one of {BALANCE}.")
  config = quickstart.get_config(f"steps={arg.steps},train={arg.train}")
  config.input.builder_config = IMBALANCED
  if arg.balance == "weights":
    config.input.class_weights = "balanced"
  if arg.balance == "sampling":
    config.input.class_sampling = "balanced"
  return config
