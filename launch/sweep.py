r"""Runs a grid of config overrides (an ablation) and collects one results table.

A sweep is a list of runs, each a dict of config overrides over one base config:
the product of `--grid KEY=V1,V2,...` axes, the list `get_sweep()` of a sweep
file, or both (every sweep-file entry combined with every grid point). Each run
gets a workdir under SWEEP_DIR named after its overrides, so rerunning the same
command skips finished runs (their workdir holds `final_metrics.json`) and
resumes an interrupted one (the trainer restores its workdir's last checkpoint).
SWEEP_DIR/sweep.json records the command each run was given; a finished run is
reused only when it is the command the sweep would run now (else the sweep refuses,
naming the differing flags; `--reuse_finished` keeps such results). When runs end,
every `final_metrics.json` becomes one row of SWEEP_DIR/results.md and results.csv:
the swept keys, the metrics, and the command that produced them.

  # 3 fusions x pretrained/scratch text encoder, one run after another on this machine:
  python launch/sweep.py --config configs/quickstart.py --sweep_dir runs/fusion \
    --grid arg.fusion=concat,gated,cross_attention --grid arg.init=pretrained,scratch \
    -- --config.total_steps=300
  # The grid a config file defines with get_sweep(), printed as TPU VM launches:
  python launch/sweep.py --config configs/ablations/NAME.py \
    --sweep_dir gs://bucket/NAME --emit tpu
  # Every cell over seeds 0-2 (and/or --folds K: stratified folds of the training split,
  # the held-out one scored by config.evals.val), plus summary.md/.csv: mean, sd, 95% interval:
  python launch/sweep.py --config configs/ablations/shapes_grid.py \
    --sweep configs/ablations/shapes_grid.py:small --seeds 3 --sweep_dir runs/small
  # Only rebuild the table (e.g. after copying the workdirs back from gs://):
  python launch/sweep.py --config configs/ablations/NAME.py --sweep_dir runs/NAME --collect

A key is a config key, handed to the trainer as `--config.KEY=VALUE` (values in
the syntax config flags parse: `0.1`, `True`, `concat`, `"(1, 2)"`), or `arg.NAME`,
a config-file argument appended to `--config PATH:NAME=VALUE,...` (how
configs/quickstart.py selects towers, init and fusion). Values with commas take
a Python list: `--grid "arg.modalities=['image,text', 'image', 'text']"`.

Flags after `--` go to every run unchanged and are not part of the run names; so do
`--config.KEY=VALUE` overrides given before it (as mmtl.train takes them).
"""

from __future__ import annotations

import ast
from collections.abc import Callable
import csv
import dataclasses
import itertools
import json
import os
from pathlib import Path
import shlex
import subprocess
import sys
import time
from typing import Any, Protocol

from absl import app, flags

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # For mmtl.workdir here, and mmtl or configs.* in config files.
  sys.path.insert(0, str(REPO_ROOT))
from mmtl import config as config_lib  # noqa: E402
from mmtl import preemption, process  # noqa: E402
from mmtl import workdir as workdir_lib  # noqa: E402
import summarize  # noqa: E402  (launch/summarize.py, beside this file)

METRICS_FILE = "final_metrics.json"  # mmtl.train.FINAL_METRICS_FILE; not imported: it loads JAX.
RECORD_FILE = "sweep.json"  # The command each run was given: what makes a result reusable.
ARG_PREFIX = "arg."  # Swept keys that are config-file arguments, not config keys.
SEED_KEY = "seed"  # --seeds N sweeps config.seed over 0..N-1,
FOLD_KEY = "cross_validation.fold"  # --folds K the held-out fold (mmtl.data.folds),
FOLDS_KEY = "cross_validation.folds"  # given the fold count.
Overrides = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Options:
  """The command line: the sweep's flags, and `train_flags`, given to every run unchanged."""

  config: str
  sweep_dir: str
  grid: list[str]
  sweep: str | None
  emit: str | None
  collect: bool
  keep_going: bool
  reuse_finished: bool
  train_module: str
  python: str
  run_timeout: float | None
  seeds: int
  folds: int
  train_flags: list[str]


