"""How a decoded example becomes a row of a model batch: numpy preprocessing shared by both loaders.

Per example (`Preprocess.example`, with the element's own RNG): crop/resize, and
the draws of augmentation and modality dropout. Per batch: flip, colour jitter,
normalization and blanking (`Preprocess.images`), then tokenization
(`Preprocess.tokenize`), under the field names the models take.

A decoder's target text (`fields.target`, captioning) becomes, with BOS, the
fixed `target.prompt`, the target and EOS in one sequence s (padded):
`decoder_input_ids` = s[:-1] and `decoder_attention_mask`, `decoder_target_ids` =
s[1:], `decoder_loss_mask` (1 on real targets after the prompt: padding and prompt
are never trained on) and `decoder_prompt_ids` (BOS + prompt, where generation
starts). Eval batches also carry every reference text of each example in
`target_texts`, a host-only field (HOST_FIELDS) that never goes to the devices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import functools
import math
from typing import Any

import ml_collections
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from mmtl import config_keys
from mmtl.data import options, source
from mmtl.modalities import MODALITIES

Batch = dict[str, np.ndarray]
TOKEN_CACHE_SIZE = 200_000  # Distinct texts a Preprocess keeps tokenized (then cleared).
HOST_FIELDS = ("target_texts",)  # Batch fields of Python objects: read on the host only.


@dataclasses.dataclass(frozen=True)
class TargetTokens:
  """A decoder tokenizer's special ids, and ids <-> text for the decoder's targets.

  BOS is the tokenizer's bos token, else its cls token (BERT: [CLS], as BERT2BERT
  models start), EOS its eos, else sep token; PAD its pad token.
  """

  tokenizer: Any
  bos: int
  eos: int
  pad: int
  prompt: tuple[int, ...]  # BOS + the prompt's tokens

  @classmethod
  def from_config(cls, target_cfg: Mapping[str, Any]) -> TargetTokens:
    """From `config.input.target` (tokenizer, prompt, pad_token)."""
    return cls.load(target_cfg["tokenizer"], target_cfg["prompt"], target_cfg["pad_token"])

  @classmethod
  def load(cls, name_or_path: str, prompt: str = "", pad_token: str | None = None) -> TargetTokens:
    """`pad_token`: a token of the vocabulary to pad with, for a tokenizer without a pad
    token (GPT-2: "<|endoftext|>", as GPT-2 captioning models pad)."""
    tok = _tokenizer(name_or_path)
    ids = {}
    if pad_token is not None:
      ids["pad"] = tok.convert_tokens_to_ids(pad_token)
      if ids["pad"] is None or (ids["pad"] == tok.unk_token_id and pad_token != tok.unk_token):
        raise config_keys.ConfigError(
          f"config.input.target.pad_token={pad_token!r} is not a token of {name_or_path!r}: "
          "give one of its tokens (e.g. its eos token)."
        )
    for what, names in (("bos", ("bos", "cls")), ("eos", ("eos", "sep")), ("pad", ("pad",))):
      if what in ids:
        continue
      ids[what] = next(
        (getattr(tok, f"{n}_token_id") for n in names if getattr(tok, f"{n}_token_id") is not None),
        None,
      )
      if ids[what] is None:
        fix = (
          " (GPT-2's has none: set config.input.target.pad_token='<|endoftext|>')"
          if what == "pad"
          else ""
        )
        raise config_keys.ConfigError(
          f"Tokenizer {name_or_path!r} has no {what} token ({' or '.join(names)}_token): the "
          f"decoder needs BOS, EOS and PAD. Set its {names[0]}_token in the tokenizer's "
          f"special_tokens_map.json / tokenizer_config.json{fix}, or use another tokenizer."
        )
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    return cls(tok, ids["bos"], ids["eos"], ids["pad"], (ids["bos"], *prompt_ids))

  def check_vocab(self, vocab_size: int) -> None:
    """A tokenizer whose ids reach past the decoder's embedding rows is the wrong one."""
    n = len(self.tokenizer)
    if n > vocab_size:
      raise config_keys.ConfigError(
        f"The target tokenizer {self.tokenizer.name_or_path!r} has {n} tokens but the "
        f"decoder's embeddings have {vocab_size} rows: set config.input.target.tokenizer to "
        "the decoder checkpoint's own tokenizer."
      )

  def sequences(self, texts: Sequence[str], max_length: int) -> dict[str, np.ndarray]:
    """The teacher-forcing fields (module doc) of `texts`, decoder length `max_length`."""
    p = len(self.prompt)
    if p > max_length:
      raise config_keys.ConfigError(
        f"config.input.target.prompt is {p - 1} tokens (+ BOS), which leaves no room in "
        f"config.input.target.max_length={max_length}: raise max_length or shorten the prompt."
      )
    body = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    seqs = np.full((len(texts), max_length + 1), self.pad, np.int32)
    real = np.zeros((len(texts), max_length + 1), bool)
    for i, ids in enumerate(body):
      row = [*self.prompt, *ids[: max_length - p], self.eos]
      seqs[i, : len(row)], real[i, : len(row)] = row, True
    loss = real[:, 1:] & (np.arange(max_length) >= p - 1)
    return dict(
      decoder_input_ids=seqs[:, :-1],
      decoder_attention_mask=real[:, 1:].astype(np.int32),  # EOS is a target, never an input
      decoder_target_ids=seqs[:, 1:],
      decoder_loss_mask=loss.astype(np.float32),
      decoder_prompt_ids=np.tile(np.asarray(self.prompt, np.int32), (len(texts), 1)),
    )

  def texts(self, ids: np.ndarray) -> list[str]:
    """Generated texts of token ids (B, L) that start with `prompt`: up to EOS, specials
    dropped."""
    out = []
    for row in np.asarray(ids)[:, len(self.prompt) :]:
      end = np.nonzero(row == self.eos)[0]
      row = row[: end[0]] if len(end) else row
      out.append(self.tokenizer.decode(row.tolist(), skip_special_tokens=True).strip())
    return out


