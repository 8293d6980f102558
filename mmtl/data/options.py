"""Which `config.input` keys exist, what they default to, and which dataset fields a config reads.

Every other data module takes its config through `input_config`, so an unknown
key fails once, here, with a did-you-mean hint.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections

from mmtl import config_keys
from mmtl.modalities import MODALITIES


def defaults() -> ml_collections.ConfigDict:
  """`config.input` keys and their defaults (see docs/data.md)."""
  keys = dict(
    dataset="mmtl_shapes",  # TFDS name[/config][:version]
    split="train",  # Any TFDS split spec: "train", "train[:2000]", "train+validation".
    data_dir=None,  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets.
    builder_config=None,  # dict of BuilderConfig fields (incl. name) for a custom config.
    download=False,  # download_and_prepare a missing (non-offline) dataset.
    loader="grain",  # "grain" (array_record) or "tf" (tf.data; needs TensorFlow).
    # Dataset feature read for each modality / the label; None = not used.
    # "a/b" reads feature b of a Sequence feature a (e.g. "captions/text");
    # a sequence of texts gives a random one in training, text `eval_text` at eval.
    # target: text a decoder learns to generate (captioning head; a ClassLabel gives its
    # class names, e.g. generative VQA answers).
    fields={
      **dict.fromkeys(MODALITIES),
      **dict(image="image", text="question", label="label", target=None),
    },
    eval_text=0,  # Eval: which text of a sequence of texts each example uses (0: the first).
    # The target text (fields.target). format "decoder" (captioning): tokenizer (the
    # decoder checkpoint's), decoder length (BOS + prompt + target + EOS, shifted), a fixed
    # prompt every target follows; pad_token: a vocabulary token to pad with when the
    # tokenizer has none (GPT-2's). format "ctc" (the ctc head): `ctc_labels` of at most
    # max_length labels in a CTC vocabulary (mmtl.ctc): tokenizer (a Wav2Vec2ForCTC
    # checkpoint's vocab.json), else `characters` (wav2vec 2.0's special tokens + these).
    target=dict(
      format="decoder", tokenizer=None, max_length=32, prompt="", pad_token=None, characters=None
    ),
    augment=dict(  # Training only; never applied by make_eval_iterator.
      crop_scale=None,  # (min, max) area fraction of a random resized crop; None: off.
      flip=False,  # Random horizontal flip (changes left/right: off for mmtl_shapes).
      color_jitter=0.0,  # Max relative brightness/contrast/saturation change; 0: off.
    ),
    # Corruptions (mmtl.data.corruptions): [dict(name=..., severity=1-5 or (low, high),
    # p=1.0), ...], applied in training; evaluators corrupt their own inputs (corruptions=).
    corruptions=(),
    class_weights=None,  # None, "balanced" (N / (K * n_c)) or a list: -> example_weight.
    # Training order (mmtl.data.sampling): None (shuffled epochs), "balanced" (each class
    # 1/K of every epoch: rare classes oversampled) or a list of per-class shares.
    class_sampling=None,
    # Cross-validation folds (mmtl.data.folds), set by config.cross_validation: None (the
    # whole split) or dict(folds, index, seed, held_out): fold `index` or all the others.
    fold=None,
    # Training: P(blank), exactly; never all at once, so the rates of the used modalities not in
    # `blank` must sum to at most their number - 1 (one such modality: rate 0).
    modality_dropout={m: 0.0 for m in MODALITIES},
    blank=(),  # Modalities always blanked (train and eval), e.g. ("text",) = image-only.
    cache=False,  # Hold this process's decoded examples in memory (small datasets).
    num_threads=2,  # Threads producing batches in this process.
    prefetch=4,  # Batches buffered ahead.
    num_workers=0,  # >0: grain worker processes (mp_prefetch) instead of threads.
  )
  # Each modality's own section (mmtl.modalities): image (size, resize, mean, std,
  # stats_from), text (tokenizer, max_length), ...
  sections = {m: dict(spec.config) for m, spec in MODALITIES.items() if spec.config}
  if clash := sorted(set(sections) & set(keys)):
    raise ValueError(f"Modalities {clash} have config sections named as config.input keys.")
  return ml_collections.ConfigDict({**keys, **sections})


def input_config(cfg: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """`defaults()` overlaid with `cfg`; an unknown key is an error, not a silent default."""

  def merge(base: dict, override: Mapping, where: str) -> dict:
    config_keys.check_keys(override, base, f"config.input{where}")
    for key, value in override.items():
      if isinstance(base[key], dict) and isinstance(value, (Mapping, ml_collections.ConfigDict)):
        merge(base[key], value, f"{where}.{key}")
      else:
        base[key] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
    return base

  cfg = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg or {})
  return ml_collections.ConfigDict(merge(defaults().to_dict(), cfg, ""))


def used_fields(cfg: ml_collections.ConfigDict) -> dict[str, str]:
  """Used fields: {modality | "label" | "target": feature path}."""
  return {k: v for k, v in cfg.fields.items() if v}
