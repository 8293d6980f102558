"""Train-state checkpoints with orbax: atomic, multi-host, topology-independent.

Layout of `directory/<step>/`: one orbax item per train-state entry (`params`,
`opt_state`, ...; the step is the directory name), `data/` with each
process's input-iterator state as `process_<i>-of-<n>.json`, and orbax's
`metrics` when best-k is tracked. Restored with another process count, an
input state carries over when every process saved the same one (the grain
train iterator's state is the global step); otherwise the iterator starts afresh.

Why orbax does the work: each step is written to a temporary directory and
renamed (or marked committed on GCS) only once every host has finished, so a
run killed mid-save leaves the previous checkpoints intact; old steps are
deleted only after a newer one is committed. Arrays are stored per shard with
tensorstore and read back onto whatever shardings the restore asks for, so a
checkpoint written on a (2,2,2) mesh restores on 1 device or a (4,1,1) mesh.
"""
from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import json
from typing import Any

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

DATA_ITEM = "data"


class _ProcessJsonHandler(ocp.CheckpointHandler):
  """Saves one JSON-able value per process (input pipelines are per host).

  Restores this process's value; when the process count changed, the value
  every saving process wrote, if they all wrote the same (a position in one
  global stream, valid for any process), else None.
  """

  def save(self, directory: epath.Path, args: DataStateSave) -> None:
    _process_file(directory).write_text(json.dumps(args.state))

  def restore(self, directory: epath.Path, args: DataStateRestore | None = None) -> Any:
    path = _process_file(directory)
    if path.exists():
      return json.loads(path.read_text())
    saved = {p.name: json.loads(p.read_text()) for p in sorted(directory.glob("process_*.json"))}
    states = list(saved.values())
    if states and all(state == states[0] for state in states):
      logging.info("Input-pipeline state of %s saved by another process count (%s): every process "
                   "saved the same, so this process continues from it.", directory, sorted(saved))
      return states[0]
    logging.warning("No input-pipeline state for this process in %s (found %s, not all the same): "
                    "the data iterator starts afresh. Expected when the process count changed "
                    "with per-process input states (loader='tf').", directory, sorted(saved))
    return None

  def metadata(self, directory: epath.Path) -> None:
    return None


def _process_file(directory: epath.Path) -> epath.Path:
  return epath.Path(directory) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"


