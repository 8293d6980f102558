r"""Robustness to corrupted inputs on `mmtl_shapes`: the quickstart's model evaluated on
clean and corrupted validation questions (image noise, blur and occlusion; word dropout
and typos; severities 1, 3, 5), trained on clean inputs or with corruptions as
augmentation (mmtl/data/corruptions.py).

Command (offline; ~3 minutes per run on 2 CPU cores, a third of it the 16 evaluation
passes):

  python -m mmtl.train --config configs/robustness.py:train_corruptions=mixed \
      --workdir workdirs/robust_mixed

Arguments (`--config configs/robustness.py:key=value,...`):
  train_corruptions=none | mixed   mixed: each training example gets image noise,
                                   occlusion and typos, each with probability 0.3 at a
                                   severity drawn from its range
  steps=N, train=N                 as in configs/quickstart.py

Metrics: `val/accuracy` (clean), `val/<corruption>_<severity>/accuracy` and
`val/corrupted/accuracy` (their mean) on 1000 `validation` examples.

The table of docs/domain_transfer.md (3 seeds each) comes from
  python launch/sweep.py --config configs/robustness.py \
      --grid arg.train_corruptions=none,mixed --grid seed=0,1,2 --sweep_dir runs/robustness
Expected (mean over seeds 0-2; none / mixed): val/accuracy 0.843 / 0.837,
val/typos_5/accuracy 0.672 / 0.725, val/occlusion_5/accuracy 0.738 / 0.775,
val/corrupted/accuracy 0.785 / 0.792.
"""

from configs import quickstart
from mmtl.config import parse_arg

EVAL_CORRUPTIONS = ["gaussian_noise", "gaussian_blur", "occlusion", "token_dropout", "typos"]
TRAIN_CORRUPTIONS = {
  "none": [],
  "mixed": [
    dict(name="gaussian_noise", severity=(1, 5), p=0.3),
    dict(name="occlusion", severity=(1, 3), p=0.3),
    dict(name="typos", severity=(1, 3), p=0.3),
  ],
}


def get_config(arg=None):
  arg = parse_arg(arg, train_corruptions="none", steps=1000, train=10000)
  if arg.train_corruptions not in TRAIN_CORRUPTIONS:
    raise ValueError(
      f"train_corruptions={arg.train_corruptions!r}: use one of {sorted(TRAIN_CORRUPTIONS)}."
    )
  config = quickstart.get_config(f"steps={arg.steps},train={arg.train}")
  config.input.corruptions = TRAIN_CORRUPTIONS[arg.train_corruptions]
  config.evals = dict(
    val=dict(
      type="classification",
      input=dict(split="validation[:1000]"),
      corruptions=EVAL_CORRUPTIONS,
      severities=(1, 3, 5),
    )
  )
  return config
