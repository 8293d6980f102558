"""Workdir files on a local disk or an object store (`gs://bucket/run`), through etils.epath.

A TPU pod slice has no filesystem that all its hosts share, so its workdir is a
bucket: orbax writes the checkpoints there, and the trainer's own files
(config.json, metrics.jsonl, TensorBoard events, curves.png, final_metrics.json,
eval_step<N>.json) are read and written with these functions. Local paths stay
plain files. epath reaches gs:// through fsspec + gcsfs (imported only when such
a path is used; with TensorFlow installed it uses tf.io.gfile instead).

`RunLock` (the workdir's lock.json) keeps a second run out of a workdir in use.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
import contextlib
import datetime
import hashlib
import json
import os
import re
import shlex
import socket
import tempfile
import time
from typing import Any
import uuid

from absl import logging
from etils import epath

LOCK_FILE = "lock.json"
# A local lock file that cannot be parsed was left by a run killed between creating
# it and writing it (a live run writes it within milliseconds, and removes it if the
# write fails): once this old, it is taken over.
_UNREADABLE_STALE_S = 10.0
# Object stores without a create-if-absent precondition: how long a run waits after
# writing its lock before reading it back, to see a racing run's overwrite.
_SETTLE_S = 2.0
_ATTEMPTS = 4  # Rounds of create, read back, take over: the lock may change hands meanwhile.


def is_remote(location: epath.PathLike) -> bool:
  """Whether `location` is on an object store (`gs://`, `s3://`...): no appends, no directories."""
  return "://" in os.fspath(location)


def path(workdir: epath.PathLike, *names: str) -> epath.Path:
  """`workdir/names...`. A local workdir is made absolute (orbax requires absolute
  paths); a remote one is joined as a string (os.path.abspath would mangle gs://)."""
  base = os.fspath(workdir)
  return epath.Path(base if is_remote(base) else os.path.abspath(base)).joinpath(*names)


def makedirs(workdir: epath.PathLike) -> None:
  """Creates a local workdir. Object stores need no directories, and creating one
  could create a bucket (gcsfs does when the bucket is missing), so remote
  workdirs are left alone."""
  if not is_remote(workdir):
    path(workdir).mkdir(parents=True, exist_ok=True)


def write_text(file: epath.PathLike, text: str) -> None:
  """Replaces `file` with `text` atomically: a reader (or a run killed mid-write)
  sees the old content or the new one, never a part. Locally: a temporary file
  renamed over it. An object store makes an uploaded object visible only once
  it is complete, so there one write is already atomic (and a rename is a copy)."""
  file = epath.Path(file)
  if is_remote(file):
    file.write_text(text)
    return
  tmp = file.with_name(file.name + ".tmp")
  try:
    tmp.write_text(text)
    tmp.replace(file)
  finally:
    tmp.unlink(missing_ok=True)  # Only left after a failed write.


def read_json(file: epath.PathLike) -> Any:
  return json.loads(epath.Path(file).read_text())


def safe_name(text: str, max_len: int = 120) -> str:
  """`text` as a readable, deterministic file or directory name: characters other
  than letters, digits and `._=+-` become `_`; a long one keeps a prefix and a hash
  of the whole, so different texts stay different names."""
  name = re.sub(r"[^A-Za-z0-9._=+-]+", "_", text)
  if len(name) > max_len:
    name = f"{name[: max_len - 20]}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"
  return name


class WorkdirLocked(RuntimeError):
  """The workdir is held by another run: `holder` is its lock record (None if unknown
  or unreadable), in `lock_file`."""

  def __init__(
    self, message: str, *, lock_file: str | None = None, holder: Mapping[str, Any] | None = None
  ):
    super().__init__(message)
    self.lock_file, self.holder = lock_file, holder


def _locked(lock_file: epath.PathLike, holder: Mapping[str, Any] | None) -> WorkdirLocked:
  """The one-line error naming the holder and the file to delete if it is gone."""
  lock_file = os.fspath(lock_file)
  if holder is None:
    who = "is unreadable (a run is writing it, or died while writing it)"
  else:
    who = (
      f"is held by run {holder['run_id']} (host {holder['host']}, pid {holder['pid']}, "
      f"started {holder.get('started', '?')})"
    )
  return WorkdirLocked(
    f"Workdir lock {lock_file} {who}: one workdir takes one run at a time. If that run is no "
    f"longer running, delete the lock ({_rm_command(lock_file)}) and rerun: the run resumes "
    "from its last checkpoint.",
    lock_file=lock_file,
    holder=holder,
  )


class RunLock:
  """Exclusive lock on a workdir, so that two runs started on it cannot both train.

  `workdir/lock.json` records the holder: run id, host, pid, the pid's start time
  (so a reused pid is told apart) and namespace, and when it started. It is
  created atomically: locally with O_CREAT | O_EXCL; on an object store with an
  upload that fails if the object exists (gcsfs' mode "xb": ifGenerationMatch=0),
  where the backend has one. Without one (tf.io.gfile) the run checks that the
  lock is absent, writes it, waits `_SETTLE_S` (2 s) and reads it back: two runs
  that both saw it absent then both write, and the later write wins, unless one
  run took over 2 s between its check and its write. That window remains.

  A lock whose holder is on this host (same hostname and pid namespace) and no
  longer running is stale, and is taken over with a logged note, as is an
  unreadable local lock file over `_UNREADABLE_STALE_S` (10 s) old. A lock of another
  host (or another pid namespace, as a container sharing the host's name) is never
  taken over: its holder cannot be checked, and WorkdirLocked says which file to
  delete. Off POSIX no lock is taken over.

  Acquiring again with the same run id in the same process succeeds. On several
  hosts only process 0 takes the lock (the others would see it as another host's):
  the caller acquires it there and broadcasts the outcome.
  """

  def __init__(self, workdir: epath.PathLike, run_id: str | None = None):
    self.workdir = workdir
    self.file = path(workdir, LOCK_FILE)
    self.run_id = run_id or uuid.uuid4().hex
    self._made_dirs: list[epath.Path] = []  # The local folders acquire created, deepest first.

  def __enter__(self) -> RunLock:
    self.acquire()
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()

  def acquire(self) -> None:
    """Takes the lock, or raises WorkdirLocked naming its holder."""
    self._made_dirs = []
    if not is_remote(self.workdir):
      folder = path(self.workdir).absolute()
      while not folder.exists():
        self._made_dirs.append(folder)
        folder = folder.parent
    makedirs(self.workdir)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    record = dict(run_id=self.run_id, **_this_process(), started=started)
    holder = None
    for _ in range(_ATTEMPTS):
      self._create(json.dumps(record))
      current = self._read()
      if current is None:
        continue  # Released or taken over in between.
      holder = current[1]
      if holder is not None and self._is_ours(holder):
        return
      if self._stale_note(holder) is None:
        raise _locked(self.file, holder)
      with _takeover_guard(self.file):
        current = self._read()  # Judged again: another process of this host may have taken it.
        note = current and self._stale_note(current[1])
        if note:
          logging.warning("Taking over workdir lock %s: %s.", self.file, note)
          self.file.unlink(missing_ok=True)
    raise _locked(self.file, holder)

  def release(self) -> None:
    """Removes the lock file if it is still ours (a run that took it over keeps it)."""
    current = self._read()
    if current is None:
      return
    holder = current[1]
    if holder is not None and self._is_ours(holder):
      self.file.unlink(missing_ok=True)
      for folder in self._made_dirs:  # A run refused before writing anything leaves no folder.
        if any(folder.iterdir()):
          break
        folder.rmdir()
    else:
      logging.warning(
        "Leaving workdir lock %s in place: it is not ours (%s).", self.file, current[0][:200]
      )

  def _is_ours(self, holder: Mapping[str, Any]) -> bool:
    return (holder["run_id"], holder["host"], holder["pid"]) == (
      self.run_id,
      socket.gethostname(),
      os.getpid(),
    )

  def _create(self, text: str) -> None:
    """Creates the lock file holding `text` unless it exists; the caller reads it back."""
    name = os.fspath(self.file)
    if not is_remote(name):
      try:
        fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        return
      try:
        with os.fdopen(fd, "w") as f:
          f.write(text)
          f.flush()
          os.fsync(f.fileno())
      except BaseException:
        os.unlink(name)  # Ours: no run should find it half written.
        raise
      return
    if self.file.exists():
      return  # Checked first, in case a backend took "xb" for "wb".
    try:
      # epath.Path.open refuses mode "x"; its backend passes it on to gcsfs/s3fs.
      with self.file._backend.open(name, "xb") as f:  # pylint: disable=protected-access
        f.write(text.encode())
      return
    except FileExistsError:
      return
    except Exception:  # pylint: disable=broad-except
      pass  # No exclusive create here (tf.io.gfile raises its own error types).
    self.file.write_text(text)
    time.sleep(_SETTLE_S)

  def _read(self) -> tuple[str, dict[str, Any] | None] | None:
    """(text, record) of the lock file, record None if unreadable; None if absent.
    Unreadable text is read again for a moment: a racing run may be writing it."""
    for delay in (0.0, 0.01, 0.05, 0.1, 0.2):
      time.sleep(delay)
      try:
        text = self.file.read_text()
      except FileNotFoundError:
        return None
      try:
        return text, _parse(text)
      except ValueError:
        pass
    return text, None

  def _stale_note(self, holder: Mapping[str, Any] | None) -> str | None:
    """Why the lock held by `holder` (None: unreadable) may be taken over; None if it may not."""
    if os.name != "posix":
      return None  # os.kill(pid, 0) would end the process on Windows.
    if holder is None:
      if is_remote(self.file):
        return None  # Uploads are whole: this was not left by a crash.
      try:
        age = time.time() - os.stat(self.file).st_mtime
      except FileNotFoundError:
        return None
      return (
        f"its unreadable lock file is {age:.0f} s old (left by a run that died writing it)"
        if age > _UNREADABLE_STALE_S
        else None
      )
    if (holder["host"], holder.get("pid_namespace")) != (socket.gethostname(), _pid_namespace()):
      return None
    gone = _gone(holder["pid"], holder.get("pid_start_time"))
    return gone and (
      f"run {holder['run_id']} (host {holder['host']}, pid {holder['pid']}, "
      f"started {holder.get('started', '?')}) {gone}"
    )


def _this_process() -> dict[str, Any]:
  pid = os.getpid()
  return dict(
    host=socket.gethostname(),
    pid=pid,
    pid_start_time=_pid_start_time(pid),
    pid_namespace=_pid_namespace(),
  )


def _pid_start_time(pid: int) -> int | None:
  """When `pid` started, in clock ticks since boot (field 22 of /proc/<pid>/stat):
  tells a reused pid apart. None off Linux, for no such process, or for a zombie."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()  # After the command name, which may hold spaces.
    return None if fields[0] == "Z" else int(fields[19])  # fields[0] is field 3, the state.
  except (OSError, IndexError, ValueError):
    return None


def _pid_namespace() -> str | None:
  """The pid namespace (Linux), e.g. "pid:[4026531836]": a container sharing its host's
  name (GKE hostNetwork pods) has its own pids, which this host cannot check."""
  try:
    return os.readlink("/proc/self/ns/pid")
  except OSError:
    return None


def _gone(pid: int, start_time: int | None) -> str | None:
  """How the lock holder `pid` (started at `start_time`) of this host is gone; None if running."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return "is no longer running"
  except PermissionError:
    pass  # Another user's process.
  if start_time is None:
    return None  # Not recorded (off Linux): the pid's owner counts as the holder.
  now = _pid_start_time(pid)
  if now is None:
    return "is no longer running"  # Exited since, or a zombie.
  return "is no longer running (its pid is another process now)" if now != start_time else None


def _parse(text: str) -> dict[str, Any]:
  record = json.loads(text)
  if not (
    isinstance(record, dict)
    and isinstance(record.get("run_id"), str)
    and isinstance(record.get("host"), str)
    and isinstance(record.get("pid"), int)
    and record["pid"] > 0
  ):  # os.kill(0 or -1, 0) would ask about many processes.
    raise ValueError(f"Not a lock record: {text!r}")
  return record


def _rm_command(file: str) -> str:
  if file.startswith("gs://"):
    return f"gcloud storage rm {file}, or gsutil rm {file}"
  return f"delete {file}" if is_remote(file) else f"rm {shlex.quote(file)}"


@contextlib.contextmanager
def _takeover_guard(lock_file: epath.Path) -> Iterator[None]:
  """Serializes takeovers of `lock_file` among this host's processes (only they take
  over its locks), so that two of them cannot both find a dead run's lock and then one
  delete the other's new lock. An flock, which the kernel drops when its holder dies,
  so it cannot go stale: on the workdir itself, or for an object store on a temp file
  named after the lock's URL."""
  import fcntl  # pylint: disable=g-import-not-at-top  # POSIX only, as are takeovers.

  name = os.fspath(lock_file)
  if is_remote(name):
    guard = os.path.join(
      tempfile.gettempdir(), f"mmtl-lock-{hashlib.sha256(name.encode()).hexdigest()[:16]}"
    )
    fd = os.open(guard, os.O_RDONLY | os.O_CREAT, 0o644)
  else:
    fd = os.open(os.path.dirname(name), os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)
