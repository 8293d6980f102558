"""Config loading, overrides, checking and the workdir's copy of it.

Configs are ml_collections files `configs/x.py` with `get_config(arg=None)`
(big_vision style), loaded with `--config configs/x.py:arg` and overridden with
`--config.key=value`. Every key mmtl knows can be overridden on any config,
whether the file sets it or not; an unknown key, in the file or in an
override, is an error that names it with a did-you-mean hint, and a value of
the wrong type (`lr="3e-3"`, `--config.total_steps=abc`) is an error naming
the type expected.

What mmtl knows is `schema()`: the trainer's keys and defaults (`DEFAULTS`),
`MODEL_DEFAULTS`, and the keys each module declares for its own section
(`input`: mmtl.data, `optim`: mmtl.optim, `distill`: mmtl.distill, `domain_adaptation`:
mmtl.domain_adaptation, `evals.<name>`: mmtl.evaluators, the heads' keys of `model` and
`loss`: mmtl.heads).
"""

from __future__ import annotations

import ast
from collections.abc import Mapping, Sequence
import importlib.util
import json
import os
from pathlib import Path
import sys
from typing import Any

from absl import flags
import ml_collections as mlc

from mmtl import workdir as workdir_lib
from mmtl.config_keys import ANY_NAME, FREE, INPUT_SECTION, RULES, ConfigError, check_keys

CONFIG_FILE = "config.json"

DEFAULTS = dict(
  seed=0,
  total_steps=1000,
  batch_size=32,  # global; each process loads batch_size / processes
  input={},  # mmtl.data: dataset, split, batch_size, preprocessing
  evals={},  # name -> evaluator config (mmtl.evaluators)
  model={},  # model_defaults()
  model_init={},  # tower name -> HF name/path, or dict(name=..., dont_load=[...])
  peft_init="",  # a folder of `mmtl.export --peft`: its LoRA/adapter/prompt params (mmtl.peft)
  optim={},  # mmtl.optim
  loss={},  # the heads' loss keys (mmtl.heads: Head.loss_config), e.g. label_smoothing
  grad_accum_steps=1,  # microbatches per step (lax.scan), same objective as the full
  # batch (contrastive: gradient cache; see mmtl.train_step)
  prefetch_to_device=2,  # batches copied to the devices ahead of the step using them
  log_every=50,
  ckpt_every=500,
  keep_ckpts=2,  # most recent checkpoints kept (plus the best): >= 2 leaves a fallback
  best_metric="",  # e.g. "val/accuracy": keep the best checkpoint by it
  best_mode="max",
  early_stopping=dict(patience=0, min_delta=0.0),  # on best_metric; 0 = off
  mesh=dict(data=-1, fsdp=1, model=1),
  sharding_rules="replicate",  # preset name or [(regex, spec), ...] (mmtl.sharding)
  distill={},  # mmtl.distill: teacher_workdir, temperature, alpha
  # mmtl.domain_adaptation: method (dann, coral, mmd), input (the unlabeled target domain,
  # over config.input), weight, schedule, gamma, mmd_kernels, mmd_kernel_mul; {} = off
  domain_adaptation={},
  # mmtl.data.folds: folds (0: off), fold (the one held out), seed, evaluator (scores it).
  cross_validation={},
  # mmtl.feature_cache: locked towers run once per example (enable); entries in `dir`,
  # else $MMTL_FEATURE_CACHE_DIR (sweeps and searches share one), else <workdir>/feature_cache.
  feature_cache=dict(enable=False, dir=""),
  # mmtl.tracking: backends ("wandb", "mlflow"; none by default), project, name, wandb_mode,
  # mlflow_uri.
  tracking={},
)