# ---- Which runs ----------------------------------------------------------------


def parse_axis(spec: str) -> tuple[str, list[Any]]:
  """`KEY=V1,V2` or `KEY=[V1, V2]` (Python literals, for values with commas)."""
  key, sep, values = spec.partition("=")
  if not sep or not key or not values:
    raise ValueError(
      f"--grid {spec!r}: expected KEY=V1,V2,... e.g. --grid model.fusion=concat,gated"
    )
  if values.lstrip().startswith("["):
    try:
      parsed = ast.literal_eval(values)
    except (SyntaxError, ValueError) as e:
      raise ValueError(
        f"--grid {spec!r}: the value list is not a Python literal ({e}); "
        "quote strings inside brackets, e.g. KEY=\"['a', 'b']\""
      ) from None
    if not isinstance(parsed, list) or not parsed:
      raise ValueError(f"--grid {spec!r}: expected a non-empty list of values")
    return key, parsed
  return key, values.split(",")


def grid(axes: list[tuple[str, list[Any]]]) -> list[Overrides]:
  """All combinations of the axes' values, the first axis varying slowest."""
  keys = [key for key, _ in axes]
  if len(set(keys)) != len(keys):
    raise ValueError(
      f"--grid names a key twice: {keys}; give each key one --grid with all its values"
    )
  return [dict(zip(keys, values)) for values in itertools.product(*(vals for _, vals in axes))]


def load_sweep_file(spec: str, *, required: bool = True) -> list[Overrides] | None:
  """The list of override dicts from `get_sweep([arg])` of a file given as PATH[:ARG]."""
  path, _, arg = spec.partition(":")
  module = config_lib.load_py(path)
  if not hasattr(module, "get_sweep"):
    if required:
      raise ValueError(
        f"{path} defines no get_sweep(); add `def get_sweep(arg=None) -> list[dict]` "
        "returning one dict of config overrides per run, or use --grid"
      )
    return None
  runs = module.get_sweep(arg) if arg else module.get_sweep()
  if not isinstance(runs, (list, tuple)) or not all(isinstance(r, dict) for r in runs) or not runs:
    raise ValueError(
      f"{path}: get_sweep() must return a non-empty list of dicts of config overrides, "
      f"got {type(runs).__name__}"
    )
  return [dict(r) for r in runs]


def combine(
  sweep_runs: list[Overrides] | None, grid_runs: list[Overrides] | None
) -> list[Overrides]:
  if sweep_runs is None or grid_runs is None:
    return sweep_runs if grid_runs is None else grid_runs
  runs = []
  for base, point in itertools.product(sweep_runs, grid_runs):
    if clash := sorted(base.keys() & point.keys()):
      raise ValueError(
        f"--grid sweeps {clash}, which the sweep file already sets; drop one of them"
      )
    runs.append({**base, **point})
  return runs


# ---- Names and commands ----------------------------------------------------------


class Launch(Protocol):
  """What a trainer command is built from: the settings shared by every run (this sweep's
  Options, launch/search.py's)."""

  config: str
  emit: str | None
  train_module: str
  python: str
  train_flags: list[str]


def cli_value(value: Any) -> str:
  """How config_flags parses it back: strings raw, everything else as a literal."""
  return value if isinstance(value, str) else repr(value)


def column(key: str) -> str:
  """How a swept key is shown in run names and tables: config arguments without `arg.`."""
  return key.removeprefix(ARG_PREFIX)


def run_name(overrides: Overrides) -> str:
  """A readable, deterministic, filesystem-safe workdir name."""
  if not overrides:
    return "base"
  return workdir_lib.safe_name(
    "__".join(f"{column(key)}={cli_value(value)}" for key, value in overrides.items())
  )


