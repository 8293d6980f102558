"""CTC's text side: the vocabulary a CTC head predicts, and decoding its frame outputs.

A CTC head (mmtl.heads.CTC) scores every frame of an audio tower over a vocabulary whose
pad token is CTC's blank, as transformers' `Wav2Vec2ForCTC` does. The vocabulary is a
`Wav2Vec2CTCTokenizer` (transformers): a checkpoint's own (`vocab.json`, e.g. a
`Wav2Vec2ForCTC` folder), or one made of given characters with wav2vec 2.0's layout
(`<pad>` = blank 0, `<s>`, `</s>`, `<unk>`, `|` = the space between words, then the
characters). Transcripts become label ids here (`CTCVocab.labels`), and label ids texts
(`CTCVocab.texts`).

Decoding, jitted over the batch: `greedy` (the best class per frame, repeats collapsed,
blanks dropped: what `Wav2Vec2CTCTokenizer.decode` of the argmax does) and
`prefix_beam_search` (CTC prefix beam search, Hannun et al. 2014, without a language
model: the labeling whose summed alignment probability is highest among the `beam_size`
prefixes kept at each frame). Both return label ids (B, T) packed to the left and padded
with -1, which `CTCVocab.texts` reads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import json
from pathlib import Path
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmtl import config_keys

# wav2vec 2.0's special tokens, in the order of its vocab.json (facebook/wav2vec2-base-960h).
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", "|")
PAD_LABEL = -1  # the label id that pads `ctc_labels` rows (transformers' CTC loss: any < 0)


@dataclasses.dataclass(frozen=True)
class CTCVocab:
  """A CTC vocabulary: transcripts <-> label ids; `blank` is the tokenizer's pad token."""

  tokenizer: Any  # transformers.Wav2Vec2CTCTokenizer
  source: str  # what it was made from, for messages

  @classmethod
  def from_config(cls, target_cfg: Mapping[str, Any]) -> CTCVocab:
    """From `config.input.target`: `tokenizer` (a checkpoint's vocab.json), else
    `characters`."""
    if target_cfg["tokenizer"]:
      return cls.load(target_cfg["tokenizer"])
    if target_cfg["characters"]:
      return cls.of_characters(target_cfg["characters"])
    raise config_keys.ConfigError(
      "config.input.target.format='ctc' needs a vocabulary: set config.input.target.tokenizer "
      "(a Wav2Vec2ForCTC checkpoint: its vocab.json) or config.input.target.characters (e.g. "
      "\"abcdefghijklmnopqrstuvwxyz'\")."
    )

  @classmethod
  def load(cls, name_or_path: str) -> CTCVocab:
    from mmtl import modalities  # transformers: only when text is used

    tok = modalities.tokenizer(name_or_path)
    if getattr(tok, "word_delimiter_token", None) is None or tok.pad_token_id is None:
      raise config_keys.ConfigError(
        f"config.input.target.tokenizer={name_or_path!r} is a {type(tok).__name__}, not a CTC "
        "vocabulary (Wav2Vec2CTCTokenizer: vocab.json with a pad token as the blank): point it "
        "at a Wav2Vec2ForCTC checkpoint, or set config.input.target.characters instead."
      )
    return cls(tok, repr(name_or_path))

  @classmethod
  def of_characters(cls, characters: str) -> CTCVocab:
    """wav2vec 2.0's special tokens, then each of `characters` once (" " is `|`)."""
    from transformers import Wav2Vec2CTCTokenizer  # pylint: disable=g-import-not-at-top

    chars = [c for c in dict.fromkeys(characters) if c != " "]
    if clash := [c for c in chars if c in SPECIAL_TOKENS]:
      raise config_keys.ConfigError(
        f"config.input.target.characters has {clash}, which the special tokens "
        f"{SPECIAL_TOKENS} use: leave them out."
      )
    vocab = {t: i for i, t in enumerate((*SPECIAL_TOKENS, *chars))}
    with tempfile.TemporaryDirectory() as tmp:  # the tokenizer keeps the vocab in memory
      (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
      tok = Wav2Vec2CTCTokenizer(str(Path(tmp) / "vocab.json"))
    return cls(tok, f"characters {''.join(chars)!r}")

  @property
  def blank(self) -> int:
    return int(self.tokenizer.pad_token_id)

  @property
  def size(self) -> int:
    return len(self.tokenizer)

  def check_head(self, vocab_size: int, blank_id: int) -> None:
    """The head scores `vocab_size` classes, `blank_id` the blank: the vocabulary's."""
    if self.size != vocab_size:
      raise config_keys.ConfigError(
        f"The CTC vocabulary ({self.source}) has {self.size} tokens but the CTC head scores "
        f"{vocab_size} (config.model.vocab_size): set config.model.vocab_size={self.size}, or "
        "use the vocabulary the head was trained with (its checkpoint's vocab.json)."
      )
    if self.blank != blank_id:
      raise config_keys.ConfigError(
        f"The CTC vocabulary ({self.source}) has its blank (pad token) at {self.blank}, the "
        f"head at config.model.blank_id={blank_id}: set config.model.blank_id={self.blank}."
      )

  def labels(self, texts: Sequence[str], max_length: int) -> np.ndarray:
    """`ctc_labels` (B, max_length) int32 of `texts` (whitespace runs as one word
    delimiter), padded with PAD_LABEL. A character outside the vocabulary, or a transcript
    longer than max_length, is an error: either would train on another transcript."""
    out = np.full((len(texts), max_length), PAD_LABEL, np.int32)
    vocab = self.tokenizer.get_vocab()
    for i, text in enumerate(texts):
      text = " ".join(text.split())
      tokens = self.tokenizer.tokenize(text)
      if unknown := sorted({t for t in tokens if t not in vocab}):
        raise config_keys.ConfigError(
          f"The transcript {text!r} has characters outside the CTC vocabulary ({self.source}): "
          f"{unknown}. Add them to config.input.target.characters, or normalize the "
          "transcripts (e.g. the case the vocabulary uses)."
        )
      if len(tokens) > max_length:
        raise config_keys.ConfigError(
          f"The transcript {text!r} is {len(tokens)} labels long, more than "
          f"config.input.target.max_length={max_length}: raise it (labels are never cut, "
          "as the audio still holds the whole transcript)."
        )
      out[i, : len(tokens)] = self.tokenizer.convert_tokens_to_ids(tokens)
    return out

  def texts(self, ids: np.ndarray) -> list[str]:
    """Texts of label ids (B, L) (decoded labels: repeats already collapsed), padding
    (< 0) and blanks dropped, `|` read as a space."""
    return [
      self.tokenizer.decode(
        [int(i) for i in row if i >= 0 and i != self.blank], group_tokens=False
      ).strip()
      for row in np.asarray(ids)
    ]


def _pack(labels: jax.Array, keep: jax.Array) -> jax.Array:
  """The kept labels of each row (B, T) moved to its start, the rest PAD_LABEL."""
  position = jnp.where(keep, jnp.cumsum(keep, axis=1) - 1, labels.shape[1])  # T: dropped
  out = jnp.full((labels.shape[0], labels.shape[1] + 1), PAD_LABEL, labels.dtype)
  out = out.at[jnp.arange(labels.shape[0])[:, None], position].set(labels)
  return out[:, :-1]


def greedy(logits: jax.Array, mask: jax.Array, blank: int) -> jax.Array:
  """Best path decoding of `logits` (B, T, V) over the frames where `mask` (B, T):
  label ids (B, T), packed left, padded with PAD_LABEL."""
  best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  previous = jnp.pad(best[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  return _pack(best, (best != blank) & (best != previous) & mask.astype(bool))


HASH_BASES = (1_000_003, 16_777_619)  # two polynomial hashes of a prefix, in wrapping uint32


def _hash(h: jax.Array, label: jax.Array, base: int) -> jax.Array:
  """A prefix's hash `h` extended by `label`."""
  return h * jnp.uint32(base) + (label.astype(jnp.uint32) + jnp.uint32(1))


def prefix_beam_search(
  logits: jax.Array, mask: jax.Array, blank: int, beam_size: int = 8
) -> tuple[jax.Array, jax.Array]:
  """CTC prefix beam search over `logits` (B, T, V) where `mask` (B, T), no language model.

  Each of the `beam_size` prefixes keeps the log probability of its alignments so far
  that end in a blank and in a label; every frame extends each prefix by every label (or
  keeps it, through a blank or a repeat) and keeps the `beam_size` best, merging an
  extension with a kept prefix it equals (prefixes are compared by length and two 32-bit
  hashes). Returns the best labeling's ids (B, T, packed left, PAD_LABEL after) and its
  log probability (B,).
  """
  return jax.vmap(lambda lp, m: _beam_one(lp, m, blank, beam_size))(
    jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), mask.astype(bool)
  )


def _beam_one(
  log_probs: jax.Array, mask: jax.Array, blank: int, k: int
) -> tuple[jax.Array, jax.Array]:
  t_max, v = log_probs.shape
  neg = jnp.float32(-jnp.inf)
  labels = jnp.arange(v, dtype=jnp.int32)
  # Beam state; a dead beam (no mass) has length -1 and never matches a prefix.
  init = dict(
    prefix=jnp.full((k, t_max), PAD_LABEL, jnp.int32),
    length=jnp.full((k,), -1, jnp.int32).at[0].set(0),
    last=jnp.full((k,), -1, jnp.int32),
    hashes=jnp.zeros((k, len(HASH_BASES)), jnp.uint32),
    p_blank=jnp.full((k,), neg).at[0].set(0.0),
    p_label=jnp.full((k,), neg),
  )

  def step(beams, xs):
    lp, real = xs
    total = jnp.logaddexp(beams["p_blank"], beams["p_label"])  # (k,)
    # Kept prefixes: through a blank, or repeating their last label.
    stay_blank = total + lp[blank]
    stay_label = jnp.where(
      beams["last"] >= 0, beams["p_label"] + lp[jnp.maximum(beams["last"], 0)], neg
    )
    # Extensions (k, v) by a label: after a repeat of the last label only via a blank.
    source = jnp.where(
      labels[None] == beams["last"][:, None], beams["p_blank"][:, None], total[:, None]
    )
    ext = jnp.where(
      (labels[None] != blank) & (beams["length"][:, None] >= 0), source + lp[None], neg
    )
    ext_length = beams["length"][:, None] + 1
    ext_hashes = jnp.stack(
      [_hash(beams["hashes"][:, i, None], labels[None], base) for i, base in enumerate(HASH_BASES)],
      -1,
    )  # (k, v, 2)
    # An extension equal to a kept prefix adds its mass there (to the first such prefix).
    same = (
      (ext_length[:, :, None] == beams["length"][None, None])
      & (ext_hashes[:, :, None, 0] == beams["hashes"][None, None, :, 0])
      & (ext_hashes[:, :, None, 1] == beams["hashes"][None, None, :, 1])
    )  # (k, v, k)
    first = same & (jnp.cumsum(same, axis=-1) == 1)
    merged = jnp.where(first, ext[:, :, None], neg)
    stay_label = jnp.logaddexp(stay_label, jax.nn.logsumexp(merged, axis=(0, 1)))
    ext = jnp.where(same.any(-1), neg, ext)
    # The k best of the kept and extended prefixes.
    scores = jnp.concatenate([jnp.logaddexp(stay_blank, stay_label), ext.reshape(-1)])
    _, best = jax.lax.top_k(scores, k)
    stays = best < k
    parent = jnp.where(stays, best, (best - k) // v)
    label = jnp.where(stays, -1, (best - k) % v)
    length = beams["length"][parent] + (~stays)
    prefix = beams["prefix"][parent]
    prefix = jnp.where(
      (~stays)[:, None] & (jnp.arange(t_max)[None] == length[:, None] - 1), label[:, None], prefix
    )
    new = dict(
      prefix=prefix,
      length=jnp.where(scores[best] > neg, length, -1),
      last=jnp.where(stays, beams["last"][parent], label),
      hashes=jnp.where(
        stays[:, None], beams["hashes"][parent], ext_hashes[parent, jnp.maximum(label, 0)]
      ),
      p_blank=jnp.where(stays, stay_blank[parent], neg),
      p_label=jnp.where(stays, stay_label[parent], ext.reshape(-1)[jnp.maximum(best - k, 0)]),
    )
    return jax.tree.map(lambda a, b: jnp.where(real, a, b), new, beams), None

  beams, _ = jax.lax.scan(step, init, (log_probs, mask))
  total = jnp.logaddexp(beams["p_blank"], beams["p_label"])
  top = jnp.argmax(total)
  return beams["prefix"][top], total[top]