MODEL_DEFAULTS = dict(
  # modality -> dict(name=<HF name/path or config.json dict>, tower=None|"vision"|"text",
  #                  pool="cls"|"mean"|"pooler", kwargs={...module attrs...},
  #                  and the modalities' own sections: `Modality.tower_config`, e.g. the
  #                  video tower's temporal={...})
  towers={},
  modalities="",  # comma-separated subset of `towers` to use ("" = all): ablations
  unused_towers=(),  # tower keys kept in `towers` that are no modality's (else a typo error)
  fusion="concat",
  head="classification",  # and the keys the heads declare (mmtl.heads: Head.config):
  # num_classes (classification, regression); temperature_init, contrastive_loss (contrastive)
  width=256,
  dropout=0.0,
  num_heads=4,
  fusion_depth=1,
  fusion_layer=-2,
  bottleneck_tokens=4,
  domain_classifier=0,  # DANN's domain classifier's hidden width (mmtl.domain_adaptation)
  dtype="float32",  # compute dtype; "bfloat16" for mixed precision
  param_dtype="float32",
  remat="none",  # per-layer activation checkpointing of the towers
  frozen_tower_mode="inference",  # fully frozen towers in training: "inference" (no
  # dropout, as LiT's locked tower) or "train"
  # head="captioning": the text decoder (name: HF GPT-2/BERT checkpoint or config.json dict;
  # cross_attention: give it cross-attention layers; kwargs: module attrs) and how it reads
  # the towers' tokens ("cross_attention" or "prefix"); see mmtl.models.fusion.
  decoder={},
  conditioning="cross_attention",
  batch_stats="trainable",  # BatchNorm statistics updated in training: "trainable" (of layers
  # whose params train), "none" (running statistics everywhere) or "all"
)
TOWER_KEYS = dict(name=(str, dict), tower=str, pool=str, kwargs={})
DECODER_KEYS = dict(name=(str, dict), cross_attention=True, kwargs={})


def trainer_defaults() -> dict[str, Any]:
  """`DEFAULTS`, with `loss` holding every registered head's loss keys (mmtl.heads)."""
  from mmtl import heads  # JAX: imported when a config is checked, not on import.

  return {**DEFAULTS, "loss": heads.config_keys("loss_config")}


def model_defaults() -> dict[str, Any]:
  """`MODEL_DEFAULTS` and every registered head's `config.model` keys (mmtl.heads)."""
  from mmtl import heads

  keys = heads.config_keys("config")
  if clash := sorted(set(keys) & set(MODEL_DEFAULTS)):
    raise ValueError(f"Heads declare config.model keys that the model has already: {clash}.")
  return {**MODEL_DEFAULTS, **keys}


def schema() -> dict[str, Any]:
  """Every key a config can set, with its default or type (see the markers above)."""
  # Imported late (JAX).
  from mmtl import data, distill, domain_adaptation, evaluators, modalities, optim, tracking
  from mmtl.data import folds

  input_keys = data.defaults().to_dict()
  input_keys["builder_config"] = FREE

  def resolve(section: Any) -> Any:
    if section == INPUT_SECTION:
      return input_keys
    if isinstance(section, dict):
      return {k: resolve(v) for k, v in section.items()}
    return section

  out = trainer_defaults()
  out.update(
    input=input_keys,
    evals={ANY_NAME: resolve(evaluators.CONFIG_KEYS)},
    model={
      **model_defaults(),
      "towers": {ANY_NAME: {**TOWER_KEYS, "kwargs": FREE, **modalities.tower_config_keys()}},
      "decoder": {**DECODER_KEYS, "kwargs": FREE},
    },
    model_init={ANY_NAME: FREE},
    optim=resolve(optim.CONFIG_KEYS),
    distill=distill.CONFIG_KEYS,
    domain_adaptation=resolve(domain_adaptation.CONFIG_KEYS),
    cross_validation=folds.CONFIG_KEYS,
    tracking=tracking.CONFIG_KEYS,
    sharding_rules=RULES,
  )
  return out


def _type_names(kinds: Any) -> str:
  kinds = kinds if isinstance(kinds, tuple) else (kinds,)
  names = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "a bool",
    "list": "a list",
    "tuple": "a tuple",
    "dict": "a dict",
    "ConfigDict": "a dict",
    "NoneType": "None",
  }
  return " or ".join(dict.fromkeys(names.get(k.__name__, k.__name__) for k in kinds))


