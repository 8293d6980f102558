"""The modalities mmtl fuses: one `Modality` each, registered by name.

A modality says everything the data pipeline and the fusion model need to know of it:
- `inputs`: the batch fields it produces and the encoder input (`Encoder.inputs` name)
  each one feeds; the first is its primary field, whose presence in a batch means "this
  modality was given" (a tower runs only then). `dummy_batch(encoder)`: its part of the
  batch `init` runs on (by default the tower's `dummy_inputs()` under these fields).
- `pool`: how its tower's tokens become one vector unless `config.model.towers.<m>.pool`
  says otherwise.
- `config`: its own `config.input.<name>` section (keys and defaults).
- its preprocessing, in three steps run by `mmtl.data.transforms.Preprocess`: `decode`
  (no randomness: what `config.input.cache` holds), `example` (per example, with the
  element's own RNG: crops, random choices) and `batch` (per batch: normalization, the
  encoder's fields), where it is also blanked: rows whose `<name>_present` is 0
  (modality dropout, `config.input.blank` for missing-modality evaluation) carry its
  empty value (mean colour, empty text, silence), as the fusion model also ignores them.

`config.input.fields.<name>` names the dataset feature it reads and
`config.input.modality_dropout.<name>` its dropout rate; `config.model.towers.<name>` its
tower, whose params are `<name>_encoder/...`. Adding a modality is one subclass with
`@register("name")`, in mmtl or in the user's own module imported before the config is
read (tests/test_modalities.py trains image + a sensor vector that way).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import functools
import math
from typing import Any, ClassVar

import numpy as np
from PIL import Image as PILImage

from mmtl import config_keys


class Modality:
  """One modality (see the module docstring). Class attributes describe it to the model;
  an instance, made per pipeline from `config.input`, preprocesses it."""

  name: ClassVar[str]  # set by `register`
  inputs: ClassVar[dict[str, str]]  # batch field -> encoder input; the first is primary
  pool: ClassVar[str] = "mean"
  config: ClassVar[dict[str, Any]] = {}
  # `batch` runs in Preprocess.tokenize, in the one thread that consumes batches (HF fast
  # tokenizers are not thread-safe), instead of the loader's threads.
  tokenizes: ClassVar[bool] = False

  def __init__(self, cfg: Any, feature: Any, *, train: bool):
    """`cfg`: the whole `config.input`; `feature`: the tfds feature it reads (None when
    batches are made from values, as `mmtl.generate --images` does)."""
    self.cfg, self.feature, self.train = cfg, feature, train

  @classmethod
  def primary(cls) -> str:
    """The batch field whose presence means the modality was given."""
    return next(iter(cls.inputs))

  @classmethod
  def dummy_batch(cls, encoder: Any) -> dict[str, Any]:
    """Its smallest batch (batch size 1) for `init` of its tower: by default the tower's
    `dummy_inputs()` under this modality's batch fields."""
    field = {arg: f for f, arg in cls.inputs.items()}
    return {field[name]: x for name, x in encoder.dummy_inputs().items()}

  def decode(self, value: Any) -> Any:
    """The dataset feature's value, in numpy; deterministic."""
    return np.asarray(value)

  def example(self, value: Any, rng: np.random.Generator) -> dict[str, Any]:
    """Per-example entries (keyed by the modality's name, or prefixed with it), stacked
    into the batch `batch` receives: arrays are stacked, strings and lists kept as lists."""
    del rng
    return {self.name: value}

  def batch(self, batch: dict[str, Any], present: np.ndarray) -> dict[str, Any]:
    """`batch` with this modality's `example` entries replaced by its `inputs` fields,
    blanked where `present` (B,) is 0."""
    x = batch.pop(self.name)
    batch[self.primary()] = x * present.reshape(-1, *[1] * (x.ndim - 1)).astype(x.dtype)
    return batch


MODALITIES: dict[str, type[Modality]] = {}
NOT_MODALITIES = ("label", "target")  # the other `config.input.fields`


def register(name: str) -> Callable[[type[Modality]], type[Modality]]:
  """Class decorator: the modality `name` (`config.input.fields.<name>`,
  `config.model.towers.<name>`)."""

  def add(cls: type[Modality]) -> type[Modality]:
    if name in MODALITIES and MODALITIES[name] is not cls:
      raise ValueError(
        f"A modality named {name!r} is registered already ({MODALITIES[name].__name__})."
      )
    if name in NOT_MODALITIES:
      raise ValueError(f"{name!r} is a batch field of every task, not a modality name.")
    if not getattr(cls, "inputs", None):
      raise ValueError(f"Modality {name!r} declares no inputs (batch field -> encoder input).")
    cls.name = name
    MODALITIES[name] = cls
    return cls

  return add


