r"""How to adapt the pretrained text tower: frozen, full fine-tuning, BitFit, LoRA, adapters,
prompt tuning, prefix tuning, on the quickstart task.

Every run is `configs/quickstart.py` (the offline all-MiniLM-L6-v2 text tower, a 2-layer ViT
trained from scratch, bilinear fusion, on mmtl_shapes/colour) with the text tower adapted by
`method`; the ViT, the fusion and the head train in full in every run (they start random:
the presets' new layers). A single run:

  python -m mmtl.train --workdir runs/peft_adapters \
      --config configs/ablations/peft.py:method=adapters

The table of docs/transfer.md ("Comparison"): every method, seeds 0, 1, 2, then the
summary over seeds:

  python launch/sweep.py --config configs/ablations/peft.py --sweep_dir runs/peft \
      --grid seed=0,1,2
  python launch/summarize.py --sweep_dir runs/peft --over seed

Arguments: method (below), frozen_dtype, sparsity (below), steps=1000, train=10000 (as the
quickstart's).
Methods (`method=`), on the text tower only:
  frozen    locked (LiT; the quickstart's default): a fixed feature extractor
  full      every text param trains, at 0.1x the LR (the quickstart's `text=tuned`)
  bitfit    its biases (preset="bitfit")
  lora      rank-8 LoRA on the attention query and value kernels (preset="lora")
  adapters  sequential bottleneck adapters of width 64 after each attention and MLP block
            (Houlsby et al. 2019; preset="adapters")
  prompts   10 soft prompt vectors after [CLS] (Lester et al. 2021; preset="prompts")
  prefix    10 prefix vectors per layer (Li & Liang 2021; prompts with deep=True)
The added params train at the run's LR (3e-3, not tuned per method); `full` keeps the
quickstart's 0.1x for the pretrained weights. `frozen_dtype=bfloat16|int8` stores the
frozen params in low precision (mmtl.low_precision); `sparsity=S` prunes the text layers'
kernels to S by magnitude over the first three quarters of training (mmtl.pruning). The
low-precision rows and the accuracy-vs-sparsity curve of docs/transfer.md:

  python launch/sweep.py --config configs/ablations/peft.py \
      --sweep configs/ablations/peft.py:lowp --sweep_dir runs/peft --grid seed=0,1,2
  python launch/sweep.py --config configs/ablations/peft.py \
      --sweep configs/ablations/peft.py:prune --sweep_dir runs/peft_prune --grid seed=0
  python launch/summarize.py --sweep_dir runs/peft_prune --over seed \
      --plot sparsity:val/accuracy
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
  "_mmtl_quickstart", os.path.join(os.path.dirname(__file__), os.pardir, "quickstart.py")
)
quickstart = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quickstart)

LAYERS = r"text_encoder/encoder/layer_\d+/(attn|mlp)"
METHODS = {
  "frozen": dict(frozen=[r"text_encoder/.*"]),
  "full": dict(lr_mults=[(r"text_encoder/.*", 0.1)]),
  "bitfit": dict(preset="bitfit"),
  "lora": dict(
    preset="lora", lora=dict(targets=[r"text_encoder/.*/attn/(query|value)/kernel"], rank=8)
  ),
  "adapters": dict(preset="adapters", adapters=dict(targets=[LAYERS], size=64)),
  "prompts": dict(preset="prompts", prompts=dict(towers=["text_encoder"], length=10)),
  "prefix": dict(preset="prompts", prompts=dict(towers=["text_encoder"], length=10, deep=True)),
}


def get_config(arg=None):
  from mmtl.config import parse_arg

  arg = parse_arg(arg, method="adapters", frozen_dtype="", sparsity=0.0, steps=1000, train=10000)
  if arg.method not in METHODS:
    raise ValueError(f"method={arg.method!r}: use one of {sorted(METHODS)}.")
  config = quickstart.get_config(f"steps={arg.steps},train={arg.train}")
  config.optim.frozen = ()
  config.optim.lr_mults = ()
  config.optim.update(METHODS[arg.method])
  config.optim.frozen_dtype = arg.frozen_dtype
  if arg.sparsity:
    config.optim.prune = dict(targets=[r"text_encoder/encoder/.*/kernel"], sparsity=arg.sparsity)
  return config


def get_sweep(arg=None):
  """launch/sweep.py's runs (seeds come from `--grid seed=...`): one per method; "lowp":
  the locked tower and LoRA's base stored in bfloat16 / int8; "prune": full fine-tuning
  with the text layers' kernels pruned to each sparsity."""
  if arg == "lowp":
    return [
      {"arg.method": "frozen", "arg.frozen_dtype": "bfloat16"},
      {"arg.method": "frozen", "arg.frozen_dtype": "int8"},
      {"arg.method": "lora", "arg.frozen_dtype": "int8"},
    ]
  if arg == "prune":
    return [{"arg.method": "full", "arg.sparsity": s} for s in (0.0, 0.5, 0.75, 0.9)]
  return [{"arg.method": m} for m in METHODS]
