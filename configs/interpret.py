r"""Why the quickstart's fused model answers as it does: attention maps and modality shares.

configs/quickstart.py (locked MiniLM + a small ViT on `mmtl_shapes/colour`, where every
question needs the image and the text) with cross-attention fusion, so that the question
attends over the image patches, and two more evaluators on the validation split
(docs/evaluation.md, "Interpretability"):

  maps          attention_maps: `attention_stepN-maps/<i>.png` for 8 examples: the image,
                the ViT's attention rollout and the question's cross-attention over it
  contribution  modality_contribution: accuracy with both modalities, with the image
                blanked, with the question blanked, and each one's gradient x input share

Command (offline, a few minutes on 2 CPU cores):

  python -m mmtl.train --config configs/interpret.py --workdir workdirs/interpret

Expected results (seed 0, 2-core CPU; docs/evaluation.md, "Interpretability", has the
table and a picture): val accuracy 0.673; with the image blanked 0.504, with the question
blanked 0.498 (chance: a question needs both); gradient x input shares image 0.27, text 0.73.

Arguments: those of configs/quickstart.py (`fusion=` picks another fusion: `gated` adds
its gate values to the pictures; maps need `cross_attention` for the question's map).
"""

from configs import quickstart


def get_config(arg=None):
  config = quickstart.get_config(",".join(filter(None, ["fusion=cross_attention", arg])))
  held_out = dict(split="validation[:1000]")
  config.evals.maps = dict(type="attention_maps", examples=8, input=held_out)
  config.evals.contribution = dict(type="modality_contribution", input=held_out)
  return config
