"""Inputs that match a pretrained encoder: its tokenizer, its image statistics, its audio
settings and log-mel front end.

All come from the same checkpoint folder (or hub id) as the weights, so text, pixels and
audio are prepared exactly as the encoder saw them in pretraining.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from absl import logging

from mmtl import hf, log_mel

# When a checkpoint has no preprocessor_config.json: the defaults of the HF image
# processor of its model_type (CLIPImageProcessor, and BitImageProcessor for DINOv2: the
# OpenAI CLIP stats; ViT, DeiT, BEiT, SigLIP, and ConvNext for ConvNeXt and ResNet: 0.5).
OPENAI_CLIP_STATS = dict(
  mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711)
)
STANDARD_STATS = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
PROCESSOR_STATS = {"clip": OPENAI_CLIP_STATS, "dinov2": OPENAI_CLIP_STATS}


def load_tokenizer(name_or_path: str | Path, *, revision: str | None = None, **kw: Any):
  """`transformers.AutoTokenizer` of the checkpoint (kw, e.g. model_max_length, pass through)."""
  from transformers import AutoTokenizer  # heavy import, only when text is used

  return AutoTokenizer.from_pretrained(str(hf.resolve(name_or_path, revision)), **kw)


def _size(processor: dict[str, Any]) -> int | None:
  """Side of the square image the model sees: crop size if it crops, else resize size."""
  for key in ("crop_size", "size"):
    s = processor.get(key)
    if isinstance(s, int):
      return s
    if isinstance(s, dict):
      for k in ("height", "shortest_edge"):
        if k in s:
          return s[k]
  return None


def image_stats(name_or_path: str | Path, *, revision: str | None = None) -> dict[str, Any]:
  """dict(mean=(r, g, b), std=(r, g, b), size=int|None) for pixels scaled to [0, 1]:
  (x - mean) / std.

  Read from preprocessor_config.json (`image_mean`, `image_std`, and `crop_size`
  or `size`). Absent entries: the family's PROCESSOR_STATS, and the config's
  `image_size` (a CLIP config's vision_config.image_size); CNN configs (ResNet,
  ConvNeXt) have none, so their size is None: the caller's to set.
  """
  folder = hf.resolve(name_or_path, revision)
  config = hf.read_config(folder)
  family = str(config.get("model_type", ""))
  family = "clip" if family.startswith("clip") else family
  file = folder / "preprocessor_config.json"
  processor = json.loads(file.read_text()) if file.exists() else {}
  vision = config.get("vision_config") or config
  if not processor and not {"image_size", "num_channels"} & set(vision):
    raise hf.CheckpointError(
      f"{str(folder)!r} is no image checkpoint: no preprocessor_config.json, and its "
      f"config.json ({config.get('model_type')}) has no image_size or num_channels; give "
      "the image tower's checkpoint."
    )
  size = _size(processor) or vision.get("image_size")
  defaults = PROCESSOR_STATS.get(family, STANDARD_STATS)
  return dict(
    mean=tuple(processor.get("image_mean", defaults["mean"])),
    std=tuple(processor.get("image_std", defaults["std"])),
    size=size if size is None or isinstance(size, int) else tuple(size),
  )  # (H, W) only for non-square configs


def audio_stats(name_or_path: str | Path, *, revision: str | None = None) -> dict[str, Any]:
  """dict(sampling_rate=int, do_normalize=bool, min_samples=int) of a speech checkpoint:
  its feature extractor's rate and normalization (preprocessor_config.json; transformers'
  Wav2Vec2FeatureExtractor defaults, 16 kHz and normalization, where it has none), and the
  fewest samples its model turns into a frame (its config's `receptive_field`; 1 for
  families without one)."""
  folder = hf.resolve(name_or_path, revision)
  file = folder / "preprocessor_config.json"
  processor = json.loads(file.read_text()) if file.exists() else {}
  module = hf.build_module(hf.read_config(folder))
  return dict(
    sampling_rate=int(processor.get("sampling_rate", 16_000)),
    do_normalize=bool(processor.get("do_normalize", True)),
    min_samples=int(getattr(module.config, "receptive_field", 1)),
  )


# The front end of each log-mel family's feature extractor, for a checkpoint without
# preprocessor_config.json: its defaults, with the mel bins (and AST's frames) of config.json.
LOG_MEL_FAMILIES = {"whisper": "whisper", "audio-spectrogram-transformer": "kaldi"}


def log_mel_spec(name_or_path: str | Path, *, revision: str | None = None) -> log_mel.LogMelSpec:
  """How a Whisper or AST checkpoint's feature extractor computes its log-mel features: read
  from its preprocessor_config.json (`WhisperFeatureExtractor`, `ASTFeatureExtractor`);
  without one, the family's extractor defaults with config.json's `num_mel_bins` (and AST's
  `max_length`), logged."""
  folder = hf.resolve(name_or_path, revision)
  file = folder / "preprocessor_config.json"
  if file.exists():
    try:
      return log_mel.LogMelSpec.from_preprocessor_config(json.loads(file.read_text()))
    except ValueError as e:
      raise hf.CheckpointError(f"{file}: {e}") from None
  config = hf.read_config(folder)
  family = config.get("model_type")
  if family not in LOG_MEL_FAMILIES:
    raise hf.CheckpointError(
      f"{str(folder)!r} has no preprocessor_config.json and its config.json is a "
      f"{family!r} model, which reads no log-mel features: give a Whisper or AST checkpoint "
      "(or its feature extractor's preprocessor_config.json), or set "
      "config.input.log_mel.front_end without stats_from."
    )
  front_end = LOG_MEL_FAMILIES[family]
  frames = config.get("max_length") if front_end == "kaldi" else None  # Whisper's: the decoder's
  spec = log_mel.LogMelSpec.default(
    front_end, num_mel_bins=config.get("num_mel_bins"), max_length=frames
  )
  logging.warning(
    "%s has no preprocessor_config.json: computing %s log-mel features with the defaults of "
    "its feature extractor (%d mel bins, 16 kHz).",
    folder,
    front_end,
    spec.num_mel_bins,
  )
  return spec
