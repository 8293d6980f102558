"""Input pipelines: a TFDS split -> numpy batches named like the models' inputs.

Loader: grain over `tfds.data_source` (array_record, no TensorFlow needed) by
default; `loader="tf"` reads tfrecord-only datasets with tf.data where
TensorFlow is installed. Both loaders share the per-example and per-batch
numpy functions below, so preprocessing is identical.

Training order (grain): the whole split, decoded -> shuffle -> repeat ->
per-example random_map (crop/resize, draw augmentation and modality dropout
decisions from the element's own RNG) -> batch -> this process's share of each
global batch -> per-batch map (colour jitter, flip, normalize, blanking) ->
[threads/processes] -> batch tokenization. The shuffle seed and each element's
RNG depend only on (seed, position in the global stream), so global batch k is
a pure function of (seed, global batch size, k), whatever the number of
processes: a 2-host run sees the 1-host run's batches, split row-wise. The
grain iterator state (a small JSON-able dict) is the global step, so it resumes
at exactly the same example, on any number of processes (see
mmtl/checkpoint.py). The tf.data loader shards per process instead.
"""
from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from absl import flags
from absl import logging
import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from mmtl import config as config_lib
from mmtl.data import shapes

Batch = dict[str, np.ndarray]
# Builders that generate their data offline: prepared on first use, no `download` needed.
OFFLINE_BUILDERS = (shapes.MmtlShapes,)
MODALITIES = ("image", "text", "audio")
TOKEN_CACHE_SIZE = 200_000  # Distinct texts kept tokenized per pipeline (then cleared).


def defaults() -> ml_collections.ConfigDict:
  """`config.input` keys and their defaults (see README, 'Data')."""
  return ml_collections.ConfigDict(dict(
      dataset="mmtl_shapes",  # TFDS name[/config][:version]
      split="train",  # Any TFDS split spec: "train", "train[:2000]", "train+validation".
      data_dir=None,  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets.
      builder_config=None,  # dict of BuilderConfig fields (incl. name) for a custom config.
      download=False,  # download_and_prepare a missing (non-offline) dataset.
      loader="grain",  # "grain" (array_record) or "tf" (tf.data; needs TensorFlow).
      # Dataset feature read for each modality / the label; None = not used.
      # "a/b" reads feature b of a Sequence feature a (e.g. "captions/text");
      # a sequence of texts gives a random one in training, text `eval_text` at eval.
      fields=dict(image="image", text="question", label="label", audio=None),
      eval_text=0,  # Eval: which text of a sequence of texts each example uses (0: the first).
      image=dict(
          size=None,  # Output side; None: image_stats size, else the dataset's fixed size.
          resize=None,  # Eval: shorter side resized to this, then center crop; None: = size.
          mean=None, std=None,  # None: from stats_from, else (0.5, 0.5, 0.5).
          stats_from=None,  # Checkpoint whose preprocessor_config.json gives mean/std/size.
      ),
      text=dict(tokenizer=None, max_length=32),  # tokenizer: HF name or local path.
      augment=dict(  # Training only; never applied by make_eval_iterator.
          crop_scale=None,  # (min, max) area fraction of a random resized crop; None: off.
          flip=False,  # Random horizontal flip (changes left/right: off for mmtl_shapes).
          color_jitter=0.0,  # Max relative brightness/contrast/saturation change; 0: off.
      ),
      class_weights=None,  # None, "balanced" (N / (K * n_c)) or a list: -> example_weight.
      # Training: P(blank), exactly; never all at once, so the rates of the used modalities not in
      # `blank` must sum to at most their number - 1 (one such modality: rate 0).
      modality_dropout=dict(image=0.0, text=0.0, audio=0.0),
      blank=(),  # Modalities always blanked (train and eval), e.g. ("text",) = image-only.
      cache=False,  # Hold this process's decoded examples in memory (small datasets).
      num_threads=2,  # Threads producing batches in this process.
      prefetch=4,  # Batches buffered ahead.
      num_workers=0,  # >0: grain worker processes (mp_prefetch) instead of threads.
  ))