def _declared_types(spec: Any) -> tuple[type, ...] | None:
  """The types a schema leaf names (a default's type, a type, or a tuple of types);
  None for leaves that take anything (FREE, a None default) and for sections."""
  if spec is None or isinstance(spec, dict) or (isinstance(spec, str) and spec == FREE):
    return None
  if isinstance(spec, type):
    return (spec,)
  if isinstance(spec, tuple) and spec and all(isinstance(s, type) for s in spec):
    return spec
  return (type(spec),)


def _accepted_types(kinds: tuple[type, ...]) -> tuple[type, ...]:
  """`kinds` widened the way values are written: an int where a float is expected,
  a list for a tuple and back, a ConfigDict for a dict."""
  out = list(kinds)
  if float in kinds:
    out.append(int)
  if list in kinds or tuple in kinds:
    out += [list, tuple]
  if dict in kinds:
    out.append(mlc.ConfigDict)
  return tuple(dict.fromkeys(out))


def _type_ok(value: Any, kinds: tuple[type, ...]) -> bool:
  if isinstance(value, bool):  # bool is an int to isinstance, never to a config.
    return bool in kinds
  return isinstance(value, _accepted_types(kinds))


def _is_section(value: Any) -> bool:
  return isinstance(value, (Mapping, mlc.ConfigDict))


def _child(spec: Mapping[str, Any], key: str, where: str) -> Any:
  """The schema of `where.key`, or ConfigError naming it with a did-you-mean."""
  if ANY_NAME in spec:
    return spec[ANY_NAME]
  if key not in spec:
    check_keys([key], spec, where)
  return spec[key]


def check(config: Any, spec: Any = None, where: str = "config") -> None:
  """Raises ConfigError for the first unknown key or wrongly typed value of `config`."""
  spec = schema() if spec is None else spec
  for key, value in config.items():
    sub = _child(spec, key, where)
    path = f"{where}.{key}"
    if value is None or (isinstance(sub, str) and sub == FREE):
      continue
    if isinstance(sub, dict):
      if not _is_section(value):
        raise ConfigError(
          f"{path}={value!r} is {_type_names(type(value))}; expected a dict "
          f"(a section with keys {', '.join(sorted(sub))})."
        )
      check(value, sub, path)
      continue
    kinds = _declared_types(sub)
    if kinds and not _type_ok(value, kinds):
      hint = (
        " (a number in quotes is a string: write it without quotes)"
        if isinstance(value, str) and _parses_as_number(value)
        else ""
      )
      raise ConfigError(
        f"{path}={value!r} is {_type_names(type(value))}; expected {_type_names(kinds)}{hint}."
      )


def _parses_as_number(text: str) -> bool:
  try:
    float(text)
  except ValueError:
    return False
  return True


def with_defaults(config: mlc.ConfigDict) -> mlc.ConfigDict:
  """A copy of `config`, checked (`check`), with missing trainer/model keys filled
  from the defaults (sections owned by other modules are filled by them)."""
  check(config)
  defaults = trainer_defaults()
  out = mlc.ConfigDict(defaults)
  model = {**model_defaults(), **config.get("model", {})}
  with out.unlocked():
    for key, value in config.items():
      if key != "model" and isinstance(defaults[key], dict) and defaults[key]:
        out[key].update(value)  # Partial sections keep the other defaults.
      elif key != "model":
        out[key] = value
    out.model = model
  return out


# ------------------------------------------------------------- overrides ---


