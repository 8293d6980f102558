"""The workdir lock (mmtl.workdir.RunLock): one run per workdir, stale locks taken over.

gs:// is served from a local folder through `etils.epath.testing.mock_epath`, as in
tests/test_workdir.py; this fake also runs without an exclusive create (as with
tf.io.gfile), and tests/test_workdir.py's would bring the trainer's imports.
"""

import json
import os
from pathlib import Path
import socket
import sys
import tempfile
import time
import types

from etils import epath
from etils.epath import testing as epath_testing
import pytest

from mmtl import process
from mmtl import workdir as workdir_lib
from mmtl.workdir import RunLock, WorkdirLocked

REPO = Path(__file__).resolve().parent.parent
RUN = "gs://bucket/run"


@pytest.fixture(params=[True, False], ids=["exclusive-create", "check-then-write"])
def gcs(request, tmp_path, monkeypatch):
  """Fake gs://BUCKET/KEY at tmp_path/gcs/BUCKET/KEY, with an exclusive create (gcsfs'
  mode "xb") or without. `gcs.before_read` runs once, before the next read."""
  monkeypatch.setattr(workdir_lib, "_SETTLE_S", 0.0)
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # Where takeovers' guard files go.
  fake = types.SimpleNamespace(before_read=None)

  def local(path):
    path = os.fspath(path)
    return str(tmp_path / "gcs" / path[len("gs://") :]) if path.startswith("gs://") else path

  def one(original, path, *args, **kwargs):
    return original(local(path), *args, **kwargs)

  def open_(original, path, mode):
    assert "a" not in mode, f"append to an object: {path}"
    if "x" in mode and not request.param:
      raise NotImplementedError(f"mode {mode!r}")
    if "r" in mode and fake.before_read:
      hook, fake.before_read = fake.before_read, None
      hook()
    os.makedirs(os.path.dirname(local(path)), exist_ok=True)  # Objects need no directories.
    return original(local(path), mode)

  with epath_testing.mock_epath(open=open_, exists=one, stat=one, remove=one):
    yield fake


@pytest.fixture(scope="module")
def dead_pid():
  """The pid of a process of this host that has exited."""
  return int(
    process.run(
      [sys.executable, "-c", "import os; print(os.getpid())"],
      check=True,
      capture_output=True,
      text=True,
      timeout=60,
    ).stdout
  )


def lock_file(workdir) -> epath.Path:
  return workdir_lib.path(workdir, workdir_lib.LOCK_FILE)


def holder(workdir) -> dict:
  return json.loads(lock_file(workdir).read_text())


def rewrite(workdir, **changes) -> None:
  """Edits the lock record, as if another process had written it."""
  lock_file(workdir).write_text(json.dumps(dict(holder(workdir), **changes)))


def test_a_second_run_is_refused_until_the_first_releases(tmp_path):
  run = str(tmp_path / "run")
  first = RunLock(run, run_id="first")
  first.acquire()
  first.acquire()  # Already ours: fine.
  second = RunLock(run)
  with pytest.raises(WorkdirLocked) as refused:
    second.acquire()
  message = str(refused.value)
  assert "\n" not in message
  for part in (
    "run first",
    f"host {socket.gethostname()}",
    f"pid {os.getpid()}",
    f"started {holder(run)['started']}",
    f"rm {run}/lock.json",
    "resumes",
  ):
    assert part in message
  assert refused.value.holder["run_id"] == "first" and refused.value.lock_file == f"{run}/lock.json"
  first.release()
  assert not os.path.exists(f"{run}/lock.json")
  with second:
    assert holder(run)["run_id"] == second.run_id
  assert os.listdir(run) == []


def test_release_leaves_another_runs_lock(tmp_path):
  first, second = RunLock(tmp_path), RunLock(tmp_path)
  first.acquire()
  second.release()  # Never had it.
  rewrite(tmp_path, run_id="successor")  # As if taken over.
  first.release()
  assert holder(tmp_path)["run_id"] == "successor"


def test_a_dead_runs_lock_on_this_host_is_taken_over(tmp_path, caplog):
  run = str(tmp_path / "run")
  process.run(
    [
      sys.executable,
      "-c",
      "import sys; from mmtl import workdir; workdir.RunLock(sys.argv[1], 'crashed').acquire()",
      run,
    ],
    cwd=REPO,
    check=True,
    timeout=60,
  )  # Exits holding the lock.
  dead = holder(run)
  assert dead["run_id"] == "crashed" and dead["pid"] != os.getpid()
  with RunLock(run, run_id="rerun"):
    assert holder(run)["run_id"] == "rerun"
  assert f"run crashed (host {socket.gethostname()}, pid {dead['pid']}" in caplog.text
  assert "no longer running" in caplog.text


def test_a_live_pid_started_at_another_time_is_a_reused_pid(tmp_path):
  RunLock(tmp_path).acquire()
  rewrite(tmp_path, run_id="before", pid_start_time=holder(tmp_path)["pid_start_time"] + 1)
  with RunLock(tmp_path, run_id="after"):  # This pid is live, but another process now.
    assert holder(tmp_path)["run_id"] == "after"