@functools.lru_cache(maxsize=8)
def _tokenizer(name_or_path: str):
  from mmtl import preprocess  # pylint: disable=g-import-not-at-top

  return preprocess.load_tokenizer(name_or_path)


def _image_spec(
  cfg: ml_collections.ConfigDict, info: tfds.core.DatasetInfo
) -> tuple[int, int, np.ndarray, np.ndarray]:
  """(size, resize, mean, std) with mean/std in [0, 1] pixel units."""
  image = cfg.image
  stats = {}
  if image.stats_from:
    from mmtl import preprocess  # pylint: disable=g-import-not-at-top

    stats = preprocess.image_stats(image.stats_from)
  size = image.size or stats.get("size")
  if size is None:
    shape = source.feature_at(info.features, cfg.fields.image).shape
    if shape[0] is None or shape[0] != shape[1]:
      why = (
        f"{image.stats_from!r} (config.input.image.stats_from) gives no image size (no "
        "preprocessor_config.json, no image_size in config.json, as with CNN checkpoints)"
        if image.stats_from
        else "config.input.image.size is not set"
      )
      raise config_keys.ConfigError(
        f"Images of {info.full_name} have shape {shape} and {why}: set "
        "config.input.image.size (e.g. --config.input.image.size=224)."
      )
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
  crop = Image.fromarray(img[top : top + ch, left : left + cw])
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
        raise config_keys.ConfigError(
          f"config.input.modality_dropout.{m}={p} is not a probability in [0, 1]."
        )
    self.modalities, n, total = list(rates), len(rates), sum(rates.values())
    keep = 1.0 - np.array(list(rates.values()), np.float64)
    # Every kept set but the empty one: row k keeps modality i iff bit i of k + 1 is set.
    self.patterns = (np.arange(1, 2**n)[:, None] >> np.arange(n)) & 1 == 1

    def weights(t: float) -> np.ndarray:  # Marginals are `keep` for every t; t sets their sum.
      return t ** (self.patterns.sum(1) - 1) * np.where(self.patterns, keep, 1.0 - keep * t).prod(1)

    # The sum falls from n - sum(p) at t = 0 to 1 - prod(p) at t = 1.
    if weights(0.0).sum() < 1.0 - 1e-9:
      if n == 1:
        only = self.modalities[0]
        raise config_keys.ConfigError(
          f"config.input.modality_dropout.{only}={total:g}, but {only} is the only used "
          "modality not in config.input.blank and dropout never blanks every modality: "
          "set it to 0."
        )
      given = ", ".join(f"{m}={p:g}" for m, p in rates.items())
      fix = ", ".join(
        f"{m}={math.floor(p * (n - 1) / total * 100) / 100:g}" for m, p in rates.items()
      )
      raise config_keys.ConfigError(
        f"config.input.modality_dropout rates {given} "
        f"sum to {total:g}, but dropout never blanks all {n} used modalities not in "
        f"config.input.blank at once, so their rates can sum to at most {n - 1}: lower them, "
        f"e.g. to {fix}."
      )
    lo, hi = 0.0, 1.0
    for _ in range(60):  # Bisect for the t whose weights sum to 1.
      mid = (lo + hi) / 2
      lo, hi = (mid, hi) if weights(mid).sum() > 1.0 else (lo, mid)
    w = weights(hi)
    self.probs = w / w.sum()

  def __call__(self, rng: np.random.Generator) -> dict[str, bool]:
    """Whether each modality is kept, from one draw of this element's RNG."""
    return dict(zip(self.modalities, self.patterns[rng.choice(len(self.probs), p=self.probs)]))


