"""Checkpoint integrity: checksums after commit, fallback to an intact step, failed saves."""

import contextlib
import errno
import hashlib
import json
import re
import threading
import time

from etils import epath
import numpy as np
from orbax.checkpoint._src.checkpointers import async_checkpointer
import pytest

from mmtl import checkpoint, process

TARGET = {"step": np.int32(0), "params": {"w": np.zeros(4, np.float32)}}


def _state(step):
  return {"step": np.int32(step), "params": {"w": np.full((4,), step, np.float32)}}


def _big_state(step):
  """320 kB that do not compress."""
  return {
    "step": np.int32(step),
    "params": {"w": np.random.default_rng(step).random(80_000, np.float32)},
  }


def _save_steps(directory, steps):
  with checkpoint.CheckpointManager(directory) as manager:
    for step in steps:
      manager.save(step, _state(step), data_state={"position": step})


def _array_file(directory, step):
  """The OCDBT data file holding the params of `step` (what a restore reads)."""
  return next((directory / str(step) / "params" / "d").iterdir())


def _flip(path):
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0xFF
  path.write_bytes(bytes(data))


def _truncate(path):
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])


def test_checksum_recorded_after_commit_on_the_hasher_thread(tmp_path, monkeypatch):
  threads = []
  digest_files = checkpoint._digest_files
  monkeypatch.setattr(
    checkpoint,
    "_digest_files",
    lambda root: (threads.append(threading.current_thread().name), digest_files(root))[1],
  )
  manager = checkpoint.CheckpointManager(tmp_path, keep=2)
  manager.save(1, _state(1), data_state={"position": 1})
  manager.save(2, _state(2), data_state={"position": 2})
  manager.wait()
  record = json.loads((tmp_path / "1.checksum.json").read_text())
  data_file = tmp_path / "1" / "data" / "process_0-of-1.json"
  assert record["files"]["data/process_0-of-1.json"] == [
    data_file.stat().st_size,
    hashlib.sha256(data_file.read_bytes()).hexdigest(),
  ]
  assert any(name.startswith("params/") for name in record["files"])
  assert (tmp_path / "2.checksum.json").exists()
  assert threads and all(name.startswith("checkpoint_checksum") for name in threads)
  assert manager.verify(1) and manager.verify(2)

  manager.save(3, _state(3))  # keep=2 deletes step 1, then its checksum goes too
  manager.close()
  assert sorted(p.name for p in tmp_path.glob("*.checksum.json")) == [
    "2.checksum.json",
    "3.checksum.json",
  ]
  assert checkpoint.saved_steps(tmp_path) == [2, 3]  # orbax ignores the records
  with checkpoint.CheckpointManager(tmp_path) as manager:
    (tmp_path / "3.checksum.json").unlink()  # killed between the commit and the hashing
    assert manager.verify(3) is False
    step, state, data_state = manager.restore_latest_intact(TARGET)
  assert step == 3 and data_state is None
  np.testing.assert_array_equal(state["params"]["w"], np.full(4, 3.0))


@pytest.mark.parametrize(
  "damage,checksum",
  [
    ("flip", True),
    ("truncate", True),
    ("truncate", False),
    ("delete_input_state", True),
    ("delete_input_state", False),
    ("delete_data", False),
  ],
)
def test_corrupt_latest_falls_back_to_previous(tmp_path, capsys, damage, checksum):
  directory = tmp_path / "checkpoints"
  _save_steps(directory, [1, 2])
  if damage == "flip":
    _flip(_array_file(directory, 2))
  elif damage == "truncate":
    _truncate(_array_file(directory, 2))
  elif damage == "delete_input_state":
    (directory / "2" / "data" / "process_0-of-1.json").unlink()
  else:
    for path in (directory / "2" / "data").iterdir():
      path.unlink()
    (directory / "2" / "data").rmdir()
  if not checksum:
    (directory / "2.checksum.json").unlink()

  asked = []
  with checkpoint.CheckpointManager(directory) as manager:
    step, state, data_state = manager.restore_latest_intact(
      lambda step: asked.append(step) or TARGET
    )
    assert asked == ([1] if checksum else [2, 1])  # A checksum mismatch is not even restored.
    assert (step, data_state) == (1, {"position": 1})
    np.testing.assert_array_equal(state["params"]["w"], np.full(4, 1.0))
    assert int(state["step"]) == 1
    assert manager.all_steps() == [1] and manager.latest_step() == 1
    manager.save(2, _state(2), data_state={"position": 2})  # the run goes on from step 1
    manager.wait()
    assert manager.verify(2)
  corrupt = tmp_path / checkpoint.CORRUPT_DIR
  assert [p.name for p in corrupt.iterdir()] == ["2"]
  assert (corrupt / "2" / "params").is_dir()  # moved, not deleted
  assert (corrupt / "2" / "2.checksum.json").exists() == checksum
  warning = capsys.readouterr().err
  assert "Checkpoint step 2" in warning and str(corrupt / "2") in warning
  with checkpoint.CheckpointManager(directory) as manager:
    assert manager.all_steps() == [1, 2]