def config_spec(config: str, overrides: Overrides) -> str:
  """`PATH[:ARG]` with the run's config arguments appended as `,NAME=VALUE` (later wins)."""
  args = [
    f"{column(key)}={cli_value(value)}"
    for key, value in overrides.items()
    if key.startswith(ARG_PREFIX)
  ]
  if not args:
    return config
  return config + (("," if ":" in config else ":") + ",".join(args))


def config_flags(overrides: Overrides) -> list[str]:
  """The `--config.KEY=VALUE` flags of the overrides that are config keys (`arg.*` go in
  `config_spec`)."""
  return [
    f"--config.{key}={cli_value(value)}"
    for key, value in overrides.items()
    if not key.startswith(ARG_PREFIX)
  ]


def train_command(args: Launch, workdir: str, overrides: Overrides) -> list[str]:
  config = config_spec(args.config, overrides)
  flags = config_flags(overrides) + args.train_flags
  if args.emit == "tpu":
    return [
      str(REPO_ROOT / "launch/tpu_vm.sh"),
      "run",
      "--config",
      config,
      "--workdir",
      workdir,
      "--",
      *flags,
    ]
  if args.emit == "slurm":
    return ["sbatch", str(REPO_ROOT / "launch/slurm.sbatch"), config, workdir, *flags]
  return [args.python, "-m", args.train_module, "--config", config, "--workdir", workdir, *flags]


def run_command(args: Launch, overrides: Overrides) -> list[str]:
  """What decides a run's result: its trainer module, config and flags (not the
  interpreter, the launcher or the workdir). A finished run is reused only for this."""
  return [
    args.train_module,
    "--config",
    config_spec(args.config, overrides),
    *config_flags(overrides),
    *args.train_flags,
  ]


def shown_command(command: list[str] | None) -> str:
  """A recorded run command as the table shows it."""
  return f"python -m {shlex.join(command)}" if command else "unknown (no record in sweep.json)"


def flag_words(command: list[str]) -> list[str]:
  """The command's words with each `--flag value` pair joined, so two commands can be
  compared flag by flag."""
  words, i = [], 0
  while i < len(command):
    word = command[i]
    if word.startswith("--") and "=" not in word and i + 1 < len(command):
      if not command[i + 1].startswith("--"):
        word, i = f"{word} {command[i + 1]}", i + 1
    words.append(word)
    i += 1
  return words


def command_difference(ran: list[str] | None, now: list[str]) -> str:
  """`ran A, this sweep gives B`: the flags in which a run's recorded command differs."""
  if ran is None:
    return "its command is not recorded"
  ran_words, now_words = flag_words(ran), flag_words(now)
  gone = [w for w in ran_words if w not in now_words]
  new = [w for w in now_words if w not in ran_words]
  if gone and new:
    return f"ran {' '.join(gone)}, this sweep gives {' '.join(new)}"
  if new:
    return f"this sweep adds {' '.join(new)}"
  if gone:
    return f"ran {' '.join(gone)}, which this sweep drops"
  return "its flags came in another order"


def workdir_of(sweep_dir: str, name: str) -> str:
  """String join: pathlib would turn gs://bucket into gs:/bucket."""
  return f"{sweep_dir.rstrip('/')}/{name}"


def final_metrics(workdir: str) -> dict[str, Any] | None:
  """The run's final metrics (local or gs:// workdir); None while it has none. The
  trainer writes the file atomically; an unreadable one (e.g. copied down half) is
  treated as missing: the run is redone."""
  try:
    return workdir_lib.read_json(workdir_lib.path(workdir, METRICS_FILE))
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def is_done(workdir: str) -> bool:
  return final_metrics(workdir) is not None


# ---- The record of commands ----------------------------------------------------------


