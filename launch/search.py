r"""Hyperparameter search with Optuna: trials through the real trainer, bad ones pruned early.

The search space is `get_search_space()` of the config file: a dict from a config key
or `arg.NAME` (as in launch/sweep.py) to a list of choices, `dict(low=, high=[, log=True]
[, step=])` (an int range if low and high are ints, else a float range) or an Optuna
distribution. Every key and every end of its range is checked against the config,
as mmtl.train checks overrides, before any trial starts.

  python launch/search.py --config configs/quickstart.py:steps=300 --study_dir runs/search \
    --trials 9 -- --config.evals.val.every=50

Each trial is `python -m mmtl.train` in STUDY_DIR/trial_NNNN (log: STUDY_DIR/logs/); each
evaluation of `--metric` it writes to metrics.jsonl is reported to Optuna, and when the
pruner (ASHA or median) says so the trainer is stopped and `pruned.json` records the
step. The study lives in Optuna's storage, STUDY_DIR/study.journal (or `--storage URL`),
so rerunning the command continues it, and workers on several hosts share it: each
takes the next trial until `--trials` trials exist. A worker that stops (Ctrl-C,
SIGTERM) re-queues its trial; one that dies is found by its stopped heartbeat; either
way the trial runs again in the same workdir, and the trainer resumes its checkpoint.

With `--seeds N` a trial trains config.seed 0..N-1 side by side (STUDY_DIR/trial_NNNN/seed=S)
and is reported, pruned and scored by the mean over its seeds.

When the worker's trials end: STUDY_DIR/results.md and results.csv (every trial),
best.txt (the best trial as a trainer command line), history.png and importance.png.
Flags after `--` (and `--config.KEY=VALUE` before it) go to every trial.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
from pathlib import Path
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from typing import Any
import warnings

from absl import app, flags
import optuna
from optuna.distributions import (
  BaseDistribution,
  CategoricalDistribution,
  FloatDistribution,
  IntDistribution,
)
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

import sweep  # Also puts the checkout on sys.path, for mmtl.

# isort: split
from mmtl import config as config_lib
from mmtl import evaluators as evaluators_lib
from mmtl import metrics as metrics_lib
from mmtl import preemption, process
from mmtl import workdir as workdir_lib

JOURNAL = "study.journal"  # Optuna's journal storage in STUDY_DIR, unless --storage is given.
PRUNED_FILE = "pruned.json"
RECORD = "mmtl_search"  # Study user attr: what the study searches (config, flags, space, metric).
POLL_S = 0.5  # How often a running trial's metrics.jsonl is read.
HEARTBEAT_S = 30.0  # How often a worker records that its trial is alive...
STALE_S = 300.0  # ...and how long without it before another worker re-queues the trial.
Space = dict[str, BaseDistribution]


@dataclasses.dataclass(frozen=True)
class Options:
  """The command line: the search's flags, and `train_flags`, given to every trial."""

  config: str
  study_dir: str
  trials: int | None
  metric: str
  mode: str
  sampler: str
  pruner: str
  seed: int
  storage: str | None
  study_name: str | None
  emit: str | None
  workers: int
  collect: bool
  keep_going: bool
  train_module: str
  python: str
  run_timeout: float | None
  seeds: int
  train_flags: list[str]


# ---- The search space -------------------------------------------------------------


def distribution(key: str, spec: Any) -> BaseDistribution:
  """The Optuna distribution of one entry of get_search_space()."""
  if isinstance(spec, BaseDistribution):
    return spec
  if isinstance(spec, (list, tuple)):
    if not spec or not all(v is None or isinstance(v, (bool, int, float, str)) for v in spec):
      raise ValueError(
        f"search space {key}={spec!r}: a choice is a non-empty list of numbers, strings, "
        "bools or None (a tuple value goes in as the string of its literal, e.g. \"('a',)\")"
      )
    return CategoricalDistribution(spec)
  if isinstance(spec, dict) and {"low", "high"} <= spec.keys() <= {"low", "high", "log", "step"}:
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    try:
      if all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high, step or 1)):
        return IntDistribution(low, high, log=log, step=step or 1)
      return FloatDistribution(low, high, log=log, step=step)
    except ValueError as e:
      raise ValueError(f"search space {key}={spec!r}: {e}") from None
  raise ValueError(
    f"search space {key}={spec!r}: use a list of choices, dict(low=, high=[, log=True]"
    "[, step=]), or an optuna.distributions object"
  )


