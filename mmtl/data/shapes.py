"""`mmtl_shapes`: an offline multimodal TFDS dataset for the quickstart, tests and ablations.

Each example is a small rendered image of 2-3 coloured shapes (with noise) and a
yes/no question about it. The question is sampled *after* the answer, so that
the answer is independent of the image alone and of the question alone: an
image-only or text-only model is at chance by construction, and only a model
that fuses both modalities can beat 50%. Question types:
  * `colour`:   "is there anything red?" (no: a colour that is absent)
  * `shape`:    "is there a circle?" (no: a shape that is absent)
  * `exist`:    "is there a red square?" (no: a colour/shape combination that is absent)
  * `relation`: "is the red square left of the blue circle?" (both objects present;
                 no: the opposite direction along an axis where they are clearly apart)

The language varies through templates and synonyms. Every word slot (template,
colour, shape, relation) has *seen* words and *held-out* paraphrases
("scarlet"/"crimson" for red, "box" for square, "west of" for left of, ...).
Training text uses held-out words at rate `heldout_rate_train` (default 0: never)
and `validation`/`test` at `heldout_rate_eval` (default 0.5 per slot), so a
pretrained text encoder that already knows "crimson" ~ "red" generalises where
the same encoder trained from scratch cannot. `validation_iid` uses the training
rate, to separate "learned the task" from "transferred the language".

A `caption` lists the objects from left to right (contrastive training,
retrieval). `captions` are five reference descriptions for captioning, as COCO has:
`caption` and four that state the count, where each object is (left / middle /
right, top / bottom of the image, relative to one another), and their order from
top to bottom; these four are a pure function of the objects (seen words only, no
random draws), so a caption model is scored on colours, shapes, counts and positions.
With `audio=True` a noisy tone whose pitch encodes the number of
objects is stored as a log-mel spectrogram (F, T, 1) float32 (`audio`), exercising the
three-modality path, and as its raw samples at 16 kHz (`waveform`, 8000 float32: the
0.5 s tone, made at 8 kHz and resampled with scipy.signal.resample_poly), for speech
towers that read waveforms.

`colour_shifted` is a target domain for domain adaptation: the same colour questions
with another look and wording. Its images are drawn in another style (outlined shapes
with a pale fill, on a light background), with another palette (each colour's hue moved
towards its neighbour: orange-red, teal, indigo, ochre) and twice the pixel noise; its
questions use the held-out paraphrases in every split, training included. A model
trained on `colour` and evaluated on `colour_shifted:validation` measures the domain
gap; `colour_shifted:train` is the unlabeled target stream (its labels are kept for
evaluation only: mmtl.domain_adaptation reads no label from it).

Generation is deterministic (one numpy Generator per (seed, split, index)) and
offline. Images are PNG-encoded with PIL, not TensorFlow, so
`download_and_prepare(file_format="array_record")` works without TensorFlow.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw
import tensorflow_datasets as tfds

# name -> (RGB, seen words, held-out words)
COLOURS = {
  "red": ((220, 40, 40), ("red",), ("scarlet", "crimson")),
  "green": ((40, 175, 60), ("green",), ("emerald", "lime")),
  "blue": ((45, 85, 230), ("blue",), ("azure", "navy")),
  "yellow": ((240, 210, 40), ("yellow",), ("golden", "lemon")),
}
# The target domain's palette (style="shifted"): each hue moved towards a neighbour's.
SHIFTED_RGB = {
  "red": (215, 95, 45),
  "green": (45, 150, 135),
  "blue": (95, 65, 200),
  "yellow": (200, 170, 70),
}
STYLES = ("plain", "shifted")
SHAPES = {
  "square": (("square",), ("box", "block")),
  "circle": (("circle",), ("disc", "ball")),
  "triangle": (("triangle",), ("wedge", "pyramid")),
  "diamond": (("diamond",), ("rhombus", "lozenge")),
}
# name -> (seen phrases, held-out phrases, axis (0: x, 1: y), sign of b - a along it)
RELATIONS = {
  "left": (("left of", "to the left of"), ("on the left side of", "west of"), 0, 1),
  "right": (("right of", "to the right of"), ("on the right side of", "east of"), 0, -1),
  "above": (("above",), ("over", "on top of"), 1, 1),
  "below": (("below",), ("under", "beneath"), 1, -1),
}
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
TEMPLATES = {
  "colour": (
    ("is there anything {c}?", "is there a {c} shape?"),
    ("do you see something {c}?", "is any object {c}?"),
  ),
  "exist": (
    ("is there {a}?", "is there {a} in the image?"),
    ("can you see {a}?", "does the picture contain {a}?"),
  ),
  "relation": (
    ("is the {o1} {rel} the {o2}?",),
    ("would you say the {o1} is {rel} the {o2}?", "is the {o1} positioned {rel} the {o2}?"),
  ),
  "caption": (
    ("{objs}, from left to right.", "a picture of {objs}, from left to right."),
    (
      "an image showing {objs}, ordered left to right.",
      "this scene contains {objs}, left to right.",
    ),
  ),
}
QUESTION_TYPES = ("colour", "shape", "exist", "relation")
SPLITS = ("train", "validation", "test", "validation_iid")
# Audio: a tone at 8 kHz whose pitch encodes the object count; log-mel (F, T, 1).
AUDIO_RATE, AUDIO_SAMPLES, AUDIO_FFT, AUDIO_HOP, AUDIO_MELS, AUDIO_FRAMES = (
  8000,
  4000,
  256,
  125,
  32,
  32,
)
COUNT_PITCH_HZ = {1: 330.0, 2: 660.0, 3: 1320.0}
COUNTS = ("1", "2", "3")  # `count`: how many objects (what the audio's pitch says)
# The same tone as raw samples at 16 kHz (the rate speech encoders take): `waveform`.
WAVEFORM_RATE = 16_000
WAVEFORM_SAMPLES = AUDIO_SAMPLES * WAVEFORM_RATE // AUDIO_RATE


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  """Size, difficulty and language split of `mmtl_shapes` (every field changes the data)."""

  image_size: int = 32
  num_train: int = 20_000
  num_eval: int = 2_000  # Each of validation, test, validation_iid.
  min_objects: int = 2
  max_objects: int = 3
  question_types: tuple[str, ...] = QUESTION_TYPES
  heldout_rate_train: float = 0.0
  heldout_rate_eval: float = 0.5
  positive_fraction: float = 0.5  # P(label == yes); < 0.5 makes an imbalanced set.
  style: str = "plain"  # "shifted": the target domain's rendering (module docstring)
  audio: bool = False
  seed: int = 0

  def __post_init__(self):
    # Every "no" answer needs an absent colour and an absent shape.
    limit = min(len(COLOURS), len(SHAPES)) - 1
    if not 1 <= self.min_objects <= self.max_objects <= limit:
      raise ValueError(
        f"Need 1 <= min_objects <= max_objects <= {limit}, got "
        f"{self.min_objects}..{self.max_objects}."
      )
    if "relation" in self.question_types and self.min_objects < 2:
      raise ValueError("question_types has 'relation': set min_objects >= 2.")
    if unknown := set(self.question_types) - set(QUESTION_TYPES):
      raise ValueError(f"Unknown question_types {sorted(unknown)}; choose from {QUESTION_TYPES}.")
    if self.style not in STYLES:
      raise ValueError(f"style={self.style!r}; choose from {STYLES}.")
    if self.image_size < 16:
      raise ValueError(f"image_size={self.image_size} is too small to draw shapes; use >= 16.")


class MmtlShapes(tfds.core.GeneratorBasedBuilder):
  """Coloured shapes + questions that need both image and text (see module docstring)."""

  VERSION = tfds.core.Version("1.2.0")
  RELEASE_NOTES = {
    "1.0.0": "Initial release.",
    "1.1.0": "`captions`: five reference descriptions per image; other fields unchanged.",
    "1.2.0": "`count` of objects; `waveform` (configs with audio): the tone at 16 kHz. Others "
    "unchanged. Config `colour_shifted` (a target domain) added later, others unchanged.",
  }
  BUILDER_CONFIGS = [
    ShapesConfig(name="default", description="32 px, 20k train, 2k per eval split."),
    ShapesConfig(name="audio", audio=True, description="`default` plus the audio field."),
    ShapesConfig(
      name="colour",
      num_train=10_000,
      num_eval=1_000,
      question_types=("colour",),
      description="Colour questions only, 10k train, 1k per eval split.",
    ),
    ShapesConfig(
      name="colour_shifted",
      num_train=5_000,
      num_eval=1_000,
      question_types=("colour",),
      heldout_rate_train=0.5,
      style="shifted",
      seed=1,
      description="`colour` in another domain: render style, palette, background, noise and "
      "wording shifted (module docstring); 5k train, 1k per eval split.",
    ),
    ShapesConfig(
      name="small",
      num_train=256,
      num_eval=64,
      audio=True,
      description="Tiny, with audio: prepares in seconds, for tests.",
    ),
  ]
  DEFAULT_CONFIG_NAME = "default"

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    size = cfg.image_size
    features = {
      "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
      "question": tfds.features.Text(),
      "caption": tfds.features.Text(),
      "captions": tfds.features.Sequence(tfds.features.Text()),
      "label": tfds.features.ClassLabel(names=["no", "yes"]),
      "question_type": tfds.features.ClassLabel(names=list(QUESTION_TYPES)),
      "count": tfds.features.ClassLabel(names=list(COUNTS)),
      "novel_words": tfds.features.Scalar(np.int32, doc="Held-out words in the question."),
      "objects": tfds.features.Sequence(
        {
          "colour": tfds.features.ClassLabel(names=list(COLOURS)),
          "shape": tfds.features.ClassLabel(names=list(SHAPES)),
          "center": tfds.features.Tensor(shape=(2,), dtype=np.float32),  # (x, y) in [0, 1]
        }
      ),
    }
    if cfg.audio:
      features["audio"] = tfds.features.Tensor(
        shape=(AUDIO_MELS, AUDIO_FRAMES, 1), dtype=np.float32
      )
      features["waveform"] = tfds.features.Tensor(
        shape=(WAVEFORM_SAMPLES,),
        dtype=np.float32,
        doc=f"The tone of `audio` as mono samples at {WAVEFORM_RATE} Hz.",
      )
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(features),
      supervised_keys=None,
      homepage="https://github.com/mmtl",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Offline: nothing to download.
    cfg = self.builder_config
    return {
      split: self._generate_examples(split, cfg.num_train if split == "train" else cfg.num_eval)
      for split in SPLITS
    }

  def _generate_examples(self, split: str, num_examples: int):
    for index in range(num_examples):
      yield index, make_example(self.builder_config, split, index)


def make_example(cfg: ShapesConfig, split: str, index: int) -> dict:
  """One example; a pure function of (cfg, split, index)."""
  rng = np.random.default_rng([cfg.seed, SPLITS.index(split), index])
  heldout_rate = (
    cfg.heldout_rate_eval if split in ("validation", "test") else cfg.heldout_rate_train
  )
  words = _Lexicon(rng, heldout_rate)
  objects = _place_objects(rng, cfg)
  qtype = cfg.question_types[rng.integers(len(cfg.question_types))]
  answer = bool(rng.random() < cfg.positive_fraction)
  if qtype == "relation":
    question = _relation_question(rng, words, objects, answer)
  else:
    question = _attribute_question(qtype, rng, words, objects, answer)
  # Captions get their own lexicon so `novel_words` counts the question only.
  caption = _caption(_Lexicon(rng, heldout_rate), objects)
  example = {
    "image": _render(rng, cfg.image_size, objects, cfg.style),
    "question": question,
    "caption": caption,
    "captions": [caption, *_descriptions(objects)],
    "label": int(answer),
    "question_type": qtype,
    "count": COUNTS.index(str(len(objects))),
    "novel_words": words.novel,
    "objects": [
      {"colour": c, "shape": s, "center": np.asarray(xy, np.float32)} for c, s, xy, _ in objects
    ],
  }
  if cfg.audio:
    tone = _tone(rng, len(objects))
    example["audio"] = _log_mel(tone)
    example["waveform"] = _at_waveform_rate(tone)
  return example


class _Lexicon:
  """Picks a seen word or (at `heldout_rate`) a held-out paraphrase per slot; counts the latter."""

  def __init__(self, rng: np.random.Generator, heldout_rate: float):
    self.rng, self.heldout_rate, self.novel = rng, heldout_rate, 0

  def pick(self, seen: tuple[str, ...], heldout: tuple[str, ...]) -> str:
    novel = self.rng.random() < self.heldout_rate
    self.novel += int(novel)
    options = heldout if novel else seen
    return options[self.rng.integers(len(options))]

  def obj(self, colour: str, shape: str) -> str:
    return f"{self.pick(*COLOURS[colour][1:])} {self.pick(*SHAPES[shape])}"


def _article(phrase: str) -> str:
  return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _place_objects(rng: np.random.Generator, cfg: ShapesConfig) -> list:
  """Distinct (colour, shape) objects that do not overlap: [(colour, shape, (x, y), radius)]."""
  size = cfg.image_size
  num = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
  combos = [(c, s) for c in COLOURS for s in SHAPES]
  chosen = rng.choice(len(combos), size=num, replace=False)
  while True:  # Rejection sampling; succeeds within a few tries for <= 5 objects.
    radii = rng.uniform(0.13, 0.18, size=num) * size
    centers = [rng.uniform(r + 1, size - r - 1, size=2) for r in radii]
    if all(
      np.linalg.norm(centers[i] - centers[j]) > radii[i] + radii[j] + 2
      for i in range(num)
      for j in range(i)
    ):
      break
  return [
    (*combos[k], tuple(float(v) / size for v in xy), float(r))
    for k, xy, r in zip(chosen, centers, radii)
  ]


def _attribute_question(qtype: str, rng, words: _Lexicon, objects: list, answer: bool) -> str:
  """Is an attribute value (colour, shape, or both: `exist`) present? No: an absent value."""
  values = {
    "colour": [(c,) for c in COLOURS],
    "shape": [(s,) for s in SHAPES],
    "exist": [(c, s) for c in COLOURS for s in SHAPES],
  }[qtype]
  present = {v for c, s, _, _ in objects for v in ((c,), (s,), (c, s))}
  pool = [v for v in values if (v in present) == answer]
  value = pool[rng.integers(len(pool))]
  if qtype == "colour":
    return words.pick(*TEMPLATES["colour"]).format(c=words.pick(*COLOURS[value[0]][1:]))
  phrase = words.pick(*SHAPES[value[0]]) if qtype == "shape" else words.obj(*value)
  return words.pick(*TEMPLATES["exist"]).format(a=_article(phrase))


def _relation_question(rng, words: _Lexicon, objects: list, answer: bool) -> str:
  """A true relation (answer yes) or its opposite (no) between two present objects.

  Only relations along an axis where the objects are clearly apart (> 0.12 of
  the image) are asked, so the answer is unambiguous either way.
  """
  candidates = []
  for a in objects:
    for b in objects:
      if a is b:
        continue
      for name, (_, _, axis, sign) in RELATIONS.items():
        if sign * (b[2][axis] - a[2][axis]) > 0.12:
          candidates.append((a, b, name if answer else OPPOSITE[name]))
  a, b, rel = candidates[rng.integers(len(candidates))]
  template = words.pick(*TEMPLATES["relation"])
  return template.format(
    o1=words.obj(a[0], a[1]), rel=words.pick(*RELATIONS[rel][:2]), o2=words.obj(b[0], b[1])
  )


def _caption(words: _Lexicon, objects: list) -> str:
  phrases = [_article(words.obj(c, s)) for c, s, _, _ in sorted(objects, key=lambda o: o[2][0])]
  return words.pick(*TEMPLATES["caption"]).format(objs=_join(phrases))


NUMBERS = {1: "one", 2: "two", 3: "three"}


def _descriptions(objects: list) -> list[str]:
  """Four reference captions of `objects` ([(colour, shape, (x, y), radius)]), seen words only:
  the count; each object's place in the image; its place among the others; top to bottom."""
  by_x = sorted(objects, key=lambda o: o[2][0])
  by_y = sorted(objects, key=lambda o: o[2][1])
  name = lambda o: _article(f"{COLOURS[o[0]][1][0]} {SHAPES[o[1]][0][0]}")
  count = f"{NUMBERS[len(objects)]} {'shape' if len(objects) == 1 else 'shapes'}"
  among = ("on the left", "in the middle", "on the right")
  ranks = (among[0], among[2]) if len(by_x) == 2 else among[: len(by_x)]
  return [
    f"{count}: {_join([name(o) for o in by_x])}.",
    f"{_join([f'{name(o)} {_place(o[2])}' for o in by_x])}.",
    f"there are {count}: {_join([f'{name(o)} {r}' for o, r in zip(by_x, ranks)])}.",
    f"from top to bottom: {_join([name(o) for o in by_y])}.",
  ]


