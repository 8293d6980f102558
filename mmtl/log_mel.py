"""Log-mel spectrograms computed as a checkpoint's own feature extractor computes them.

Two front ends, named after the transformers feature extractors they equal (within 1e-4 on
the same waveform: tests/test_log_mel.py):
- "whisper" (`WhisperFeatureExtractor`): centred 400-sample frames every 160 samples
  (reflect-padded), periodic Hann window, power spectrum, Slaney mel filters (0-8 kHz),
  log10 floored at 1e-10, clamped to 8 below the clip's maximum, then (x + 4) / 4; the
  last frame is dropped, so N samples give N / 160 frames. The extractor pads every clip
  with zeros to `chunk_length` seconds (30) before all this.
- "kaldi" (`ASTFeatureExtractor`, Kaldi's fbank as torchaudio.compliance.kaldi computes
  it): 400-sample frames every 160 samples from the clip's start (no padding), each with
  its mean removed and pre-emphasis 0.97, symmetric Hann window, 512-point power
  spectrum, Kaldi mel filters (20 Hz to Nyquist), natural log floored at float32's eps;
  the frames are zero-padded or cut to `max_length` and normalized as (x - mean) / (2 *
  std) with the AudioSet statistics.

The mel filter banks and windows come from `transformers.audio_utils` (the functions the
extractors call), the FFT from scipy.fft; the framing, power, mel and log are numpy over all
frames at once (transformers' numpy `spectrogram` loops over frames in Python). Features
are (frames, mel bins) float32, mmtl's channels-last layout.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import functools
from typing import Any, ClassVar

import numpy as np

FRONT_ENDS = ("whisper", "kaldi")
# The transformers feature extractor of each front end (`feature_extractor_type` in a
# checkpoint's preprocessor_config.json).
EXTRACTORS = {"WhisperFeatureExtractor": "whisper", "ASTFeatureExtractor": "kaldi"}


@dataclasses.dataclass(frozen=True)
class LogMelSpec:
  """What a front end computes; the defaults are the transformers extractors'."""

  front_end: str
  num_mel_bins: int
  sampling_rate: int = 16_000
  hop_length: int = 160
  n_fft: int = 400  # window (frame) length in samples
  chunk_length: float = 30  # whisper: seconds every clip is padded to
  max_length: int = 1024  # kaldi: frames the spectrogram is padded or cut to
  do_normalize: bool = True  # kaldi: (x - mean) / (2 * std)
  mean: float = -4.2677393
  std: float = 4.5689974

  KALDI_PREEMPHASIS: ClassVar[float] = 0.97
  KALDI_FFT: ClassVar[int] = 512
  KALDI_FLOOR: ClassVar[float] = float(np.finfo(np.float32).eps)

  def __post_init__(self) -> None:
    if self.front_end not in FRONT_ENDS:
      raise ValueError(f"Log-mel front end {self.front_end!r}: use one of {FRONT_ENDS}.")

  @classmethod
  def default(cls, front_end: str, **settings: Any) -> LogMelSpec:
    """The transformers extractor's defaults (Whisper: 80 mel bins; AST: 128), `settings`
    (those not None) replacing them."""
    bins = 80 if front_end == "whisper" else 128
    settings = {k: v for k, v in settings.items() if v is not None}
    return cls(front_end=front_end, **{"num_mel_bins": bins, **settings})

  @classmethod
  def from_preprocessor_config(cls, processor: Mapping[str, Any]) -> LogMelSpec:
    """The spec of a `preprocessor_config.json` dict of a Whisper or AST feature extractor."""
    kind = processor.get("feature_extractor_type")
    if kind not in EXTRACTORS:
      raise ValueError(
        f"feature_extractor_type {kind!r} computes no log-mel spectrogram mmtl knows; "
        f"mmtl computes those of {sorted(EXTRACTORS)}."
      )
    if processor.get("dither"):
      raise ValueError(
        f"The feature extractor adds dither={processor['dither']} (random noise); mmtl's "
        "front end is deterministic: set dither to 0.0 in preprocessor_config.json."
      )
    if EXTRACTORS[kind] == "whisper":
      keys = dict(sampling_rate=16_000, hop_length=160, n_fft=400, chunk_length=30)
      bins = processor.get("feature_size", 80)
    else:
      keys = dict(sampling_rate=16_000, max_length=1024, do_normalize=True)
      keys.update(mean=-4.2677393, std=4.5689974)
      bins = processor.get("num_mel_bins", 128)
    kw = {k: processor.get(k, default) for k, default in keys.items()}
    return cls(front_end=EXTRACTORS[kind], num_mel_bins=int(bins), **kw)

  @property
  def frames(self) -> int:
    """Frames of the features of one clip: fixed by the front end."""
    if self.front_end == "whisper":
      return self.samples // self.hop_length
    return self.max_length

  @property
  def samples(self) -> int:
    """The clip length (samples) the features describe: whisper pads every clip to it;
    kaldi's `max_length` frames cover this many."""
    if self.front_end == "whisper":
      return round(self.chunk_length * self.sampling_rate)
    return (self.max_length - 1) * self.hop_length + self.n_fft