def load_space(config: str) -> Space:
  """`get_search_space()` of the config file of `config` (PATH[:ARG]), as distributions."""
  path = config.partition(":")[0]
  module = config_lib.load_py(path)
  if not hasattr(module, "get_search_space"):
    raise ValueError(
      f"{path} defines no get_search_space(); add `def get_search_space() -> dict` "
      "mapping config keys (or arg.NAME) to choices or ranges"
    )
  space = module.get_search_space()
  if not isinstance(space, dict) or not space:
    raise ValueError(f"{path}: get_search_space() returned {space!r}; it needs at least one key")
  return {key: distribution(key, spec) for key, spec in space.items()}


def config_overrides(train_flags: list[str]) -> list[tuple[str, str]]:
  """The (key, value) overrides of `--config.KEY=VALUE` / `--config.KEY VALUE` flags."""
  out, words = [], iter(train_flags)
  for word in words:
    if word.startswith("--config."):
      key, sep, value = word[len("--config.") :].partition("=")
      out.append((key, value if sep else next(words, "")))
  return out


def trial_config(args: Options, params: dict[str, Any]) -> Any:
  """The config a trial with `params` trains, built and checked as mmtl.train builds it."""
  base = config_lib.load_file(sweep.config_spec(args.config, params))
  overrides = config_overrides(sweep.config_flags(params) + args.train_flags)
  return config_lib.with_defaults(config_lib.apply_overrides(base, overrides))


def ends(dist: BaseDistribution) -> list[Any]:
  """The values of `dist` that are checked against the config: every choice, or both ends."""
  if isinstance(dist, CategoricalDistribution):
    return list(dist.choices)
  return [dist.low, dist.high]


def metric_names(config: Any) -> list[str]:
  """What the config's evaluators log (`<evaluator>/<metric>`); nothing is opened or run."""
  context = evaluators_lib.EvalContext(
    head_type=config.model.head,
    make_batches=None,
    predict_fns={},
    text_embedder=lambda tokenizer, max_len: None,
  )
  return [
    name
    for key, cfg in config.evals.items()
    for name in evaluators_lib.make(key, cfg, context).metric_names()
  ]


def check(args: Options, space: Space) -> int:
  """Raises ConfigError/ValueError for a key, value or metric the trials could not use;
  returns the step of the metric's first evaluation (0: only at the end)."""
  for key, dist in space.items():
    for value in ends(dist):
      try:
        trial_config(args, {key: value})
      except config_lib.ConfigError as e:
        raise config_lib.ConfigError(f"search space {key}={value!r}: {e}") from None
  config = trial_config(args, {})
  names = metric_names(config)
  if args.metric not in names:
    raise ValueError(
      f"--metric {args.metric}: no evaluator of the config logs it; they log "
      f"{', '.join(names) or 'nothing (config.evals is empty)'}"
    )
  evaluator = args.metric.split("/")[0]
  every = int(config.evals[evaluator].get("every", 0))
  if not every and args.pruner != "none":
    raise ValueError(
      f"--pruner {args.pruner} needs evaluations during training, but config.evals."
      f"{evaluator}.every is 0 (evaluated at the end only): add --config.evals.{evaluator}."
      "every=STEPS after --, or use --pruner none"
    )
  return every


# ---- The study --------------------------------------------------------------------


