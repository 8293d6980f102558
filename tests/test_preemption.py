"""StopSignals: a signal asks the run to stop, at a step all processes agree on. The trainer
under real signals: tests/test_train.py (in process), test_reliability.py (the command
line), test_multihost.py (two jax.distributed processes)."""

import os
import signal
import threading

import jax
from jax.experimental import multihost_utils
import pytest

from mmtl import preemption


def test_one_process_stops_at_the_next_step_and_puts_the_handlers_back(capfd):
  before = {s: signal.getsignal(s) for s in preemption.SIGNALS}
  with preemption.StopSignals() as stop:
    assert not stop.reached()
    os.kill(os.getpid(), signal.SIGINT)  # No KeyboardInterrupt: a request to stop.
    assert stop.reached() and stop.received == "SIGINT" and stop.describe() == "SIGINT"
    os.kill(os.getpid(), signal.SIGTERM)  # A second signal (during the save) is only noted.
    assert stop.received == "SIGINT"
  assert {s: signal.getsignal(s) for s in preemption.SIGNALS} == before
  assert capfd.readouterr().err.splitlines() == [
    "SIGINT: saving the step in flight, then stopping.",
    "SIGTERM again: still stopping after saving; kill -9 stops at once, leaving the previous "
    "checkpoint the latest.",
  ]
  with pytest.raises(KeyboardInterrupt):  # Python's own handler again.
    os.kill(os.getpid(), signal.SIGINT)


def test_jax_distributed_processes_agree_through_jax_preemption_service(monkeypatch):
  """SIGTERM is left to JAX's preemption service, SIGINT passed on to it as SIGTERM, and the
  step to stop at is the service's, counted in steps run since the start (a resumed run's
  first step is 1 too)."""
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda step: step == 3)
  kills = []
  monkeypatch.setattr(os, "kill", lambda pid, signum: kills.append((pid, signum)))
  sigterm = signal.getsignal(signal.SIGTERM)
  with preemption.StopSignals() as stop:
    assert signal.getsignal(signal.SIGTERM) is sigterm
    signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
    assert kills == [(os.getpid(), signal.SIGTERM)]
    assert [stop.reached() for _ in range(4)] == [False, False, True, False]
    assert stop.received is None and "SIGTERM or SIGINT to one of the" in stop.describe()
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_outside_the_main_thread_signals_are_left_alone():
  handlers, reached = [], []

  def run():
    with preemption.StopSignals() as stop:
      handlers.append(signal.getsignal(signal.SIGTERM))
      reached.append(stop.reached())

  thread = threading.Thread(target=run)
  thread.start()
  thread.join(timeout=30)
  assert handlers == [signal.getsignal(signal.SIGTERM)] and reached == [False]