def _place(xy: tuple[float, float]) -> str:
  """Where a centre (x, y in [0, 1], y down) is in the image, by thirds."""
  column = ("left", "", "right")[min(int(xy[0] * 3), 2)]
  row = ("top", "", "bottom")[min(int(xy[1] * 3), 2)]
  if row:
    return f"at the {row} {column}".rstrip()
  return f"on the {column}" if column else "in the centre"


def _join(phrases: list[str]) -> str:
  return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _render(rng: np.random.Generator, size: int, objects: list, style: str) -> Image.Image:
  """Noisy background, jittered colours, drawn at 2x and downsampled (anti-aliasing).
  `plain`: filled shapes on a dark background; `shifted` (the target domain): the shifted
  palette's outlines around a pale fill, on a light background, with twice the noise."""
  scale = 2
  shifted = style == "shifted"
  low, high = (160, 220) if shifted else (50, 110)
  background = tuple(int(v) for v in rng.integers(low, high) + rng.integers(-12, 13, size=3))
  img = Image.new("RGB", (size * scale, size * scale), background)
  draw = ImageDraw.Draw(img)
  for colour, shape, (x, y), r in objects:
    rgb = SHIFTED_RGB[colour] if shifted else COLOURS[colour][0]
    fill = tuple(int(np.clip(v + rng.integers(-20, 21), 0, 255)) for v in rgb)
    kw = dict(fill=fill)
    if shifted:  # the colour as a 3 px outline (at 2x) around a fill halfway to the background
      pale = tuple((c + b) // 2 for c, b in zip(fill, background))
      kw = dict(fill=pale, outline=fill, width=3)
    x, y, r = x * size * scale, y * size * scale, r * scale
    if shape == "square":
      draw.rectangle([x - r, y - r, x + r, y + r], **kw)
    elif shape == "circle":
      draw.ellipse([x - r, y - r, x + r, y + r], **kw)
    elif shape == "triangle":
      draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], **kw)
    else:
      draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], **kw)
  pixels = np.asarray(img.resize((size, size), Image.BOX), np.float32)
  pixels += rng.normal(0.0, 12.0 if shifted else 6.0, size=pixels.shape)
  return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _mel_filterbank(rate: int, n_fft: int, n_mels: int) -> np.ndarray:
  """Triangular HTK-mel filters, (n_fft // 2 + 1, n_mels)."""
  to_mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)
  to_hz = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)
  edges = to_hz(np.linspace(0.0, to_mel(rate / 2), n_mels + 2))
  freqs = np.linspace(0.0, rate / 2, n_fft // 2 + 1)[:, None]
  lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
  return np.maximum(
    0.0, np.minimum((freqs - lower) / (center - lower), (upper - freqs) / (upper - center))
  )


_MEL = _mel_filterbank(AUDIO_RATE, AUDIO_FFT, AUDIO_MELS)


def _tone(rng: np.random.Generator, count: int) -> np.ndarray:
  """AUDIO_SAMPLES at AUDIO_RATE of a noisy tone at COUNT_PITCH_HZ[count] (+-3%)."""
  t = np.arange(AUDIO_SAMPLES) / AUDIO_RATE
  pitch = COUNT_PITCH_HZ[count] * rng.uniform(0.97, 1.03)
  return np.sin(2 * np.pi * pitch * t + rng.uniform(0, 2 * np.pi)) + rng.normal(
    0, 0.3, AUDIO_SAMPLES
  )


def _log_mel(wave: np.ndarray) -> np.ndarray:
  """Log-mel (F, T, 1) of `_tone`'s samples, roughly in [-1, 1]."""
  starts = np.arange(AUDIO_FRAMES) * AUDIO_HOP
  frames = wave[np.minimum(starts[:, None] + np.arange(AUDIO_FFT), AUDIO_SAMPLES - 1)] * np.hanning(
    AUDIO_FFT
  )
  power = np.abs(np.fft.rfft(frames, axis=-1)) ** 2  # (T, n_fft // 2 + 1)
  log_mel = np.log(power @ _MEL + 1e-3)  # (T, F)
  return ((log_mel.T - 2.0) / 4.0).astype(np.float32)[..., None]


def _at_waveform_rate(wave: np.ndarray) -> np.ndarray:
  """`_tone`'s samples resampled to WAVEFORM_RATE (polyphase, scipy), float32."""
  from scipy import signal  # pylint: disable=g-import-not-at-top

  up = WAVEFORM_RATE // AUDIO_RATE
  return signal.resample_poly(wave, up, 1).astype(np.float32)