def parse_value(text: str, spec: Any, current: Any, where: str) -> Any:
  """`--config.X=text` as a value of the type the schema gives X; a key with no type
  (a None default, free-form sections) takes a Python literal, or the text itself."""
  kinds = _declared_types(spec)
  try:
    literal = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    literal = text
  if kinds is None:
    return literal
  if bool in kinds and text.lower() in ("true", "false", "1", "0", "yes", "no"):
    return text.lower() in ("true", "1", "yes")
  if float in kinds and _parses_as_number(text):
    return float(text)
  if int in kinds and isinstance(literal, int) and not isinstance(literal, bool):
    return literal
  if not isinstance(literal, str) and _type_ok(literal, kinds):
    if isinstance(literal, (list, tuple)) and isinstance(current, (list, tuple)):
      return type(current)(literal)
    return literal
  if str in kinds:
    return text
  if list in kinds or tuple in kinds:  # A bare comma-separated list: blank=image,text.
    return tuple(v for v in text.split(",") if v)
  example = (
    f" (its value is {current!r})"
    if current is not None
    else ""
    if isinstance(spec, (type, tuple))
    else f" (default {spec!r})"
  )
  raise ConfigError(f"{where} expects {_type_names(kinds)}{example}.")


def apply_overrides(config: mlc.ConfigDict, overrides: Sequence[tuple[str, str]]) -> mlc.ConfigDict:
  """A copy of `config` with `[("model.fusion", "gated"), ...]` set: any key of
  `schema()`, sections created on the way. An unknown key or unparsable value is
  a ConfigError naming the flag."""
  config = mlc.ConfigDict(config.to_dict() if isinstance(config, mlc.ConfigDict) else config)
  full = schema()
  for key, text in overrides:
    parts = key.split(".")
    node, spec, where = config, full, "config"
    try:
      for i, part in enumerate(parts):
        # Below a leaf (e.g. a tower's `name` given as a config dict) anything goes.
        spec = _child(spec, part, where) if isinstance(spec, dict) else FREE
        where = f"{where}.{part}"
        current = node.get(part)
        if i == len(parts) - 1:
          value = parse_value(text, spec, current, where)
          if part in node:
            del node[part]  # A ConfigDict field keeps its type; the value was typed above.
          node[part] = value
        elif current is None:
          node[part] = {}
          node = node[part]
        elif _is_section(current):
          node = current
        else:
          raise ConfigError(f"{where} is {current!r}, not a section: set it as a whole.")
    except ConfigError as e:
      raise ConfigError(f"--config.{key}={text}: {e}") from None
  return config


def load_py(path: str | os.PathLike) -> Any:
  """Imports a config (or sweep) file by path: configs are files, not packages."""
  file = Path(path)
  if not file.is_file():
    raise ConfigError(f"Config file {path} does not exist (paths are relative to {Path.cwd()}).")
  spec = importlib.util.spec_from_file_location(f"_mmtl_config_{file.stem}", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_file(spec: str) -> mlc.ConfigDict:
  """The config of `PATH[:ARG]`: `get_config(ARG)` (or `get_config()`)."""
  path, sep, arg = spec.partition(":")
  module = load_py(path)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path} defines no get_config(arg=None).")
  try:
    config = module.get_config(arg) if sep else module.get_config()
  except (ValueError, TypeError, KeyError) as e:  # e.g. a bad config argument
    raise ConfigError(f"--config {spec}: {e}") from None
  return config if isinstance(config, mlc.ConfigDict) else mlc.ConfigDict(config)


_OVERRIDES: list[tuple[str, str]] = []


def define_flags() -> None:
  """`--config file.py[:arg]`; `--config.key=value` overrides are read by `parse_flags`."""
  flags.DEFINE_string("config", None, "Config file (configs/x.py[:arg]).")


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with `--config.KEY=VALUE` / `--config.KEY VALUE` taken out
  first (in order, later wins): `from_flags` applies them to the config."""
  rest, i = [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      key, sep, value = arg[len("--config.") :].partition("=")
      if not sep:
        if i + 1 == len(argv):
          sys.exit(f"{arg} has no value: write {arg}=VALUE.")
        value, i = argv[i + 1], i + 1
      _OVERRIDES.append((key, value))
    else:
      rest.append(arg)
    i += 1
  return flags.FLAGS(rest)


def from_flags(base: mlc.ConfigDict | None = None) -> mlc.ConfigDict:
  """The config of `--config` (or `base`) with the command line's overrides applied."""
  config = base if base is not None else load_file(flags.FLAGS.config)
  return apply_overrides(config, _OVERRIDES)