@pytest.mark.parametrize(
  "elsewhere",
  [dict(host="tpu-vm-7"), dict(pid_namespace="pid:[1]")],
  ids=["another-host", "another-pid-namespace"],
)
def test_a_lock_of_another_host_is_never_taken_over(tmp_path, dead_pid, elsewhere):
  RunLock(tmp_path).acquire()
  rewrite(tmp_path, run_id="remote", pid=dead_pid, **elsewhere)  # That pid is not its host's.
  with pytest.raises(WorkdirLocked, match=f"run remote .*pid {dead_pid}"):
    RunLock(tmp_path).acquire()
  assert holder(tmp_path)["run_id"] == "remote"


def test_an_unreadable_lock_is_taken_over_once_old(tmp_path):
  file = tmp_path / "lock.json"
  file.write_text("")  # A run killed between creating its lock and writing it.
  with pytest.raises(WorkdirLocked, match="lock.json is unreadable"):
    RunLock(tmp_path).acquire()  # It may be a run writing it now.
  past = time.time() - 2 * workdir_lib._UNREADABLE_STALE_S
  os.utime(file, (past, past))
  with RunLock(tmp_path, run_id="next"):
    assert holder(tmp_path)["run_id"] == "next"


def test_gs_workdir_lock(gcs):
  first = RunLock(RUN, run_id="first")
  first.acquire()
  with pytest.raises(WorkdirLocked) as refused:
    RunLock(RUN).acquire()
  assert "run first" in str(refused.value)
  assert (
    "gcloud storage rm gs://bucket/run/lock.json, or gsutil rm gs://bucket/run/lock.json"
    in str(refused.value)
  )
  first.release()
  assert not lock_file(RUN).exists()
  with RunLock(RUN, run_id="second"):
    assert holder(RUN)["run_id"] == "second"


def test_gs_workdir_stale_and_remote_locks(gcs, dead_pid):
  RunLock(RUN).acquire()
  rewrite(RUN, run_id="crashed", pid=dead_pid)
  RunLock(RUN, run_id="rerun").acquire()
  assert holder(RUN)["run_id"] == "rerun"
  rewrite(RUN, run_id="remote", host="tpu-vm-7")
  with pytest.raises(WorkdirLocked, match="run remote .host tpu-vm-7"):
    RunLock(RUN).acquire()


@pytest.mark.parametrize("gcs", [False], indirect=True)
def test_gs_lock_overwritten_by_a_racing_run_is_not_taken(gcs):
  def racer_writes():  # Between our write and our read-back.
    lock_file(RUN).write_text(json.dumps(dict(run_id="racer", host="tpu-vm-7", pid=1)))

  gcs.before_read = racer_writes
  with pytest.raises(WorkdirLocked, match="run racer"):
    RunLock(RUN).acquire()
  assert holder(RUN)["run_id"] == "racer"


RACER = """
import os, sys, time
from mmtl import workdir
control, me = sys.argv[1], sys.argv[2]
open(os.path.join(control, "ready" + me), "w").close()
while not os.path.exists(os.path.join(control, "go")):
  time.sleep(0.001)
try:
  workdir.RunLock(os.path.join(control, "run"), me).acquire()
  result = "won"
except workdir.WorkdirLocked:
  result = "locked"
with open(os.path.join(control, "partial" + me), "w") as f:  # renamed whole: never read empty
  f.write(result)
os.replace(os.path.join(control, "partial" + me), os.path.join(control, "result" + me))
while not os.path.exists(os.path.join(control, "done")):  # Holds the lock until all have tried.
  time.sleep(0.01)
"""


def wait_for(paths, timeout_s=60.0):
  deadline = time.monotonic() + timeout_s
  while not all(p.exists() for p in paths):
    assert time.monotonic() < deadline, "racers did not get there"
    time.sleep(0.01)


@pytest.mark.parametrize("stale", [False, True], ids=["free", "dead-run's-lock"])
def test_racing_processes_one_wins(tmp_path, dead_pid, stale):
  if stale:
    RunLock(tmp_path / "run", run_id="crashed").acquire()
    rewrite(tmp_path / "run", pid=dead_pid)
  names = [str(i) for i in range(4)]
  racers = [
    process.start([sys.executable, "-c", RACER, str(tmp_path), name], cwd=REPO) for name in names
  ]
  try:
    wait_for([tmp_path / f"ready{name}" for name in names])
    (tmp_path / "go").touch()
    wait_for([tmp_path / f"result{name}" for name in names])
    results = {name: (tmp_path / f"result{name}").read_text() for name in names}
  finally:
    (tmp_path / "done").touch()
    for racer in racers:
      try:
        racer.wait(timeout=60)
      finally:
        process.kill_group(racer)
  winners = [name for name, result in results.items() if result == "won"]
  assert len(winners) == 1, results
  assert holder(tmp_path / "run")["run_id"] == winners[0]