def record(args: Options, space: Space) -> dict[str, Any]:
  """What a study searches; a rerun must search the same."""
  return dict(
    config=args.config,
    train_flags=args.train_flags,
    metric=args.metric,
    mode=args.mode,
    space={key: optuna.distributions.distribution_to_json(d) for key, d in space.items()},
    **({"seeds": args.seeds} if args.seeds > 1 else {}),
  )


def make_sampler(args: Options) -> optuna.samplers.BaseSampler:
  """This worker's sampler; not stored in the study, so each worker (and rerun) sets its own."""
  if args.sampler == "random":
    return optuna.samplers.RandomSampler(seed=args.seed)
  # constant_liar: concurrent workers do not all sample next to the same running trial.
  # Random startup trials: a third of the budget, at most Optuna's default of 10.
  startup = max(1, min(10, (args.trials or 0) // 3))
  return optuna.samplers.TPESampler(seed=args.seed, constant_liar=True, n_startup_trials=startup)


def make_pruner(name: str, every: int) -> optuna.pruners.BasePruner:
  """The pruner, with ASHA's rungs in training steps of evaluations `every` steps apart."""
  if name == "asha":  # Rungs at the 1st, 3rd, 9th... evaluation; the best third go on.
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=every, reduction_factor=3)
  if name == "median":
    return optuna.pruners.MedianPruner()
  return optuna.pruners.NopPruner()


def journal_storage(study_dir: Path) -> optuna.storages.JournalStorage:
  """STUDY_DIR/study.journal: Optuna's storage for a filesystem that workers share (NFS
  included: it needs no fcntl locks, unlike SQLite)."""
  return optuna.storages.JournalStorage(
    optuna.storages.journal.JournalFileBackend(str(study_dir / JOURNAL))
  )


def open_study(args: Options, space: Space, sampler: Any, pruner: Any) -> optuna.Study:
  """The study of STUDY_DIR (created if new); ValueError if it searches something else."""
  storage = args.storage or journal_storage(Path(args.study_dir))
  name = args.study_name or Path(args.study_dir).resolve().name
  try:  # Loaded first: creating an existing study would still write to its journal.
    study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
  except KeyError:
    study = optuna.create_study(
      study_name=name,
      storage=storage,
      direction="maximize" if args.mode == "max" else "minimize",
      sampler=sampler,
      pruner=pruner,
      load_if_exists=True,  # Another worker may create it at the same time.
    )
  wanted = json.loads(json.dumps(record(args, space)))
  saved = study.user_attrs.get(RECORD)
  if saved is None:
    study.set_user_attr(RECORD, wanted)
  elif saved != wanted:
    differ = "; ".join(
      f"{key} {saved.get(key)!r} there, {wanted[key]!r} here"
      for key in wanted
      if saved.get(key) != wanted[key]
    )
    raise ValueError(
      f"{args.study_dir} holds study {study.study_name!r} of another search ({differ}); "
      "rerun with its settings to continue it, or give a new --study_dir"
    )
  return study


def trial_dir(trial: optuna.trial.FrozenTrial) -> str:
  """A retried trial runs in the workdir of the trial it retries, so it resumes there."""
  number = RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)
  return f"trial_{trial.number if number is None else number:04d}"


def requeue(study: optuna.Study, number: int) -> None:
  """Marks a trial that did not finish FAIL and queues it again with the same params."""
  try:
    study.tell(number, state=TrialState.FAIL)
  except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
    return  # Another worker finished or re-queued it first.
  RetryHeartbeatStaleTrialCallback()(study, study.get_trials(deepcopy=False)[number])


def requeue_stale(study: optuna.Study) -> None:
  """Re-queues RUNNING trials whose worker stopped recording heartbeats (it died)."""
  now = time.time()
  for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
    # A retry starts with the heartbeat of the trial it copies: its own start counts too.
    beat = max(trial.user_attrs.get("heartbeat", 0.0), trial.datetime_start.timestamp())
    if now - beat > STALE_S:
      print(f"[trial {trial.number}] no heartbeat for {now - beat:.0f} s: re-queued", flush=True)
      requeue(study, trial.number)


