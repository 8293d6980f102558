"""What the configured TFDS dataset holds and how to read it.

The prepared builder, a random-access source of the split that decodes only the
used features, the split's size and class names, the checks that the configured
split and features exist (each failing with the fix), and the class weights and
class-balanced order its labels give.
"""

from __future__ import annotations

from collections.abc import Mapping
import os
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from mmtl import config_keys, modalities
from mmtl.data import bounces, folds, options, sampling, shapes, spoken_digits

# Builders that generate their data offline: prepared on first use, no `download` needed.
OFFLINE_BUILDERS = (shapes.MmtlShapes, spoken_digits.MmtlSpokenDigits, bounces.MmtlBounces)


def builder(cfg: Mapping[str, Any]) -> tfds.core.DatasetBuilder:
  """The TFDS builder, prepared: mmtl's offline builders generate, others need `download`."""
  cfg = options.input_config(cfg)
  name, kwargs = cfg.dataset, {"data_dir": cfg.data_dir}
  if cfg.builder_config:  # Replaces the /config part of the name.
    name = cfg.dataset.split("/")[0].split(":")[0]
    cls = tfds.builder_cls(name)
    kwargs["config"] = type(cls.BUILDER_CONFIGS[0])(**cfg.builder_config)
  try:
    b = tfds.builder(name, **kwargs)
  except tfds.core.registered.DatasetNotFoundError:
    raise config_keys.ConfigError(
      f"Unknown dataset {cfg.dataset!r}. Use a TFDS catalog name or mmtl's built-in "
      "'mmtl_shapes', 'mmtl_spoken_digits' or 'mmtl_bounces'; for your own builder, import "
      "the module that defines it before building the pipeline (see docs/data.md, 'Real "
      "datasets')."
    ) from None
  if b.is_prepared():
    return b
  if isinstance(b, OFFLINE_BUILDERS):
    b.download_and_prepare(file_format="array_record")
    return b
  if cfg.data_dir is not None and not os.path.isdir(os.path.expanduser(cfg.data_dir)):
    raise FileNotFoundError(
      f"config.input.data_dir={cfg.data_dir!r} does not exist. Point it at the directory "
      f"holding {cfg.dataset!r}, or set it to None for $TFDS_DATA_DIR / ~/tensorflow_datasets."
    )
  if not cfg.download:
    raise FileNotFoundError(
      f"Dataset {cfg.dataset!r} is not prepared in {b.data_dir}. Prepare it once with "
      f"`tfds build {cfg.dataset.split(':')[0].replace('/', ' --config ')} "
      f"--data_dir {b.data_dir_root} --file_format array_record` "
      "(see docs/data.md, 'Real datasets'), or set config.input.download=True."
    )
  b.download_and_prepare(file_format="array_record")
  return b


def check_split(b: tfds.core.DatasetBuilder, split: str) -> None:
  """Raises a ConfigError naming the splits `b` has when `split` uses another one."""
  for part in split.split("+"):
    name = part.split("[")[0].strip()
    if name not in b.info.splits:
      raise config_keys.ConfigError(
        f"Unknown split {name!r} of {b.info.full_name}; it has {sorted(b.info.splits)}. "
        "Set config.input.split (slices like 'train[:1000]' are fine)."
      )


def feature_at(features: tfds.features.FeaturesDict, path: str) -> tfds.features.FeatureConnector:
  """Feature at "a/b" (b inside Sequence or dict feature a), or a ConfigError naming it."""
  node = features
  for key in path.split("/"):
    node = getattr(node, "feature", node)  # Step into a Sequence.
    if not isinstance(node, tfds.features.FeaturesDict) or key not in node:
      available = sorted(node.keys()) if isinstance(node, tfds.features.FeaturesDict) else []
      raise config_keys.ConfigError(
        f"Feature {path!r} not in the dataset (available here: {available}). "
        "Fix config.input.fields, or set that field to None."
      )
    node = node[key]
  return node


def value_at(example: Mapping[str, Any], path: str) -> Any:
  """The value of feature path "a/b" in a decoded example."""
  for key in path.split("/"):
    example = example[key]
  return example


def _skip_decoding(features: tfds.features.FeaturesDict, keep: set[str]) -> dict[str, Any]:
  """Decoders that leave unused top-level features as raw bytes (TFDS cannot skip nested
  dicts or sequences)."""
  nested = (tfds.features.FeaturesDict, tfds.features.Sequence)
  return {
    k: tfds.decode.SkipDecoding()
    for k, f in features.items()
    if k not in keep and not isinstance(f, nested)
  }