def read_record(sweep_dir: str) -> dict[str, dict[str, Any]]:
  """SWEEP_DIR/sweep.json's runs by name ({} if there is none): each run's overrides and
  the command it was last given."""
  file = workdir_lib.path(sweep_dir, RECORD_FILE)
  try:
    saved = workdir_lib.read_json(file)
  except FileNotFoundError:
    return {}
  except json.JSONDecodeError as e:
    raise ValueError(f"{file} is not JSON ({e}); move it away to start the record afresh") from None
  return {run["name"]: run for run in saved.get("runs", [])}


def stale_results(
  args: Options, runs: list[tuple[str, Overrides]], done: set[str], record: dict[str, Any]
) -> str | None:
  """Why the finished runs whose recorded command is not the one this sweep would give
  them cannot be reused (None: there are none), naming the differing flags."""
  groups: dict[str, list[str]] = {}
  for name, overrides in runs:
    ran, now = record.get(name, {}).get("command"), run_command(args, overrides)
    if name in done and ran != now:
      groups.setdefault(command_difference(ran, now), []).append(name)
  if not groups:
    return None
  detail = "; ".join(
    f"{', '.join(names[:3])}{f' (+{len(names) - 3} more)' if len(names) > 3 else ''}: {why}"
    for why, names in groups.items()
  )
  return (
    f"{sum(map(len, groups.values()))} finished run(s) in {args.sweep_dir} came from another "
    f"command than this sweep's ({detail}); give a new --sweep_dir to run this sweep afresh, "
    "or pass --reuse_finished to keep their results (the table shows each run's command)"
  )


def write_record(
  args: Options, runs: list[tuple[str, Overrides]], done: set[str], record: dict[str, Any]
) -> dict[str, Any]:
  """Writes SWEEP_DIR/sweep.json: every unfinished run of this sweep with the command it is
  now given; finished runs (and runs of earlier sweeps into the same directory) keep the
  command that produced their results. Returns the new record."""
  record = dict(record)
  for name, overrides in runs:
    if name not in done:
      record[name] = dict(name=name, overrides=overrides, command=run_command(args, overrides))
    elif name not in record:  # Finished with no record, kept by --reuse_finished.
      record[name] = dict(name=name, overrides=overrides, command=None)
  saved = dict(config=args.config, train_flags=args.train_flags, runs=list(record.values()))
  workdir_lib.makedirs(args.sweep_dir)
  workdir_lib.write_text(
    workdir_lib.path(args.sweep_dir, RECORD_FILE), json.dumps(saved, indent=2, default=repr)
  )
  return record


# ---- Running ---------------------------------------------------------------------


FEATURE_CACHE_ENV = "MMTL_FEATURE_CACHE_DIR"  # mmtl.feature_cache.ENV_DIR (it loads JAX)


def trainer_env(sweep_dir: Path) -> dict[str, str]:
  """This environment with the checkout first on PYTHONPATH, so `python -m mmtl.train` and
  config files find mmtl from any directory, and one feature cache for the runs of
  `sweep_dir` (SWEEP_DIR/feature_cache, unless the environment names one): runs that share
  a locked tower compute its features once (with config.feature_cache.enable)."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
  if not workdir_lib.is_remote(str(sweep_dir)):
    env.setdefault(FEATURE_CACHE_ENV, str(Path(sweep_dir).absolute() / "feature_cache"))
  return env


def timed_out(seconds: float) -> str:
  """Why a run that hit its deadline failed."""
  return f"timed out: still running after --run_timeout={seconds:g}s; its processes were stopped"


def log_tail(log: Path, lines: int = 15) -> str:
  """The last lines of a run's log: what a failure message shows."""
  return "".join(log.read_text(errors="replace").splitlines(keepends=True)[-lines:])