def retried(trials: list[optuna.trial.FrozenTrial]) -> dict[int, int]:
  """Trial number -> the number of the trial that retries it."""
  return {
    n: t.number for t in trials for n in RetryHeartbeatStaleTrialCallback.retry_history(t)[-1:]
  }


def has_work(study: optuna.Study, budget: int) -> bool:
  """Whether a trial is queued or fewer than `budget` trials exist (retries not counted)."""
  trials = study.get_trials(deepcopy=False)
  done = retried(trials)
  queued = any(t.state == TrialState.WAITING for t in trials)
  return queued or sum(t.number not in done for t in trials) < budget


# ---- Running a trial --------------------------------------------------------------


def raise_interrupt(signum: int, frame: Any) -> None:
  """SIGTERM (SLURM preemption, `kill`) as Ctrl-C: the worker re-queues its trial."""
  raise KeyboardInterrupt


def die_with_worker() -> None:
  """In the trainer (Linux): SIGTERM when its worker dies, even by SIGKILL, so that no
  orphan keeps training in a workdir that the trial's retry will use."""
  ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def stop(proc: subprocess.Popen, workdir: str) -> None:
  """Ends the trainer and its process group (SIGTERM, SIGKILL a minute later), and removes
  the workdir lock it could not release (a retry on another host could not tell that its
  holder is gone)."""
  process.kill_group(proc, grace_s=60)
  lock = workdir_lib.path(workdir, workdir_lib.LOCK_FILE)
  try:
    holder = workdir_lib.read_json(lock)
  except (FileNotFoundError, json.JSONDecodeError):
    return
  if (holder.get("host"), holder.get("pid")) == (socket.gethostname(), proc.pid):
    lock.unlink(missing_ok=True)


def curves(workdir: str) -> dict[str, dict[int, float]]:
  """metrics.jsonl so far; a line being written is read at the next poll."""
  try:
    return metrics_lib.read(workdir)
  except json.JSONDecodeError:
    return {}


def steps_run(workdir: str) -> int:
  """The last step the trial's trainer logged (a pruned trial ran at most log_every more)."""
  return max((max(c) for c in curves(workdir).values() if c), default=0)


def total_steps(workdir: str) -> int | None:
  """The trial's configured steps (its pinned config.json); None until the trainer pins it."""
  try:
    return int(
      workdir_lib.read_json(workdir_lib.path(workdir, config_lib.CONFIG_FILE))["total_steps"]
    )
  except (FileNotFoundError, json.JSONDecodeError, KeyError):
    return None


def trial_runs(args: Options, study_dir: Path, name: str) -> list[tuple[str, dict[str, Any]]]:
  """(workdir, extra overrides) of each trainer run of trial directory `name`: the
  directory itself, or with `--seeds N` one `seed=S` directory in it per seed."""
  workdir = sweep.workdir_of(str(study_dir), name)
  if args.seeds <= 1:
    return [(workdir, {})]
  return [(sweep.workdir_of(workdir, f"seed={s}"), {"seed": s}) for s in range(args.seeds)]


