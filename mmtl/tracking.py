"""Experiment tracking services a run also reports to: Weights & Biases and MLflow.

Off by default (`config.tracking.backends=()`); TensorBoard and metrics.jsonl are always
written (mmtl.metrics). Each backend listed gets what TensorBoard gets: every logged
metric at its step, the config (as the run's hyperparameters) and the final metrics
table, from the main process only.

  config.tracking = dict(
    backends=("wandb", "mlflow"),
    project="mmtl",        # W&B project / MLflow experiment
    name="",               # the tracked run's name ('' : the workdir's name)
    wandb_mode="offline",  # offline: written under DIR/wandb, no network (`wandb sync` later)
    mlflow_uri="",         # '' : a local store, DIR/mlflow.db (SQLite; see below)
  )

MLflow's default here is a SQLite database in the workdir, `sqlite:///DIR/mlflow.db`, with
its runs' artifacts in DIR/mlflow_artifacts (`mlflow ui --backend-store-uri
sqlite:///DIR/mlflow.db` shows them): MLflow 3 refuses its
directory file store (`file:DIR/mlruns`, in maintenance mode) unless
`MLFLOW_ALLOW_FILE_STORE=true` is set, and `mlflow_uri` takes that too, or a tracking
server's URL. A resumed run continues the same tracked run: the ids a run was given are kept in
DIR/tracking.json and passed back when the workdir resumes (W&B `resume="allow"` with the
same id; MLflow's run reopened by id). A backend that is not installed is refused before
anything is written, naming the pip command. MLflow metric names allow letters, digits
and `_ - . / : ` and space only, so other characters become `_` (`val/i2t_recall@1` is
`val/i2t_recall_1` there).
"""

from __future__ import annotations

from collections.abc import Mapping
import importlib.util
import json
import os
import re
import secrets
import tempfile
import time
from typing import Any, Protocol

from mmtl import config_keys
from mmtl import metrics as metrics_lib
from mmtl import workdir as workdir_lib

IDS_FILE = "tracking.json"
MLFLOW_DB = "mlflow.db"  # MLflow's local store in the workdir (SQLite)
MLFLOW_ARTIFACTS = "mlflow_artifacts"  # its runs' artifacts (final_metrics.json, .txt)
CONFIG_KEYS = dict(backends=(), project="mmtl", name="", wandb_mode="offline", mlflow_uri="")
# backend -> (module it imports, the pip command that installs it)
BACKENDS = {"wandb": ("wandb", "pip install wandb"), "mlflow": ("mlflow", "pip install mlflow")}
WANDB_MODES = ("offline", "online", "disabled")


class Tracker(Protocol):
  """One tracking backend's run: metrics at a step, then the final table."""

  def log(self, step: int, values: Mapping[str, float]) -> None: ...

  def close(self, final: Mapping[str, float] | None) -> None: ...


def check(tracking: Mapping[str, Any], workdir: str) -> dict[str, Any]:
  """`config.tracking` with defaults; a ConfigError for an unknown backend or mode, a
  backend whose package is not installed (naming the pip command), or local files a
  backend would keep in a `gs://` workdir (W&B offline, MLflow's default store)."""
  config_keys.check_keys(tracking, CONFIG_KEYS, "config.tracking")
  cfg = {**CONFIG_KEYS, **tracking}
  for backend in cfg["backends"]:
    if backend not in BACKENDS:
      raise config_keys.ConfigError(
        f"config.tracking.backends has {backend!r}; use any of {sorted(BACKENDS)}."
      )
    module, pip = BACKENDS[backend]
    if importlib.util.find_spec(module) is None:
      raise config_keys.ConfigError(
        f"config.tracking.backends has {backend!r}, which is not installed: `{pip}`, or "
        f"drop it (--config.tracking.backends=\"()\")."
      )
  if cfg["wandb_mode"] not in WANDB_MODES:
    raise config_keys.ConfigError(
      f"config.tracking.wandb_mode={cfg['wandb_mode']!r}; use one of {WANDB_MODES}."
    )
  if workdir_lib.is_remote(workdir):
    if "wandb" in cfg["backends"] and cfg["wandb_mode"] == "offline":
      raise config_keys.ConfigError(
        f"W&B's offline files cannot live in {workdir}: set config.tracking.wandb_mode="
        "'online' (its local files then go to a temporary directory), or use a local workdir."
      )
    if "mlflow" in cfg["backends"] and not cfg["mlflow_uri"]:
      raise config_keys.ConfigError(
        f"MLflow's local store cannot live in {workdir}: set config.tracking.mlflow_uri "
        "(a tracking server's URL, or a local sqlite:/// database)."
      )
  return cfg


