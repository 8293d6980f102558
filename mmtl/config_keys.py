"""How a component declares the config keys of its section, and the error for a bad one
(with the one line a command-line tool prints for it).

Components (the input pipeline, optimizer, evaluators, distillation, LoRA) state
their keys with defaults or types in these terms and check them with
`check_keys`; `mmtl.config` gathers every declaration into the run's schema.
This module imports nothing from mmtl, so any component can use it without
depending on the config system that depends on the components.

A schema is a nested dict: a leaf is a default value (its type is the expected
type; None: any), a type or tuple of types (no default); `ANY_NAME` as the only
key: entries of any name, each following its value; `FREE`: anything.
"""

from __future__ import annotations

from collections.abc import Sequence
import difflib
from typing import Any

ANY_NAME = "*"
FREE = "<free-form>"
INPUT_SECTION = "<config.input section>"  # Replaced by the input pipeline's keys.
RULES = (str, list, tuple)  # A regex or a list of regexes / (regex, value) pairs.


class ConfigError(ValueError):
  """A config key is unknown or a value is unusable."""


def error_line(error: BaseException) -> str:
  """What a command-line tool prints for an error the user can fix: its kind once, then
  its message on one line (line breaks folded), so the last line of a log says it all."""
  return f"{type(error).__name__}: {' '.join(str(error).split())}"


def check_keys(cfg: Any, known: Sequence[str], where: str) -> None:
  """Raises ConfigError naming the first key of `cfg` (a mapping or key list) not in `known`.

  Every config section in mmtl checks its keys through here, so a typo fails the
  same way everywhere, with a did-you-mean hint.
  """
  for key in cfg.keys() if hasattr(cfg, "keys") else cfg:
    if key not in known:
      close = difflib.get_close_matches(key, list(known), n=1)
      hint = f" Did you mean {where}.{close[0]}?" if close else ""
      raise ConfigError(
        f"Unknown config key {where}.{key}.{hint} Known keys of {where}: "
        f"{', '.join(sorted(known))}."
      )
