"""Corrupted inputs: image noise, blur and occlusion, word dropout and typos, audio noise,
each at severities 1-5, for training (as augmentation) and evaluation (robustness).

  config.input.corruptions = [  # training: each applied with probability p
      dict(name="gaussian_noise", severity=(1, 5), p=0.5),  # a severity drawn per example
      dict(name="typos", severity=2),
  ]
  config.evals.val.corruptions = ["gaussian_noise", "occlusion", "typos"]  # evaluation:
  config.evals.val.severities = (1, 3, 5)  # one more pass per corruption and severity

A corruption changes one modality's decoded value (the dataset's image at its own size,
its texts, its raw audio samples) before that modality's own preprocessing, from the
example's random generator: a training example is corrupted differently each epoch, an
evaluation example the same way every time. `CORRUPTIONS` lists them (name -> the
modalities it applies to, its parameter per severity, what it does); adding one is a
function and one entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
from typing import Any

import numpy as np

from mmtl import config_keys

SPEC_KEYS = dict(name=str, severity=(int, list, tuple), p=1.0)  # one config.input.corruptions entry


@dataclasses.dataclass(frozen=True)
class Corruption:
  """`apply(value, level, rng)` changes a decoded value of one of `modalities`; `levels`
  are its parameter at severities 1-5."""

  modalities: tuple[str, ...]
  apply: Callable[[Any, float, np.random.Generator], Any]
  levels: tuple[float, ...]
  doc: str


def _pixels(image: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
  """`fn` on the image as floats in [0, 1]; back to its dtype (uint8 [0, 255])."""
  x = np.asarray(image, np.float32) / 255.0
  return (np.clip(fn(x), 0.0, 1.0) * 255.0 + 0.5).astype(np.asarray(image).dtype)


def gaussian_noise(image: np.ndarray, std: float, rng: np.random.Generator) -> np.ndarray:
  return _pixels(image, lambda x: x + rng.normal(0.0, std, x.shape))


def gaussian_blur(image: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
  del rng
  from scipy import ndimage  # pylint: disable=g-import-not-at-top

  sigma = fraction * min(np.shape(image)[:2])
  return _pixels(image, lambda x: ndimage.gaussian_filter(x, (sigma, sigma, 0), mode="nearest"))


def occlusion(image: np.ndarray, area: float, rng: np.random.Generator) -> np.ndarray:
  h, w = np.shape(image)[:2]
  side = max(1, round(np.sqrt(area * h * w)))
  top, left = rng.integers(h - min(side, h) + 1), rng.integers(w - min(side, w) + 1)
  out = np.array(image)
  out[top : top + side, left : left + side] = 128
  return out


def token_dropout(texts: Sequence[str], rate: float, rng: np.random.Generator) -> list[str]:
  out = []
  for text in texts:
    words = text.split()
    kept = [w for w in words if rng.random() >= rate]
    if words and not kept:
      kept = [words[rng.integers(len(words))]]
    out.append(" ".join(kept))
  return out


LETTERS = "abcdefghijklmnopqrstuvwxyz"


def typos(texts: Sequence[str], rate: float, rng: np.random.Generator) -> list[str]:
  def edit(word: str) -> str:
    if len(word) < 2 or rng.random() >= rate:
      return word
    i, kind = int(rng.integers(len(word) - 1)), int(rng.integers(4))
    letter = LETTERS[rng.integers(len(LETTERS))]
    if kind == 0:  # swap two neighbours
      return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if kind == 1:  # delete
      return word[:i] + word[i + 1 :]
    if kind == 2:  # insert
      return word[:i] + letter + word[i:]
    return word[:i] + letter + word[i + 1 :]  # replace

  return [" ".join(edit(w) for w in text.split()) for text in texts]


def audio_noise(samples: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
  x = np.asarray(samples, np.float32)
  power = float(np.mean(x**2)) or 1e-12
  noise = rng.normal(0.0, np.sqrt(power / 10 ** (snr_db / 10)), x.shape)
  return (x + noise).astype(np.float32)


IMAGE, TEXT, AUDIO = ("image",), ("text",), ("waveform", "log_mel")
CORRUPTIONS: dict[str, Corruption] = {
  "gaussian_noise": Corruption(
    IMAGE,
    gaussian_noise,
    (0.08, 0.12, 0.18, 0.26, 0.38),
    "pixel noise of this standard deviation ([0, 1] pixels; ImageNet-C's levels)",
  ),
  "gaussian_blur": Corruption(
    IMAGE,
    gaussian_blur,
    (1 / 64, 1 / 32, 3 / 64, 1 / 16, 3 / 32),
    "Gaussian blur of this sigma, as a fraction of the shorter side (0.5-3 px at 32 px)",
  ),
  "occlusion": Corruption(
    IMAGE,
    occlusion,
    (0.05, 0.1, 0.2, 0.3, 0.4),
    "a grey square covering this fraction of the image, at a random place",
  ),
  "token_dropout": Corruption(
    TEXT,
    token_dropout,
    (0.1, 0.2, 0.3, 0.4, 0.5),
    "each word dropped with this probability (one is always kept)",
  ),
  "typos": Corruption(
    TEXT,
    typos,
    (0.1, 0.2, 0.3, 0.4, 0.5),
    "each word of 2+ characters gets one typo (swap, delete, insert or replace a letter) "
    "with this probability",
  ),
  "audio_noise": Corruption(
    AUDIO,
    audio_noise,
    (20.0, 15.0, 10.0, 5.0, 0.0),
    "white noise at this signal-to-noise ratio (dB) over the raw samples",
  ),
}


def get(name: str, where: str) -> Corruption:
  if name not in CORRUPTIONS:
    raise config_keys.ConfigError(
      f"{where}: no corruption is named {name!r}; choose from {sorted(CORRUPTIONS)}."
    )
  return CORRUPTIONS[name]


def check_severity(value: Any, where: str) -> tuple[int, int]:
  """A severity (1-5) or an inclusive (low, high) range of them, as a range."""
  low, high = (value, value) if isinstance(value, int) else tuple(value)
  if not (isinstance(low, int) and isinstance(high, int) and 1 <= low <= high <= 5):
    raise config_keys.ConfigError(
      f"{where}.severity={value!r}: use a severity in 1-5 or a range (low, high) of them."
    )
  return low, high


@dataclasses.dataclass(frozen=True)
class Corrupt:
  """One `config.input.corruptions` entry, checked against the modalities the input reads."""

  name: str
  corruption: Corruption
  modalities: tuple[str, ...]  # the used ones it applies to
  severity: tuple[int, int]
  p: float

  def __call__(self, example: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if self.p < 1.0 and rng.random() >= self.p:
      return example
    low, high = self.severity
    level = self.corruption.levels[int(rng.integers(low, high + 1)) - 1]
    for m in self.modalities:
      if m in example:
        example[m] = self.corruption.apply(example[m], level, rng)
    return example


def parse(specs: Sequence[Mapping[str, Any]], used: Sequence[str]) -> list[Corrupt]:
  """`config.input.corruptions` of an input that reads modalities `used`."""
  out = []
  for i, spec in enumerate(specs or ()):
    where = f"config.input.corruptions[{i}]"
    if not isinstance(spec, Mapping):
      raise config_keys.ConfigError(f"{where}={spec!r}: give dict(name=..., severity=..., p=...).")
    config_keys.check_keys(spec, SPEC_KEYS, where)
    corruption = get(spec.get("name", ""), where)
    modalities = tuple(m for m in corruption.modalities if m in used)
    if not modalities:
      raise config_keys.ConfigError(
        f"{where}: {spec['name']!r} corrupts {' or '.join(corruption.modalities)}, which this "
        f"input does not read (its modalities: {', '.join(used)})."
      )
    p = float(spec.get("p", 1.0))
    if not 0.0 <= p <= 1.0:
      raise config_keys.ConfigError(f"{where}.p={p} is not a probability in [0, 1].")
    severity = check_severity(spec.get("severity", 3), where)
    out.append(Corrupt(spec["name"], corruption, modalities, severity, p))
  return out


def apply(corrupts: Sequence[Corrupt], example: Mapping[str, Any], rng: np.random.Generator):
  """The decoded example with every corruption applied in turn (a copy; `example` as is)."""
  out = dict(example)
  for corrupt in corrupts:
    out = corrupt(out, rng)
  return out


def modalities_changed(specs: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
  """{modality: names of the corruptions of `specs` that may change it}."""
  out: dict[str, list[str]] = {}
  for spec in specs or ():
    for m in get(spec["name"], "config.input.corruptions").modalities:
      out.setdefault(m, []).append(spec["name"])
  return out