# What the label and target fields must read (each modality declares its own: `reads`).
FIELD_SPECS = {
  "label": modalities.FeatureSpec("uifb", (0, 1), "class ids or numbers (or a list of ids)"),
  # Texts, or class labels, whose names are the texts (generative VQA's answers).
  "target": modalities.FeatureSpec("OSUiu", (0, 1), "a text, a list of texts or class labels"),
}


def _field_spec(field: str) -> modalities.FeatureSpec | None:
  modality = modalities.MODALITIES.get(field)
  return FIELD_SPECS.get(field) or (modality.reads if modality else None)


def check_fields(cfg: ml_collections.ConfigDict, features: tfds.features.FeaturesDict) -> None:
  """A ConfigError naming the field, its feature, what that holds and the features that
  would fit, for a used field whose feature is missing or of a kind it cannot read (an
  image field on a class label, a label on a text)."""
  for field, path in options.used_fields(cfg).items():
    feature, spec = feature_at(features, path), _field_spec(field)
    problem = spec and spec.problem(feature.get_tensor_info())
    if problem:
      fits = [k for k, f in features.items() if not spec.problem(f.get_tensor_info())]
      raise config_keys.ConfigError(
        f"config.input.fields.{field}={path!r}: that feature of {cfg.dataset} holds {problem}. "
        f"Point it at a feature that does (here: {fits or 'none'}), or set it to None."
      )


def decoders(
  cfg: ml_collections.ConfigDict, features: tfds.features.FeaturesDict
) -> dict[str, Any]:
  """Checks every used field (`check_fields`); decoders that skip the unused features."""
  check_fields(cfg, features)
  fields = options.used_fields(cfg)
  return _skip_decoding(features, {path.split("/")[0] for path in fields.values()})


def data_source(cfg: Mapping[str, Any]) -> tuple[Any, tfds.core.DatasetBuilder]:
  """Random-access source of cfg.split decoding only the used features, and its builder."""
  cfg = options.input_config(cfg)
  b = builder(cfg)
  check_split(b, cfg.split)
  skip = decoders(cfg, b.info.features)
  if not b.info.splits[cfg.split].num_examples:
    raise config_keys.ConfigError(
      f"Split {cfg.split!r} of {b.info.full_name} has no examples; set "
      "config.input.split to a non-empty slice (e.g. 'train[:1000]')."
    )
  try:
    src = b.as_data_source(split=cfg.split, decoders=skip)
  except NotImplementedError as e:  # Prepared as tfrecord: no random access.
    raise config_keys.ConfigError(
      f"{b.info.full_name} is stored as {b.info.file_format.value}, which grain cannot read. "
      "Use config.input.loader='tf' (needs TensorFlow), or rebuild it with "
      "`--file_format array_record`."
    ) from e
  if cfg.fold is not None:
    src = folds.Subset(src, fold_positions(cfg, b))
  return src, b


def num_examples(cfg: Mapping[str, Any]) -> int:
  """Number of examples in cfg.split (over all processes; of its folds with cfg.fold)."""
  cfg = options.input_config(cfg)
  b = builder(cfg)
  check_split(b, cfg.split)
  if cfg.fold is not None:
    return len(fold_positions(cfg, b))
  return b.info.splits[cfg.split].num_examples


def class_names(cfg: Mapping[str, Any]) -> list[str]:
  """Names of the label classes (zero-shot prompts, confusion matrices)."""
  cfg = options.input_config(cfg)
  feature = feature_at(builder(cfg).info.features, cfg.fields.label)
  if not isinstance(feature, tfds.features.ClassLabel):
    raise config_keys.ConfigError(
      f"Feature {cfg.fields.label!r} is not a ClassLabel; it has no class names."
    )
  return list(feature.names)


def labels(cfg: ml_collections.ConfigDict, b: tfds.core.DatasetBuilder) -> np.ndarray:
  """The label of every example cfg reads (cfg.split, or its folds), in order."""
  found = split_labels(cfg, b)
  return found if cfg.fold is None else found[fold_positions(cfg, b)]


def fold_positions(cfg: ml_collections.ConfigDict, b: tfds.core.DatasetBuilder) -> np.ndarray:
  """The positions in cfg.split of the examples of cfg.fold (mmtl.data.folds)."""
  _check_label(cfg, b, "fold")
  where = f"config.cross_validation on {b.info.full_name}:{cfg.split}"
  feature = feature_at(b.info.features, cfg.fields.label)
  names = list(feature.names) if isinstance(feature, tfds.features.ClassLabel) else None
  return folds.indices(split_labels(cfg, b), cfg.fold, where, names)


