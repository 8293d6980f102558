"""Stopping a run on SIGTERM or SIGINT at a step every process agrees on, to save it.

Machines announce that they go away with SIGTERM: a spot or preemptible VM's preemption,
a TPU maintenance event, SLURM's `--signal` ahead of the time limit, `scancel`,
`launch/tpu_vm.sh stop`; Ctrl-C (a notebook's "interrupt") sends SIGINT. Killed at once,
a run loses every step since its last checkpoint. Inside `StopSignals` a signal only asks
the run to stop: the train loop calls `reached()` after every step and, once it is
True, saves that step and exits with EXIT_CODE, so the same command continues from it.

Several processes (jax.distributed) must all save the same step. JAX's preemption
service does that (`multihost_utils.reached_preemption_sync_point`, as orbax's
`reached_preemption` and MaxText use it): it catches SIGTERM on any host, tells the
others, and all stop at the step after the furthest one any of them had reached; SIGINT
is passed on to it as SIGTERM. One process without jax.distributed uses a Python signal
handler. Further signals are noted and ignored, so the save in progress completes;
SIGKILL still ends a process at once, and the previous checkpoint then stays the latest
intact one (orbax commits a step atomically).
"""

from __future__ import annotations

from collections.abc import Callable
import os
import signal
import threading
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils

# os.EX_TEMPFAIL of sysexits.h, "temporary failure; the user is invited to retry": the run
# saved its step and stopped on a signal; rerunning the same command continues it.
EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _write_stderr(message: str) -> None:
  # os.write, not print: a handler that prints while the interrupted code prints raises
  # "reentrant call" in Python's buffered writer.
  os.write(2, f"{message}\n".encode())


class StopSignals:
  """Within `with StopSignals():`, SIGTERM and SIGINT ask the run to stop after a step.

  `reached()`, called once after every step, is True after the step to save and stop at,
  the same one on every process. Outside the block (setup, the final evaluation) one
  process keeps Python's handlers: a signal stops it at once, with nothing unsaved to
  lose. JAX's preemption service catches SIGTERM for the whole life of a jax.distributed
  process: there a SIGTERM before the block stops the run after its first step, and one
  after it is logged and has no effect.
  """

  def __init__(self) -> None:
    self.received: str | None = None  # The first signal's name (one process only).
    self._synced = False
    # Steps run inside the block: the counter JAX's preemption service agrees on. Not the
    # train step: a notice that arrives before the first call is placed after counter 0,
    # which a resumed run's step numbers would never meet again.
    self._steps = 0
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> StopSignals:
    if threading.current_thread() is not threading.main_thread():
      logging.warning("Training outside the main thread: signals stop it without a save.")
      return self
    if jax.distributed.is_initialized():
      if not jax.config.jax_enable_preemption_service:
        logging.warning(
          "jax_enable_preemption_service is off: a signal stops this job without a save."
        )
        return self
      self._synced = True
      self._install(signal.SIGINT, self._forward_to_preemption_service)
    else:
      for signum in SIGNALS:
        self._install(signum, self._ask_to_stop)
    return self

  def __exit__(self, *exc: Any) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def reached(self) -> bool:
    """Whether to save the step just run and stop: the same answer at the same step on
    every process."""
    self._steps += 1
    if self._synced:
      return multihost_utils.reached_preemption_sync_point(self._steps)
    return self.received is not None

  def describe(self) -> str:
    """The signal that stopped the run, as far as this process knows it."""
    return self.received or f"SIGTERM or SIGINT to one of the {jax.process_count()} processes"

  def _install(self, signum: int, handler: Callable[[int, Any], None]) -> None:
    self._previous[signum] = signal.signal(signum, handler)

  def _ask_to_stop(self, signum: int, frame: Any) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.received is None:
      self.received = name
      _write_stderr(f"{name}: saving the step in flight, then stopping.")
    else:
      _write_stderr(
        f"{name} again: still stopping after saving; kill -9 stops at once, leaving the "
        "previous checkpoint the latest."
      )

  def _forward_to_preemption_service(self, signum: int, frame: Any) -> None:
    del signum, frame
    _write_stderr("SIGINT: passed on as SIGTERM to JAX's preemption service (every host stops).")
    os.kill(os.getpid(), signal.SIGTERM)