# ------------------------------------------------------ workdir config ---


def to_dict(config: mlc.ConfigDict) -> dict[str, Any]:
  """Plain JSON-able dict (tuples become lists, as they will in config.json)."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def load_json(path: str | os.PathLike) -> mlc.ConfigDict:
  """A config.json (local or gs://) as a ConfigDict."""
  return mlc.ConfigDict(workdir_lib.read_json(path))


Change = tuple[str, Any, Any]  # (key path "a.b", old value, new value); "<unset>" if absent


def diff(old: Any, new: Any, prefix: str = "") -> list[Change]:
  """Every leaf that differs between two config dicts."""
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for key in sorted(set(old) | set(new)):
      out += diff(old.get(key, "<unset>"), new.get(key, "<unset>"), f"{prefix}{key}.")
    return out
  return [] if old == new else [(prefix.rstrip("."), old, new)]


def format_changes(changes: Sequence[Change], most: int = 20) -> str:
  shown = [f"config.{key}: {old!r} -> {new!r}" for key, old, new in changes[:most]]
  return "; ".join(shown) + (f" (+{len(changes) - most} more)" if len(changes) > most else "")


def _with_current_defaults(saved: dict[str, Any]) -> dict[str, Any]:
  """A saved config.json with trainer/model keys added to mmtl since it was written
  set to their defaults (new keys default to the old behaviour), so an older run
  still resumes; a config with keys mmtl no longer knows is compared as saved."""
  try:
    return to_dict(with_defaults(mlc.ConfigDict(saved)))
  except ConfigError:
    return saved


def saved_changes(config: mlc.ConfigDict, workdir: str) -> list[Change] | None:
  """How `config` differs from the workdir's config.json (None: there is none)."""
  path = workdir_lib.path(workdir, CONFIG_FILE)
  if not path.exists():
    return None
  return diff(_with_current_defaults(workdir_lib.read_json(path)), to_dict(config))


def refuse_change(workdir: str, changes: Sequence[Change]) -> ConfigError:
  return ConfigError(
    f"Workdir {workdir} holds a run with a different config "
    f"({workdir_lib.path(workdir, CONFIG_FILE)}): "
    + format_changes(changes)
    + ". Use a new --workdir, or pass --allow_config_change to resume this run's "
    "checkpoints with the new config."
  )


def pin(config: mlc.ConfigDict, workdir: str, *, step: int | None = None) -> None:
  """Writes `DIR/config.json` (call once everything is validated). A different
  config.json already there is kept as `config.<step>.json` (`step`: the latest
  checkpoint it trained; 0 when it saved none). Process 0 writes."""
  from mmtl import distributed  # JAX: not at import time (launch/sweep.py loads config files).

  if not distributed.is_main_process():
    return
  workdir_lib.makedirs(workdir)
  path = workdir_lib.path(workdir, CONFIG_FILE)
  text = json.dumps(to_dict(config), indent=2, sort_keys=True)
  if path.exists() and saved_changes(config, workdir):
    old = workdir_lib.path(workdir, f"config.{step or 0}.json")
    n = 1
    while old.exists():
      old, n = workdir_lib.path(workdir, f"config.{step or 0}.{n}.json"), n + 1
    workdir_lib.write_text(old, path.read_text())
    print(f"Config changed: the previous one is kept as {old}.", flush=True)
  workdir_lib.write_text(path, text)


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
      raise ConfigError(
        f"Config argument {piece!r} is not key=value; arguments are "
        f"{', '.join(f'{k}={v}' for k, v in defaults.items())}."
      )
  out = dict(defaults)
  for key, value in values.items():
    kind = type(defaults[key])
    if kind is bool:
      out[key] = value.lower() in ("1", "true", "yes")
    else:
      try:
        out[key] = kind(value)
      except ValueError:
        raise ConfigError(
          f"Config argument {key}={value!r}: expected {_type_names(kind)}."
        ) from None
  return mlc.ConfigDict(out)