def run_trial(args: Options, study: optuna.Study, space: Space, study_dir: Path) -> bool:
  """Asks Optuna for a trial (a queued retry first), trains it and tells the outcome;
  returns False if it failed. Interrupted, or its trainer stopped by a signal (after saving):
  the trial is re-queued, and KeyboardInterrupt raised. With `--seeds N` the trial's N
  trainers run side by side; each evaluation step is reported (and pruned on) as the mean
  over the seeds once all have logged it, and the trial's value is the mean of their final
  metric (each seed's value recorded)."""
  trial = study.ask(space)
  name = trial_dir(study.get_trials(deepcopy=False)[trial.number])
  runs = trial_runs(args, study_dir, name)
  workdirs = [workdir for workdir, _ in runs]
  shown = " ".join(f"{sweep.column(k)}={sweep.cli_value(v)}" for k, v in trial.params.items())
  retry = name != f"trial_{trial.number:04d}"
  prefix = f"[trial {trial.number}, in {name}]" if retry else f"[trial {trial.number}]"
  logs = [
    study_dir / "logs" / f"{name}{'-' + Path(w).name if extra else ''}.log" for w, extra in runs
  ]
  logs[0].parent.mkdir(parents=True, exist_ok=True)
  trainer = dataclasses.replace(args, emit=None)
  cmds = [sweep.train_command(trainer, w, {**trial.params, **extra}) for w, extra in runs]
  print(f"{prefix} {shown}: running, log {', '.join(map(str, logs))}", flush=True)
  for cmd in cmds:
    print(f"  {shlex.join(cmd)}", flush=True)
  for key, value in dict(workdir=name, host=socket.gethostname(), heartbeat=time.time()).items():
    trial.set_user_attr(key, value)
  start, beat, reported, timed_out = time.time(), time.time(), set(), False
  procs = []
  for cmd, log in zip(cmds, logs):
    with log.open("a") as out:
      procs.append(
        process.start(
          cmd,
          stdout=out,
          stderr=subprocess.STDOUT,
          env=sweep.trainer_env(study_dir),
          preexec_fn=die_with_worker if sys.platform == "linux" else None,
        )
      )

  def stop_all() -> None:
    for proc, workdir in zip(procs, workdirs):
      stop(proc, workdir)

  try:
    while True:
      exited = all(proc.poll() is not None for proc in procs)
      seed_curves = [curves(w).get(args.metric, {}) for w in workdirs]
      curve = {
        step: statistics.fmean(c[step] for c in seed_curves)
        for step in set.intersection(*(set(c) for c in seed_curves))
      }
      last = total_steps(workdirs[0])
      for step in sorted(set(curve) - reported):
        trial.report(curve[step], step)
        reported.add(step)
        if (last is None or step < last) and trial.should_prune():
          stop_all()
          pruned = dict(step=step, metric=args.metric, value=curve[step], trial=trial.number)
          for workdir in workdirs:
            workdir_lib.write_text(workdir_lib.path(workdir, PRUNED_FILE), json.dumps(pruned))
          finish(study, trial, workdirs, start, TrialState.PRUNED, pruned_step=step)
          print(f"{prefix} pruned at step {step} ({args.metric} {curve[step]:.4g})", flush=True)
          return True
      if exited:
        break
      if args.run_timeout is not None and time.time() - start > args.run_timeout:
        stop_all()
        timed_out = True
        break
      if time.time() - beat > HEARTBEAT_S:
        beat = time.time()
        trial.set_user_attr("heartbeat", beat)
      time.sleep(POLL_S)
  except KeyboardInterrupt:
    stop_all()
    requeue(study, trial.number)
    print(f"{prefix} interrupted: re-queued; rerun to resume it from its checkpoint", flush=True)
    raise
  if any(proc.returncode == preemption.EXIT_CODE for proc in procs):  # Saved on a signal.
    stop_all()
    requeue(study, trial.number)
    print(f"{prefix} stopped by a signal after saving: re-queued; rerun to resume it", flush=True)
    raise KeyboardInterrupt
  finals = [sweep.final_metrics(w) or {} for w in workdirs]
  failed = [
    (log, proc.returncode, final)
    for proc, log, final in zip(procs, logs, finals)
    if proc.returncode or args.metric not in final
  ]
  if not timed_out and not failed:
    values = [final[args.metric] for final in finals]
    value = statistics.fmean(values)
    notes = dict(values=values, sd=statistics.stdev(values)) if len(values) > 1 else {}
    finish(study, trial, workdirs, start, TrialState.COMPLETE, value=value, **notes)
    over = f" (mean over {len(values)} seeds)" if len(values) > 1 else ""
    print(f"{prefix} done: {args.metric} {value:.4g}{over}", flush=True)
    return True
  log, returncode, _ = failed[0] if failed else (logs[0], 0, {})
  if timed_out:
    why = sweep.timed_out(args.run_timeout)
  elif returncode:
    why = f"exit code {returncode}"
  else:
    why = f"no {args.metric} in final metrics"
  finish(study, trial, workdirs, start, TrialState.FAIL, error=f"{why}: see logs/{log.name}")
  print(f"{prefix} FAILED ({why}); last lines of {log}:\n{sweep.log_tail(log)}", file=sys.stderr)
  return False


