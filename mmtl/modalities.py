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

- `tower(encoder, tower_cfg)`: its tower around the encoder `config.model.towers.<name>`
  builds (by default that encoder; video: the image tower under a temporal model), reading
  its own sections of that config (`tower_config`), and
  `check_tower(encoder, batch)`: its start-up check against a training batch.

`config.input.fields.<name>` names the dataset feature it reads and
`config.input.modality_dropout.<name>` its dropout rate; `config.model.towers.<name>` its
tower, whose params are `<name>_encoder/...`. Adding a modality is one subclass with
`@register("name")`, in mmtl or in the user's own module imported before the config is
read (tests/test_modalities.py trains image + a sensor vector that way).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import functools
import math
from typing import Any, ClassVar

import numpy as np
from PIL import Image as PILImage

from mmtl import config_keys, log_mel


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
  """What a dataset feature must hold for a field to read it, as TFDS describes the
  feature's tensor: numpy dtype kinds ("u" unsigned, "i" signed, "f" float, "O" text),
  ranks (empty: any), and in words, for the error naming a mismatch."""

  kinds: str
  ranks: tuple[int, ...]
  holds: str

  def problem(self, info: Any) -> str | None:
    """Why a feature of tensor info `info` (tfds `get_tensor_info()`) does not fit, else
    None."""
    if not hasattr(info, "shape"):  # A dict of features.
      return f"a group of features ({', '.join(sorted(info))}), not one"
    kind, rank = np.dtype(info.np_dtype).kind, len(info.shape)
    if kind in self.kinds and (not self.ranks or rank in self.ranks):
      return None
    what = "text" if kind in "OSU" else f"{np.dtype(info.np_dtype).name} values"
    return f"{what} of shape {tuple(info.shape)}, where it needs {self.holds}"


class Modality:
  """One modality (see the module docstring). Class attributes describe it to the model;
  an instance, made per pipeline from `config.input`, preprocesses it."""

  name: ClassVar[str]  # set by `register`
  inputs: ClassVar[dict[str, str]]  # batch field -> encoder input; the first is primary
  pool: ClassVar[str] = "mean"
  # The dataset feature it reads (checked when the pipeline opens the dataset); None: any.
  reads: ClassVar[FeatureSpec | None] = None
  config: ClassVar[dict[str, Any]] = {}
  # Its own sections of `config.model.towers.<name>`, which `tower` reads (video: temporal).
  tower_config: ClassVar[dict[str, Any]] = {}
  # `batch` runs in Preprocess.tokenize, in the one thread that consumes batches (HF fast
  # tokenizers are not thread-safe), instead of the loader's threads.
  tokenizes: ClassVar[bool] = False
  # `example` draws from the element's RNG even when `training_randomness()` is None (a
  # zero colour jitter, the one text of one): a cached tower's modality still runs it, so
  # the other modalities' draws stay those of an uncached run; False skips its decoding
  # and per-example step when its tower is cached (mmtl.feature_cache).
  draws_when_deterministic: ClassVar[bool] = True

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

  def training_randomness(self) -> str | None:
    """Why the tower's input for one example varies between training epochs (augmentation,
    random crops or choices), else None: mmtl.feature_cache caches a locked tower's
    features only when its input is the one evaluation preprocessing gives, every epoch."""
    return None

  @classmethod
  def tower(cls, encoder: Any, tower_cfg: Mapping[str, Any]) -> Any:
    """The tower of this modality around `encoder`, the module that
    `config.model.towers.<name>` (`tower_cfg`) builds: by default `encoder` itself."""
    del tower_cfg
    return encoder

  @classmethod
  def check_tower(cls, encoder: Any, batch: Mapping[str, Any]) -> None:
    """Start-up check of the tower against a batch of the training input (e.g. a clip
    longer than the tower's positions): a ConfigError naming the fix."""
    del encoder, batch


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
  reads = FeatureSpec("uif", (3,), "images (height, width, channels)")
  config = dict(
    size=None,  # Output side; None: image_stats size, else the dataset's fixed size.
    resize=None,  # Eval: shorter side resized to this, then center crop; None: = size.
    mean=None,
    std=None,  # None: from stats_from, else (0.5, 0.5, 0.5).
    stats_from=None,  # Checkpoint whose preprocessor_config.json gives mean/std/size.
  )

  def __init__(self, cfg: Any, feature: Any, *, train: bool):
    super().__init__(cfg, feature, train=train)
    self.size, self.resize, self.mean, self.std = pixel_spec(cfg, "image", feature)
    aug = cfg.augment
    self.crop_scale = aug.crop_scale if train else None
    self.flip = aug.flip and train
    self.jitter = aug.color_jitter if train else 0.0

  def training_randomness(self) -> str | None:
    aug = self.cfg.augment
    on = [f"{k}={aug[k]!r}" for k in ("crop_scale", "flip", "color_jitter") if aug[k]]
    return f"config.input.augment ({', '.join(on)}) changes the images" if on else None

  def example(self, value: Any, rng: np.random.Generator) -> dict[str, Any]:
    img = as_rgb(np.asarray(value))
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
    x = normalize_pixels(x, self.mean, self.std)
    batch["pixel_values"] = x if present.all() else x * present[:, None, None, None]
    return batch