# (prepared dataset dir, split, label field) -> its labels: a split's labels are read once
# per process, not again by every reader of a fold (the held-out evaluator, each evaluation).
_SPLIT_LABELS: dict[tuple[str, str, str], np.ndarray] = {}


def split_labels(cfg: ml_collections.ConfigDict, b: tfds.core.DatasetBuilder) -> np.ndarray:
  """The label of every example of cfg.split, in order (decoding the label only; read
  once per process, returned read-only)."""
  key = (str(b.data_dir), cfg.split, cfg.fields.label)
  if key not in _SPLIT_LABELS:
    root = cfg.fields.label.split("/")[0]
    skip = _skip_decoding(b.info.features, {root})
    if cfg.loader == "tf":
      examples = tfds.as_numpy(b.as_dataset(split=cfg.split, decoders=skip))
    else:
      src = b.as_data_source(split=cfg.split, decoders=skip)
      examples = (src[i] for i in range(len(src)))
    found = np.asarray([value_at(ex, cfg.fields.label) for ex in examples])
    found.setflags(write=False)
    _SPLIT_LABELS[key] = found
  return _SPLIT_LABELS[key]


def multilabel_classes(features: tfds.features.FeaturesDict, path: str) -> int | None:
  """The number of classes when feature path `path` holds a list of class ids per example
  (a Sequence of ClassLabel, or a ClassLabel inside a Sequence: multi-label); None else."""
  node, listed = features, False
  for key in path.split("/"):
    if isinstance(node, tfds.features.Sequence):
      node, listed = node.feature, True
    node = node[key]
  if isinstance(node, tfds.features.Sequence):
    node, listed = node.feature, True
  return node.num_classes if listed and isinstance(node, tfds.features.ClassLabel) else None


def _check_label(cfg: ml_collections.ConfigDict, b: tfds.core.DatasetBuilder, key: str) -> None:
  """`config.input.<key>` reads one class per example from the label field."""
  if "label" not in options.used_fields(cfg):
    raise config_keys.ConfigError(f"config.input.{key} needs config.input.fields.label.")
  feature_at(b.info.features, cfg.fields.label)  # exists, or an error naming it
  if multilabel_classes(b.info.features, cfg.fields.label):
    raise config_keys.ConfigError(
      f"config.input.{key} needs one class per example; config.input.fields.label="
      f"{cfg.fields.label!r} holds a list of classes (multi-label)."
    )


def class_weights(cfg: ml_collections.ConfigDict, b: tfds.core.DatasetBuilder) -> np.ndarray | None:
  """Per-class example weights; "balanced" reads the split's labels once (labels only)."""
  if cfg.class_weights is None:
    return None
  _check_label(cfg, b, "class_weights")
  num_classes = feature_at(b.info.features, cfg.fields.label).num_classes
  if cfg.class_weights == "balanced":
    found = labels(cfg, b)
    counts = np.bincount(found, minlength=num_classes).astype(np.float64)
    return (len(found) / (num_classes * np.maximum(counts, 1))).astype(np.float32)
  weights = np.asarray(cfg.class_weights, np.float32)
  if weights.shape != (num_classes,):
    raise config_keys.ConfigError(
      f"config.input.class_weights has {weights.size} entries; the label has "
      f"{num_classes} classes. Give one weight per class, or 'balanced'."
    )
  return weights


def class_sampling(
  cfg: ml_collections.ConfigDict, b: tfds.core.DatasetBuilder, seed: int
) -> sampling.ClassBalancedOrder | None:
  """The class-balanced order of the training stream (mmtl.data.sampling), None when
  config.input.class_sampling is not set."""
  if cfg.class_sampling is None:
    return None
  _check_label(cfg, b, "class_sampling")
  if cfg.class_weights is not None:
    raise config_keys.ConfigError(
      "config.input.class_sampling and class_weights both rebalance the classes: set one."
    )
  feature = feature_at(b.info.features, cfg.fields.label)
  found = labels(cfg, b)
  counts = np.bincount(found, minlength=feature.num_classes)
  share = sampling.shares(cfg.class_sampling, counts, list(feature.names))
  return sampling.ClassBalancedOrder(found, share, seed)