def test_every_checkpoint_corrupt(tmp_path):
  directory = tmp_path / "checkpoints"
  _save_steps(directory, [1, 2])
  _flip(_array_file(directory, 1))
  _truncate(_array_file(directory, 2))
  with checkpoint.CheckpointManager(directory) as manager:
    with pytest.raises(
      checkpoint.CheckpointCorrupt,
      match="every step is corrupt .*step 2.*step 1.* all were moved aside to "
      ".*checkpoints_corrupt; rerunning starts from scratch",
    ):
      manager.restore_latest_intact(TARGET)
    assert manager.all_steps() == [] and manager.latest_step() is None
    assert manager.restore_latest_intact(TARGET) is None
    manager.save(1, _state(1))
    manager.wait()
    _flip(_array_file(directory, 1))
    with pytest.raises(checkpoint.CheckpointCorrupt):
      manager.restore_latest_intact(TARGET)
  assert sorted(p.name for p in (tmp_path / checkpoint.CORRUPT_DIR).iterdir()) == ["1", "1.1", "2"]


def test_no_checkpoints(tmp_path):
  assert checkpoint.saved_steps(tmp_path / "checkpoints") == []
  assert not (tmp_path / "checkpoints").exists()  # The listing creates nothing.
  with checkpoint.CheckpointManager(tmp_path / "checkpoints") as manager:
    assert manager.restore_latest_intact(TARGET) is None


def test_checksum_intact_but_target_mismatch_moves_nothing(tmp_path):
  _save_steps(tmp_path, [1])
  with checkpoint.CheckpointManager(tmp_path) as manager:
    with pytest.raises(
      checkpoint.CheckpointError, match="matches its checksum but does not restore"
    ):
      manager.restore_latest_intact({**TARGET, "opt_state": {"mu": np.zeros(4, np.float32)}})
    assert manager.all_steps() == [1]


def _save_as_two_processes(self, directory, args):
  for i, state in enumerate(args.state):
    (epath.Path(directory) / f"process_{i}-of-2.json").write_text(json.dumps(state))


@pytest.mark.parametrize(
  "states,expected",
  [
    ([{"step": 5}, {"step": 5}], {"step": 5}),  # one global stream: carries over
    ([{"shard": 0}, {"shard": 1}], None),
  ],
)  # per-process states: starts afresh
def test_input_state_of_another_process_count(tmp_path, monkeypatch, states, expected):
  with monkeypatch.context() as patch:
    patch.setattr(checkpoint._ProcessJsonHandler, "save", _save_as_two_processes)
    with checkpoint.CheckpointManager(tmp_path) as manager:
      manager.save(1, _state(1), data_state=states)
  with checkpoint.CheckpointManager(tmp_path) as manager:
    step, _, data_state = manager.restore_latest_intact(TARGET)
    assert (step, data_state) == (1, expected)
    assert manager.data_state() == expected


def test_input_state_missing_for_the_saving_process_count(tmp_path):
  (tmp_path / "process_1-of-1.json").write_text("{}")
  with pytest.raises(checkpoint.CheckpointCorrupt, match="process_0-of-1.json is missing"):
    checkpoint._ProcessJsonHandler().restore(epath.Path(tmp_path))


def _wait_committed_or_failed(manager, step):
  """Polls check_for_errors (as the trainer does after each step) until `step` is committed."""
  deadline = time.monotonic() + 60
  while not (manager.directory / str(step)).exists():
    manager.check_for_errors()
    assert time.monotonic() < deadline, f"step {step} neither committed nor failed"
    time.sleep(0.01)