def as_rgb(img: np.ndarray) -> np.ndarray:
  """A grayscale image (H, W, 1) repeated to RGB; RGB as it is."""
  return np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img


def normalize_pixels(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """(x / 255 - mean) / std of [0, 255] float pixels, channels last."""
  return x * (1.0 / (255.0 * std)) - mean / std


@register("video")
class Video(Modality):
  """Video clips (T, H, W, C) for a video tower (mmtl.models.video: an image tower on
  each frame and a temporal model). `num_frames` frames are sampled `stride` apart: from
  a random start in training (the element's RNG: deterministic and resumable), the
  centred window at evaluation. A clip with fewer frames than the window spans gives its
  frames from the start, `stride` apart, zero-padded to `num_frames` with a
  `video_mask` of its real frames (`short_clips="pad"`), or is an error naming it
  (`short_clips="error"`). Frames of another size are resized as images are at
  evaluation (shorter side to `resize`, central `size` crop); grayscale frames are
  repeated to RGB. Of `config.input.augment`, `flip` applies (to the whole clip).
  Blanked: frames of the mean colour."""

  inputs = {"video": "pixel_values", "video_mask": "frame_mask"}
  pool = "pooler"  # the temporal model's pooling
  reads = FeatureSpec("uif", (4,), "clips (frames, height, width, channels)")
  config = dict(
    num_frames=8,  # frames per clip the tower sees
    stride=1,  # take every stride-th frame
    short_clips="pad",  # clips shorter than (num_frames - 1) * stride + 1: "pad" | "error"
    size=None,  # frame side; None: stats_from's image size, else the dataset's
    resize=None,  # shorter side resized to this before the central crop; None: = size
    mean=None,
    std=None,  # None: from stats_from, else (0.5, 0.5, 0.5)
    stats_from=None,  # image checkpoint whose preprocessor_config.json gives mean/std/size
  )
  tower_config = dict(
    temporal=dict(  # the temporal model (mmtl.models.video) and its size
      type="factorised",  # "mean" | "attention" | "factorised" | "joint"
      layers=1,  # factorised: temporal transformer layers
      max_frames=16,  # temporal position embeddings: the most frames a clip may have
      num_heads=4,  # attention heads of the temporal layers and of the attention pool
      frame_pool=None,  # a frame's vector: "cls" | "mean" | "pooler"; None: cls, CNNs pooler
    )
  )

  def __init__(self, cfg: Any, feature: Any, *, train: bool):
    super().__init__(cfg, feature, train=train)
    v = cfg.video
    if v.num_frames < 1 or v.stride < 1:
      raise config_keys.ConfigError(
        f"config.input.video.num_frames={v.num_frames} and stride={v.stride} must be >= 1."
      )
    if v.short_clips not in ("pad", "error"):
      raise config_keys.ConfigError(
        f"config.input.video.short_clips={v.short_clips!r}; use 'pad' or 'error'."
      )
    self.size, self.resize, self.mean, self.std = pixel_spec(cfg, "video", feature)
    self.num_frames, self.stride = v.num_frames, v.stride
    self.span = (v.num_frames - 1) * v.stride + 1  # frames a window covers
    self.flip = cfg.augment.flip and train

  def training_randomness(self) -> str | None:
    if self.cfg.augment.flip:
      return "config.input.augment.flip flips the clips"
    frames = self.feature.shape[0] if self.feature is not None and self.feature.shape else None
    if frames is None or frames > self.span:
      return f"training draws a random window of {self.span} frames from clips " + (
        f"of {frames}" if frames else "of varying length"
      )
    return None

  def decode(self, value: Any) -> np.ndarray:
    x = np.asarray(value)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
      raise config_keys.ConfigError(
        f"A clip of {self.cfg.dataset} (feature {self.cfg.fields.video!r}) has shape "
        f"{x.shape}; a video is (frames, height, width, 1 or 3 channels): point "
        "config.input.fields.video at such a feature."
      )
    return x

  def example(self, value: Any, rng: np.random.Generator) -> dict[str, Any]:
    clip, total = np.asarray(value), len(value)
    if total >= self.span:
      start = rng.integers(total - self.span + 1) if self.train else (total - self.span) // 2
      frames = clip[start : start + self.span : self.stride]
    elif self.cfg.video.short_clips == "pad":
      frames = clip[:: self.stride][: self.num_frames]
    else:
      raise config_keys.ConfigError(
        f"A clip of {self.cfg.dataset} has {total} frames; num_frames={self.num_frames} at "
        f"stride={self.stride} spans {self.span}: lower config.input.video.num_frames or "
        "stride, or set config.input.video.short_clips='pad' (padded, masked frames)."
      )
    out = np.zeros((self.num_frames, self.size, self.size, 3), np.uint8)
    for i, f in enumerate(frames):
      out[i] = _center_crop(as_rgb(f), self.size, self.resize)
    return {
      "video": out,
      "video_frames": np.int32(len(frames)),
      "video_flip": np.bool_(self.flip and rng.random() < 0.5),
    }

  def batch(self, batch: dict[str, Any], present: np.ndarray) -> dict[str, Any]:
    x = batch.pop("video").astype(np.float32)
    frames, flip = batch.pop("video_frames"), batch.pop("video_flip")
    if flip.any():
      x[flip] = x[flip, :, :, ::-1]
    frames = np.where(present > 0, frames, 0)  # blanked: no frame of the clip is kept
    real = np.arange(self.num_frames)[None] < frames[:, None]
    # Padding and blanked clips: the mean colour; a blanked clip's frames count as real.
    x = normalize_pixels(x, self.mean, self.std) * real[:, :, None, None, None]
    batch["video"] = x
    batch["video_mask"] = (real | (present[:, None] == 0)).astype(np.int32)
    return batch

  @classmethod
  def tower(cls, encoder: Any, tower_cfg: Mapping[str, Any]) -> Any:
    """`encoder` (an image tower) on every frame under the temporal model
    `config.model.towers.video.temporal` (mmtl.models.video)."""
    from mmtl.models import video  # pylint: disable=g-import-not-at-top

    t = {**cls.tower_config["temporal"], **dict(tower_cfg.get("temporal") or {})}
    frame_pool = t["frame_pool"] or ("cls" if encoder.num_layers else "pooler")
    return video.VideoEncoder(
      frame=encoder,
      temporal=t["type"],
      temporal_layers=t["layers"],
      max_frames=t["max_frames"],
      num_heads=t["num_heads"],
      frame_pool=frame_pool,
      dtype=encoder.dtype,
    )

  @classmethod
  def check_tower(cls, encoder: Any, batch: Mapping[str, Any]) -> None:
    """The tower's own shape checks, run abstractly on one clip of the batch's shape:
    its temporal positions, and the frame size its image tower takes (a ViT's
    `image_size`; DeiT, DINOv2 and CNNs take others)."""
    import jax  # pylint: disable=g-import-not-at-top

    clip = jax.ShapeDtypeStruct((1, *np.shape(batch["video"])[1:]), np.float32)
    mask = jax.ShapeDtypeStruct(clip.shape[:2], np.int32)
    try:
      jax.eval_shape(lambda x, m: encoder.init(jax.random.key(0), x, m), clip, mask)
    except ValueError as e:
      raise config_keys.ConfigError(
        f"The video tower does not take clips of shape {clip.shape[1:]}: {e} (Frames are "
        "resized to config.input.video.size; config.input.video.stats_from gives the "
        "image checkpoint's.)"
      ) from None


def pixel_spec(cfg: Any, name: str, feature: Any) -> tuple[int, int, np.ndarray, np.ndarray]:
  """(size, resize, mean, std) of the pixels of modality `name` (its `config.input.<name>`
  section: size, resize, mean, std, stats_from), mean/std in [0, 1] pixel units. The
  size is the section's, else stats_from's, else the feature's fixed square frame."""
  section = cfg[name]
  stats = {}
  if section.stats_from:
    from mmtl import preprocess  # Reads the checkpoint folder: only when asked.

    stats = preprocess.image_stats(section.stats_from)
  size = section.size or stats.get("size")
  if size is None:
    shape = feature.shape if feature is not None else (None, None, None)
    if shape[-3] is None or shape[-3] != shape[-2]:
      why = (
        f"{section.stats_from!r} (config.input.{name}.stats_from) gives no image size (no "
        "preprocessor_config.json, no image_size in config.json, as with CNN checkpoints)"
        if section.stats_from
        else f"config.input.{name}.size is not set"
      )
      raise config_keys.ConfigError(
        f"{'Images' if name == 'image' else 'Video clips'} of {cfg.dataset} have shape "
        f"{shape} and {why}: set "
        f"config.input.{name}.size (e.g. --config.input.{name}.size=224)."
      )
    size = shape[-3]
  mean = np.asarray(section.mean or stats.get("mean") or (0.5, 0.5, 0.5), np.float32)
  std = np.asarray(section.std or stats.get("std") or (0.5, 0.5, 0.5), np.float32)
  return int(size), int(section.resize or size), mean, std


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
  reads = FeatureSpec("OSU", (0, 1), "a text or a list of texts")
  # tokenizer: HF name or local path; mlm_probability: the share of tokens masked for the
  # masked_lm head (BERT: 0.15), train and eval alike, giving `mlm_labels`.
  config = dict(tokenizer=None, max_length=32, mlm_probability=0.0)
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
    if (p := cfg.text.mlm_probability) and not 0.0 < p < 1.0:
      raise config_keys.ConfigError(
        f"config.input.text.mlm_probability={p}: use a share of tokens in (0, 1) (BERT: 0.15)."
      )
    if p and self.tokenizer.mask_token_id is None:
      raise config_keys.ConfigError(
        f"Tokenizer {cfg.text.tokenizer!r} has no mask token, which masked-LM needs."
      )

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

  def training_randomness(self) -> str | None:
    if self.cfg.text.mlm_probability:
      return "config.input.text.mlm_probability masks its tokens at random"
    if self.feature is None or not getattr(self.feature, "shape", ()):
      return None  # one text per example
    return (
      f"feature {self.cfg.fields.text!r} holds several texts per example, one drawn at "
      "random in training"
    )

  def example(self, value: Any, rng: np.random.Generator) -> dict[str, Any]:
    out = {"text": value[rng.integers(len(value))] if self.train else value[0]}
    if self.cfg.text.mlm_probability:  # the example's masking, drawn now: tokens come later
      out["text_mask_seed"] = rng.integers(2**32, dtype=np.uint32)
    return out

  def batch(self, batch: dict[str, Any], present: np.ndarray) -> dict[str, Any]:
    texts = [t if p else "" for t, p in zip(batch.pop("text"), present)]
    rows = self._token_rows(texts)
    batch.update(input_ids=rows[:, 0], attention_mask=rows[:, 1], token_type_ids=rows[:, 2])
    if self.cfg.text.mlm_probability:
      seeds = batch.pop("text_mask_seed")
      batch["input_ids"], batch["mlm_labels"] = self._mask_tokens(rows[:, 0], rows[:, 1], seeds)
    return batch

  def _mask_tokens(
    self, ids: np.ndarray, attention: np.ndarray, seeds: np.ndarray
  ) -> tuple[np.ndarray, np.ndarray]:
    """BERT's masking, as transformers' DataCollatorForLanguageModeling: each real,
    non-special token is chosen with probability `mlm_probability`; a chosen one becomes
    [MASK] (80%), a random token (10%) or stays (10%), and is the only kind with a label.
    Row i draws from its example's seed, so a batch is a pure function of the stream
    position (resumable, any process count)."""
    p = self.cfg.text.mlm_probability
    special = np.isin(ids, self.tokenizer.all_special_ids) | (attention == 0)
    ids, labels = ids.copy(), np.full_like(ids, -100)
    for i, seed in enumerate(seeds):
      rng = np.random.default_rng(int(seed))
      chosen = (rng.random(ids.shape[1]) < p) & ~special[i]
      kind = rng.random(ids.shape[1])
      random_ids = rng.integers(len(self.tokenizer), size=ids.shape[1])
      labels[i] = np.where(chosen, ids[i], -100)
      ids[i] = np.where(chosen & (kind < 0.8), self.tokenizer.mask_token_id, ids[i])
      ids[i] = np.where(chosen & (kind >= 0.9), random_ids, ids[i])
    return ids, labels

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

  draws_when_deterministic = False

  inputs = {"audio_values": "pixel_values"}
  reads = FeatureSpec("uif", (), "spectrograms (numbers)")

  def decode(self, value: Any) -> np.ndarray:
    return np.asarray(value, np.float32)


class Clip(Modality):
  """What the audio modalities read from raw clips share: a mono clip at the tower's
  sampling rate (converted with scipy.signal.resample_poly when `resample`, else refused),
  cropped to one fixed length (a random window in training, the start at evaluation) and,
  where asked, normalized to zero mean and unit variance over its real samples
  (`(x - mean) / sqrt(var + 1e-7)`, transformers' `zero_mean_unit_var_norm`). Subclasses
  say what the checkpoint gives (`checkpoint_stats`), how long a clip is when
  `max_seconds` is not set (`default_length`) and what the tower reads of it."""

  draws_when_deterministic = False  # its only draw is the crop of a longer clip
  reads = FeatureSpec("uif", (1, 2), "audio samples (samples,) or (samples, channels)")
  config = dict(
    rate=None,  # The dataset's sampling rate; None: its feature's `sample_rate` (tfds Audio).
    stats_from=None,  # Checkpoint whose preprocessor_config.json gives the settings below.
    sampling_rate=None,  # The tower's rate; None: stats_from's, else the dataset's.
    normalize=None,  # Zero mean, unit variance per clip; None: stats_from's, else the default.
    resample=False,  # Convert other rates to sampling_rate (else they are an error).
    downmix=False,  # Average the channels of multi-channel clips (else they are an error).
    max_seconds=None,  # Crop longer clips; None: the modality's default length.
  )
  default_normalize: ClassVar[bool] = True

  def __init__(self, cfg: Any, feature: Any, *, train: bool):
    super().__init__(cfg, feature, train=train)
    self.section = w = cfg[self.name]
    self.stats = self.checkpoint_stats(w.stats_from) if w.stats_from else {}
    self.rate = w.rate or getattr(feature, "sample_rate", None)
    if not self.rate:
      raise config_keys.ConfigError(
        f"The {self.name} feature of {cfg.dataset} does not say its sampling rate: set "
        f"config.input.{self.name}.rate (mmtl_shapes: 16000)."
      )
    self.sampling_rate = int(w.sampling_rate or self.stats.get("sampling_rate") or self.rate)
    if self.sampling_rate != self.rate and not w.resample:
      raise config_keys.ConfigError(
        f"The clips of {cfg.dataset} are at {self.rate} Hz, the tower takes "
        f"{self.sampling_rate} Hz: set config.input.{self.name}.resample=True to resample them "
        "(scipy.signal.resample_poly), or use a tower trained at the data's rate."
      )
    g = math.gcd(self.sampling_rate, int(self.rate))  # resampling: up / down, lowest terms
    self.up, self.down = self.sampling_rate // g, int(self.rate) // g
    self.normalize = (
      w.normalize
      if w.normalize is not None
      else self.stats.get("do_normalize", self.default_normalize)
    )
    if w.max_seconds:
      self.length = round(w.max_seconds * self.sampling_rate)
    else:
      self.length = self.default_length(feature)

  def checkpoint_stats(self, name_or_path: str) -> dict[str, Any]:
    """The settings `stats_from`'s checkpoint gives (sampling_rate, do_normalize, ...)."""
    raise NotImplementedError

  def default_length(self, feature: Any) -> int:
    """Samples per clip when `max_seconds` is not set: by default the feature's fixed
    length (at the tower's rate)."""
    samples = feature.shape[0] if feature is not None and feature.shape else None
    if not samples:
      raise config_keys.ConfigError(
        f"The clips of {self.cfg.dataset} vary in length: set config.input.{self.name}."
        "max_seconds (clips are cropped to it and padded to it, so every batch has one shape)."
      )
    return self.resampled_length(samples)

  def resampled_length(self, samples: int) -> int:
    """Samples of a clip of `samples` at the tower's rate (resample_poly's output length)."""
    return -(-samples * self.up // self.down)

  def decode(self, value: Any) -> np.ndarray:
    x = np.asarray(value)
    # Integer samples (int16: tfds' Audio feature, as in LibriSpeech; mmtl_spoken_digits)
    # in [-1, 1), as audio libraries read them and the feature extractors expect.
    scale = 1.0 / -np.iinfo(x.dtype).min if np.issubdtype(x.dtype, np.signedinteger) else 1.0
    x = x.astype(np.float32) * np.float32(scale)
    if x.ndim == 2 and x.shape[1] == 1:
      x = x[:, 0]
    elif x.ndim == 2 and self.section.downmix:
      x = x.mean(axis=1)
    elif x.ndim != 1:
      raise config_keys.ConfigError(
        f"A clip of {self.cfg.dataset} has shape {x.shape} (samples, channels); the "
        f"tower takes mono: set config.input.{self.name}.downmix=True to average the channels."
      )
    if self.up != self.down:
      from scipy import signal  # pylint: disable=g-import-not-at-top

      x = signal.resample_poly(x, self.up, self.down).astype(np.float32)
    return x

  def training_randomness(self) -> str | None:
    samples = self.feature.shape[0] if self.feature is not None and self.feature.shape else None
    if samples and self.resampled_length(samples) <= self.length:
      return None
    return f"training crops a random {self.length}-sample window of clips " + (
      f"of {samples} samples" if samples else "of varying length"
    )

  def crop(self, value: Any, rng: np.random.Generator) -> np.ndarray:
    """The clip cropped to `length` samples and normalized (where asked)."""
    x = np.asarray(value, np.float32)
    if len(x) > self.length:
      start = rng.integers(len(x) - self.length + 1) if self.train else 0
      x = x[start : start + self.length]
    if self.normalize:  # transformers' zero_mean_unit_var_norm
      x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    return x


@register("waveform")
class Waveform(Clip):
  """Raw mono waveforms for a speech tower (wav2vec2, HuBERT) that reads samples, not a
  spectrogram: each clip prepared as `Clip` says, normalized by default (the checkpoint
  feature extractor's `do_normalize`), then zero-padded to one fixed length with a
  `waveform_mask` of its real samples. Blanked: silence."""

  inputs = {"waveform": "input_values", "waveform_mask": "attention_mask"}
  config = dict(
    Clip.config,
    min_seconds=None,  # Zero-pad shorter clips to this (the padding counts as signal).
  )

  def __init__(self, cfg: Any, feature: Any, *, train: bool):
    super().__init__(cfg, feature, train=train)
    self.min_length = round((self.section.min_seconds or 0) * self.sampling_rate)
    self.min_samples = self.stats.get("min_samples", 1)  # the tower's receptive field

  def checkpoint_stats(self, name_or_path: str) -> dict[str, Any]:
    from mmtl import preprocess  # Reads the checkpoint folder: only when asked.

    return preprocess.audio_stats(name_or_path)

  def example(self, value: Any, rng: np.random.Generator) -> dict[str, Any]:
    x = self.crop(value, rng)
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


@register("log_mel")
class LogMel(Clip):
  """Log-mel spectrograms for a tower that reads them (the Whisper encoder, AST), computed
  from raw clips in the pipeline exactly as the checkpoint's feature extractor computes
  them (mmtl.log_mel: `whisper` = `WhisperFeatureExtractor`, `kaldi` = `ASTFeatureExtractor`).
  Each clip is prepared as `Clip` says (not normalized unless the extractor does:
  Whisper's `do_normalize`), then turned into (frames, mel bins) features: Whisper's pad
  the clip to `max_seconds` (default the extractor's 30 s chunk), Kaldi's pad or cut the
  frames to `frames` (AST's `max_length`). Blanked: the features of silence."""

  inputs = {"log_mel": "input_features"}
  config = dict(
    Clip.config,
    front_end=None,  # "whisper" or "kaldi"; None: stats_from's feature extractor.
    num_mel_bins=None,  # None: stats_from's, else the front end's default (80, 128).
    frames=None,  # kaldi: frames per clip (AST's max_length); None: stats_from's, else 1024.
  )
  default_normalize = False

  def __init__(self, cfg: Any, feature: Any, *, train: bool):
    section = cfg[self.name]
    self.spec = self._spec(section)
    super().__init__(cfg, feature, train=train)
    if self.sampling_rate != self.spec.sampling_rate:
      self.spec = dataclasses.replace(self.spec, sampling_rate=self.sampling_rate)
    if self.spec.front_end == "whisper" and section.max_seconds:
      # Whisper's features cover the padded clip: max_seconds sets it instead of 30 s.
      self.spec = dataclasses.replace(self.spec, chunk_length=section.max_seconds)
    self.check_tower_limits()
    self.silence = log_mel.log_mel(np.zeros(self.length, np.float32), self.spec)

  def _spec(self, section: Any) -> log_mel.LogMelSpec:
    """The front end's spec: stats_from's feature extractor, with the section's overrides."""
    spec = None
    if section.stats_from:
      from mmtl import preprocess  # Reads the checkpoint folder: only when asked.

      spec = preprocess.log_mel_spec(section.stats_from)
    front_end = section.front_end or (spec.front_end if spec else None)
    if front_end not in log_mel.FRONT_ENDS:
      raise config_keys.ConfigError(
        f"config.input.log_mel.front_end={front_end!r}: set it to one of "
        f"{log_mel.FRONT_ENDS} (Whisper's or AST's feature extractor), or set "
        "config.input.log_mel.stats_from to the tower's checkpoint to read it from there."
      )
    overrides = dict(num_mel_bins=section.num_mel_bins, max_length=section.frames)
    if spec is None or spec.front_end != front_end:
      return log_mel.LogMelSpec.default(front_end, **overrides)
    return dataclasses.replace(spec, **{k: v for k, v in overrides.items() if v is not None})

  def checkpoint_stats(self, name_or_path: str) -> dict[str, Any]:
    return dict(sampling_rate=self.spec.sampling_rate)

  def default_length(self, feature: Any) -> int:
    return self.spec.samples  # the samples the front end's features cover

  def check_tower_limits(self) -> None:
    """With `stats_from`, what the tower takes: its mel bins and the frames its positions
    cover (Whisper: 2 * max_source_positions; AST: max_length)."""
    if not self.section.stats_from:
      return
    from mmtl import hf  # pylint: disable=g-import-not-at-top

    tower = hf.read_config(self.section.stats_from)
    bins = tower.get("num_mel_bins")
    if bins is not None and bins != self.spec.num_mel_bins:
      raise config_keys.ConfigError(
        f"config.input.log_mel gives {self.spec.num_mel_bins} mel bins, the tower "
        f"{self.section.stats_from!r} takes {bins}: drop config.input.log_mel.num_mel_bins "
        "(stats_from gives the tower's) or point stats_from at the tower's checkpoint."
      )
    if self.spec.front_end == "whisper":  # (a Whisper config's max_length is the decoder's)
      most = 2 * tower["max_source_positions"] if "max_source_positions" in tower else None
    else:
      most = tower.get("max_length")
    if most is not None and self.spec.frames > most:
      raise config_keys.ConfigError(
        f"config.input.log_mel gives {self.spec.frames} frames per clip "
        f"({self.spec.frames * self.spec.hop_length / self.sampling_rate:g} s), more than "
        f"the tower's positions cover ({most} frames): lower config.input.log_mel."
        "max_seconds (or frames)."
      )

  def example(self, value: Any, rng: np.random.Generator) -> dict[str, Any]:
    return {"log_mel": log_mel.log_mel(self.crop(value, rng), self.spec)}

  def batch(self, batch: dict[str, Any], present: np.ndarray) -> dict[str, Any]:
    x = batch.pop("log_mel")
    batch["log_mel"] = np.where(present[:, None, None] > 0, x, self.silence[None])
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


def tower_config_keys() -> dict[str, Any]:
  """The sections of `config.model.towers.<m>` that modalities declare (`tower_config`)."""
  return {key: v for spec in MODALITIES.values() for key, v in spec.tower_config.items()}


def blank_fields(keep: Sequence[str] = ()) -> dict[str, None]:
  """`config.input.fields` overrides that read no modality but those in `keep`."""
  return {m: None for m in MODALITIES if m not in keep}


def tower_fields(m: str, encoder_inputs: Sequence[str]) -> Mapping[str, str]:
  """Batch field -> encoder input of modality `m`, for the inputs the encoder takes."""
  return {f: arg for f, arg in MODALITIES[m].inputs.items() if arg in encoder_inputs}
