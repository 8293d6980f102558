"""Train-state checkpoints with orbax: atomic, multi-host, topology-independent, verified.

Layout of `directory/<step>/`: one orbax item per train-state entry (`params`,
`opt_state`, ...; the step is the directory name), `data/` with each
process's input-iterator state as `process_<i>-of-<n>.json`, and orbax's
`metrics` when best-k is tracked. Restored with another process count, an
input state carries over when every process saved the same one (the grain
train iterator's state is the global step); otherwise the iterator starts afresh.
With the same process count a missing input state is corruption: silently
restarting the data stream would repeat data.

Why orbax does the work: each step is written to a temporary directory and
renamed (or marked committed on GCS) only once every host has finished, so a
run killed mid-save leaves the previous checkpoints intact; old steps are
deleted only after a newer one is committed. Arrays are stored per shard with
tensorstore and read back onto whatever shardings the restore asks for, so a
checkpoint written on a (2,2,2) mesh restores on 1 device or a (4,1,1) mesh.

What orbax does not do: notice files that changed after the commit (a flipped
bit may even restore silently) or report a failed asynchronous save before
the next one. So once a step is committed, process 0 records the size and
sha256 of each of its files in `directory/<step>.checksum.json` (a background
thread; orbax ignores names that are not a step), `restore_latest_intact`
checks them and moves a bad step aside to `checkpoints_corrupt/` next to
`directory` (never deleting it) to resume from the newest good one, and `check_for_errors`
turns a failed save (e.g. a full disk) into one line saying what to do.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import concurrent.futures
import contextlib
import dataclasses
import errno
import hashlib
import json
import logging as std_logging
import os
import re
import sys
from typing import Any

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from mmtl import workdir as workdir_lib

DATA_ITEM = "data"
CHECKSUM_SUFFIX = ".checksum.json"
CHECKPOINT_DIR = "checkpoints"  # A run's checkpoints: WORKDIR/checkpoints/<step>/.
CORRUPT_DIR = "checkpoints_corrupt"  # Next to the checkpoint directory.
_PROCESS_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")
_READ_CHUNK = 1 << 22
# orbax's replica-parallel saving (its default off GPU) splits each replicated array across
# its replicas: one device slice (an XLA program per shape and device) and one host transfer
# per replica. For small arrays (biases, norms, heads) that costs more than the write it
# spreads; below this many bytes per replica, one replica writes the array whole.
MIN_REPLICA_SLICE_BYTES = 1 << 20


@contextlib.contextmanager
def _orbax_warnings_held():
  """Holds back warnings orbax logs about what mmtl does on purpose (replacing a type
  handler, opening a checkpoint directory read-only): they would precede every one-line
  error and every evaluation."""
  absl_logger = std_logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(std_logging.ERROR)
  try:
    yield
  finally:
    absl_logger.setLevel(level)


def _register_array_handler() -> None:
  """orbax's jax.Array handler with MIN_REPLICA_SLICE_BYTES."""
  with _orbax_warnings_held():
    ocp.type_handlers.register_type_handler(
      jax.Array,
      ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES),
      override=True,
    )


_register_array_handler()


class CheckpointError(RuntimeError):
  """A checkpoint could not be written, or read back as it was written."""


class CheckpointCorrupt(CheckpointError):
  """A committed checkpoint's files changed, went missing or do not restore."""


class CheckpointSaveError(CheckpointError):
  """A checkpoint save (or recording its checksum) failed; the message says how to resume."""


class _ProcessJsonHandler(ocp.CheckpointHandler):
  """Saves one JSON-able value per process (input pipelines are per host).

  Restores this process's value; when the process count changed, the value
  every saving process wrote, if they all wrote the same (a position in one
  global stream, valid for any process), else None. A value missing although
  the same process count saved is CheckpointCorrupt.
  """

  def save(self, directory: epath.Path, args: DataStateSave) -> None:
    _process_file(directory).write_text(json.dumps(args.state))

  def restore(self, directory: epath.Path, args: DataStateRestore | None = None) -> Any:
    path = _process_file(directory)
    if path.exists():
      return json.loads(path.read_text())
    files = sorted(epath.Path(directory).glob("process_*.json"))
    counts = {int(m.group(2)) for m in (_PROCESS_FILE.fullmatch(p.name) for p in files) if m}
    if not files or jax.process_count() in counts:
      raise CheckpointCorrupt(
        f"Input-pipeline state {path.name} is missing from {directory}, which holds "
        f"{[p.name for p in files] or 'no input state at all'}: this process count saved one"
      )
    saved = {p.name: json.loads(p.read_text()) for p in files}
    states = list(saved.values())
    if all(state == states[0] for state in states):
      logging.info(
        "Input-pipeline state of %s saved by another process count (%s): every process "
        "saved the same, so this process continues from it.",
        directory,
        sorted(saved),
      )
      return states[0]
    logging.warning(
      "No input-pipeline state for this process in %s (found %s, not all the same): "
      "the data iterator starts afresh. Expected when the process count changed "
      "with per-process input states (loader='tf').",
      directory,
      sorted(saved),
    )
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
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