def test_disk_full_stops_with_one_line(tmp_path):
  disk = tmp_path / "disk"
  disk.mkdir()
  mount = process.run(
    ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
    capture_output=True,
    text=True,
    timeout=60,
  )
  if mount.returncode != 0:
    pytest.skip(
      f"cannot mount a small tmpfs here ({mount.stderr.strip()}); "
      "test_failed_async_save_is_reported covers the translation"
    )
  try:
    directory = disk / "checkpoints"
    manager = checkpoint.CheckpointManager(directory, keep=100)
    with pytest.raises(checkpoint.CheckpointSaveError) as failure:
      for step in range(1, 30):
        manager.save(step, _big_state(step))
        _wait_committed_or_failed(manager, step)
    with contextlib.suppress(checkpoint.CheckpointSaveError):
      manager.close()  # The save in flight when a checksum could not be written may fail too.
    message = str(failure.value)
    # The full disk fails a save (the last intact step is the one before) or the
    # checksum record of a committed step (that step is the last intact one).
    what, step = re.match(
      r"(Saving|Recording the checksum of committed) checkpoint step (\d+) ", message
    ).groups()
    last = int(step) - 1 if what == "Saving" else int(step)
    assert "\n" not in message and "No space left on device" in message, message
    assert str(directory) in message and f"resume from step {last}" in message, message
    assert "free space or move the workdir" in message, message

    with checkpoint.CheckpointManager(directory, keep=100) as manager:
      assert manager.restore_latest_intact(_big_state(0))[0] >= last  # resumes as the message says
      with pytest.raises(OSError), open(directory / "filler", "wb", buffering=0) as filler:
        while True:
          filler.write(b"\0" * 4096)
      with pytest.raises(checkpoint.CheckpointSaveError, match="No space left on device"):
        manager.save(last + 1, _state(last + 1))
        manager.wait()
  finally:
    process.run(["umount", str(disk)], check=True, timeout=60)


def test_failed_async_save_is_reported(tmp_path, monkeypatch):
  def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  manager = checkpoint.CheckpointManager(tmp_path, keep=2)
  manager.save(1, _state(1))
  manager.wait()
  monkeypatch.setattr(async_checkpointer, "_background_wait_for_commit_futures", no_space)
  manager.save(2, _state(2))
  with pytest.raises(checkpoint.CheckpointSaveError) as failure:
    _wait_committed_or_failed(manager, 2)
  assert str(failure.value) == (
    f"Saving checkpoint step 2 in {tmp_path} failed: OSError: [Errno 28] No space left on "
    "device; the last intact checkpoint is step 1: free space or move the workdir, then rerun "
    "the same command to resume from step 1."
  )
  manager.check_for_errors()  # each failure is reported once
  manager.wait()
  assert manager.all_steps() == [1]

  manager.save(3, _state(3))
  with pytest.raises(checkpoint.CheckpointSaveError, match="step 3 .* resume from step 1"):
    manager.save(4, _state(4))  # the next save reports the previous one's failure
  manager.save(4, _state(4))
  with pytest.raises(checkpoint.CheckpointSaveError, match="step 4 .* resume from step 1"):
    manager.wait()
  monkeypatch.undo()
  manager.save(5, _state(5))
  manager.close()
  assert manager.all_steps() == [1, 5]


def test_failed_checksum_is_reported(tmp_path, monkeypatch):
  def no_space(root):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(checkpoint, "_digest_files", no_space)
  with checkpoint.CheckpointManager(tmp_path) as manager:
    manager.save(1, _state(1))
    with pytest.raises(
      checkpoint.CheckpointSaveError,
      match="Recording the checksum of committed checkpoint step 1 .* No space "
      "left on device; the last intact checkpoint is step 1",
    ):
      manager.wait()


def test_cleanup_after_a_failure_does_not_replace_it(tmp_path, monkeypatch, caplog):
  release = threading.Event()

  def no_space(root):
    release.wait(30)  # Both checksums fail, after both saves.
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(checkpoint, "_digest_files", no_space)
  manager = checkpoint.CheckpointManager(tmp_path)
  manager.save(1, _state(1))
  manager.save(2, _state(2))
  release.set()
  with pytest.raises(
    checkpoint.CheckpointSaveError, match="checksum of committed checkpoint step 1"
  ):
    manager.wait()
  manager.wait()  # as in the trainer's `finally:`, after the error that stopped it
  manager.close()
  assert "checksum of committed checkpoint step 2" in caplog.text
