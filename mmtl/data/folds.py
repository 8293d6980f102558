"""Cross-validation: stratified, deterministic folds of the training split, one held out
as validation.

  config.cross_validation = dict(folds=5, fold=2)  # train on folds 0, 1, 3, 4; validate on 2

`apply` turns that into input settings before anything reads data: `config.input`
reads the examples of `config.input.split` outside fold `fold`, and the evaluator named
by `evaluator` (default `val`) reads fold `fold` of that same split (its other input
overrides kept); every other evaluator keeps its split. The folds are scikit-learn's
`StratifiedKFold(folds, shuffle=True, random_state=seed)` over the split's labels in the
split's order, so each fold keeps the class shares of the split, they are the same in
every run and on any number of processes, and runs over seeds with the same `seed` here
see the same folds. `launch/sweep.py --folds K` runs every fold.
"""

from __future__ import annotations

import functools
from typing import Any

import ml_collections
import numpy as np
from sklearn import model_selection

from mmtl import config_keys

# config.cross_validation: folds 0 = off.
CONFIG_KEYS = dict(folds=0, fold=0, seed=0, evaluator="val")


def apply(config: ml_collections.ConfigDict) -> None:
  """Writes `config.cross_validation` into `config.input.fold` and the held-out
  evaluator's `input` (in place; running it again changes nothing)."""
  cv = config.get("cross_validation") or {}
  config_keys.check_keys(cv, CONFIG_KEYS, "config.cross_validation")
  cv = {**CONFIG_KEYS, **cv}
  folds, fold, evaluator = int(cv["folds"]), int(cv["fold"]), cv["evaluator"]
  if not folds:
    return
  where = "config.cross_validation"
  if folds < 2 or not 0 <= fold < folds:
    raise config_keys.ConfigError(
      f"{where}: folds={folds}, fold={fold}; use folds >= 2 and a fold in 0..folds-1."
    )
  if evaluator not in config.evals:
    raise config_keys.ConfigError(
      f"{where}.evaluator={evaluator!r} names no evaluator (config.evals has "
      f"{sorted(config.evals)}): name the one that scores the held-out fold."
    )
  selection = dict(folds=folds, index=fold, seed=int(cv["seed"]))
  config.input.fold = dict(selection, held_out=False)
  held_out = config.evals[evaluator]
  eval_input = dict(held_out.get("input", {}))
  eval_input.update(split=config.input.split, fold=dict(selection, held_out=True))
  held_out.input = eval_input


def indices(
  labels: np.ndarray, fold: dict[str, Any], where: str, names: list[str] | None = None
) -> np.ndarray:
  """Positions in the split of the examples `fold` (config.input.fold) selects: those of
  fold `index` if `held_out`, else all others, in the split's order. A fold count above
  the smallest class's count is refused with the counts (of the classes by `names`)."""
  folds = int(fold["folds"])
  classes, counts = np.unique(labels, return_counts=True)
  if folds > counts.min():
    shown = ", ".join(
      f"class {names[c] if names else c}: {n}" for c, n in zip(classes.tolist(), counts.tolist())
    )
    raise config_keys.ConfigError(
      f"{where}: {folds} folds, but the smallest class of the split has {counts.min()} "
      f"example(s) ({shown}); stratified folds need each class in every fold: use at most "
      f"{counts.min()} folds."
    )
  held_out = _held_out(labels.tobytes(), str(labels.dtype), folds, int(fold["seed"]))[
    int(fold["index"])
  ]
  if fold["held_out"]:
    return held_out
  return np.setdiff1d(np.arange(len(labels)), held_out)


@functools.lru_cache(maxsize=8)
def _held_out(labels: bytes, dtype: str, folds: int, seed: int) -> tuple[np.ndarray, ...]:
  """Each fold's positions (sorted), from the labels' bytes: computed once per split."""
  y = np.frombuffer(labels, dtype)
  split = model_selection.StratifiedKFold(folds, shuffle=True, random_state=seed)
  return tuple(np.sort(test) for _, test in split.split(np.zeros(len(y)), y))


class Subset:
  """The examples of a random-access source at `positions`, in that order (what grain
  reads: `len` and indexing)."""

  def __init__(self, source: Any, positions: np.ndarray):
    self.source, self.positions = source, positions

  def __len__(self) -> int:
    return len(self.positions)

  def __getitem__(self, i: int) -> Any:
    return self.source[int(self.positions[i])]