def finish(
  study: optuna.Study,
  trial: optuna.Trial,
  workdirs: list[str],
  start: float,
  state: TrialState,
  value: float | None = None,
  **notes: Any,
) -> None:
  """Records what the trial cost (steps over its runs, seconds) and tells Optuna how it
  ended."""
  steps = sum(steps_run(w) for w in workdirs)
  for key, note in dict(steps=steps, seconds=time.time() - start, **notes).items():
    trial.set_user_attr(key, note)
  study.tell(trial, value, state=state)


# ---- Results ----------------------------------------------------------------------


def results(args: Options, study: optuna.Study, study_dir: Path) -> str:
  """Writes the trials table, best.txt and the plots; returns the summary to print."""
  trials = study.get_trials()
  retries = retried(trials)
  keys = list(dict.fromkeys(k for t in trials for k in t.params))
  rows = []
  for t in trials:
    note = t.user_attrs.get("error", "")
    if t.number in retries:
      note = f"re-queued as trial {retries[t.number]}"
    elif "pruned_step" in t.user_attrs:
      note = f"pruned at step {t.user_attrs['pruned_step']}"
    rows.append(
      {
        "run": trial_dir(t),
        "trial": t.number,
        **{sweep.column(k): v for k, v in t.params.items()},
        args.metric: t.value,
        **(
          {
            f"{args.metric} sd": t.user_attrs.get("sd"),
            f"{args.metric} values": ";".join(map(repr, t.user_attrs.get("values", []))),
          }
          if args.seeds > 1
          else {}
        ),
        "state": t.state.name,
        "steps": t.user_attrs.get("steps"),
        "seconds": t.user_attrs.get("seconds"),
        "note": note,
      }
    )
  spread = [f"{args.metric} sd", f"{args.metric} values"] if args.seeds > 1 else []
  columns = ["trial", *map(sweep.column, keys), args.metric, *spread]
  columns += ["state", "steps", "seconds", "note"]
  sweep.write_tables(columns, rows, study_dir)
  lines = [f"Wrote {study_dir / 'results.md'} and {study_dir / 'results.csv'}"]

  # Cost: each workdir once (a retry continues its trial's workdir), against what the
  # trials would have run unpruned.
  ran = configured = 0
  for name in {trial_dir(t) for t in trials}:
    for workdir, _ in trial_runs(args, study_dir, name):
      ran += steps_run(workdir)
      configured += total_steps(workdir) or 0
  states = [t.state.name for t in trials if t.number not in retries]
  counts = ", ".join(f"{states.count(s)} {s.lower()}" for s in dict.fromkeys(sorted(states)))
  lines.append(f"{len(states)} trials" + (f" ({counts})" if counts else "") + f"; {ran} steps run")
  if configured:
    lines[-1] += f" of the {configured} configured (pruning saved {1 - ran / configured:.0%})"

  complete = [t for t in trials if t.state == TrialState.COMPLETE]
  if complete:
    best = study.best_trial
    command = sweep.train_command(
      dataclasses.replace(args, emit=None), sweep.workdir_of(str(study_dir), "best"), best.params
    )
    (study_dir / "best.txt").write_text(shlex.join(command) + "\n")
    over = f", mean over {args.seeds} seeds" if args.seeds > 1 else ""
    lines.append(
      f"Best {args.metric} {best.value:.4g} (trial {best.number}{over}); {study_dir}/best.txt:"
    )
    lines.append(f"  {shlex.join(command)}")
    lines += plots(study, study_dir, len(complete))
  return "\n".join(lines)


