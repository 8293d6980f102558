"""Speech synthesis with eSpeak NG, deterministic: text -> int16 samples at 22.05 kHz.

eSpeak NG's library and voice data come bundled in the `espeakng-loader` wheel; `ESpeak`
calls the library through ctypes. Its synthesiser keeps state from one utterance to the
next (the same call gives other samples the second time, whatever its random seed), so
`Synthesiser` speaks each utterance in a fresh copy of a never-used one: a helper process
(`serve`, which imports nothing but this module) forked once per utterance. This module
imports no other part of mmtl, so that helper starts in a fraction of a second.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import struct
import subprocess
import sys
import traceback
from typing import Any

import numpy as np

RATE = 22_050  # eSpeak NG's output rate
# The helper process's program: this file run as a module of its own (not as a script,
# which would put mmtl/ first on sys.path, nor through the mmtl package, which may not be
# importable from where the caller runs).
_SERVE = (
  "import importlib.util as u; s = u.spec_from_file_location('mmtl_espeak', {path!r}); "
  "m = u.module_from_spec(s); s.loader.exec_module(m); m.serve()"
)


class ESpeak:
  """eSpeak NG through ctypes, in this process (stateful: see the module docstring)."""

  _SYNCHRONOUS = 2  # AUDIO_OUTPUT_SYNCHRONOUS: samples come back through the callback
  _RATE, _PITCH = 1, 3  # espeak_PARAMETER: espeakRATE, espeakPITCH
  _CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
  )

  def __init__(self):
    import espeakng_loader  # pylint: disable=g-import-not-at-top

    self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
    rate = self.lib.espeak_Initialize(
      self._SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0
    )
    if rate != RATE:
      raise RuntimeError(f"eSpeak NG did not start (espeak_Initialize returned {rate}).")
    self.chunks: list[np.ndarray] = []
    self.callback = self._CALLBACK(self._collect)  # kept referenced while the library holds it
    self.lib.espeak_SetSynthCallback(self.callback)

  def _collect(self, samples, count, events) -> int:
    del events
    if count > 0:
      self.chunks.append(np.ctypeslib.as_array(samples, (count,)).copy())
    return 0  # continue

  def say(self, text: str, voice: str, rate: int, pitch: int, seed: int) -> np.ndarray:
    """`text` spoken by `voice` ("en+m3") at `rate` words/min and base `pitch` (0-99);
    `seed` seeds the synthesiser's random draws."""
    self.chunks = []
    if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
      raise ValueError(f"eSpeak NG has no voice {voice!r}.")
    self.lib.espeak_SetParameter(self._RATE, rate, 0)
    self.lib.espeak_SetParameter(self._PITCH, pitch, 0)
    self.lib.espeak_ng_SetRandSeed(ctypes.c_long(seed))
    data = text.encode()
    if (err := self.lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, 0, None, None)) != 0:
      raise RuntimeError(f"eSpeak NG failed to speak {text!r} (error {err}).")
    return np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int16)


def serve() -> None:
  """The synthesis process (`Synthesiser` starts it): reads one JSON request per line on
  stdin, answers each with a 4-byte length and the int16 samples on stdout (length -1: it
  failed). Its ESpeak is never used: each request is spoken by a forked child (this
  process runs no other thread, so forking it is safe)."""
  synth, out = ESpeak(), sys.stdout.buffer
  for line in sys.stdin:
    read, write = os.pipe()
    if (pid := os.fork()) == 0:  # the child: speak once, send the samples, exit
      status = 1
      try:
        os.close(read)
        with os.fdopen(write, "wb") as pipe:
          pipe.write(synth.say(*json.loads(line)).tobytes())
        status = 0
      except BaseException:  # never back into the loop: its error, then exit
        traceback.print_exc()
      finally:
        os._exit(status)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
      samples = pipe.read()
    _, status = os.waitpid(pid, 0)
    out.write(struct.pack("<i", len(samples) if status == 0 else -1))
    out.write(samples if status == 0 else b"")
    out.flush()


class Synthesiser:
  """Deterministic eSpeak NG speech: each `say` in a fresh copy of an unused synthesiser
  (a helper process, `serve`, forked per utterance), so the samples depend on the
  arguments only. A context manager; each call has a deadline, after which the helper is
  killed."""

  TIMEOUT_S = 60.0

  def __enter__(self) -> Synthesiser:
    from mmtl import process  # pylint: disable=g-import-not-at-top  (not in the helper)

    # Its own process group: closing kills it and any child it forked.
    self.process = process.start(
      [sys.executable, "-c", _SERVE.format(path=__file__)],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
    )
    return self

  def _read(self, n: int) -> bytes:
    data = b""
    while len(data) < n:
      ready, _, _ = select.select([self.process.stdout], [], [], self.TIMEOUT_S)
      chunk = os.read(self.process.stdout.fileno(), n - len(data)) if ready else b""
      if not chunk:
        from mmtl import process  # pylint: disable=g-import-not-at-top

        status = self.process.poll()
        process.kill_group(self.process, grace_s=0)  # hung or gone: nothing of it to keep
        raise RuntimeError(
          f"The eSpeak NG process gave no samples in {self.TIMEOUT_S:g} s (it stopped with "
          f"{status}); its error, if any, is above."
        )
      data += chunk
    return data

  def say(self, text: str, voice: str, rate: int, pitch: int, seed: int) -> np.ndarray:
    request = [text, voice, rate, pitch, seed]
    try:
      self.process.stdin.write((json.dumps(request) + "\n").encode())
      self.process.stdin.flush()
    except BrokenPipeError:
      raise RuntimeError(
        f"The eSpeak NG process stopped ({self.process.poll()}); its error, if any, is above."
      ) from None
    (size,) = struct.unpack("<i", self._read(4))
    if size < 0:
      raise RuntimeError(f"eSpeak NG failed to speak {request}.")
    return np.frombuffer(self._read(size), np.int16)

  def __exit__(self, *exc: Any) -> None:
    from mmtl import process  # pylint: disable=g-import-not-at-top

    with contextlib.suppress(BrokenPipeError):  # a helper that stopped early
      self.process.stdin.close()
    try:
      self.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
      pass
    process.kill_group(self.process, grace_s=1)
    self.process.stdout.close()