@register("image")
class Image(Modality):
  """RGB images: a crop (random resized in training, else resize + central) to `size`,
  optional flip and colour jitter, normalized by the tower's mean/std. Blanked: the mean
  colour (zeros after normalization)."""

  inputs = {"pixel_values": "pixel_values"}
  pool = "cls"
  config = dict(
    size=None,  # Output side; None: image_stats size, else the dataset's fixed size.
    resize=None,  # Eval: shorter side resized to this, then center crop; None: = size.
    mean=None,
    std=None,  # None: from stats_from, else (0.5, 0.5, 0.5).
    stats_from=None,  # Checkpoint whose preprocessor_config.json gives mean/std/size.
  )

  def __init__(self, cfg: Any, feature: Any, *, train: bool):
    super().__init__(cfg, feature, train=train)
    self.size, self.resize, self.mean, self.std = self._spec()
    aug = cfg.augment
    self.crop_scale = aug.crop_scale if train else None
    self.flip = aug.flip and train
    self.jitter = aug.color_jitter if train else 0.0

  def _spec(self) -> tuple[int, int, np.ndarray, np.ndarray]:
    """(size, resize, mean, std) with mean/std in [0, 1] pixel units."""
    image = self.cfg.image
    stats = {}
    if image.stats_from:
      from mmtl import preprocess  # Reads the checkpoint folder: only when asked.

      stats = preprocess.image_stats(image.stats_from)
    size = image.size or stats.get("size")
    if size is None:
      shape = self.feature.shape
      if shape[0] is None or shape[0] != shape[1]:
        why = (
          f"{image.stats_from!r} (config.input.image.stats_from) gives no image size (no "
          "preprocessor_config.json, no image_size in config.json, as with CNN checkpoints)"
          if image.stats_from
          else "config.input.image.size is not set"
        )
        raise config_keys.ConfigError(
          f"Images of {self.cfg.dataset} have shape {shape} and {why}: set "
          "config.input.image.size (e.g. --config.input.image.size=224)."
        )
      size = shape[0]
    mean = np.asarray(image.mean or stats.get("mean") or (0.5, 0.5, 0.5), np.float32)
    std = np.asarray(image.std or stats.get("std") or (0.5, 0.5, 0.5), np.float32)
    return int(size), int(image.resize or size), mean, std

  def example(self, value: Any, rng: np.random.Generator) -> dict[str, Any]:
    img = np.asarray(value)
    if img.shape[-1] == 1:
      img = np.repeat(img, 3, axis=-1)
    if self.crop_scale:
      img = _random_resized_crop(img, self.size, self.crop_scale, rng)
    else:
      img = _center_crop(img, self.size, self.resize)
    return {
      "image": img,
      "image_flip": np.bool_(self.flip and rng.random() < 0.5),
      "image_jitter": rng.uniform(1 - self.jitter, 1 + self.jitter, size=3).astype(np.float32),
    }

  def batch(self, batch: dict[str, Any], present: np.ndarray) -> dict[str, Any]:
    x = batch.pop("image").astype(np.float32)  # [0, 255]
    flip, jitter = batch.pop("image_flip"), batch.pop("image_jitter")
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
    batch["pixel_values"] = x if present.all() else x * present[:, None, None, None]
    return batch


def _center_crop(img: np.ndarray, size: int, resize: int) -> np.ndarray:
  """Shorter side -> `resize`, then the central size x size (no-op when already size x size)."""
  h, w = img.shape[:2]
  if h == w == size:
    return img
  scale = resize / min(h, w)
  nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
  img = np.asarray(PILImage.fromarray(img).resize((nw, nh), PILImage.BILINEAR))
  top, left = (nh - size) // 2, (nw - size) // 2
  return img[top : top + size, left : left + size]


def _random_resized_crop(
  img: np.ndarray, size: int, scale: Sequence[float], rng: np.random.Generator
) -> np.ndarray:
  """Inception-style crop: area fraction in `scale`, aspect ratio in [3/4, 4/3]."""
  h, w = img.shape[:2]
  area = h * w * rng.uniform(*scale)
  ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
  ch, cw = min(h, round(math.sqrt(area / ratio))), min(w, round(math.sqrt(area * ratio)))
  top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
  crop = PILImage.fromarray(img[top : top + ch, left : left + cw])
  return np.asarray(crop.resize((size, size), PILImage.BILINEAR))