class CheckpointManager:
  """Saves and restores `{'step', 'params', 'opt_state', ...}` train states.

  Keeps the `keep` most recent steps (2 by default, so a corrupt latest step
  has a fallback) plus, when `best_metric` is set, the `keep_best` steps with
  the best value of that metric (`best_mode` "max" or "min") among those saved
  with metrics. Saves are asynchronous by default: `save` returns once arrays
  are copied off the devices (so the state may be donated right after); call
  `check_for_errors()` after each train step to stop at a failed save, `wait()`
  before reading the files and `close()` at the end. Resume with
  `restore_latest_intact`.
  """

  def __init__(
    self,
    directory: str | epath.PathLike,
    *,
    keep: int = 2,
    keep_best: int = 1,
    best_metric: str | None = None,
    best_mode: str = "max",
    async_save: bool = True,
    read_only: bool = False,
  ):
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode={best_mode!r}: use 'max' (e.g. accuracy) or 'min' (e.g. loss).")
    if keep < 1:
      raise ValueError(f"keep={keep}: keep at least the latest checkpoint (keep >= 1) to resume.")
    self.best_metric = best_metric
    self._read_only = read_only
    policies = [ocp.checkpoint_managers.LatestN(n=keep)]
    best_fn = None
    if best_metric is not None:
      best_fn = lambda metrics: metrics[best_metric]  # noqa: E731
      policies.append(
        ocp.checkpoint_managers.BestN(
          get_metric_fn=best_fn,
          reverse=best_mode == "min",
          n=keep_best,
          keep_checkpoints_without_metrics=False,
        )
      )
    options = ocp.CheckpointManagerOptions(
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
      best_fn=best_fn,
      best_mode=best_mode,
      create=not read_only,
      read_only=read_only,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=not read_only,
      save_interval_steps=0 if read_only else 1,
    )
    with _orbax_warnings_held() if read_only else contextlib.nullcontext():
      self._manager = ocp.CheckpointManager(epath.Path(directory), options=options)
    # The step handed to orbax whose commit has not been seen yet, and the
    # checksums being computed (one thread: hashing never competes with itself).
    self._pending: int | None = None
    self._hasher = concurrent.futures.ThreadPoolExecutor(
      1, thread_name_prefix="checkpoint_checksum"
    )
    self._checksums: list[tuple[int, concurrent.futures.Future]] = []
    # A CheckpointSaveError was raised and no save started since: wait() and
    # close() log later failures, so the run ends with the first one.
    self._failed = False

  @property
  def directory(self) -> epath.Path:
    return self._manager.directory

  @property
  def corrupt_directory(self) -> epath.Path:
    """Where `restore_latest_intact` moves bad steps: CORRUPT_DIR next to `directory`."""
    return self.directory.parent / CORRUPT_DIR

  def save(
    self,
    step: int,
    state: Mapping[str, Any],
    *,
    data_state: Any = None,
    metrics: Mapping[str, float] | None = None,
  ) -> None:
    """Writes `state` (every entry but 'step' becomes an orbax item) at `step`.

    `data_state` is this process's JSON-able input-iterator state (each host
    saves its own). `metrics` (floats) rank the step for best-k; they are
    stored only when a `best_metric` is tracked. Raises CheckpointSaveError if
    the previous save failed.
    """
    if self.best_metric is not None and metrics is not None and self.best_metric not in metrics:
      raise ValueError(
        f"Checkpoint metrics {sorted(metrics)} lack "
        f"best_metric={self.best_metric!r}; pass it in `metrics` or change the "
        "checkpoint's best_metric."
      )
    self._finish_pending()  # orbax's save waits for the previous one anyway
    self._raise_checksum_errors(block=False)
    self._failed = False
    items = {k: ocp.args.StandardSave(v) for k, v in state.items() if k != "step"}
    if data_state is not None:
      items[DATA_ITEM] = DataStateSave(data_state)
    metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
    try:
      self._manager.save(int(step), args=ocp.args.Composite(**items), metrics=metrics, force=True)
    except Exception as e:
      if _errno(e) is None:  # Not the storage: a bug (e.g. a state that is not JSON) stays as is.
        raise
      raise self._save_error(f"Saving checkpoint step {step}", e) from e
    self._pending = int(step)

  def check_for_errors(self) -> None:
    """Raises CheckpointSaveError for a save that failed since the last call; never blocks.

    Cheap enough for every train step, so a run whose disk filled up stops at
    the next step, not at the next save (or at the end). Each failure is
    raised once.
    """
    if self._pending is not None and not self._manager.is_saving_in_progress():
      self._finish_pending()
    self._raise_checksum_errors(block=False)

  def verify(self, step: int) -> bool:
    """Whether `step`'s files still match the checksum recorded after its commit.

    False when none was recorded (the run stopped between the commit and the
    hashing, or the step predates checksums). Raises CheckpointCorrupt when a
    recorded file is missing or differs; files added later are not checked.
    """
    step = self.resolve_step(step)
    record = self._checksum_file(step)
    if not record.exists():
      return False
    try:
      expected = json.loads(record.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointCorrupt(
        f"Checksum record {record} of checkpoint step {step} is unreadable ({e})"
      ) from e
    actual = _digest_files(self.directory / str(step))
    bad = [
      f"{name} {'is missing' if name not in actual else 'changed'}"
      for name, digest in expected.items()
      if actual.get(name) != digest
    ]
    if bad:
      more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
      raise CheckpointCorrupt(
        f"Checkpoint step {step} in {self.directory} does not match the "
        f"checksum recorded at its commit: {', '.join(bad[:3])}{more}"
      )
    return True

  def restore_latest_intact(
    self,
    target: Mapping[str, Any] | Callable[[int], Mapping[str, Any]],
  ) -> tuple[int, dict[str, Any], Any] | None:
    """`(step, state, data_state)` of the newest step that verifies and restores.

    None when nothing was saved. `target` as for `restore`, or a function of
    the step giving it (the optimizer state's structure may depend on the
    step, e.g. with gradual unfreezing). Newer steps that fail (checksum
    mismatch, or no checksum and the restore or input state fails) are moved
    aside to `corrupt_directory`, never deleted, with a warning; orbax then
    lists the remaining steps only, so later saves go on from the one
    restored. A step whose checksum matches but that does not restore is not
    corrupt (the target does not fit it, or the storage is unreachable):
    CheckpointError, nothing moved. Raises CheckpointCorrupt when every step
    is bad.
    """
    if self._read_only:
      raise ValueError("restore_latest_intact moves corrupt steps aside: use a writable manager.")
    self.wait()  # Committed steps get their checksums before they are checked.
    bad = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      verified, reason = self._verify_on_process_0(step)
      if reason is None:
        step_target = target(step) if callable(target) else target
        try:
          state, data_state = self.restore(step_target, step), self.data_state(step)
        except Exception as e:
          if verified and not isinstance(e, CheckpointCorrupt):
            raise CheckpointError(
              f"Checkpoint step {step} in {self.directory} matches its checksum but does not "
              f"restore ({_root_cause(e)}): its files are as written, so check the restore "
              "target (did the model or optimizer config change?) and the storage."
            ) from e
          reason = f"Checkpoint step {step} in {self.directory} does not restore ({_root_cause(e)})"
      if _on_any_process(reason is not None) and reason is None:
        reason = f"Checkpoint step {step} in {self.directory} does not restore on another process"
      if reason is None:
        self._move_aside(bad, then=f"resuming from step {step}")
        return step, state, data_state
      bad.append((step, reason))
    if not bad:
      return None
    self._move_aside(bad, then="no intact checkpoint is left")
    raise CheckpointCorrupt(
      f"No intact checkpoint in {self.directory}: every step is corrupt "
      f"({'; '.join(reason for _, reason in bad)}); all were moved aside to "
      f"{self.corrupt_directory}; rerunning starts from scratch, or move them back by hand."
    )

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
      if DATA_ITEM in (self._manager.metadata(step).item_handlers or {}):
        raise CheckpointCorrupt(
          f"Checkpoint step {step} in {self.directory} was saved with an "
          f"input-pipeline state, but its {DATA_ITEM}/ folder is gone"
        )
      return None
    return self._manager.restore(step, args=ocp.args.Composite(**{DATA_ITEM: DataStateRestore()}))[
      DATA_ITEM
    ]

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
      raise FileNotFoundError(
        f"No checkpoint{'' if step is None else f' for step {step}'} in "
        f"{self.directory} (steps: {self.all_steps()})."
      )
    return step

  def item_metadata(self, step: int, item: str) -> Any:
    """Tree of orbax metadata (shape, dtype) of one saved train-state entry."""
    if item not in self._item_names(step):
      raise KeyError(
        f"Checkpoint step {step} in {self.directory} has no item {item!r}; "
        f"it has {sorted(self._item_names(step))}."
      )
    return ocp.handlers.StandardCheckpointHandler().metadata(self.directory / str(step) / item).tree

  def wait(self) -> None:
    """Blocks until pending saves are committed and their checksums recorded.

    Raises CheckpointSaveError if one failed, unless one was raised already
    (then it logs it: this runs in cleanups, after the error that stopped the run).
    """
    failed_before = self._failed
    while True:
      try:
        self._finish_pending()
        self._raise_checksum_errors(block=True)
        return
      except CheckpointSaveError as e:
        if not failed_before:
          raise
        logging.warning("After the checkpoint failure already reported: %s", e)

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._hasher.shutdown()
      self._manager.close()

  def __enter__(self) -> CheckpointManager:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()

  def _item_names(self, step: int) -> set[str]:
    return {p.name for p in (self.directory / str(step)).iterdir() if p.is_dir()}

  def _checksum_file(self, step: int) -> epath.Path:
    return self.directory / f"{step}{CHECKSUM_SUFFIX}"

  def _finish_pending(self) -> None:
    """Waits for the save handed to orbax; once it is committed, queues its checksum."""
    step, self._pending = self._pending, None
    if step is None:
      return
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      # orbax 0.12.8's finalize stops at the first part that failed (often the step
      # metadata) and leaves the array writes' error of the same save in its async
      # checkpointer, to be raised again by the next save or by close: collect it now.
      with contextlib.suppress(Exception):
        self._manager._checkpointer.wait_until_finished()  # pylint: disable=protected-access
      # orbax already dropped from its listing the old steps this save was to replace.
      self._manager.reload()
      raise self._save_error(f"Saving checkpoint step {step}", e) from e
    if jax.process_index() == 0:  # Every process's files are in the shared directory.
      self._checksums.append((step, self._hasher.submit(self._record_checksum, step)))

  def _record_checksum(self, step: int) -> None:
    """Writes `<step>.checksum.json` (on the hasher thread) and drops those of deleted steps."""
    step_dir = self.directory / str(step)
    try:
      files = _digest_files(step_dir)
    except FileNotFoundError:
      if step_dir.exists():
        raise
      return  # keep=1: the next save's commit deleted it meanwhile.
    workdir_lib.write_text(
      self._checksum_file(step),
      json.dumps({"step": step, "algorithm": "sha256", "files": files}, indent=1),
    )
    for record in self.directory.glob(f"*{CHECKSUM_SUFFIX}"):
      if not (self.directory / record.name[: -len(CHECKSUM_SUFFIX)]).exists():
        record.unlink(missing_ok=True)

  def _raise_checksum_errors(self, block: bool) -> None:
    """Raises the first failure among the finished checksum jobs (they finish in order)."""
    while self._checksums and (block or self._checksums[0][1].done()):
      step, future = self._checksums.pop(0)
      if (error := future.exception()) is not None:
        raise self._save_error(
          f"Recording the checksum of committed checkpoint step {step}", error
        ) from error

  def _save_error(self, what: str, error: BaseException) -> CheckpointSaveError:
    """The error for a failed save, on one line: what failed, the root cause, the last
    committed step and how to go on. Marks the failure as reported (see `wait`)."""
    self._failed = True
    last = max((s for s in self._manager.all_steps() if s != self._pending), default=None)
    fix = (
      "free space or move the workdir"
      if _errno(error) in (errno.ENOSPC, errno.EDQUOT)
      else "fix that"
    )
    resume = "start from scratch" if last is None else f"resume from step {last}"
    return CheckpointSaveError(
      f"{what} in {self.directory} failed: {_root_cause(error)}; the last intact checkpoint "
      f"is {'none' if last is None else f'step {last}'}: {fix}, then rerun the same command "
      f"to {resume}."
    )

  def _verify_on_process_0(self, step: int) -> tuple[bool, str | None]:
    """(verified, why corrupt or None): `verify` on process 0 only (one read of the
    files for all hosts), its verdict on every process so all pick the same step."""
    verified, reason = False, None
    if jax.process_index() == 0:
      try:
        verified = self.verify(step)
      except CheckpointCorrupt as e:
        reason = str(e)
    if jax.process_count() > 1:
      code = int(
        multihost_utils.broadcast_one_to_all(np.int32(verified + 2 * (reason is not None)))
      )
      verified = bool(code & 1)
      if code & 2 and reason is None:
        reason = f"Checkpoint step {step} in {self.directory} does not match its checksum"
    return verified, reason

  def _move_aside(self, bad: list[tuple[int, str]], then: str) -> None:
    """Moves each bad step and its checksum record into `corrupt_directory`; orbax forgets it."""
    if not bad:
      return
    if jax.process_index() == 0:
      self.corrupt_directory.mkdir(parents=True, exist_ok=True)
      for step, reason in bad:
        dest, n = self.corrupt_directory / str(step), 0
        while dest.exists():
          n += 1
          dest = self.corrupt_directory / f"{step}.{n}"
        (self.directory / str(step)).rename(dest)
        if self._checksum_file(step).exists():  # Kept with the files it describes.
          self._checksum_file(step).rename(dest / self._checksum_file(step).name)
        message = f"{reason}. Moved it aside to {dest} (nothing deleted); {then}."
        logging.warning(message)
        print(f"WARNING: {message}", file=sys.stderr, flush=True)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("mmtl.checkpoint.moved_aside")
    self._manager.reload()


def saved_steps(directory: str | epath.PathLike) -> list[int]:
  """The committed steps in `directory`, oldest first; creates nothing (a run
  decides with it, before writing anything, whether it resumes)."""
  if not epath.Path(directory).exists():
    return []
  with CheckpointManager(directory, read_only=True) as manager:
    return manager.all_steps()


def _digest_files(root: epath.Path) -> dict[str, list[Any]]:
  """`{path relative to root: [size, sha256]}` of every file under `root`.

  sha256 so a file can be checked by hand with `sha256sum`.
  """
  files, folders = {}, [root]
  while folders:
    for path in folders.pop().iterdir():
      if path.is_dir():
        folders.append(path)
        continue
      digest, size = hashlib.sha256(), 0
      with path.open("rb") as f:
        while chunk := f.read(_READ_CHUNK):
          digest.update(chunk)
          size += len(chunk)
      files[path.relative_to(root).as_posix()] = [size, digest.hexdigest()]
  return dict(sorted(files.items()))


def _on_any_process(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def _chain(error: BaseException) -> list[BaseException]:
  """`error` and its causes, outermost first."""
  chain = []
  while error is not None and all(error is not e for e in chain):
    chain.append(error)
    error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
  return chain


def _errno_of(error: BaseException) -> int | None:
  if isinstance(error, OSError) and error.errno:
    return error.errno
  # tensorstore reports a failed write as ValueError("... [os_error_code='28']").
  match = re.search(r"os_error_code='(\d+)'", str(error))
  return int(match.group(1)) if match else None


def _errno(error: BaseException) -> int | None:
  return next((code for e in _chain(error) if (code := _errno_of(e)) is not None), None)


def _root_cause(error: BaseException) -> str:
  """The innermost exception that names an OS error (else the innermost), on one line."""
  chain = _chain(error)
  root = next((e for e in chain if _errno_of(e) is not None), chain[-1])
  text = " ".join(str(root).split())
  text = f"{type(root).__name__}: {text[:300] + '...' if len(text) > 300 else text}"
  code = _errno_of(root)
  if code is not None and not isinstance(root, OSError):
    text = f"[Errno {code}] {os.strerror(code)} ({text})"
  return text


def _put_scalar(step: int, like: Any) -> jax.Array:
  value = np.asarray(step, dtype=getattr(like, "dtype", np.int32))
  sharding = getattr(like, "sharding", None)
  return jax.device_put(value, sharding) if sharding is not None else jnp.asarray(value)


VARIABLES = ("params", "batch_stats")  # the train-state entries that are model variables


def restore_variables(
  directory: str | epath.PathLike, *, step: int | None = None, shardings: Any = None
) -> dict[str, Any]:
  """Only the model variables of a checkpoint, {"params": ...} (+ "batch_stats" when the
  model has BatchNorm): evaluation, distillation teachers, export.

  `shardings`: a tree of shardings like the variables, or one sharding for all
  (e.g. `sharding.replicated(mesh)`); None puts every array on this process's
  first device.
  """
  with CheckpointManager(directory, read_only=True) as manager:
    step = manager.resolve_step(step)
    # params always (a clear KeyError if absent); batch_stats when the model has them
    items = [k for k in VARIABLES if k == "params" or k in manager._item_names(step)]
    meta = {k: manager.item_metadata(step, k) for k in items}
    if shardings is None:
      shardings = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
      shardings = jax.tree.map(lambda _, s=shardings: s, meta)
    return manager.restore({k: abstract(meta[k], shardings[k]) for k in items}, step)