class Preprocess:
  """The numpy preprocessing shared by both loaders: per example, then per batch."""

  def __init__(
    self,
    cfg: ml_collections.ConfigDict,
    info: tfds.core.DatasetInfo | None,
    *,
    train: bool,
    class_weights: np.ndarray | None = None,
  ):
    self.cfg, self.train, self.class_weights = cfg, train, class_weights
    self.fields = options.used_fields(cfg)
    self.modalities = [m for m in MODALITIES if m in self.fields]
    if not self.modalities:
      raise config_keys.ConfigError(
        "config.input.fields uses no modality: set fields.image/text/audio."
      )
    if unknown := set(cfg.blank) - set(MODALITIES):
      raise config_keys.ConfigError(
        f"config.input.blank has {sorted(unknown)}; choose from {MODALITIES}."
      )
    if set(self.modalities) <= set(cfg.blank):
      raise config_keys.ConfigError(
        f"config.input.blank={tuple(cfg.blank)} blanks every used modality."
      )
    if "image" in self.fields:
      self.size, self.resize, self.mean, self.std = _image_spec(cfg, info)
    if "text" in self.fields:
      if not cfg.text.tokenizer:
        raise config_keys.ConfigError(
          "config.input.fields.text is set: set config.input.text.tokenizer "
          "(HF name or path, e.g. the text checkpoint)."
        )
      self.tokenizer = _tokenizer(cfg.text.tokenizer)
      self._token_cache: dict[str, np.ndarray] = {}
    if "target" in self.fields:
      if not cfg.target.tokenizer:
        raise config_keys.ConfigError(
          "config.input.fields.target is set: set config.input.target.tokenizer (the decoder "
          "checkpoint's tokenizer, HF name or path)."
        )
      self.target = TargetTokens.from_config(cfg.target)
      feature = source.feature_at(info.features, cfg.fields.target) if info else None
      self.target_names = (
        list(feature.names) if isinstance(feature, tfds.features.ClassLabel) else None
      )
    aug = cfg.augment
    self.crop_scale = aug.crop_scale if train else None
    self.flip = aug.flip and train
    self.jitter = aug.color_jitter if train else 0.0
    self.dropout = (
      _ModalityDropout({m: cfg.modality_dropout[m] for m in self.modalities if m not in cfg.blank})
      if train
      else None
    )

  def decode(self, ex: Mapping[str, Any]) -> dict[str, Any]:
    """Used fields only, in numpy (the cacheable, RNG-free part)."""
    out = {}
    for name, path in self.fields.items():
      value = source.value_at(ex, path)
      if name == "text":
        value = _texts(value)
        if not self.train:
          value = self._eval_text(value)
      if name == "target":
        value = [self.target_names[int(value)]] if self.target_names else _texts(value)
        if not value:
          raise config_keys.ConfigError(
            f"An example has no {self.cfg.fields.target!r} text: every example needs a target."
          )
      out[name] = value
    return out

  def _eval_text(self, texts: list[str]) -> list[str]:
    """Text `eval_text` alone: eval uses one fixed text (multi-caption retrieval reads
    each caption in its own pass)."""
    i = self.cfg.eval_text
    if not 0 <= i < len(texts):
      raise config_keys.ConfigError(
        f"An eval example has {len(texts)} texts; config.input.eval_text={i} needs at least "
        f"{i + 1} (retrieval: lower config.evals.<name>.captions)."
      )
    return texts[i : i + 1]

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
    if "target" in ex:
      refs = ex["target"]
      out["target"] = refs[rng.integers(len(refs))] if self.train else refs[0]
      if not self.train:
        out["target_texts"] = list(refs)
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
    return {
      k: (
        [e[k] for e in examples]
        if k in ("text", "target", *HOST_FIELDS)
        else np.stack([e[k] for e in examples])
      )
      for k in examples[0]
    }

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
    # Blanked: the mean colour.
    batch["pixel_values"] = x if present.all() else x * present[:, None, None, None]
    return batch

  def _token_rows(self, texts: list[str]) -> np.ndarray:
    """(B, 3, L) int32 ids/mask/type ids. Texts repeat (templates, epochs): each string is
    tokenized once, in one batched call for a batch's new strings."""
    new = [t for t in dict.fromkeys(texts) if t not in self._token_cache]
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
      ids, mask, type_ids = rows[:, 0], rows[:, 1], rows[:, 2]
      batch.update(input_ids=ids, attention_mask=mask, token_type_ids=type_ids)
    if "audio" in batch:
      batch["audio_values"] = batch.pop("audio") * batch["audio_present"][:, None, None, None]
    if "target" in batch:
      batch.update(self.target.sequences(batch.pop("target"), self.cfg.target.max_length))
    return batch


def _texts(value: Any) -> list[str]:
  """A text feature's value (one string or a sequence of them) as a list of str."""
  texts = [value] if isinstance(value, (bytes, str)) else list(value)
  return [t.decode() if isinstance(t, bytes) else t for t in texts]
