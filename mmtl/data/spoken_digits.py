"""`mmtl_spoken_digits`: real synthesised speech, offline, for speech recognition (CTC).

Each example is a sequence of 1-`max_digits` English digit words ("seven three nine"),
spoken by eSpeak NG (formant synthesis, mmtl.espeak: its library and voice data come
bundled in the `espeakng-loader` wheel) in one of its English voices: a language
("en": British, "en-us": American) with a voice variant (m1-m7, f1-f4: speakers of
different timbre and pitch range), at a random rate (`rates`, words per minute) and base
pitch (`pitches`, eSpeak's 0-99), after a random lead-in silence of 0-0.15 s. The 22.05
kHz speech is resampled to 16 kHz (scipy.signal.resample_poly), white noise is added at an
SNR drawn from `snrs_db` (relative to the speech's mean power over its voiced part), and the
clip is stored as int16 samples at 16 kHz (`waveform`; set `config.input.waveform.rate=16000`).

Splits are by voice variant, so validation and test speakers are never heard in
training: train m1-m4, f1-f2; validation m5, f3; test m6-m7, f4 (each in both accents).
The transcript is the digit words in lower case, one space between words (`transcript`);
`first_digit` and `num_digits` are class labels of the same audio (e.g. for pretraining a
tower by classification), `voice`, `rate`, `pitch` and `snr_db` say how it was made.

Generation is deterministic (one numpy Generator per (seed, split, index); eSpeak NG
speaks each clip in a fresh copy of an unused synthesiser, as its state carries over from
one utterance to the next) and offline; `mmtl.data.source` prepares it on first use.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow_datasets as tfds

from mmtl import espeak

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
RATE = 16_000  # the stored sampling rate
MAX_SECONDS = 2.0  # every clip is at most this long (checked at generation)
SPLIT_VARIANTS = {
  "train": ("m1", "m2", "m3", "m4", "f1", "f2"),
  "validation": ("m5", "f3"),
  "test": ("m6", "m7", "f4"),
}
LANGUAGES = ("en", "en-us")
# What the transcripts can hold: the `characters` of a CTC vocabulary for this dataset.
CHARACTERS = "".join(sorted(set("".join(DIGITS))))


@dataclasses.dataclass
class SpokenDigitsConfig(tfds.core.BuilderConfig):
  """Size and difficulty of `mmtl_spoken_digits` (every field changes the data)."""

  num_train: int = 3000
  num_eval: int = 500  # Each of validation and test.
  max_digits: int = 3
  rates: tuple[int, int] = (140, 220)  # eSpeak's words per minute, drawn uniformly
  pitches: tuple[int, int] = (25, 75)  # eSpeak's base pitch, 0-99
  snrs_db: tuple[float, ...] = (30.0, 20.0, 10.0)  # one drawn per clip
  seed: int = 0


def with_noise(clip: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
  """`clip` plus white noise `snr_db` below its mean power where it is voiced (above 1% of
  its peak), so that pauses and lead-in silence do not lower the speech's power."""
  voiced = np.abs(clip) > 0.01 * np.abs(clip).max()
  noise_power = np.mean(clip[voiced] ** 2) / 10 ** (snr_db / 10)
  return clip + rng.normal(scale=math.sqrt(noise_power), size=clip.shape)


def make_example(
  cfg: SpokenDigitsConfig, split: str, index: int, synth: espeak.Synthesiser
) -> dict:
  """One example; a pure function of (cfg, split, index)."""
  from scipy import signal  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng([cfg.seed, list(SPLIT_VARIANTS).index(split), index])
  digits = rng.integers(10, size=rng.integers(1, cfg.max_digits + 1))
  transcript = " ".join(DIGITS[d] for d in digits)
  voice = f"{LANGUAGES[rng.integers(len(LANGUAGES))]}+{rng.choice(SPLIT_VARIANTS[split])}"
  rate = int(rng.integers(cfg.rates[0], cfg.rates[1] + 1))
  pitch = int(rng.integers(cfg.pitches[0], cfg.pitches[1] + 1))
  snr_db = float(rng.choice(cfg.snrs_db))
  seed = int(rng.integers(2**31))
  speech = synth.say(transcript, voice, rate, pitch, seed).astype(np.float64) / 32768.0
  g = math.gcd(RATE, espeak.RATE)
  speech = signal.resample_poly(speech, RATE // g, espeak.RATE // g)
  lead = np.zeros(int(rng.integers(0, int(0.15 * RATE) + 1)))
  clip = with_noise(np.concatenate([lead, speech]), snr_db, rng)
  clip = 0.9 * clip / np.abs(clip).max()
  if len(clip) > MAX_SECONDS * RATE:
    raise ValueError(
      f"{split}[{index}]: {transcript!r} by {voice} at {rate} words/min is {len(clip) / RATE:.2f}"
      f" s, longer than {MAX_SECONDS} s: lower max_digits or raise the lowest rate."
    )
  return {
    "waveform": np.round(clip * 32767).astype(np.int16),
    "transcript": transcript,
    "first_digit": int(digits[0]),
    "num_digits": len(digits) - 1,
    "voice": voice,
    "rate": rate,
    "pitch": pitch,
    "snr_db": np.float32(snr_db),
  }


class MmtlSpokenDigits(tfds.core.GeneratorBasedBuilder):
  """Spoken digit sequences by eSpeak NG voices, split by voice (see module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
    SpokenDigitsConfig(name="default", description="3000 train, 500 per eval split."),
    SpokenDigitsConfig(
      name="small", num_train=64, num_eval=32, description="Tiny: prepares in seconds, for tests."
    ),
  ]
  DEFAULT_CONFIG_NAME = "default"

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          # int16 samples (tfds' Audio feature would need TensorFlow to decode).
          "waveform": tfds.features.Tensor(
            shape=(None,), dtype=np.int16, doc=f"Mono int16 samples at {RATE} Hz."
          ),
          "transcript": tfds.features.Text(),
          "first_digit": tfds.features.ClassLabel(names=list(DIGITS)),
          "num_digits": tfds.features.ClassLabel(
            names=[str(n) for n in range(1, cfg.max_digits + 1)]
          ),
          "voice": tfds.features.Text(),
          "rate": tfds.features.Scalar(np.int32, doc="eSpeak NG's words per minute."),
          "pitch": tfds.features.Scalar(np.int32, doc="eSpeak NG's base pitch (0-99)."),
          "snr_db": tfds.features.Scalar(np.float32, doc="Speech-to-noise ratio (dB)."),
        }
      ),
      supervised_keys=None,
      homepage="https://github.com/espeak-ng/espeak-ng",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Offline: nothing to download.
    cfg = self.builder_config
    return {
      split: self._generate_examples(split, cfg.num_train if split == "train" else cfg.num_eval)
      for split in SPLIT_VARIANTS
    }

  def _generate_examples(self, split: str, num_examples: int):
    with espeak.Synthesiser() as synth:
      for index in range(num_examples):
        yield index, make_example(self.builder_config, split, index, synth)
