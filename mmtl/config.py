"""Config loading, checking and the workdir's copy of it.

Configs are ml_collections files `configs/x.py` with `get_config(arg=None)`
(big_vision style), loaded with `--config configs/x.py:arg` and overridden with
`--config.key=value`. An unknown key, in the file or in an override, is an
error that names it: a typo must not silently fall back to a default.

The trainer's top-level keys and their defaults are `DEFAULTS`; sections owned
by other modules check their own keys (`optim`: mmtl.optim, `input`: mmtl.data,
`evals.*`: mmtl.evaluators, `distill`: mmtl.distill, `model`: `MODEL_DEFAULTS`).
"""
from __future__ import annotations

import difflib
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from absl import flags
import ml_collections as mlc
from ml_collections import config_flags

from mmtl import workdir as workdir_lib

CONFIG_FILE = "config.json"

DEFAULTS = dict(
    seed=0,
    total_steps=1000,
    batch_size=32,         # global; each process loads batch_size / processes
    input={},              # mmtl.data: dataset, split, batch_size, preprocessing
    evals={},              # name -> evaluator config (mmtl.evaluators)
    model={},              # MODEL_DEFAULTS
    model_init={},         # tower name -> HF name/path, or dict(name=..., dont_load=[...])
    optim={},              # mmtl.optim
    loss=dict(label_smoothing=0.0),
    grad_accum_steps=1,    # microbatches per step (lax.scan): batch_size / this per pass
    prefetch_to_device=2,  # batches copied to the devices ahead of the step using them
    log_every=50,
    ckpt_every=500,
    keep_ckpts=1,          # most recent checkpoints kept (plus the best, see best_metric)
    best_metric="",        # e.g. "val/accuracy": keep the best checkpoint by it
    best_mode="max",
    early_stopping=dict(patience=0, min_delta=0.0),  # on best_metric; 0 = off
    mesh=dict(data=-1, fsdp=1, model=1),
    sharding_rules="replicate",  # preset name or [(regex, spec), ...] (mmtl.sharding)
    distill={},            # mmtl.distill: teacher_workdir, temperature, alpha
)

MODEL_DEFAULTS = dict(
    # modality -> dict(name=<HF name/path or config.json dict>, tower=None|"vision"|"text",
    #                  pool="cls"|"mean"|"pooler", kwargs={...module attrs...})
    towers={},
    modalities="",  # comma-separated subset of `towers` to use ("" = all): ablations
    fusion="concat",
    head="classification",
    num_classes=2,
    width=256,
    dropout=0.0,
    num_heads=4,
    fusion_depth=1,
    fusion_layer=-2,
    bottleneck_tokens=4,
    temperature_init=0.07,
    dtype="float32",        # compute dtype; "bfloat16" for mixed precision
    param_dtype="float32",
    remat="none",           # per-layer activation checkpointing of the towers
)
TOWER_KEYS = ("name", "tower", "pool", "kwargs")


class ConfigError(ValueError):
  """A config key is unknown or a value is unusable."""


def check_keys(cfg: Any, known: Sequence[str], where: str) -> None:
  """Raises ConfigError naming the first key of `cfg` (a mapping or key list) not in `known`.

  Every config section in mmtl checks its keys through here, so a typo fails the
  same way everywhere, with a did-you-mean hint.
  """
  for key in (cfg.keys() if hasattr(cfg, "keys") else cfg):
    if key not in known:
      close = difflib.get_close_matches(key, list(known), n=1)
      hint = f" Did you mean {where}.{close[0]}?" if close else ""
      raise ConfigError(f"Unknown config key {where}.{key}.{hint} Known keys of {where}: "
                        f"{', '.join(sorted(known))}.")


def with_defaults(config: mlc.ConfigDict) -> mlc.ConfigDict:
  """A copy of `config` with missing trainer/model keys filled from the defaults.

  Raises ConfigError naming any key that is not a trainer or model key.
  """
  out = mlc.ConfigDict(DEFAULTS)
  check_keys(config, DEFAULTS, "config")
  for key in config.keys():
    if key != "model" and isinstance(DEFAULTS[key], dict) and DEFAULTS[key]:
      check_keys(config[key], DEFAULTS[key], f"config.{key}")
  check_keys(config.get("model", {}), MODEL_DEFAULTS, "config.model")
  model = {**MODEL_DEFAULTS, **config.get("model", {})}
  for modality, tower in model["towers"].items():
    check_keys(tower, TOWER_KEYS, f"config.model.towers.{modality}")
  with out.unlocked():
    for key, value in config.items():
      if key != "model" and isinstance(DEFAULTS[key], dict) and DEFAULTS[key]:
        out[key].update(value)  # Partial sections keep the other defaults.
      elif key != "model":
        out[key] = value
    out.model = model
  return out