def plots(study: optuna.Study, study_dir: Path, complete: int) -> list[str]:
  """Optuna's optimisation history and parameter importances (of 2 or more complete trials)
  as PNGs."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from optuna.visualization import matplotlib as optuna_plots

  drawn = [("history.png", optuna_plots.plot_optimization_history)]
  out = []
  if complete >= 2:
    drawn.append(("importance.png", optuna_plots.plot_param_importances))
  else:
    out.append("importance.png: not drawn (Optuna's importances need 2 complete trials)")
  for name, draw in drawn:
    figure = draw(study).figure
    figure.set_size_inches(8, 5)
    figure.tight_layout()
    figure.savefig(study_dir / name, dpi=100)
    plt.close(figure)
    out.append(f"Wrote {study_dir / name}")
  return out


# ---- Other hosts ------------------------------------------------------------------


def worker_flags(args: Options) -> list[str]:
  """This search's own flags as a worker takes them: all but --seed and the emitting ones."""
  out = []
  for field in dataclasses.fields(Options):
    value = getattr(args, field.name)
    skip = ("seed", "emit", "workers", "collect", "python", "train_flags")
    if field.name in skip or value is None or value is False:
      continue
    out += [f"--{field.name}"] if value is True else [f"--{field.name}", str(value)]
  return out


def emitted(args: Options) -> list[str]:
  """The shell lines that start `--workers` workers of this search, each with its own
  sampler seed (--seed, --seed + 1, ...)."""
  script = str(sweep.REPO_ROOT / "launch/search.py")
  trainer = shlex.join(["--", *args.train_flags])
  if args.emit == "slurm":  # One array job; SLURM_ARRAY_TASK_ID is read in each task.
    worker = shlex.join([args.python, script, *worker_flags(args)])
    wrap = f"{worker} --seed $(({args.seed} + SLURM_ARRAY_TASK_ID)) {trainer}"
    array = f"--array=0-{args.workers - 1}"
    return [f"sbatch {array} --job-name=mmtl-search --wrap {shlex.quote(wrap)}"]
  lines = []
  for w in range(args.workers):
    seed = ["--seed", str(args.seed + w)]
    if args.emit == "local":
      lines.append(shlex.join([args.python, script, *worker_flags(args), *seed]) + f" {trainer}")
      continue
    # TPU VM ${TPU_NAME}-w: launch/tpu_vm.sh up ships the code and the venv to ~/mmtl; the
    # worker runs detached there, as tpu_vm.sh run runs the trainer.
    worker = shlex.join([".venv/bin/python", "launch/search.py", *worker_flags(args), *seed])
    remote = f"cd ~/mmtl && setsid nohup {worker} {trainer} >search.log 2>&1 </dev/null &"
    vm = f'"${{TPU_NAME}}-{w}"'
    lines.append(
      f"{sweep.REPO_ROOT}/launch/tpu_vm.sh up --name {vm} && gcloud compute tpus tpu-vm ssh {vm}"
      f' --zone "${{TPU_ZONE}}" --worker=0 --command {shlex.quote(remote)}'
    )
  return lines