def run_locally(args: Options, runs: list[tuple[str, Overrides]], sweep_dir: Path) -> list[str]:
  """Runs the unfinished runs one after another; returns the names that failed."""
  env = trainer_env(sweep_dir)
  (sweep_dir / "logs").mkdir(parents=True, exist_ok=True)
  failed = []
  for i, (name, overrides) in enumerate(runs, 1):
    workdir = str(sweep_dir / name)
    prefix = f"[{i}/{len(runs)}] {name}"
    if is_done(workdir):
      print(f"{prefix}: done already, skipped")
      continue
    log = sweep_dir / "logs" / f"{name}.log"
    cmd = train_command(args, workdir, overrides)
    print(f"{prefix}: running, log {log}\n  {shlex.join(cmd)}", flush=True)
    start = time.time()
    with log.open("a") as f:
      try:
        returncode = process.run(
          cmd, timeout=args.run_timeout, stdout=f, stderr=subprocess.STDOUT, env=env
        ).returncode
      except subprocess.TimeoutExpired:
        returncode = None
    if returncode == 0 and is_done(workdir):
      print(f"{prefix}: done in {time.time() - start:.0f}s", flush=True)
      continue
    if returncode == preemption.EXIT_CODE:  # Not a failure, but no reason to start the next run.
      print(
        f"{prefix}: stopped by a signal after saving its step; rerun this sweep to continue it",
        file=sys.stderr,
        flush=True,
      )
      failed.append(name)
      break
    if returncode is None:
      why = timed_out(args.run_timeout)
    elif returncode:
      why = f"exit code {returncode}"
    else:
      why = f"exited 0 without writing {METRICS_FILE}"
    print(
      f"{prefix}: FAILED ({why}); last lines of {log}:\n{log_tail(log)}",
      file=sys.stderr,
      flush=True,
    )
    failed.append(name)
    if not args.keep_going:
      break
  return failed


# ---- Results table ---------------------------------------------------------------


def collect(
  runs: list[tuple[str, Overrides]], sweep_dir: Path, record: dict[str, Any]
) -> tuple[list[str], list[dict[str, Any]]]:
  """One row per run: its overrides, then its final metrics (blank when unfinished), and
  (not a column of results.md, which lists it under the table) the recorded command."""
  keys = list(dict.fromkeys(column(key) for _, overrides in runs for key in overrides))
  metric_names: dict[str, None] = {}
  rows = []
  for name, overrides in runs:
    shown = {column(key): cli_value(value) for key, value in overrides.items()}
    row = {"run": name, **{key: shown.get(key, "") for key in keys}}
    row["command"] = shown_command(record.get(name, {}).get("command"))
    metrics = final_metrics(str(sweep_dir / name))
    if metrics is not None:
      metric_names.update(dict.fromkeys(metrics))
      row.update(metrics)
      row["status"] = "done"
    else:
      row["status"] = "running or failed" if (sweep_dir / name).exists() else "not started"
    rows.append(row)
  columns = keys + list(metric_names)
  if any(row["status"] != "done" for row in rows):
    columns.append("status")
  return columns, rows


