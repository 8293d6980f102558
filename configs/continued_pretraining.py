r"""Domain-adaptive continued pretraining (Gururangan et al. 2020, "Don't Stop
Pretraining"): masked-LM training of the pretrained all-MiniLM-L6-v2 text tower on
unlabeled in-domain text, the questions of `mmtl_shapes/colour_shifted` (the target
domain's wording, held-out paraphrases included; its labels are not read), before
fine-tuning on the task from that run.

Commands (offline, 2 CPU cores):

  # 1. continued pretraining (~4 minutes): the masked_lm head, 15% of tokens masked
  python -m mmtl.train --config configs/continued_pretraining.py --workdir workdirs/dapt
  # 2. the task, its text tower from that run (config.model_init from a workdir)
  python -m mmtl.train --config configs/domain_adaptation.py:method=none \
      --config.model_init.text_encoder=workdirs/dapt --workdir workdirs/dapt_task

all-MiniLM-L6-v2 is a BertModel checkpoint: it has no MLM head, so the head's transform
starts as transformers initializes it (its decoder is the tied word embeddings); a
BertForMaskedLM checkpoint's own head loads with `config.model_init.head=<checkpoint>`.

Arguments (`--config configs/continued_pretraining.py:key=value,...`):
  steps=N      training steps (default 1000)

Metrics: `val/loss`, `val/accuracy` and `val/perplexity` of the masked tokens of 1000
held-out target-domain questions (expected after 1000 steps: accuracy 0.852, perplexity
1.50). Step 2 then gives target/accuracy 0.532 ± 0.006 and val/accuracy 0.804 ± 0.010
(seeds 0-2), against 0.539 and 0.843 from MiniLM itself (docs/domain_transfer.md).
"""

import ml_collections as mlc

from configs import quickstart
from mmtl.config import parse_arg

TARGET = "mmtl_shapes/colour_shifted"


def get_config(arg=None):
  arg = parse_arg(arg, steps=1000)
  text_path = quickstart.minilm_path()
  config = mlc.ConfigDict()
  config.seed = 0
  config.total_steps = arg.steps
  config.batch_size = 32
  config.input = dict(
    dataset=TARGET,
    split="train",
    fields=dict(image=None, text="question", label=None),
    text=dict(tokenizer=text_path, max_length=10, mlm_probability=0.15),
    cache=True,
  )
  config.model = dict(
    towers=dict(text=dict(name=text_path, pool="mean")),
    head="masked_lm",
    width=8,  # the (unused) fusion's width
  )
  config.model_init = dict(text_encoder=text_path)
  config.optim = dict(
    name="adamw",
    lr=5e-5,  # BERT-style continued pretraining
    wd=1e-4,
    schedule=dict(warmup_steps=min(100, arg.steps // 10), decay="linear"),
    grad_clip_norm=1.0,
  )
  config.evals = dict(val=dict(type="masked_lm", input=dict(split="validation[:1000]")))
  config.log_every = 50
  config.ckpt_every = 500
  return config