# ---- Main -------------------------------------------------------------------------


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The search's flags; `--study-dir`, `--keep-going`, `--train-module` are aliases."""
  sweep.define_trainer_flags(flag_values)
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("study_dir", None, "The study and one workdir per trial. Required.", **fv)
  flags.DEFINE_integer(
    "trials", None, "Trials in the study, across all workers and reruns. Required.", **fv
  )
  flags.DEFINE_string("metric", "val/accuracy", "Evaluator metric optimized and pruned on.", **fv)
  flags.DEFINE_enum("mode", "max", ["max", "min"], "Maximize or minimize --metric.", **fv)
  flags.DEFINE_enum("sampler", "tpe", ["tpe", "random"], "Optuna sampler.", **fv)
  flags.DEFINE_enum(
    "pruner",
    "asha",
    ["asha", "median", "none"],
    "Stops trials early: asha (successive halving), median (below the median of the "
    "trials at the same step), none.",
    **fv,
  )
  flags.DEFINE_integer("seed", 0, "Seed of this worker's sampler.", **fv)
  flags.DEFINE_integer(
    "seeds",
    1,
    "Train each trial with config.seed 0..N-1 side by side (workdirs trial_NNNN/seed=S); "
    "its value, and each evaluation the pruner sees, is the mean over the seeds.",
    lower_bound=1,
    **fv,
  )
  flags.DEFINE_string(
    "storage",
    None,
    "Optuna storage URL (e.g. postgresql://..., sqlite:///...) instead of "
    "STUDY_DIR/study.journal: for workers that share no filesystem.",
    **fv,
  )
  flags.DEFINE_string("study_name", None, "Name of the study (default: STUDY_DIR's name).", **fv)
  flags.DEFINE_enum(
    "emit",
    None,
    ["local", "tpu", "slurm"],
    "Print the commands that start --workers workers instead of running one: local "
    "(python launch/search.py ...), tpu (on TPU VMs ${TPU_NAME}-0, -1, ...), slurm "
    "(one sbatch array job).",
    **fv,
  )
  flags.DEFINE_integer("workers", 1, "Workers that --emit starts.", lower_bound=1, **fv)
  flags.DEFINE_bool("collect", False, "Only (re)write the results from the study.", **fv)
  flags.DEFINE_bool(
    "keep_going", False, "Go on with the next trial after a failed one, instead of stopping.", **fv
  )
  flags.DEFINE_alias("study-dir", "study_dir", **fv)
  flags.DEFINE_alias("keep-going", "keep_going", **fv)


def error(message: Any) -> int:
  print(f"search.py: error: {message}", file=sys.stderr)
  return 2


def run(flag_values: flags.FlagValues, train_flags: list[str]) -> int:
  """Runs, emits or collects the search of parsed flags; returns the exit code (2: bad input)."""
  try:
    args = sweep.options(flag_values, train_flags, Options, ("config", "study_dir"))
    if not args.collect and not (args.trials and args.trials > 0):
      raise ValueError("--trials is required: the number of trials of the study (> 0)")
    if "://" in args.study_dir:
      raise ValueError(
        f"--study_dir must be a local or mounted directory, not {args.study_dir} "
        "(trial workdirs and the journal are files)"
      )
    space = load_space(args.config)
    if args.seeds > 1 and sweep.SEED_KEY in space:
      raise ValueError(
        f"--seeds {args.seeds} sets config.seed, which the search space searches: drop one"
      )
    every = check(args, space)
  except (ValueError, config_lib.ConfigError) as e:
    return error(e)
  if args.emit:
    print("\n".join(emitted(args)))
    return 0

  warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  study_dir = Path(args.study_dir)
  study_dir.mkdir(parents=True, exist_ok=True)
  try:
    study = open_study(args, space, make_sampler(args), make_pruner(args.pruner, every))
  except ValueError as e:
    return error(e)
  failed = interrupted = False
  if not args.collect:
    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
      requeue_stale(study)
      while has_work(study, args.trials):
        failed = not run_trial(args, study, space, study_dir) or failed
        if failed and not args.keep_going:
          break
        requeue_stale(study)
    except KeyboardInterrupt:
      interrupted = True
    finally:
      signal.signal(signal.SIGTERM, previous)
  print(results(args, study, study_dir))
  if interrupted:
    return 130
  return 1 if failed else 0


def main(argv: list[str]) -> int:
  """The search of command line `argv` (without the program name): for tests and Python
  callers; `python launch/search.py ARGS` runs the same through app.run."""
  return sweep.run_with_own_flags("search.py", define_flags, run, argv)


if __name__ == "__main__":
  define_flags()
  app.run(lambda argv: run(flags.FLAGS, argv[1:]), flags_parser=sweep.parse_flags)
