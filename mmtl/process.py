"""Child processes with a deadline: on a timeout (or Ctrl-C) the whole process group is
killed, so no trainer, `jax.distributed` task or data worker outlives the command that
started it, and a hung child fails with its command and deadline instead of hanging its
caller. Used by launch/sweep.py, launch/search.py, mmtl.bench and the tests."""

from __future__ import annotations

from collections.abc import Sequence
import os
import signal
import subprocess
from typing import Any

GRACE_S = 10.0  # Between SIGTERM and SIGKILL: time to save a checkpoint and release a lock.


def start(cmd: Sequence[Any], **popen_kwargs: Any) -> subprocess.Popen:
  """`subprocess.Popen` leading a process group of its own (a new session): `kill_group`
  reaches everything it starts, and a terminal's Ctrl-C reaches only the caller, which
  decides (through `kill_group`) how its children end."""
  return subprocess.Popen(cmd, start_new_session=True, **popen_kwargs)


def _signal_group(pgid: int, signum: int) -> None:
  try:
    os.killpg(pgid, signum)
  except (ProcessLookupError, PermissionError):
    pass  # The group is gone already.


def kill_group(proc: subprocess.Popen, grace_s: float = GRACE_S) -> None:
  """Ends `proc` (started by `start`) and its process group: SIGTERM, then SIGKILL to what
  is left after `grace_s`; returns once `proc` has exited."""
  if proc.poll() is None:
    _signal_group(proc.pid, signal.SIGTERM)
    try:
      proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
      pass
  _signal_group(proc.pid, signal.SIGKILL)  # Also children that outlived their parent.
  proc.wait()


def run(
  cmd: Sequence[Any],
  *,
  timeout: float | None,
  check: bool = False,
  capture_output: bool = False,
  input: str | bytes | None = None,
  grace_s: float = GRACE_S,
  **popen_kwargs: Any,
) -> subprocess.CompletedProcess:
  """`subprocess.run` whose timeout (seconds; None: none) kills the whole process group and
  then raises `subprocess.TimeoutExpired` with what the command printed (its pipes are
  drained, so a chatty child cannot block on a full pipe). Processes the command left
  running in its group when it exits are killed too."""
  if input is not None:
    popen_kwargs["stdin"] = subprocess.PIPE
  if capture_output:
    popen_kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  with start(cmd, **popen_kwargs) as proc:
    try:
      stdout, stderr = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
      kill_group(proc, grace_s)
      stdout, stderr = proc.communicate()
      raise subprocess.TimeoutExpired(proc.args, timeout, stdout, stderr) from None
    except BaseException:  # KeyboardInterrupt, SIGTERM turned into an exception.
      kill_group(proc, grace_s)
      raise
    finally:
      _signal_group(proc.pid, signal.SIGKILL)
  result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
  if check:
    result.check_returncode()
  return result