@register("text")
class Text(Modality):
  """Texts, tokenized by the tower's tokenizer to `max_length` (padded). A feature holding
  several texts gives a random one in training and text `config.input.eval_text` at
  evaluation. Blanked: the empty text ([CLS] [SEP] for BERT)."""

  inputs = {
    "input_ids": "input_ids",
    "attention_mask": "attention_mask",
    "token_type_ids": "token_type_ids",
  }
  config = dict(tokenizer=None, max_length=32)  # tokenizer: HF name or local path.
  tokenizes = True
  CACHE_SIZE: ClassVar[int] = 200_000  # Distinct texts kept tokenized (then cleared).

  def __init__(self, cfg: Any, feature: Any, *, train: bool):
    super().__init__(cfg, feature, train=train)
    if not cfg.text.tokenizer:
      raise config_keys.ConfigError(
        "config.input.fields.text is set: set config.input.text.tokenizer "
        "(HF name or path, e.g. the text checkpoint)."
      )
    self.tokenizer = tokenizer(cfg.text.tokenizer)
    self._cache: dict[str, np.ndarray] = {}

  def decode(self, value: Any) -> list[str]:
    texts = as_texts(value)
    if self.train:
      return texts
    # Evaluation reads one fixed text (multi-caption retrieval reads each in its own pass).
    i = self.cfg.eval_text
    if not 0 <= i < len(texts):
      raise config_keys.ConfigError(
        f"An eval example has {len(texts)} texts; config.input.eval_text={i} needs at least "
        f"{i + 1} (retrieval: lower config.evals.<name>.captions)."
      )
    return texts[i : i + 1]

  def example(self, value: Any, rng: np.random.Generator) -> dict[str, Any]:
    return {"text": value[rng.integers(len(value))] if self.train else value[0]}

  def batch(self, batch: dict[str, Any], present: np.ndarray) -> dict[str, Any]:
    texts = [t if p else "" for t, p in zip(batch.pop("text"), present)]
    rows = self._token_rows(texts)
    batch.update(input_ids=rows[:, 0], attention_mask=rows[:, 1], token_type_ids=rows[:, 2])
    return batch

  def _token_rows(self, texts: list[str]) -> np.ndarray:
    """(B, 3, L) int32 ids/mask/type ids. Texts repeat (templates, epochs): each string is
    tokenized once, in one batched call for a batch's new strings."""
    new = [t for t in dict.fromkeys(texts) if t not in self._cache]
    if new:
      tokens = self.tokenizer(
        new,
        padding="max_length",
        truncation=True,
        max_length=self.cfg.text.max_length,
        return_tensors="np",
      )
      ids = tokens["input_ids"]
      type_ids = tokens.get("token_type_ids", np.zeros_like(ids))
      rows = np.stack([ids, tokens["attention_mask"], type_ids], 1)
      if len(self._cache) + len(new) > self.CACHE_SIZE:
        self._cache.clear()
      self._cache.update(zip(new, rows.astype(np.int32)))
    return np.stack([self._cache[t] for t in texts])


@register("audio")
class Audio(Modality):
  """Spectrograms (mel x frames x 1) from the dataset, for an image tower (a ViT over the
  spectrogram, AST-style: it takes them as its pixel_values). Blanked: zeros."""

  inputs = {"audio_values": "pixel_values"}

  def decode(self, value: Any) -> np.ndarray:
    return np.asarray(value, np.float32)