@functools.lru_cache(maxsize=8)
def mel_filters(spec: LogMelSpec) -> np.ndarray:
  """(frequency bins, mel bins) float64 filter bank, as the transformers extractor builds it."""
  import warnings

  from transformers.audio_utils import mel_filter_bank  # numpy only; imported when used

  with warnings.catch_warnings():
    # AST's 128 Kaldi filters over 257 bins leave the lowest ones empty, as in transformers.
    warnings.filterwarnings("ignore", message="At least one mel filter has all zero values")
    if spec.front_end == "whisper":
      filters = mel_filter_bank(
        num_frequency_bins=1 + spec.n_fft // 2,
        num_mel_filters=spec.num_mel_bins,
        min_frequency=0.0,
        max_frequency=8000.0,
        sampling_rate=spec.sampling_rate,
        norm="slaney",
        mel_scale="slaney",
      )
    else:
      filters = mel_filter_bank(
        num_frequency_bins=spec.KALDI_FFT // 2 + 1,
        num_mel_filters=spec.num_mel_bins,
        min_frequency=20,
        max_frequency=spec.sampling_rate // 2,
        sampling_rate=spec.sampling_rate,
        norm=None,
        mel_scale="kaldi",
        triangularize_in_mel_space=True,
      )
  return filters


@functools.lru_cache(maxsize=8)
def _tables(spec: LogMelSpec) -> tuple[np.ndarray, np.ndarray]:
  """(mel filters, window) in the front end's compute dtype: Whisper float32, Kaldi float64."""
  from transformers.audio_utils import window_function

  dtype = np.float32 if spec.front_end == "whisper" else np.float64
  window = window_function(spec.n_fft, "hann", periodic=spec.front_end == "whisper")
  return mel_filters(spec).astype(dtype), window.astype(dtype)


def _frames(x: np.ndarray, length: int, hop: int) -> np.ndarray:
  """(frames, length) view of every whole `length`-sample frame, `hop` apart."""
  if len(x) < length:
    return np.zeros((0, length), x.dtype)
  return np.lib.stride_tricks.sliding_window_view(x, length)[::hop]


def log_mel(waveform: np.ndarray, spec: LogMelSpec) -> np.ndarray:
  """(spec.frames, num_mel_bins) float32 features of a mono clip (samples,) at
  `spec.sampling_rate`: whisper pads or cuts it to `spec.samples` first, kaldi pads or cuts
  its frames to `max_length`. The FFT is scipy.fft's: Whisper's in float32 (as torch's STFT
  computes it; 4x faster than float64 on 400-sample frames), Kaldi's in float64 (as
  transformers' numpy path)."""
  import scipy.fft  # pylint: disable=g-import-not-at-top

  x = np.asarray(waveform, np.float32)
  filters, window = _tables(spec)
  if spec.front_end == "whisper":
    x = np.pad(x[: spec.samples], (0, max(spec.samples - len(x), 0)))
    half = spec.n_fft // 2
    frames = _frames(np.pad(x, (half, half), mode="reflect"), spec.n_fft, spec.hop_length)
    power = _power(scipy.fft.rfft(frames * window, axis=-1))
    logs = np.log10(np.maximum(power @ filters, 1e-10))[:-1]
    logs = np.maximum(logs, logs.max() - 8.0)
    return (logs + 4.0) / 4.0
  # float64: after pre-emphasis the lowest bins hold ~1e-4 of a frame's energy, where
  # float32's rounding moves their log by more than 1e-4.
  frames = _frames(x.astype(np.float64), spec.n_fft, spec.hop_length)[: spec.max_length]
  frames = frames - frames.mean(axis=1, keepdims=True)  # Kaldi's remove_dc_offset
  p = spec.KALDI_PREEMPHASIS
  frames = np.concatenate([frames[:, :1] * (1 - p), frames[:, 1:] - p * frames[:, :-1]], axis=1)
  power = _power(scipy.fft.rfft(frames * window, n=spec.KALDI_FFT, axis=-1))
  fbank = np.log(np.maximum(power @ filters, spec.KALDI_FLOOR))
  fbank = np.pad(fbank, ((0, spec.max_length - len(fbank)), (0, 0)))
  if spec.do_normalize:
    fbank = (fbank - spec.mean) / (2 * spec.std)
  return fbank.astype(np.float32)


def _power(spectrum: np.ndarray) -> np.ndarray:
  return np.square(spectrum.real) + np.square(spectrum.imag)
