"""Class-balanced sampling: which example each position of the training stream reads.

`config.input.class_sampling` ("balanced", or one share per class) replaces the plain
shuffled epochs by epochs that hold each class in the given proportion: with
"balanced", every class fills 1/K of each epoch (an epoch is as long as the split), so
a rare class's examples recur several times per epoch (oversampling) and a frequent
class's epoch takes a different subset of its examples each time (undersampling, but
over the epochs every example is read). An alternative to weighting the loss per class
(`config.input.class_weights`): the gradient of each batch already sees the classes
equally often.

Epoch e is a pure function of (seed, e): each class c gets its share of the epoch's N
positions (largest remainders), filled with whole passes over its examples in a random
order plus a random subset for the rest, and the epoch is shuffled. Position i reads
epoch i // N at i % N. Like the plain stream, the order is then a pure function of
(seed, position), so it does not depend on the process count and a saved iterator state
(the global step) resumes it exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mmtl import config_keys


def shares(spec: str | Sequence[float], counts: np.ndarray, names: Sequence[str]) -> np.ndarray:
  """Each class's share of an epoch, from `config.input.class_sampling` and the split's
  per-class counts; a ConfigError for a class asked for that has no example."""
  where = "config.input.class_sampling"
  if isinstance(spec, str):
    if spec != "balanced":
      raise config_keys.ConfigError(f"{where}={spec!r}: use 'balanced' or one share per class.")
    out = np.ones(len(counts))
  else:
    out = np.asarray(spec, np.float64)
    if out.shape != counts.shape or (out < 0).any() or not out.sum() > 0:
      raise config_keys.ConfigError(
        f"{where} has {out.size} entries; the label has {counts.size} classes. Give one "
        "share (>= 0, not all 0) per class, or 'balanced'."
      )
  empty = [names[c] for c in np.flatnonzero((counts == 0) & (out > 0))]
  if empty and isinstance(spec, str):  # "balanced" over the classes the split has
    out[counts == 0] = 0.0
  elif empty:
    raise config_keys.ConfigError(
      f"{where} gives a share to {empty}, which the training split has no example of "
      f"(per-class counts {dict(zip(names, counts.tolist()))})."
    )
  return out / out.sum()


class ClassBalancedOrder:
  """Stream position -> example index, each epoch holding the classes in `share`
  proportions (module docstring). `labels`: the split's label of each example."""

  def __init__(self, labels: np.ndarray, share: np.ndarray, seed: int):
    self.num = len(labels)
    self.seed = seed
    self.members = [np.flatnonzero(labels == c) for c in range(len(share))]
    exact = share * self.num
    slots = np.floor(exact).astype(np.int64)
    extra = np.argsort(-(exact - slots), kind="stable")[: self.num - slots.sum()]
    slots[extra] += 1
    self.slots = slots
    self._last: tuple[int, np.ndarray] | None = None  # the epoch read last (loader threads)

  def epoch(self, e: int) -> np.ndarray:
    """The example indices of epoch `e`, in order."""
    last = self._last
    if last is None or last[0] != e:
      rng = np.random.default_rng([self.seed, e])
      parts = []
      for members, slots in zip(self.members, self.slots):
        if not slots:
          continue
        full, rest = divmod(int(slots), len(members))
        parts += [rng.permutation(members) for _ in range(full)]
        parts.append(rng.choice(members, size=rest, replace=False))
      last = self._last = (e, rng.permutation(np.concatenate(parts)))
    return last[1]

  def __call__(self, position: int, _: object = None) -> int:
    e, i = divmod(int(position), self.num)
    return int(self.epoch(e)[i])
