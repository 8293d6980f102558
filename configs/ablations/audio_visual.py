r"""The audio-visual table of docs/video.md ("Recipe: seen and heard"): configs/audio_visual.py
with one modality, late fusion, MBT's bottleneck fusion (with and without modality
dropout) and the video tower's other temporal models, 3 seeds each.

A single cell:

  python -m mmtl.train --workdir runs/x \
      --config configs/ablations/audio_visual.py:modalities=both,fusion=concat,seed=1

The whole table (`get_sweep()`; finished runs are skipped on rerun), one run after another,
with a Markdown + CSV table of every run's final_metrics.json:

  python launch/sweep.py --config configs/ablations/audio_visual.py --sweep_dir runs/audio_visual

Expected results: docs/video.md, "Recipe: seen and heard".
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
  "_mmtl_audio_visual", os.path.join(os.path.dirname(__file__), os.pardir, "audio_visual.py")
)
audio_visual = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(audio_visual)

SEEDS = (0, 1, 2)
SETTINGS = (
  {"arg.modalities": "video"},
  {"arg.modalities": "audio"},
  {"arg.fusion": "concat"},
  {"arg.fusion": "bottleneck"},
  {"arg.fusion": "bottleneck", "arg.dropout": 0.3},
  {"arg.fusion": "bottleneck", "arg.temporal": "mean"},
  {"arg.fusion": "bottleneck", "arg.temporal": "attention"},
  {"arg.fusion": "bottleneck", "arg.temporal": "joint"},
)


def get_config(arg=None):
  return audio_visual.get_config(arg)


def get_sweep(arg=None):
  """Override dicts for launch/sweep.py: `arg.*` keys are config-file arguments."""
  del arg
  return [{**setting, "arg.seed": seed} for setting in SETTINGS for seed in SEEDS]
