"""`mmtl_bounces`: short videos of a bouncing ball with a synchronised soundtrack, offline.

Each example is a clip of `frames` frames (`size` x `size` RGB, at `fps` frames per
second) of a ball that moves along one axis, horizontally or vertically (with a slight
drift across it), and bounces off the walls; every bounce makes a sound, a decaying tone
with its second harmonic, starting at the instant the ball meets the wall, in a soundtrack
of the clip's length (16 kHz int16 samples, white noise at a drawn SNR). The label joins
what is seen and what is heard: the axis of motion (horizontal or vertical) and the
pitch of the bounces (low: 250-450 Hz, high: 900-1600 Hz), four classes
("horizontal-low", ...). Neither modality alone can do better than half of them: the
video does not say the pitch, the sound does not say the axis, and no single frame says
the axis either (a temporal model must see the ball move). Nuisances: the ball's size,
colour, speed and start, a static square of another colour, the background's gradient,
the number of bounces (1-3) and the noise.

`motion` and `pitch` are the two halves of the label as class labels of their own,
`bounces` how many bounces the clip has. Generation is deterministic (one numpy
Generator per (seed, split, index)) and offline; `mmtl.data.source` prepares it on first
use (the default configuration in about 10 s).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow_datasets as tfds

from mmtl.data import spoken_digits

RATE = 16_000  # the soundtrack's sampling rate
MOTIONS = ("horizontal", "vertical")
PITCHES = {"low": (250.0, 450.0), "high": (900.0, 1600.0)}  # Hz, drawn uniformly per clip
LABELS = tuple(f"{m}-{p}" for m in MOTIONS for p in PITCHES)
SPLITS = ("train", "validation", "test")


@dataclasses.dataclass
class BouncesConfig(tfds.core.BuilderConfig):
  """Size of `mmtl_bounces` (every field changes the data)."""

  num_train: int = 2000
  num_eval: int = 500  # Each of validation and test.
  frames: int = 16
  size: int = 32
  fps: float = 16.0
  snrs_db: tuple[float, ...] = (20.0, 10.0, 5.0)  # one drawn per clip
  seed: int = 0


def reflect(u: np.ndarray, length: float) -> np.ndarray:
  """The position in [0, length] of a point that moved `u` from 0 between two walls."""
  return length - np.abs(np.mod(u, 2 * length) - length)


def bounce_times(start: float, velocity: float, length: float, duration: float) -> np.ndarray:
  """Times in (0, duration) at which a ball at `start` in [0, length], moving at
  `velocity` (per second), meets a wall (its unfolded path crosses a multiple of length)."""
  if velocity == 0:
    return np.zeros(0)
  end = start + velocity * duration
  lo, hi = sorted((start, end))
  walls = np.arange(math.floor(lo / length), math.ceil(hi / length) + 1) * length
  times = (walls - start) / velocity
  return np.sort(times[(times > 0) & (times < duration)])


def _bounce_sound(t: np.ndarray, freq: float) -> np.ndarray:
  """A knock: 2 ms attack, then a 25 ms exponential decay, cut at 80 ms."""
  envelope = np.minimum(t / 0.002, 1.0) * np.exp(-np.maximum(t - 0.002, 0.0) / 0.025)
  wave = np.sin(2 * np.pi * freq * t) + 0.3 * np.sin(4 * np.pi * freq * t)
  return np.where((t >= 0) & (t < 0.08), envelope * wave, 0.0)


def _render(
  cfg: BouncesConfig, rng: np.random.Generator, xy: np.ndarray, radius: float
) -> np.ndarray:
  """(frames, size, size, 3) uint8: a gradient background, a static square, the ball at
  `xy` (frames, 2) (anti-aliased by its distance to each pixel centre)."""
  n = cfg.size
  grid = np.stack(np.meshgrid(np.arange(n), np.arange(n), indexing="xy"), -1) + 0.5  # (y, x, 2)
  a, b = rng.uniform(10, 90, size=(2, 3))
  direction = rng.normal(size=2)
  ramp = (grid @ (direction / np.linalg.norm(direction))) / n  # about [-1, 1]
  background = a + (b - a) * (ramp[..., None] + 1) / 2  # (y, x, 3)
  side = rng.uniform(4, 7)
  corner = rng.uniform(0, n - side, size=2)
  inside = np.all((grid >= corner) & (grid < corner + side), -1)
  background = np.where(inside[..., None], rng.uniform(100, 255, size=3), background)
  colour = rng.uniform(120, 255, size=3)
  d = np.linalg.norm(grid[None] - xy[:, None, None], axis=-1)  # (frames, y, x)
  alpha = np.clip(radius + 0.5 - d, 0.0, 1.0)[..., None]
  return np.round(alpha * colour + (1 - alpha) * background).astype(np.uint8)


def make_example(cfg: BouncesConfig, split: str, index: int) -> dict:
  """One example; a pure function of (cfg, split, index)."""
  rng = np.random.default_rng([cfg.seed, SPLITS.index(split), index])
  motion, pitch = int(rng.integers(2)), int(rng.integers(2))
  duration = cfg.frames / cfg.fps
  radius = rng.uniform(2.5, 4.5)
  length = cfg.size - 2 * radius  # the span of the ball's centre between the walls
  # Along the axis: fast enough to bounce at least once (it covers more than `length`).
  speed = rng.uniform(1.2, 3.0) * length / duration * rng.choice((-1, 1))
  start = rng.uniform(0, length)
  across, drift = rng.uniform(0, length), rng.uniform(-0.1, 0.1) * length / duration
  t = np.arange(cfg.frames) / cfg.fps
  along_xy = reflect(start + speed * t, length) + radius
  across_xy = reflect(across + drift * t, length) + radius
  xy = np.stack([along_xy, across_xy] if motion == 0 else [across_xy, along_xy], -1)
  video = _render(cfg, rng, xy, radius)

  times = bounce_times(start, speed, length, duration)
  freq = rng.uniform(*PITCHES[list(PITCHES)[pitch]])
  samples = np.arange(round(duration * RATE)) / RATE
  sound = sum((_bounce_sound(samples - tb, freq) for tb in times), np.zeros_like(samples))
  clip = spoken_digits.with_noise(sound, float(rng.choice(cfg.snrs_db)), rng)
  clip = 0.9 * clip / np.abs(clip).max()
  return {
    "video": video,
    "audio": np.round(clip * 32767).astype(np.int16),
    "label": 2 * motion + pitch,
    "motion": motion,
    "pitch": pitch,
    "bounces": len(times),
  }


class MmtlBounces(tfds.core.GeneratorBasedBuilder):
  """A bouncing ball seen and heard (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
    BouncesConfig(name="default", description="2000 train, 500 per eval split."),
    BouncesConfig(
      name="small", num_train=64, num_eval=32, description="Tiny: prepares in seconds, for tests."
    ),
  ]
  DEFAULT_CONFIG_NAME = "default"

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    samples = round(cfg.frames / cfg.fps * RATE)
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          # uint8 frames, zlib-compressed (tfds' Video feature would need TensorFlow).
          "video": tfds.features.Tensor(
            shape=(cfg.frames, cfg.size, cfg.size, 3),
            dtype=np.uint8,
            encoding=tfds.features.Encoding.ZLIB,
            doc=f"RGB frames at {cfg.fps:g} frames per second.",
          ),
          "audio": tfds.features.Tensor(
            shape=(samples,), dtype=np.int16, doc=f"Mono int16 samples at {RATE} Hz."
          ),
          "label": tfds.features.ClassLabel(names=list(LABELS)),
          "motion": tfds.features.ClassLabel(names=list(MOTIONS)),
          "pitch": tfds.features.ClassLabel(names=list(PITCHES)),
          "bounces": tfds.features.Scalar(np.int32, doc="How many times the ball bounces."),
        }
      ),
      supervised_keys=None,
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
