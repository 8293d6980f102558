"""Experiment tracking (mmtl.tracking): W&B offline and a local MLflow store, no network."""

import json
import os
from pathlib import Path
import signal
import struct
import sys

import pytest

from mmtl import config as config_lib
from mmtl import data, metrics, tracking, train
from tests.test_train import patch_train_batches, tiny_config
from tests.test_workdir import tb_texts

TRACKING = dict(backends=("wandb", "mlflow"), project="mmtl-test", name="tiny")


def wandb_records(run_dir):
  """The records of a W&B offline run's `.wandb` transaction log (what `wandb sync`
  uploads): W&B's LevelDB-log format, 32 KiB blocks of (crc32, length, type) chunks, each
  record a `wandb_internal_pb2.Record`."""
  from wandb.proto import wandb_internal_pb2  # pylint: disable=g-import-not-at-top

  (log,) = run_dir.glob("*.wandb")
  raw, pos, chunks = log.read_bytes(), 7, b""  # 7: the ":W&B" file header
  while pos + 7 <= len(raw):
    if 32768 - pos % 32768 < 7:  # A block's tail too short for a chunk header: padding.
      pos += 32768 - pos % 32768
      continue
    _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
    chunks += raw[pos + 7 : pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):  # FULL or LAST: a whole record.
      record = wandb_internal_pb2.Record()
      record.ParseFromString(chunks)
      chunks = b""
      yield record


def wandb_run(run_dir):
  """A W&B offline run's logged rows ({step: {name: value}}), summary and config."""
  history, summary, config = {}, {}, {}

  def items(updates):
    return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in updates}

  for record in wandb_records(run_dir):
    kind = record.WhichOneof("record_type")
    if kind == "history":
      row = items(record.history.item)
      history.setdefault(row.pop("_step"), {}).update(row)
    elif kind == "summary":
      summary.update(items(record.summary.update))
    elif kind == "run":
      config.update(items(record.run.config.update))
  return history, summary, config


@pytest.mark.slow
def test_a_stopped_and_resumed_run_reports_one_tracked_run_to_each_backend(
  tiny_bert_dir, data_dir, tmp_path, monkeypatch
):
  """SIGTERM after step 3, the same command again: each backend holds one run (the same
  id) with every step's metrics, the config and the final table."""
  from mlflow.tracking import MlflowClient

  config = tiny_config(tiny_bert_dir, data_dir, ckpt_every=100, tracking=TRACKING)
  config.evals.val.every = 3
  workdir = tmp_path / "run"

  def sigterm_at_batch_3(n, batch):
    if n == 1 + 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return batch

  real = patch_train_batches(monkeypatch, sigterm_at_batch_3)
  with pytest.raises(train.Stopped):
    train.train(config, str(workdir))
  ids = json.loads((workdir / tracking.IDS_FILE).read_text())
  monkeypatch.setattr(data, "make_train_iterator", real)
  final = train.train(config, str(workdir))
  assert json.loads((workdir / tracking.IDS_FILE).read_text()) == ids  # the same runs
  logged = metrics.read(str(workdir))

  client = MlflowClient(tracking_uri=f"sqlite:///{workdir / tracking.MLFLOW_DB}")
  (run,) = client.search_runs([client.get_experiment_by_name("mmtl-test").experiment_id])
  assert run.info.run_id == ids["mlflow"] and run.info.status == "FINISHED"
  assert run.info.run_name == "tiny" and run.data.params["optim.lr"] == "0.003"
  for name in ("train/loss", "val/accuracy"):
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
    assert history == pytest.approx(logged[name]), name
  artifact = client.download_artifacts(run.info.run_id, "final_metrics.json", str(tmp_path))
  assert json.loads(open(artifact).read()) == pytest.approx(final)
  # Artifacts stay in the workdir (a database store would put them in the process's ./mlruns).
  stored = workdir / tracking.MLFLOW_ARTIFACTS / run.info.run_id / "artifacts"
  assert sorted(p.name for p in stored.iterdir()) == ["final_metrics.json", "final_metrics.txt"]
  assert not (Path.cwd() / "mlruns").exists()

  runs = sorted((workdir / "wandb").glob(f"offline-run-*-{ids['wandb']}"))
  assert len(runs) == 2  # The first attempt and its resume: one run id, synced as one run.
  rows = {}
  for run_dir in runs:
    history, summary, logged_config = wandb_run(run_dir)
    rows.update(history)
    assert logged_config["optim.lr"] == 0.003
  for name in ("train/loss", "val/accuracy"):
    got = {step: row[name] for step, row in rows.items() if name in row}
    assert got == pytest.approx(logged[name]), name
  assert {k: summary[k] for k in final if k != "step"} == pytest.approx(
    {k: v for k, v in final.items() if k != "step"}
  )
  (table,) = (runs[-1] / "files" / "media" / "table").glob("final_metrics_*.table.json")
  assert dict(json.loads(table.read_text())["data"]) == pytest.approx(final)

  # TensorBoard's text tab: the config at the first step, the final table at the last.
  texts = tb_texts(workdir / metrics.TB_DIR)
  assert '"lr": 0.003' in texts["config/text_summary"]
  assert metrics.format_table(final) in texts["final_metrics/text_summary"]


def test_a_backend_that_is_not_installed_names_the_pip_command(
  tiny_bert_dir, data_dir, tmp_path, monkeypatch
):
  monkeypatch.setitem(sys.modules, "wandb", None)
  monkeypatch.setattr(
    tracking.importlib.util,
    "find_spec",
    lambda name, real=tracking.importlib.util.find_spec: None if name == "wandb" else real(name),
  )
  config = tiny_config(tiny_bert_dir, data_dir, tracking=dict(backends=("wandb",)))
  with pytest.raises(
    config_lib.ConfigError,
    match=r"config\.tracking\.backends has 'wandb', which is not installed: `pip install "
    r"wandb`, or drop it",
  ):
    train.train(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.parametrize(
  "tracking_cfg,message",
  [
    (dict(backends=("neptune",)), r"has 'neptune'; use any of \['mlflow', 'wandb'\]"),
    (dict(wandb_mode="cloud"), r"wandb_mode='cloud'; use one of"),
    (dict(backend=("wandb",)), r"config\.tracking\.backend"),
  ],
)
def test_bad_tracking_config(tracking_cfg, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    tracking.check(tracking_cfg, "/tmp/run")


def test_local_tracking_files_are_refused_in_a_gs_workdir():
  """W&B's offline files and MLflow's default store would not reach the bucket."""
  with pytest.raises(config_lib.ConfigError, match=r"W&B's offline files cannot live in gs://"):
    tracking.check(dict(backends=("wandb",)), "gs://bucket/run")
  with pytest.raises(config_lib.ConfigError, match=r"MLflow's local store cannot live in gs://"):
    tracking.check(dict(backends=("mlflow",)), "gs://bucket/run")
  remote = dict(backends=("wandb", "mlflow"), wandb_mode="online", mlflow_uri="http://mlflow:5000")
  assert tracking.check(remote, "gs://bucket/run")["wandb_mode"] == "online"


def test_mlflow_names_keep_what_mlflow_allows():
  assert tracking.mlflow_name("val/i2t_recall@1") == "val/i2t_recall_1"
  assert tracking.mlflow_name("speed/steps_per_s") == "speed/steps_per_s"
  assert tracking.flat_config({"optim": {"lr": 0.1, "frozen": []}, "seed": 0}) == {
    "optim.lr": 0.1,
    "optim.frozen": [],
    "seed": 0,
  }
