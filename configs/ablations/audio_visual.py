r"""The audio-visual table of docs/video.md ("Recipe: seen and heard"): configs/audio_visual.py
with one modality, late fusion and MBT's bottleneck fusion from scratch; then, with each
seed's video-only run's frame tower, late and bottleneck fusion, bottleneck fusion with
modality dropout and with the video tower's other temporal models; 3 seeds each.

A single cell:

  python -m mmtl.train --workdir runs/x \
      --config configs/ablations/audio_visual.py:modalities=both,fusion=concat,seed=1

The table (finished runs are skipped on rerun; one run after another; a Markdown + CSV
table of every run's final_metrics.json): the rows from scratch, each seed's frame tower
exported from its video-only run, then every row (`get_sweep(DIR)`: the frame towers are
DIR/frame_<seed>):

  python launch/sweep.py --config configs/ablations/audio_visual.py --sweep_dir runs/av
  for seed in 0 1 2; do
    python -m mmtl.export --workdir runs/av/modalities=video__seed=$seed --tower video \
        --out runs/av/frame_$seed
  done
  python launch/sweep.py --config configs/ablations/audio_visual.py \
      --sweep configs/ablations/audio_visual.py:runs/av --sweep_dir runs/av

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
SCRATCH = (
  {"arg.modalities": "video"},
  {"arg.modalities": "audio"},
  {"arg.fusion": "concat"},
  {"arg.fusion": "bottleneck"},
)
PRETRAINED_FRAMES = (
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
  """Override dicts for launch/sweep.py (`arg.*` keys are config-file arguments): the rows
  from scratch, and with `arg` (the folder of the exported frame towers, frame_<seed>) the
  rows that start from them."""
  runs = [{**row, "arg.seed": seed} for row in SCRATCH for seed in SEEDS]
  if arg:
    runs += [
      {**row, "arg.init": f"{arg}/frame_{seed}", "arg.seed": seed}
      for row in PRETRAINED_FRAMES
      for seed in SEEDS
    ]
  return runs
