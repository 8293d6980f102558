"""How a decoded example becomes a row of a model batch: numpy preprocessing shared by both loaders.

Each modality's steps are its `mmtl.modalities.Modality`'s: `decode`, then per example
(`Preprocess.example`, with the element's own RNG: corruptions (mmtl.data.corruptions),
crop/resize, the draws of augmentation)
and per batch (flip, colour jitter, normalization and blanking in `Preprocess.arrays`,
then tokenization in `Preprocess.tokenize`), under the field names the models take.
Preprocess adds what is no modality's: labels, example weights, modality dropout's draws
(`<m>_present`) and the decoder's target.

A CTC head's target text (`fields.target` with `target.format="ctc"`) becomes its
`ctc_labels` (mmtl.ctc). A decoder's target text (captioning) becomes, with BOS, the
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
import math
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from mmtl import config_keys, ctc, modalities
from mmtl.data import corruptions, options, source
from mmtl.modalities import MODALITIES, as_texts

Batch = dict[str, np.ndarray]
HOST_FIELDS = ("target_texts",)  # Batch fields of Python objects: read on the host only.
# config.input.target.format: the decoder's teacher-forcing fields, or a CTC head's labels.
TARGET_FORMATS = ("decoder", "ctc")
# The decoded example's entry holding its cached tower outputs ({batch field: row}), which
# the loader adds from mmtl.feature_cache's tables and `Preprocess.example` passes on.
CACHED_ROWS = "cached_rows"


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
    tok = modalities.tokenizer(name_or_path)
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
          f"Tokenizer {name_or_path!r} has no {what} token "
          f"({' or '.join(f'{n}_token' for n in names)}): the "
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
  """The numpy preprocessing shared by both loaders: per example, then per batch. Each
  modality's own steps are its `mmtl.modalities.Modality`'s; this class adds the label,
  the decoder target, example weights and modality dropout."""

  def __init__(
    self,
    cfg: ml_collections.ConfigDict,
    info: tfds.core.DatasetInfo | None,
    *,
    train: bool,
    class_weights: np.ndarray | None = None,
    cached: Sequence[str] = (),
  ):
    """`cached`: modalities whose tower outputs the examples carry (mmtl.feature_cache,
    under `CACHED_ROWS`): their batch step (tokenizing, normalizing) does not run, nor their
    decoding and per-example step unless that draws from the element's RNG
    (`Modality.draws_when_deterministic`: then it runs, so that the other modalities'
    draws stay those of an uncached run)."""
    self.cfg, self.train, self.class_weights = cfg, train, class_weights
    self.cached = tuple(cached)
    self.fields = options.used_fields(cfg)
    # Multi-label (a list of class ids per example): labels become multi-hot rows.
    self.label_classes = (
      source.multilabel_classes(info.features, self.fields["label"])
      if info and "label" in self.fields
      else None
    )
    if unknown := set(cfg.blank) - set(MODALITIES):
      raise config_keys.ConfigError(
        f"config.input.blank has {sorted(unknown)}; choose from {list(MODALITIES)}."
      )
    self.specs = {
      m: spec(cfg, source.feature_at(info.features, path) if info else None, train=train)
      for m, spec in MODALITIES.items()
      if (path := self.fields.get(m))
    }
    self.modalities = list(self.specs)
    self.corruptions = corruptions.parse(cfg.corruptions, self.modalities)
    self.unread = {m for m in self.cached if not self.specs[m].draws_when_deterministic}
    if not self.modalities:
      raise config_keys.ConfigError(
        f"config.input.fields uses no modality: set fields.<m> for some of {list(MODALITIES)}."
      )
    if set(self.modalities) <= set(cfg.blank):
      raise config_keys.ConfigError(
        f"config.input.blank={tuple(cfg.blank)} blanks every used modality."
      )
    if "target" in self.fields:
      if cfg.target.format not in TARGET_FORMATS:
        raise config_keys.ConfigError(
          f"config.input.target.format={cfg.target.format!r}; use one of {TARGET_FORMATS}."
        )
      if cfg.target.format == "ctc":
        self.target = ctc.CTCVocab.from_config(cfg.target)
      elif not cfg.target.tokenizer:
        raise config_keys.ConfigError(
          "config.input.fields.target is set: set config.input.target.tokenizer (the decoder "
          "checkpoint's tokenizer, HF name or path)."
        )
      else:
        self.target = TargetTokens.from_config(cfg.target)
      feature = source.feature_at(info.features, cfg.fields.target) if info else None
      self.target_names = (
        list(feature.names) if isinstance(feature, tfds.features.ClassLabel) else None
      )
    self.dropout = (
      _ModalityDropout({m: cfg.modality_dropout[m] for m in self.modalities if m not in cfg.blank})
      if train
      else None
    )

  def decode(self, ex: Mapping[str, Any]) -> dict[str, Any]:
    """Used fields only, in numpy (the cacheable, RNG-free part)."""
    out = {}
    for name, path in self.fields.items():
      if name in self.unread:
        continue
      value = source.value_at(ex, path)
      if name in self.specs:
        value = self.specs[name].decode(value)
      if name == "target":
        value = [self.target_names[int(value)]] if self.target_names else as_texts(value)
        if not value:
          raise config_keys.ConfigError(
            f"An example has no {self.cfg.fields.target!r} text: every example needs a target."
          )
      out[name] = value
    return out

  def example(self, ex: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """Each modality's per-example step (after the configured corruptions), and this
    element's random decisions (applied batched in `arrays` and `tokenize`)."""
    if self.corruptions:
      ex = corruptions.apply(self.corruptions, ex, rng)
    out = dict(ex.get(CACHED_ROWS, {}))
    for m, spec in self.specs.items():
      if m in ex:
        entries = spec.example(ex[m], rng)
        if m not in self.cached:  # a cached modality's step runs for its RNG draws only
          out.update(entries)
    if "target" in ex:
      refs = ex["target"]
      out["target"] = refs[rng.integers(len(refs))] if self.train else refs[0]
      if not self.train:
        out["target_texts"] = list(refs)
    weight = 1.0
    if "label" in ex and self.label_classes:
      out["labels"] = np.zeros(self.label_classes, np.float32)
      out["labels"][np.asarray(ex["label"], np.int64)] = 1.0
    elif "label" in ex:
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
    """Arrays stacked; strings and lists (texts, references) kept as lists."""
    return {
      k: (
        [e[k] for e in examples]
        if isinstance(examples[0][k], (str, list))
        else np.stack([e[k] for e in examples])
      )
      for k in examples[0]
    }

  def arrays(self, batch: dict[str, Any]) -> dict[str, Any]:
    """The batch step of every modality that needs no tokenizer (in the loader's threads):
    normalization and blanking, under the field names the models take."""
    return self._batch(batch, tokenizes=False)

  def tokenize(self, batch: dict[str, Any]) -> Batch:
    """The batch step of the modalities that tokenize, and the decoder's target sequences
    (in the one thread consuming batches: HF fast tokenizers are not thread-safe)."""
    batch = self._batch(batch, tokenizes=True)
    if "target" in batch:
      texts, max_length = batch.pop("target"), self.cfg.target.max_length
      if self.cfg.target.format == "ctc":
        batch["ctc_labels"] = self.target.labels(texts, max_length)
      else:
        batch.update(self.target.sequences(texts, max_length))
    return batch

  def _batch(self, batch: dict[str, Any], *, tokenizes: bool) -> dict[str, Any]:
    batch = dict(batch)
    for m, spec in self.specs.items():
      if spec.tokenizes == tokenizes and m in batch:
        batch = spec.batch(batch, batch[f"{m}_present"])
    return batch