def open_trackers(config: Mapping[str, Any], workdir: str) -> list[Tracker]:
  """The trackers `config["tracking"]` asks for, each continuing the tracked run this
  workdir started (DIR/tracking.json), with the config (a JSON-able dict) logged."""
  cfg = check(config.get("tracking", {}), workdir)
  if not cfg["backends"]:
    return []
  ids_file = workdir_lib.path(workdir, IDS_FILE)
  ids = workdir_lib.read_json(ids_file) if ids_file.exists() else {}
  name = cfg["name"] or os.path.basename(os.path.normpath(os.fspath(workdir)))
  params = flat_config(config)
  opened = {
    backend: OPENERS[backend](cfg, workdir, name, ids.get(backend), params)
    for backend in cfg["backends"]
  }
  ids = {**ids, **{backend: tracker.run_id for backend, tracker in opened.items()}}
  workdir_lib.write_text(ids_file, json.dumps(ids, indent=1))
  return list(opened.values())


def flat_config(config: Mapping[str, Any]) -> dict[str, Any]:
  """A config dict as {"optim.lr": 0.001, ...}: sections flattened."""
  out = {}

  def visit(prefix: str, node: Any) -> None:
    if isinstance(node, Mapping) and node:
      for key, value in node.items():
        visit(f"{prefix}.{key}" if prefix else str(key), value)
    else:
      out[prefix] = node

  visit("", config)
  return out


class WandbTracker:
  """A W&B run (offline by default: files under DIR/wandb, synced later with `wandb sync`)."""

  def __init__(
    self,
    cfg: Mapping[str, Any],
    workdir: str,
    name: str,
    run_id: str | None,
    params: Mapping[str, Any],
  ):
    import wandb

    self._wandb = wandb
    self.run_id = run_id or secrets.token_hex(6)  # W&B ids: letters and digits
    # Online from a gs:// workdir (`check`), its local files are only a staging area.
    remote = workdir_lib.is_remote(workdir)
    self._run = wandb.init(
      project=cfg["project"],
      name=name,
      id=self.run_id,
      resume="allow",
      mode=cfg["wandb_mode"],
      dir=tempfile.mkdtemp(prefix="mmtl_wandb_") if remote else os.fspath(workdir),
      config=params,
      reinit="create_new",
    )

  def log(self, step: int, values: Mapping[str, float]) -> None:
    self._run.log(dict(values), step=step)

  def close(self, final: Mapping[str, float] | None) -> None:
    if final is not None:
      self._run.summary.update(dict(final))
      rows = [[name, value] for name, value in final.items()]
      table = self._wandb.Table(columns=["metric", "value"], data=rows)
      self._run.log({"final_metrics": table}, step=int(final["step"]))
    self._run.finish(exit_code=0 if final is not None else 1)


MLFLOW_NAME = re.compile(r"[^\w\-./: ]")


def mlflow_name(name: str) -> str:
  """`name` with the characters MLflow refuses in metric and param names as `_`."""
  return MLFLOW_NAME.sub("_", name)


class MlflowTracker:
  """An MLflow run in `mlflow_uri` (default: DIR/mlflow.db), through MlflowClient."""

  def __init__(
    self,
    cfg: Mapping[str, Any],
    workdir: str,
    name: str,
    run_id: str | None,
    params: Mapping[str, Any],
  ):
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    uri, artifacts = cfg["mlflow_uri"], None
    if not uri:  # A local workdir (`check`).
      local = os.path.abspath(os.fspath(workdir))
      uri = "sqlite:///" + os.path.join(local, MLFLOW_DB)
      # A database store keeps artifacts in ./mlruns of the process's directory unless
      # its experiment names a place: the workdir's.
      artifacts = "file://" + os.path.join(local, MLFLOW_ARTIFACTS)
    self._client = client = MlflowClient(tracking_uri=uri)
    if run_id is None:
      project = cfg["project"]
      experiment = client.get_experiment_by_name(project)
      experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment(project, artifact_location=artifacts)
      )
      run_id = client.create_run(experiment_id, run_name=name).info.run_id
      # MLflow params are strings of limited length, set once (a resumed run keeps them).
      batch = [Param(mlflow_name(k), json.dumps(v)[:6000]) for k, v in params.items()]
      for start in range(0, len(batch), 100):
        client.log_batch(run_id, params=batch[start : start + 100])
    else:
      client.update_run(run_id, status="RUNNING")
    self.run_id = run_id

  def log(self, step: int, values: Mapping[str, float]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(mlflow_name(k), float(v), now, step) for k, v in values.items()]
    self._client.log_batch(self.run_id, metrics=metrics)

  def close(self, final: Mapping[str, float] | None) -> None:
    if final is not None:
      self._client.log_dict(self.run_id, dict(final), "final_metrics.json")
      self._client.log_text(self.run_id, metrics_lib.format_table(final), "final_metrics.txt")
    self._client.set_terminated(self.run_id, status="FINISHED" if final is not None else "KILLED")


OPENERS = {"wandb": WandbTracker, "mlflow": MlflowTracker}
