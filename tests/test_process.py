"""mmtl.process: a deadline ends the whole process group, and what the command printed is kept."""

import subprocess
import sys
import textwrap

import pytest

from mmtl import bench, process
from test_sweep import HANG, assert_gone

# Prints a line, then hangs (test_sweep.HANG: a child that ignores SIGTERM, both pids written).
HANGING = HANG + 'print("started", flush=True)\nhang()\n'


@pytest.mark.timeout(60)  # Seconds when the deadline works; a hang otherwise.
def test_a_deadline_kills_the_group_and_keeps_the_output(tmp_path, monkeypatch):
  monkeypatch.setenv("FAKE_TRAIN_CALLS", str(tmp_path / "calls"))
  with pytest.raises(subprocess.TimeoutExpired) as e:
    process.run(
      [sys.executable, "-c", HANGING], timeout=2, grace_s=1, capture_output=True, text=True
    )
  assert "timed out after 2 seconds" in str(e.value)
  assert e.value.stdout == "started\n"
  assert_gone(tmp_path / "calls.pids")


@pytest.mark.timeout(60)  # Seconds when the deadline works; a hang otherwise.
def test_children_left_behind_are_killed_and_check_raises(tmp_path):
  pid_file = tmp_path / "pid"
  leave_child = textwrap.dedent(f"""\
      import subprocess, sys
      child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
      open({str(pid_file)!r}, "w").write(str(child.pid))
      sys.exit(3)
      """)
  result = process.run([sys.executable, "-c", leave_child], timeout=60)
  assert result.returncode == 3
  assert_gone(pid_file)
  with pytest.raises(subprocess.CalledProcessError):
    process.run([sys.executable, "-c", "raise SystemExit(1)"], timeout=60, check=True)
  echoed = process.run(["cat"], timeout=60, input="abc", capture_output=True, text=True)
  assert echoed.stdout == "abc"


@pytest.mark.timeout(60)  # Seconds when the deadline works; a hang otherwise.
def test_a_hung_benchmark_worker_is_an_error_row(tmp_path, monkeypatch):
  """mmtl.bench's isolated worker (here a stand-in interpreter that hangs) gets
  --worker_timeout seconds; the measurement becomes an error, the benchmark goes on."""
  fake_python = tmp_path / "python"
  fake_python.write_text("#!/bin/sh\necho 'compiling...' >&2\nexec sleep 600\n")
  fake_python.chmod(0o755)
  monkeypatch.setattr(sys, "executable", str(fake_python))
  result = bench.run_measurement(dict(kind="matmul"), isolate=True, env={}, timeout=2)
  assert result["error"].startswith("worker timed out after --worker_timeout=2s: compiling...")