@register("waveform")
class Waveform(Modality):
  """Raw mono waveforms for a speech tower (wav2vec2, HuBERT) that reads samples, not a
  spectrogram. Per clip: converted to the tower's sampling rate (`resample`, with
  scipy.signal.resample_poly) or refused, cropped to `max_seconds` (a random window in
  training, the start at evaluation), normalized to zero mean and unit variance over its
  real samples (the checkpoint feature extractor's `do_normalize`), then zero-padded to
  one fixed length with a `waveform_mask` of its real samples. Blanked: silence."""

  inputs = {"waveform": "input_values", "waveform_mask": "attention_mask"}
  config = dict(
    rate=None,  # The dataset's sampling rate; None: its feature's `sample_rate` (tfds Audio).
    stats_from=None,  # Checkpoint whose preprocessor_config.json gives sampling_rate, do_normalize.
    sampling_rate=None,  # The tower's rate; None: stats_from's, else the dataset's.
    normalize=None,  # Zero mean, unit variance per clip; None: stats_from's, else True.
    resample=False,  # Convert other rates to sampling_rate (else they are an error).
    downmix=False,  # Average the channels of multi-channel clips (else they are an error).
    max_seconds=None,  # Crop longer clips; None: the feature's fixed length.
    min_seconds=None,  # Zero-pad shorter clips to this (the padding counts as signal).
  )

  def __init__(self, cfg: Any, feature: Any, *, train: bool):
    super().__init__(cfg, feature, train=train)
    w = cfg.waveform
    stats = {}
    if w.stats_from:
      from mmtl import preprocess  # Reads the checkpoint folder: only when asked.

      stats = preprocess.audio_stats(w.stats_from)
    self.rate = w.rate or getattr(feature, "sample_rate", None)
    if not self.rate:
      raise config_keys.ConfigError(
        f"The waveform feature of {cfg.dataset} does not say its sampling rate: set "
        "config.input.waveform.rate (mmtl_shapes: 16000)."
      )
    self.sampling_rate = int(w.sampling_rate or stats.get("sampling_rate") or self.rate)
    if self.sampling_rate != self.rate and not w.resample:
      raise config_keys.ConfigError(
        f"The waveforms of {cfg.dataset} are at {self.rate} Hz, the tower takes "
        f"{self.sampling_rate} Hz: set config.input.waveform.resample=True to resample them "
        "(scipy.signal.resample_poly), or use a tower trained at the data's rate."
      )
    g = math.gcd(self.sampling_rate, int(self.rate))  # resampling: up / down, lowest terms
    self.up, self.down = self.sampling_rate // g, int(self.rate) // g
    self.normalize = w.normalize if w.normalize is not None else stats.get("do_normalize", True)
    self.min_length = round((w.min_seconds or 0) * self.sampling_rate)
    self.min_samples = stats.get("min_samples", 1)  # the tower's receptive field
    if w.max_seconds:
      self.length = round(w.max_seconds * self.sampling_rate)
    else:
      samples = feature.shape[0] if feature is not None and feature.shape else None
      if not samples:
        raise config_keys.ConfigError(
          f"The waveforms of {cfg.dataset} vary in length: set config.input.waveform.max_seconds "
          "(clips are cropped to it and padded to it, so every batch has one shape)."
        )
      self.length = -(-samples * self.up // self.down)  # resample_poly's output length

  def decode(self, value: Any) -> np.ndarray:
    x = np.asarray(value, np.float32)
    if x.ndim == 2 and x.shape[1] == 1:
      x = x[:, 0]
    elif x.ndim == 2 and self.cfg.waveform.downmix:
      x = x.mean(axis=1)
    elif x.ndim != 1:
      raise config_keys.ConfigError(
        f"A waveform of {self.cfg.dataset} has shape {x.shape} (samples, channels); the "
        "tower takes mono: set config.input.waveform.downmix=True to average the channels."
      )
    if self.up != self.down:
      from scipy import signal  # pylint: disable=g-import-not-at-top

      x = signal.resample_poly(x, self.up, self.down).astype(np.float32)
    return x

  def example(self, value: Any, rng: np.random.Generator) -> dict[str, Any]:
    x = np.asarray(value, np.float32)
    if len(x) > self.length:
      start = rng.integers(len(x) - self.length + 1) if self.train else 0
      x = x[start : start + self.length]
    if self.normalize:  # transformers' Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm
      x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    n = min(max(len(x), self.min_length), self.length)
    if n < self.min_samples:
      raise config_keys.ConfigError(
        f"A clip of {self.cfg.dataset} has {len(x)} samples, fewer than the tower's receptive "
        f"field ({self.min_samples} samples at {self.sampling_rate} Hz), so it gives no frame: "
        f"drop such clips from the split, or zero-pad them with config.input.waveform."
        f"min_seconds={self.min_samples / self.sampling_rate:g}."
      )
    out = np.zeros(self.length, np.float32)
    out[: len(x)] = x
    return {"waveform": out, "waveform_length": np.int32(n)}

  def batch(self, batch: dict[str, Any], present: np.ndarray) -> dict[str, Any]:
    x, lengths = batch.pop("waveform"), batch.pop("waveform_length")
    lengths = np.where(present > 0, lengths, self.length)  # blanked: silence, full length
    batch["waveform"] = x * present[:, None].astype(np.float32)
    batch["waveform_mask"] = (np.arange(self.length)[None] < lengths[:, None]).astype(np.int32)
    return batch


@functools.lru_cache(maxsize=8)
def tokenizer(name_or_path: str) -> Any:
  """The HF tokenizer of a checkpoint, loaded once per process."""
  from mmtl import preprocess  # transformers: only when text is used

  return preprocess.load_tokenizer(name_or_path)


def as_texts(value: Any) -> list[str]:
  """A text feature's value (one string or a sequence of them) as a list of str."""
  texts = [value] if isinstance(value, (bytes, str)) else list(value)
  return [t.decode() if isinstance(t, bytes) else t for t in texts]


def blank_fields(keep: Sequence[str] = ()) -> dict[str, None]:
  """`config.input.fields` overrides that read no modality but those in `keep`."""
  return {m: None for m in MODALITIES if m not in keep}


def tower_fields(m: str, encoder_inputs: Sequence[str]) -> Mapping[str, str]:
  """Batch field -> encoder input of modality `m`, for the inputs the encoder takes."""
  return {f: arg for f, arg in MODALITIES[m].inputs.items() if arg in encoder_inputs}