@ocp.args.register_with_handler(_ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(_ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


def abstract(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying `shardings`: the restore target for a tree."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class CheckpointManager:
  """Saves and restores `{'step', 'params', 'opt_state', ...}` train states.

  Keeps the `keep` most recent steps plus, when `best_metric` is set, the
  `keep_best` steps with the best value of that metric (`best_mode` "max" or
  "min") among those saved with metrics. Saves are asynchronous by default:
  `save` returns once arrays are copied off the devices (so the state may be
  donated right after); call `wait()` before reading the files and `close()`
  at the end.
  """

  def __init__(self, directory: str | epath.PathLike, *, keep: int = 1,
               keep_best: int = 1, best_metric: str | None = None,
               best_mode: str = "max", async_save: bool = True,
               read_only: bool = False):
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode={best_mode!r}: use 'max' (e.g. accuracy) or 'min' (e.g. loss).")
    if keep < 1:
      raise ValueError(f"keep={keep}: keep at least the latest checkpoint (keep >= 1) to resume.")
    self.best_metric = best_metric
    policies = [ocp.checkpoint_managers.LatestN(n=keep)]
    best_fn = None
    if best_metric is not None:
      best_fn = lambda metrics: metrics[best_metric]  # noqa: E731
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=best_fn, reverse=best_mode == "min", n=keep_best,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        best_fn=best_fn, best_mode=best_mode, create=not read_only, read_only=read_only,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=not read_only,
        save_interval_steps=0 if read_only else 1)
    self._manager = ocp.CheckpointManager(epath.Path(directory), options=options)

  @property
  def directory(self) -> epath.Path:
    return self._manager.directory

  def save(self, step: int, state: Mapping[str, Any], *, data_state: Any = None,
           metrics: Mapping[str, float] | None = None) -> None:
    """Writes `state` (every entry but 'step' becomes an orbax item) at `step`.

    `data_state` is this process's JSON-able input-iterator state (each host
    saves its own). `metrics` (floats) rank the step for best-k; they are
    stored only when a `best_metric` is tracked.
    """
    if self.best_metric is not None and metrics is not None and self.best_metric not in metrics:
      raise ValueError(f"Checkpoint metrics {sorted(metrics)} lack "
                       f"best_metric={self.best_metric!r}; pass it in `metrics` or change the "
                       "checkpoint's best_metric.")
    items = {k: ocp.args.StandardSave(v) for k, v in state.items() if k != "step"}
    if data_state is not None:
      items[DATA_ITEM] = DataStateSave(data_state)
    metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
    self._manager.save(int(step), args=ocp.args.Composite(**items), metrics=metrics, force=True)

  def restore(self, target: Mapping[str, Any], step: int | None = None) -> dict[str, Any]:
    """The train state at `step` (default: latest), placed as `target` says.

    `target` has the train state's structure with `jax.ShapeDtypeStruct`
    leaves carrying the wanted shardings (see `abstract`), so the mesh may
    differ from the one that saved. A 'step' entry is filled from the step.
    """
    step = self.resolve_step(step)
    items = {k: ocp.args.StandardRestore(v) for k, v in target.items() if k != "step"}
    restored = dict(self._manager.restore(step, args=ocp.args.Composite(**items)))
    if "step" in target:
      restored["step"] = _put_scalar(step, target["step"])
    return {k: restored[k] for k in target}

  def data_state(self, step: int | None = None) -> Any:
    """This process's input-iterator state saved at `step`, or None (see _ProcessJsonHandler)."""
    step = self.resolve_step(step)
    if DATA_ITEM not in self._item_names(step):
      return None
    return self._manager.restore(step, args=ocp.args.Composite(
        **{DATA_ITEM: DataStateRestore()}))[DATA_ITEM]

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """Best step by `best_metric` (the latest when no metric is tracked)."""
    return self._manager.best_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def metrics(self, step: int) -> dict[str, float] | None:
    return self._manager.metrics(step)

  def resolve_step(self, step: int | None) -> int:
    """`step` if saved, the latest step for None; FileNotFoundError otherwise."""
    step = self.latest_step() if step is None else step
    if step is None or step not in self._manager.all_steps():
      raise FileNotFoundError(f"No checkpoint{'' if step is None else f' for step {step}'} in "
                              f"{self.directory} (steps: {self.all_steps()}).")
    return step

  def item_metadata(self, step: int, item: str) -> Any:
    """Tree of orbax metadata (shape, dtype) of one saved train-state entry."""
    if item not in self._item_names(step):
      raise KeyError(f"Checkpoint step {step} in {self.directory} has no item {item!r}; "
                     f"it has {sorted(self._item_names(step))}.")
    return ocp.handlers.StandardCheckpointHandler().metadata(self.directory / str(step) / item).tree

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are committed."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> CheckpointManager:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  def _item_names(self, step: int) -> set[str]:
    return {p.name for p in (self.directory / str(step)).iterdir() if p.is_dir()}


def _put_scalar(step: int, like: Any) -> jax.Array:
  value = np.asarray(step, dtype=getattr(like, "dtype", np.int32))
  sharding = getattr(like, "sharding", None)
  return jax.device_put(value, sharding) if sharding is not None else jnp.asarray(value)


def restore_params_only(directory: str | epath.PathLike, *, step: int | None = None,
                        shardings: Any = None) -> Any:
  """Only the params of a checkpoint (evaluation, distillation teachers).

  `shardings`: a tree of shardings like the params, or one sharding for all
  (e.g. `sharding.replicated(mesh)`); None puts every array on this process's
  first device.
  """
  with CheckpointManager(directory, read_only=True) as manager:
    step = manager.resolve_step(step)
    meta = manager.item_metadata(step, "params")
    if shardings is None:
      shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
      shardings = jax.tree.map(lambda _, s=shardings: s, meta)
    return manager.restore({"params": abstract(meta, shardings)}, step)["params"]