def define_flags() -> None:
  """`--config file.py[:arg]` with `--config.key=value` overrides."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/x.py[:arg]).",
                                  lock_config=True)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that turns ml_collections' bare AttributeError for an
  override of a non-existent key into an error naming the flag."""
  try:
    return flags.FLAGS(argv)
  except AttributeError as e:
    found = re.search(r"'([^'\\]+)", str(e))
    key = found.group(1) if found else str(e)
    bad = [a.split("=")[0] for a in argv
           if a.startswith("--config.") and key in a.split("=")[0].split(".")]
    hint = re.search(r'Did you mean "([^"]+)"', str(e))
    sys.exit(f"Unknown config key {key!r} in {bad[0] if bad else '--config.*'}: the config has no "
             f"such key.{f' Did you mean {hint.group(1)!r}?' if hint else ''} Overrides can only "
             "set keys that the config file defines.")


def to_dict(config: mlc.ConfigDict) -> dict[str, Any]:
  """Plain JSON-able dict (tuples become lists, as they will in config.json)."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def load_json(path: str | os.PathLike) -> mlc.ConfigDict:
  """A config.json (local or gs://) as a ConfigDict."""
  return mlc.ConfigDict(workdir_lib.read_json(path))


def _diff(old: Any, new: Any, prefix: str = "config") -> list[str]:
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for key in sorted(set(old) | set(new)):
      out += _diff(old.get(key, "<unset>"), new.get(key, "<unset>"), f"{prefix}.{key}")
    return out
  return [] if old == new else [f"{prefix}: {old!r} -> {new!r}"]


def _with_current_defaults(saved: dict[str, Any]) -> dict[str, Any]:
  """A saved config.json with trainer/model keys added to mmtl since it was written
  set to their defaults (new keys default to the old behaviour), so an older run
  still resumes; a config with keys mmtl no longer knows is compared as saved."""
  try:
    return to_dict(with_defaults(mlc.ConfigDict(saved)))
  except ConfigError:
    return saved


def save_or_check(config: mlc.ConfigDict, workdir: str, *, allow_change: bool = False) -> None:
  """Writes `DIR/config.json`, or checks that an existing one is the same run.

  A workdir that holds another run's config is refused (resuming it with a
  different config would silently mix two experiments in one set of
  checkpoints), unless `allow_change` (flag `--allow_config_change`). Only
  process 0 writes: on an object store every host rewriting one object at once
  would hit its rate limit.
  """
  from mmtl import distributed  # JAX: not at import time (launch/sweep.py loads config files).
  workdir_lib.makedirs(workdir)
  path = workdir_lib.path(workdir, CONFIG_FILE)
  new = to_dict(config)
  if path.exists():
    changes = _diff(_with_current_defaults(workdir_lib.read_json(path)), new)
    if changes and not allow_change:
      raise ConfigError(
          f"Workdir {workdir} holds a run with a different config ({path}):\n  "
          + "\n  ".join(changes[:20]) + "\nUse a new --workdir, or pass --allow_config_change "
          "to resume this run's checkpoints with the new config.")
  if distributed.is_main_process():
    workdir_lib.write_text(path, json.dumps(new, indent=2, sort_keys=True))


def parse_arg(arg: str | None, **defaults: Any) -> mlc.ConfigDict:
  """Config-file arguments `--config x.py:key=value,key2=value2`, typed like `defaults`.

  A comma-separated piece without `=` continues the previous value, so list-like
  values need no quoting: `modalities=image,text,init=scratch`.
  """
  values: dict[str, str] = {}
  last = None
  for piece in (arg or "").split(","):
    if "=" in piece:
      last, value = piece.split("=", 1)
      check_keys([last], defaults, "config argument")
      values[last] = value
    elif piece and last is not None:
      values[last] += "," + piece
    elif piece:
      raise ConfigError(f"Config argument {piece!r} is not key=value; arguments are "
                        f"{', '.join(f'{k}={v}' for k, v in defaults.items())}.")
  out = dict(defaults)
  for key, value in values.items():
    kind = type(defaults[key])
    if kind is bool:
      out[key] = value.lower() in ("1", "true", "yes")
    else:
      out[key] = kind(value)
  return mlc.ConfigDict(out)