def input_config(cfg: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """`defaults()` overlaid with `cfg`; an unknown key is an error, not a silent default."""
  def merge(base: dict, override: Mapping, where: str) -> dict:
    config_lib.check_keys(override, base, f"config.input{where}")
    for key, value in override.items():
      if isinstance(base[key], dict) and isinstance(value, Mapping):
        merge(base[key], value, f"{where}.{key}")
      else:
        base[key] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
    return base
  cfg = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else dict(cfg or {})
  return ml_collections.ConfigDict(merge(defaults().to_dict(), cfg, ""))


# ---------------------------------------------------------------- dataset ---

def builder(cfg: Mapping[str, Any]) -> tfds.core.DatasetBuilder:
  """The TFDS builder, prepared: mmtl's offline builders generate, others need `download`."""
  cfg = input_config(cfg)
  name, kwargs = cfg.dataset, {"data_dir": cfg.data_dir}
  if cfg.builder_config:  # Replaces the /config part of the name.
    name = cfg.dataset.split("/")[0].split(":")[0]
    cls = tfds.builder_cls(name)
    kwargs["config"] = type(cls.BUILDER_CONFIGS[0])(**cfg.builder_config)
  try:
    b = tfds.builder(name, **kwargs)
  except tfds.core.registered.DatasetNotFoundError:
    raise config_lib.ConfigError(
        f"Unknown dataset {cfg.dataset!r}. Use a TFDS catalog name or mmtl's built-in "
        "'mmtl_shapes'; for your own builder, import the module that defines it before "
        "building the pipeline (see README, 'Data').") from None
  if b.is_prepared():
    return b
  if isinstance(b, OFFLINE_BUILDERS):
    b.download_and_prepare(file_format="array_record")
    return b
  if cfg.data_dir is not None and not os.path.isdir(os.path.expanduser(cfg.data_dir)):
    raise FileNotFoundError(
        f"config.input.data_dir={cfg.data_dir!r} does not exist. Point it at the directory "
        f"holding {cfg.dataset!r}, or set it to None for $TFDS_DATA_DIR / ~/tensorflow_datasets.")
  if not cfg.download:
    raise FileNotFoundError(
        f"Dataset {cfg.dataset!r} is not prepared in {b.data_dir}. Prepare it once with "
        f"`tfds build {cfg.dataset.split(':')[0].replace('/', ' --config ')} "
        f"--data_dir {b.data_dir_root} --file_format array_record` "
        "(see README, 'Data'), or set config.input.download=True.")
  b.download_and_prepare(file_format="array_record")
  return b


def _check_split(b: tfds.core.DatasetBuilder, split: str) -> None:
  for part in split.split("+"):
    name = part.split("[")[0].strip()
    if name not in b.info.splits:
      raise config_lib.ConfigError(f"Unknown split {name!r} of {b.info.full_name}; it has {sorted(b.info.splits)}. "
                       "Set config.input.split (slices like 'train[:1000]' are fine).")


def _feature(features: tfds.features.FeaturesDict, path: str) -> tfds.features.FeatureConnector:
  """Feature at "a/b" (b inside Sequence or dict feature a), or a ConfigError naming it."""
  node = features
  for key in path.split("/"):
    node = getattr(node, "feature", node)  # Step into a Sequence.
    if not isinstance(node, tfds.features.FeaturesDict) or key not in node:
      available = sorted(node.keys()) if isinstance(node, tfds.features.FeaturesDict) else []
      raise config_lib.ConfigError(f"Feature {path!r} not in the dataset (available here: {available}). "
                     "Fix config.input.fields, or set that field to None.")
    node = node[key]
  return node


def _skip_decoding(features: tfds.features.FeaturesDict, keep: set[str]) -> dict[str, Any]:
  """Decoders that leave unused top-level features as raw bytes (TFDS cannot skip nested dicts)."""
  nested = lambda f: isinstance(getattr(f, "feature", f), tfds.features.FeaturesDict)
  return {k: tfds.decode.SkipDecoding() for k, f in features.items() if k not in keep and not nested(f)}


def _fields(cfg: ml_collections.ConfigDict) -> dict[str, str]:
  """Used fields: {"image"|"text"|"audio"|"label": feature path}."""
  return {k: v for k, v in cfg.fields.items() if v}


def _decoders(cfg: ml_collections.ConfigDict, features: tfds.features.FeaturesDict) -> dict[str, Any]:
  """Checks that every used field exists; decoders that skip the unused features."""
  for path in _fields(cfg).values():
    _feature(features, path)
  return _skip_decoding(features, {path.split("/")[0] for path in _fields(cfg).values()})


def data_source(cfg: Mapping[str, Any]) -> tuple[Any, tfds.core.DatasetBuilder]:
  """Random-access source of cfg.split decoding only the used features, and its builder."""
  cfg = input_config(cfg)
  b = builder(cfg)
  _check_split(b, cfg.split)
  decoders = _decoders(cfg, b.info.features)
  if not b.info.splits[cfg.split].num_examples:
    raise config_lib.ConfigError(f"Split {cfg.split!r} of {b.info.full_name} has no examples; set "
                                 "config.input.split to a non-empty slice (e.g. 'train[:1000]').")
  try:
    return b.as_data_source(split=cfg.split, decoders=decoders), b
  except NotImplementedError as e:  # Prepared as tfrecord: no random access.
    raise config_lib.ConfigError(f"{b.info.full_name} is stored as {b.info.file_format.value}, which grain "
                     "cannot read. Use config.input.loader='tf' (needs TensorFlow), or rebuild it "
                     "with `--file_format array_record`.") from e


def num_examples(cfg: Mapping[str, Any]) -> int:
  """Number of examples in cfg.split (over all processes)."""
  cfg = input_config(cfg)
  b = builder(cfg)
  _check_split(b, cfg.split)
  return b.info.splits[cfg.split].num_examples


def class_names(cfg: Mapping[str, Any]) -> list[str]:
  """Names of the label classes (zero-shot prompts, confusion matrices)."""
  cfg = input_config(cfg)
  feature = _feature(builder(cfg).info.features, cfg.fields.label)
  if not isinstance(feature, tfds.features.ClassLabel):
    raise config_lib.ConfigError(f"Feature {cfg.fields.label!r} is not a ClassLabel; it has no class names.")
  return list(feature.names)


def _get(example: Mapping[str, Any], path: str) -> Any:
  for key in path.split("/"):
    example = example[key]
  return example


def _class_weights(cfg: ml_collections.ConfigDict, b: tfds.core.DatasetBuilder) -> np.ndarray | None:
  """Per-class example weights; "balanced" reads the split's labels once (labels only)."""
  if cfg.class_weights is None:
    return None
  if "label" not in _fields(cfg):
    raise config_lib.ConfigError("config.input.class_weights needs config.input.fields.label.")
  num_classes = _feature(b.info.features, cfg.fields.label).num_classes
  if cfg.class_weights == "balanced":
    root = cfg.fields.label.split("/")[0]
    skip = _skip_decoding(b.info.features, {root})
    if cfg.loader == "tf":
      examples = tfds.as_numpy(b.as_dataset(split=cfg.split, decoders=skip))
    else:
      src = b.as_data_source(split=cfg.split, decoders=skip)
      examples = (src[i] for i in range(len(src)))
    labels = np.asarray([_get(ex, cfg.fields.label) for ex in examples])
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    return (len(labels) / (num_classes * np.maximum(counts, 1))).astype(np.float32)
  weights = np.asarray(cfg.class_weights, np.float32)
  if weights.shape != (num_classes,):
    raise config_lib.ConfigError(f"config.input.class_weights has {weights.size} entries; the label has "
                     f"{num_classes} classes. Give one weight per class, or 'balanced'.")
  return weights


# ---------------------------------------------------------- preprocessing ---

@functools.lru_cache(maxsize=8)
def _tokenizer(name_or_path: str):
  from mmtl import preprocess  # pylint: disable=g-import-not-at-top
  return preprocess.load_tokenizer(name_or_path)


def _image_spec(cfg: ml_collections.ConfigDict, info: tfds.core.DatasetInfo) -> tuple[int, int, np.ndarray, np.ndarray]:
  """(size, resize, mean, std) with mean/std in [0, 1] pixel units."""
  image = cfg.image
  stats = {}
  if image.stats_from:
    from mmtl import preprocess  # pylint: disable=g-import-not-at-top
    stats = preprocess.image_stats(image.stats_from)
  size = image.size or stats.get("size")
  if size is None:
    shape = _feature(info.features, cfg.fields.image).shape
    if shape[0] is None or shape[0] != shape[1]:
      raise config_lib.ConfigError(f"Images of {info.full_name} have shape {shape}: set config.input.image.size.")
    size = shape[0]
  mean = np.asarray(image.mean or stats.get("mean") or (0.5, 0.5, 0.5), np.float32)
  std = np.asarray(image.std or stats.get("std") or (0.5, 0.5, 0.5), np.float32)
  return int(size), int(image.resize or size), mean, std


def _center_crop(img: np.ndarray, size: int, resize: int) -> np.ndarray:
  """Shorter side -> `resize`, then the central size x size (no-op when already size x size)."""
  h, w = img.shape[:2]
  if h == w == size:
    return img
  scale = resize / min(h, w)
  nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
  img = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
  top, left = (nh - size) // 2, (nw - size) // 2
  return img[top:top + size, left:left + size]


def _random_resized_crop(img: np.ndarray, size: int, scale: Sequence[float], rng: np.random.Generator) -> np.ndarray:
  """Inception-style crop: area fraction in `scale`, aspect ratio in [3/4, 4/3]."""
  h, w = img.shape[:2]
  area = h * w * rng.uniform(*scale)
  ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
  ch, cw = min(h, round(math.sqrt(area / ratio))), min(w, round(math.sqrt(area * ratio)))
  top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
  crop = Image.fromarray(img[top:top + ch, left:left + cw])
  return np.asarray(crop.resize((size, size), Image.BILINEAR))


class _ModalityDropout:
  """Draws which modalities an example keeps: each blanked at exactly its rate, never all at once.

  Independent draws with one modality restored when all come up blank keep modalities more often
  than configured (image 0.3, text 0.5 gave 0.225 / 0.421), and so does redrawing. Instead the kept
  set is drawn from independent keeping at rates (1 - p_m) * t conditioned on keeping one, t in
  [0, 1] solved so that the marginals are exactly 1 - p_m: the distribution closest to independent
  dropout (maximum entropy) with these rates. It exists iff sum(p) <= n - 1, as an example blanks at
  most n - 1 of its n modalities; t = 1 (plain independent draws) when some rate is 0.
  """

  def __init__(self, rates: Mapping[str, float]):
    """`rates`: P(blank) of each modality dropout may blank (used and not in config.input.blank)."""
    for m, p in rates.items():
      if not 0.0 <= p <= 1.0:
        raise config_lib.ConfigError(f"config.input.modality_dropout.{m}={p} is not a probability in [0, 1].")
    self.modalities, n, total = list(rates), len(rates), sum(rates.values())
    keep = 1.0 - np.array(list(rates.values()), np.float64)
    # Every kept set but the empty one: row k keeps modality i iff bit i of k + 1 is set.
    self.patterns = (np.arange(1, 2 ** n)[:, None] >> np.arange(n)) & 1 == 1

    def weights(t: float) -> np.ndarray:  # Marginals are `keep` for every t; t sets their sum.
      return t ** (self.patterns.sum(1) - 1) * np.where(self.patterns, keep, 1.0 - keep * t).prod(1)

    if weights(0.0).sum() < 1.0 - 1e-9:  # The sum falls from n - sum(p) at t = 0 to 1 - prod(p) at 1.
      if n == 1:
        raise config_lib.ConfigError(
            f"config.input.modality_dropout.{self.modalities[0]}={total:g}, but {self.modalities[0]} is the only "
            "used modality not in config.input.blank and dropout never blanks every modality: set it to 0.")
      fix = ", ".join(f"{m}={math.floor(p * (n - 1) / total * 100) / 100:g}" for m, p in rates.items())
      raise config_lib.ConfigError(
          f"config.input.modality_dropout rates {', '.join(f'{m}={p:g}' for m, p in rates.items())} sum "
          f"to {total:g}, but dropout never blanks all {n} used modalities not in config.input.blank at "
          f"once, so their rates can sum to at most {n - 1}: lower them, e.g. to {fix}.")
    lo, hi = 0.0, 1.0
    for _ in range(60):  # Bisect for the t whose weights sum to 1.
      mid = (lo + hi) / 2
      lo, hi = (mid, hi) if weights(mid).sum() > 1.0 else (lo, mid)
    w = weights(hi)
    self.probs = w / w.sum()

  def __call__(self, rng: np.random.Generator) -> dict[str, bool]:
    """Whether each modality is kept, from one draw of this element's RNG."""
    return dict(zip(self.modalities, self.patterns[rng.choice(len(self.probs), p=self.probs)]))


class _Preprocess:
  """The numpy preprocessing shared by both loaders: per example, then per batch."""

  def __init__(self, cfg: ml_collections.ConfigDict, info: tfds.core.DatasetInfo, *, train: bool,
               class_weights: np.ndarray | None = None):
    self.cfg, self.train, self.class_weights = cfg, train, class_weights
    self.fields = _fields(cfg)
    self.modalities = [m for m in MODALITIES if m in self.fields]
    if not self.modalities:
      raise config_lib.ConfigError("config.input.fields uses no modality: set fields.image/text/audio.")
    if unknown := set(cfg.blank) - set(MODALITIES):
      raise config_lib.ConfigError(f"config.input.blank has {sorted(unknown)}; choose from {MODALITIES}.")
    if set(self.modalities) <= set(cfg.blank):
      raise config_lib.ConfigError(f"config.input.blank={tuple(cfg.blank)} blanks every used modality.")
    if "image" in self.fields:
      self.size, self.resize, self.mean, self.std = _image_spec(cfg, info)
    if "text" in self.fields:
      if not cfg.text.tokenizer:
        raise config_lib.ConfigError("config.input.fields.text is set: set config.input.text.tokenizer "
                         "(HF name or path, e.g. the text checkpoint).")
      self.tokenizer = _tokenizer(cfg.text.tokenizer)
      self._token_cache: dict[str, np.ndarray] = {}
    aug = cfg.augment
    self.crop_scale = aug.crop_scale if train else None
    self.flip = aug.flip and train
    self.jitter = aug.color_jitter if train else 0.0
    self.dropout = _ModalityDropout({m: cfg.modality_dropout[m] for m in self.modalities
                                     if m not in cfg.blank}) if train else None

  def decode(self, ex: Mapping[str, Any]) -> dict[str, Any]:
    """Used fields only, in numpy (the cacheable, RNG-free part)."""
    out = {}
    for name, path in self.fields.items():
      value = _get(ex, path)
      if name == "text":
        texts = [value] if isinstance(value, (bytes, str)) else list(value)
        value = [t.decode() if isinstance(t, bytes) else t for t in texts]
        if not self.train:
          value = self._eval_text(value)
      out[name] = value
    return out

  def _eval_text(self, texts: list[str]) -> list[str]:
    """Text `eval_text` alone: eval uses one fixed text (multi-caption retrieval reads
    each caption in its own pass)."""
    i = self.cfg.eval_text
    if not 0 <= i < len(texts):
      raise config_lib.ConfigError(
          f"An eval example has {len(texts)} texts; config.input.eval_text={i} needs at least "
          f"{i + 1} (retrieval: lower config.evals.<name>.captions).")
    return texts[i:i + 1]

  def example(self, ex: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """Crop/resize, and draw this element's random decisions (applied batched in `images`)."""
    out = {}
    if "image" in ex:
      img = np.asarray(ex["image"])
      if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
      if self.crop_scale:
        img = _random_resized_crop(img, self.size, self.crop_scale, rng)
      else:
        img = _center_crop(img, self.size, self.resize)
      out["image"] = img
      out["flip"] = np.bool_(self.flip and rng.random() < 0.5)
      out["jitter"] = rng.uniform(1 - self.jitter, 1 + self.jitter, size=3).astype(np.float32)
    if "text" in ex:
      texts = ex["text"]
      out["text"] = texts[rng.integers(len(texts))] if self.train else texts[0]
    if "audio" in ex:
      out["audio"] = np.asarray(ex["audio"], np.float32)
    weight = 1.0
    if "label" in ex:
      out["labels"] = np.int32(ex["label"])
      if self.class_weights is not None:
        weight = self.class_weights[ex["label"]]
    out["example_weight"] = np.float32(weight)
    kept = self.dropout(rng) if self.dropout else {}
    for m in self.modalities:
      out[f"{m}_present"] = np.float32(m not in self.cfg.blank and kept.get(m, True))
    return out

  @staticmethod
  def stack(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {k: ([e[k] for e in examples] if k == "text" else np.stack([e[k] for e in examples]))
            for k in examples[0]}

  def images(self, batch: dict[str, Any]) -> dict[str, Any]:
    """Batched flip, colour jitter, normalization and blanking of images."""
    if "image" not in batch:
      return batch
    batch = dict(batch)
    x = batch.pop("image").astype(np.float32)  # [0, 255]
    flip, jitter = batch.pop("flip"), batch.pop("jitter")
    if flip.any():
      x[flip] = x[flip, :, ::-1]
    if self.jitter:
      brightness, contrast, saturation = (f[:, None, None, None] for f in jitter.T)
      x = x * brightness
      mean = x.mean(axis=(1, 2, 3), keepdims=True)
      x = (x - mean) * contrast + mean
      gray = x.mean(axis=-1, keepdims=True)
      x = np.clip((x - gray) * saturation + gray, 0.0, 255.0)
    x = x * (1.0 / (255.0 * self.std)) - self.mean / self.std  # (x / 255 - mean) / std
    present = batch["image_present"]
    batch["pixel_values"] = x if present.all() else x * present[:, None, None, None]  # Blank: mean colour.
    return batch

  def _token_rows(self, texts: list[str]) -> np.ndarray:
    """(B, 3, L) int32 ids/mask/type ids. Texts repeat (templates, epochs): each string is
    tokenized once, in one batched call for a batch's new strings."""
    new = [t for t in dict.fromkeys(texts) if t not in self._token_cache]
    if new:
      tokens = self.tokenizer(new, padding="max_length", truncation=True,
                              max_length=self.cfg.text.max_length, return_tensors="np")
      ids = tokens["input_ids"]
      rows = np.stack([ids, tokens["attention_mask"], tokens.get("token_type_ids", np.zeros_like(ids))], 1)
      if len(self._token_cache) + len(new) > TOKEN_CACHE_SIZE:
        self._token_cache.clear()
      self._token_cache.update(zip(new, rows.astype(np.int32)))
    return np.stack([self._token_cache[t] for t in texts])

  def tokenize(self, batch: dict[str, Any]) -> Batch:
    """Batched tokenization (blanked texts become empty), audio blanking; final names."""
    batch = dict(batch)
    if "text" in batch:
      texts = [t if p else "" for t, p in zip(batch.pop("text"), batch["text_present"])]
      rows = self._token_rows(texts)
      batch["input_ids"], batch["attention_mask"], batch["token_type_ids"] = rows[:, 0], rows[:, 1], rows[:, 2]
    if "audio" in batch:
      batch["audio_values"] = batch.pop("audio") * batch["audio_present"][:, None, None, None]
    return batch


# ---------------------------------------------------------------- loaders ---

def _grain_seed(seed: int) -> int:
  """config.seed -> grain's 32-bit seed; the same on every process."""
  return int(np.random.SeedSequence(seed).generate_state(1)[0])


def _check_process(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise config_lib.ConfigError(f"process_index={process_index} must be in [0, process_count={process_count}).")


def _to_iterator(ds: grain.MapDataset, cfg: ml_collections.ConfigDict, pre: _Preprocess) -> grain.DatasetIterator:
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch))
  ds = ds.map(pre.tokenize)  # Once per batch; in the consumer thread or in the workers.
  if cfg.num_workers:
    if not flags.FLAGS.is_parsed():  # grain workers read absl flags; outside absl.app use defaults.
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
  return iter(ds)


def _source(cfg, pre: _Preprocess, src, process_index: int = 0,
            process_count: int = 1) -> grain.MapDataset:
  """The slice `process_index::process_count` of `src` (default: all of it), decoded (and held
  in memory when cfg.cache)."""
  ds = grain.MapDataset.source(src)[process_index::process_count].map(pre.decode)
  if cfg.cache:
    ds = grain.MapDataset.source(list(ds))
  return ds


def make_train_iterator(input_cfg: Mapping[str, Any], *, batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1) -> Iterator[Batch]:
  """Endless, shuffled (reshuffled per epoch), augmented batches: this process's share.

  `batch_size` is per process; the global batch is B = batch_size *
  process_count. With grain, all processes shuffle the whole split the same way
  and global batch k is rows [k*B, (k+1)*B) of that one stream; process p
  yields its contiguous rows [k*B + p*batch_size, k*B + (p+1)*batch_size), so
  concatenating the processes' batches (as `sharding.put_batch` does) gives the
  1-process batch of size B, row for row, random augmentation included. Only
  those rows are read and decoded, except with `cache`, where each process
  holds the whole decoded split. The returned iterator has `get_state() ->
  dict` and `set_state(dict)`: restoring a saved state continues with exactly
  the batch that would have come next; a grain state is the global step, valid
  for any process count with the same global batch (loader="tf" instead reads a
  per-process slice of the split, and its state only for the same process).
  """
  cfg = input_config(input_cfg)
  _check_process(process_index, process_count)
  if cfg.loader == "tf":
    return _TfIterator(cfg, batch_size=batch_size, seed=seed, process_index=process_index,
                       process_count=process_count, train=True)
  _check_loader(cfg)
  src, b = data_source(cfg)
  pre = _Preprocess(cfg, b.info, train=True, class_weights=_class_weights(cfg, b))
  ds = _source(cfg, pre, src)  # Lazy without cache: reads only what this process's rows need.
  if len(ds) < batch_size * process_count:
    raise config_lib.ConfigError(f"{cfg.dataset}:{cfg.split} has only {len(ds)} examples, fewer than the "
                     f"global batch size {batch_size} x {process_count} processes.")
  ds = ds.seed(_grain_seed(seed)).shuffle().repeat(None).random_map(pre.example)
  # Local-size batches; global batch k is local batches k*P..k*P+P-1: this process takes the p-th.
  ds = ds.batch(batch_size, drop_remainder=True, batch_fn=pre.stack)[process_index::process_count]
  return _to_iterator(ds.map(pre.images), cfg, pre)


def eval_num_batches(num: int, *, batch_size: int, process_count: int) -> int:
  """Batches every process yields for a `num`-example split (equal on all processes)."""
  return max(1, math.ceil(math.ceil(num / process_count) / batch_size))


def make_eval_iterator(input_cfg: Mapping[str, Any], *, batch_size: int,
                       process_index: int = 0, process_count: int = 1) -> Iterator[Batch]:
  """One ordered pass over this process's slice; no augmentation or modality dropout.

  Every process yields the same number of batches (`eval_num_batches`), as
  multi-host steps require; rows past the end repeat an example with
  `example_weight` 0.0 (real rows have 1.0).
  """
  cfg = input_config(input_cfg)
  _check_process(process_index, process_count)
  if cfg.loader == "tf":
    return _TfIterator(cfg, batch_size=batch_size, seed=0, process_index=process_index,
                       process_count=process_count, train=False)
  _check_loader(cfg)
  src, b = data_source(cfg)
  pre = _Preprocess(cfg, b.info, train=False)
  shard = _source(cfg, pre, src, process_index, process_count)
  total = eval_num_batches(len(src), batch_size=batch_size, process_count=process_count) * batch_size
  fallback = grain.MapDataset.source(src).map(pre.decode)[0]

  def padded(i: int):
    return (shard[i], np.float32(1.0)) if i < len(shard) else (fallback, np.float32(0.0))

  def example(item, rng):
    ex, weight = item
    out = pre.example(ex, rng)
    out["example_weight"] = weight
    return out

  ds = grain.MapDataset.range(total).map(padded).seed(0).random_map(example)
  ds = ds.batch(batch_size, batch_fn=pre.stack).map(pre.images)
  return _to_iterator(ds, cfg, pre)


def _check_loader(cfg: ml_collections.ConfigDict) -> None:
  if cfg.loader != "grain":
    raise config_lib.ConfigError(f"config.input.loader={cfg.loader!r}; choose 'grain' or 'tf'.")


# ------------------------------------------------------- tf.data fallback ---

def _import_tf():
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(
        "config.input.loader='tf' needs TensorFlow, which is not installed: `pip install "
        "tensorflow-cpu`, or rebuild the dataset as array_record (`tfds build NAME "
        "--file_format array_record`) and use loader='grain'.") from None
  return tf


class _TfIterator:
  """tf.data reader for tfrecord-only datasets, with the same numpy preprocessing.

  tf.data has no JSON-able iterator state, so `get_state` records the number of
  batches produced and `set_state` rebuilds the (seeded, deterministic)
  pipeline and skips that many batches. Each process reads its own slice of the
  split, so a state saved by another process slice does not apply: the stream
  then starts afresh (with a warning).
  """

  def __init__(self, cfg: ml_collections.ConfigDict, *, batch_size: int, seed: int,
               process_index: int, process_count: int, train: bool):
    tf = _import_tf()
    b = builder(cfg)
    _check_split(b, cfg.split)
    decoders = _decoders(cfg, b.info.features)
    self.cfg, self.batch_size, self.seed, self.train = cfg, batch_size, seed, train
    self.process_index, self.process_count = process_index, process_count
    self.pre = _Preprocess(cfg, b.info, train=train,
                           class_weights=_class_weights(cfg, b) if train else None)
    split = tfds.even_splits(cfg.split, n=process_count, drop_remainder=False)[process_index]
    # Fixed seeds: every rebuilt pipeline replays the same stream. Shuffling before
    # repeating keeps epochs whole (each example once per epoch), reshuffled per epoch.
    read_config = tfds.ReadConfig(shuffle_seed=seed, shuffle_reshuffle_each_iteration=False,
                                  interleave_cycle_length=1)
    try:
      ds = b.as_dataset(split=split, shuffle_files=train, read_config=read_config, decoders=decoders)
    except NotImplementedError as e:  # Prepared as array_record: no tf.data reader.
      raise config_lib.ConfigError(f"{b.info.full_name} is stored as {b.info.file_format.value}, which tf.data "
                       "cannot read. Use config.input.loader='grain'.") from e
    if train:
      ds = ds.shuffle(10_000, seed=seed).repeat()
    self._tf_ds = ds.prefetch(tf.data.AUTOTUNE)
    total = eval_num_batches(b.info.splits[cfg.split].num_examples, batch_size=batch_size,
                             process_count=process_count) * batch_size
    self.num_batches = None if train else total // batch_size
    self.set_state({"batches": 0, "process": [process_index, process_count]})

  def _examples(self):
    rng = np.random.default_rng([self.seed, self.process_index])
    last = None
    for ex in tfds.as_numpy(self._tf_ds):
      last = self.pre.decode(ex)
      yield self.pre.example(last, rng), np.float32(1.0)
    while True:  # Eval padding up to the common number of batches.
      yield self.pre.example(last, rng), np.float32(0.0)

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    if self.num_batches is not None and self.batches >= self.num_batches:
      raise StopIteration
    rows = []
    for ex, weight in (next(self._stream) for _ in range(self.batch_size)):
      if not self.train:
        ex["example_weight"] = weight
      rows.append(ex)
    self.batches += 1
    return self.pre.tokenize(self.pre.images(self.pre.stack(rows)))

  def get_state(self) -> dict[str, Any]:
    return {"batches": self.batches, "process": [self.process_index, self.process_count]}

  def set_state(self, state: dict[str, Any]) -> None:
    self._stream, self.batches = self._examples(), 0
    if state["process"] != [self.process_index, self.process_count]:
      logging.warning("The loader='tf' input state was saved by process %s of %s; this is process "
                      "%d of %d: the data iterator starts afresh.", *state["process"],
                      self.process_index, self.process_count)
      return
    for _ in range(state["batches"]):
      next(self)