def markdown_cell(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  return (
    "" if value is None else str(value).replace("|", r"\|")
  )  # e.g. regexes: not a column break.


def write_tables(columns: list[str], rows: list[dict[str, Any]], sweep_dir: Path) -> str:
  """Writes results.md (for papers and READMEs: the table, then each row's command) and
  results.csv (for code: the command a column); returns the Markdown."""
  lines = ["| " + " | ".join(map(markdown_cell, columns)) + " |", "|" + "---|" * len(columns)]
  lines += [
    "| " + " | ".join(markdown_cell(row.get(c, "")) for c in columns) + " |" for row in rows
  ]
  commands = ["command"] if any("command" in row for row in rows) else []
  if commands:
    lines += ["", "Commands (each run's workdir is SWEEP_DIR/RUN):", ""]
    lines += [f"- {row['run']}: `{row['command']}`" for row in rows if "command" in row]
  markdown = "\n".join(lines) + "\n"
  (sweep_dir / "results.md").write_text(markdown)
  with (sweep_dir / "results.csv").open("w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=["run", *columns, *commands], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  return markdown


def write_summary(sweep_dir: Path, over: list[str]) -> str | None:
  """summary.md / .csv over the repeats (launch/summarize.py); None before any run finished."""
  try:
    columns, table = summarize.summarize(sweep_dir, over)
  except ValueError as e:
    print(f"No summary yet: {e}", file=sys.stderr)
    return None
  return summarize.write(sweep_dir, columns, table, over)


# ---- Main ------------------------------------------------------------------------


def define_trainer_flags(flag_values: flags.FlagValues) -> None:
  """The flags saying what each run trains and with which trainer (shared with
  launch/search.py); `--train-module` is an alias."""
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("config", None, "Base config, PATH[:ARG], as for mmtl.train. Required.", **fv)
  flags.DEFINE_string(
    "train_module",
    "mmtl.train",
    "Module run with `python -m` for each run: any "
    "trainer taking --config/--workdir and writing final_metrics.json.",
    **fv,
  )
  flags.DEFINE_string("python", sys.executable, "Interpreter for local runs.", **fv)
  flags.DEFINE_float(
    "run_timeout",
    None,
    "Seconds a run may take: a run still going then is stopped (its whole process group, "
    "SIGTERM then SIGKILL) and counts as failed. Default: no limit.",
    lower_bound=0,
    **fv,
  )
  flags.DEFINE_alias("train-module", "train_module", **fv)
  flags.DEFINE_alias("run-timeout", "run_timeout", **fv)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The sweep's flags; `--sweep-dir`, `--keep-going`, `--train-module` are aliases."""
  define_trainer_flags(flag_values)
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("sweep_dir", None, "One workdir per run goes here. Required.", **fv)
  flags.DEFINE_multi_string(
    "grid",
    [],
    "KEY=V1,V2: a swept config key and its values (repeatable: the runs are the product).",
    **fv,
  )
  flags.DEFINE_string(
    "sweep",
    None,
    "FILE[:ARG]: a file whose get_sweep([ARG]) returns the runs' "
    "override dicts (default: the config file's own get_sweep(), if it has one "
    "and no --grid is given).",
    **fv,
  )
  flags.DEFINE_enum(
    "emit",
    None,
    ["local", "tpu", "slurm"],
    "Print the unfinished runs' launch commands instead of running them: local "
    "(python -m ...), tpu (launch/tpu_vm.sh run; set TPU_NAME, TPU_ZONE, "
    "TPU_ACCELERATOR_TYPE), slurm (sbatch launch/slurm.sbatch).",
    **fv,
  )
  flags.DEFINE_bool("collect", False, "Only (re)write the results table.", **fv)
  flags.DEFINE_integer(
    "seeds",
    0,
    "Run every cell with config.seed 0..N-1 and add SWEEP_DIR/summary.md and .csv: each "
    "metric's mean, sd and 95%% t-interval over them (launch/summarize.py).",
    lower_bound=0,
    **fv,
  )
  flags.DEFINE_integer(
    "folds",
    0,
    "Run every cell on each of K stratified folds of the training split, the fold held out "
    "scored by config.evals.val (config.cross_validation, mmtl.data.folds), summarized as "
    "--seeds.",
    lower_bound=0,
    **fv,
  )
  flags.DEFINE_bool(
    "keep_going", False, "Go on with the next run after a failed one, instead of stopping.", **fv
  )
  flags.DEFINE_bool(
    "reuse_finished",
    False,
    "Keep the results of finished runs that were given another command than this sweep "
    "would give them (by default the sweep refuses them); the table shows each run's command.",
    **fv,
  )
  for alias, name in [
    ("sweep-dir", "sweep_dir"),
    ("keep-going", "keep_going"),
    ("reuse-finished", "reuse_finished"),
  ]:
    flags.DEFINE_alias(alias, name, **fv)


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """Parses `argv` (program first) into `flag_values`; returns [program, *the runs' flags].

  The runs' flags are those after `--` and the `--config.KEY=VALUE` (or `--config.KEY VALUE`)
  overrides before it, in order: absl would reject the latter as unknown flags.
  """
  after = []
  if "--" in argv:
    argv, after = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
  own, train_flags, i = [], [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      if "=" not in arg and i + 1 < len(argv):
        arg, i = f"{arg}={argv[i + 1]}", i + 1
      train_flags.append(arg)
    else:
      own.append(arg)
    i += 1
  program, *positional = flag_values(own)
  if positional:
    raise flags.Error(f"unexpected arguments {positional}: flags for every run go after `--`")
  return [program, *train_flags, *after]


def options(
  flag_values: flags.FlagValues,
  train_flags: list[str],
  cls: type = Options,
  required: tuple[str, ...] = ("config", "sweep_dir"),
) -> Any:
  """The parsed command line as a `cls` (a dataclass with a field per flag, and
  `train_flags`); ValueError if a `required` flag is missing."""
  for name in required:
    if not flag_values[name].value:
      raise ValueError(f"--{name} is required")
  values = {
    f.name: flag_values[f.name].value for f in dataclasses.fields(cls) if f.name != "train_flags"
  }
  return cls(**values, train_flags=list(train_flags))


def repeat_axes(args: Options) -> list[tuple[str, list[Any]]]:
  """The axes `--seeds` and `--folds` add to every run (seeds, then folds)."""
  axes = []
  if args.seeds:
    axes.append((SEED_KEY, list(range(args.seeds))))
  if args.folds:
    axes.append((FOLD_KEY, list(range(args.folds))))
  return axes


def repeat_flags(args: Options) -> list[str]:
  """The flags `--folds K` gives every run (the fold count; each run's fold is its own)."""
  return [f"--config.{FOLDS_KEY}={args.folds}"] if args.folds else []


def summarized_over(args: Options) -> list[str]:
  """The columns the summary averages over: the repeats' keys."""
  return [column(key) for key, _ in repeat_axes(args)]


def sweep_runs(args: Options) -> list[Overrides]:
  """Every run's overrides: the grid and sweep file's runs, each repeated over the seeds
  and folds (their keys last, so the repeats of a cell sit together)."""
  axes = repeat_axes(args)
  runs = _sweep_runs(args, repeats=bool(axes))
  if not axes:
    return runs
  if clash := sorted({key for run in runs for key in run} & {key for key, _ in axes}):
    flag = {SEED_KEY: "--seeds", FOLD_KEY: "--folds"}
    raise ValueError(
      f"{', '.join(flag[k] for k in clash)} sweep(s) {clash}, which the grid or sweep file "
      "already sets; drop one of them"
    )
  return combine(runs, grid(axes))


def _sweep_runs(args: Options, repeats: bool) -> list[Overrides]:
  """The runs of --grid and --sweep (or the config's get_sweep()); with `repeats` and
  neither, the base config alone."""
  grid_runs = grid([parse_axis(spec) for spec in args.grid]) if args.grid else None
  if args.sweep:
    sweep_file_runs = load_sweep_file(args.sweep)
  elif grid_runs is None:
    sweep_file_runs = load_sweep_file(args.config, required=False)
    if sweep_file_runs is None and repeats:
      return [{}]
    if sweep_file_runs is None:
      raise ValueError(
        f"nothing to sweep: pass --grid KEY=V1,V2, --sweep FILE or --seeds N, "
        f"or define get_sweep() in {args.config.partition(':')[0]}"
      )
  else:
    sweep_file_runs = None
  return combine(sweep_file_runs, grid_runs)


def run_with_own_flags(
  program: str,
  define: Callable[[flags.FlagValues], None],
  run_flags: Callable[[flags.FlagValues, list[str]], int],
  argv: list[str],
) -> int:
  """`run_flags` of command line `argv` (without the program name) parsed into flags of
  its own (`define`d), not absl's global ones: for tests and Python callers."""
  flag_values = flags.FlagValues()
  define(flag_values)
  try:
    train_flags = parse_flags([program, *argv], flag_values)[1:]
  except flags.Error as e:
    print(f"{program}: error: {e}", file=sys.stderr)
    return 2
  return run_flags(flag_values, train_flags)


def main(argv: list[str]) -> int:
  """The sweep of command line `argv` (without the program name), with flags of its own: for
  tests and Python callers; `python launch/sweep.py ARGS` runs the same through app.run."""
  return run_with_own_flags("sweep.py", define_flags, run, argv)


def _app_main(argv: list[str]) -> int:
  """app.run's main: flags.FLAGS parsed by parse_flags, argv = [program, *the runs' flags]."""
  return run(flags.FLAGS, argv[1:])


def print_commands(args: Options, runs: list[tuple[str, Overrides]]) -> None:
  """The runs' launch commands (`--emit`), nothing else, so the output can be piped to a
  shell or a job queue."""
  for name, overrides in runs:
    print(shlex.join(train_command(args, workdir_of(args.sweep_dir, name), overrides)))


def run(flag_values: flags.FlagValues, train_flags: list[str]) -> int:
  """Runs, emits or collects the sweep of parsed flags; returns the exit code (2: a bad sweep)."""
  try:
    args = options(flag_values, train_flags)
    if args.folds == 1:
      raise ValueError("--folds 1 holds out the whole split; use --folds K with K >= 2")
    args = dataclasses.replace(args, train_flags=[*repeat_flags(args), *args.train_flags])
    runs = [(run_name(overrides), overrides) for overrides in sweep_runs(args)]
  except (ValueError, FileNotFoundError) as e:
    print(f"sweep.py: error: {e}", file=sys.stderr)
    return 2
  names = [name for name, _ in runs]
  if duplicates := sorted({n for n in names if names.count(n) > 1}):
    print(
      f"sweep.py: error: runs with identical overrides: {duplicates}; remove the repeats",
      file=sys.stderr,
    )
    return 2

  if not args.emit and "://" in args.sweep_dir:
    print(
      f"sweep.py: error: local runs and tables need a local --sweep_dir, not {args.sweep_dir}; "
      "copy the workdirs down (e.g. gsutil -m rsync -r) and point --sweep_dir there",
      file=sys.stderr,
    )
    return 2
  try:
    record = read_record(args.sweep_dir)
    done = {name for name, _ in runs if is_done(workdir_of(args.sweep_dir, name))}
  except ImportError as e:  # --emit to gs:// without gcsfs here: nothing can be read there.
    print(
      f"sweep.py: cannot read {args.sweep_dir} ({e}): printing every run, recording none",
      file=sys.stderr,
    )
    print_commands(args, runs)
    return 0
  except ValueError as e:
    print(f"sweep.py: error: {e}", file=sys.stderr)
    return 2
  if not args.collect:
    if not args.reuse_finished and (why := stale_results(args, runs, done, record)):
      print(f"sweep.py: error: {why}", file=sys.stderr)
      return 2
    record = write_record(args, runs, done, record)

  if args.emit:
    print_commands(args, [(name, overrides) for name, overrides in runs if name not in done])
    return 0

  sweep_dir = Path(args.sweep_dir)
  sweep_dir.mkdir(parents=True, exist_ok=True)
  failed = [] if args.collect else run_locally(args, runs, sweep_dir)
  print(write_tables(*collect(runs, sweep_dir, record), sweep_dir), end="")
  print(f"Wrote {sweep_dir / 'results.md'} and {sweep_dir / 'results.csv'}")
  if (over := summarized_over(args)) and (summary := write_summary(sweep_dir, over)):
    print(summary, end="")
    print(f"Wrote {sweep_dir / 'summary.md'} and {sweep_dir / 'summary.csv'}")
  if failed:
    print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  define_flags()
  app.run(_app_main, flags_parser=parse_flags)
