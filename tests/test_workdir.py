"""Workdirs on an object store (gs://), offline, and the atomic final-metrics write.

GCS cannot be reached from the tests, so `fake_gcs` serves `gs://...` from a local
folder through `etils.epath.testing.mock_epath` (which swaps the backend behind every
epath path) and enforces what an object store forbids: appending, and making
directories (gcsfs would create a bucket). A write that bypasses epath would land
in a local `gs:` folder in the working directory, which the fixture checks is empty.
"""

import errno
import json
import os
from pathlib import Path
import struct
import sys
import textwrap
import time

from etils.epath import testing as epath_testing
import ml_collections as mlc
import pytest

from mmtl import checkpoint, data, distributed, evaluate, metrics, process, train
from mmtl import config as config_lib
from mmtl import workdir as workdir_lib

# The tiny trainer setup of test_train (its fixtures are registered here by the import).
from tests.test_train import (  # noqa: F401
  Preempted,
  patch_train_batches,
  tiny_config,
)

RUN = "gs://bucket/run"


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """Serves gs://BUCKET/KEY from tmp_path/gcs/BUCKET/KEY; yields the gs:// -> local map."""
  root, cwd = tmp_path / "gcs", tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)

  def local(path):
    path = os.fspath(path)
    return str(root / path[len("gs://") :]) if path.startswith("gs://") else path

  def one(original, path, *args, **kwargs):
    return original(local(path), *args, **kwargs)

  def two(original, path, dst, **kwargs):
    return original(local(path), local(dst), **kwargs)

  def open_(original, path, mode):
    if os.fspath(path).startswith("gs://"):
      assert "a" not in mode, f"append to an object: {path}"
      os.makedirs(os.path.dirname(local(path)), exist_ok=True)  # Objects need no directories.
    return original(local(path), mode)

  def no_dirs(original, path, **kwargs):
    assert not os.fspath(path).startswith("gs://"), f"directory made on an object store: {path}"
    return original(path, **kwargs)

  with epath_testing.mock_epath(
    open=open_,
    exists=one,
    isdir=one,
    listdir=one,
    stat=one,
    remove=one,
    rmtree=one,
    rename=two,
    replace=two,
    copy=two,
    makedirs=no_dirs,
    mkdir=no_dirs,
  ):
    yield local
  assert not os.listdir(cwd), "a write bypassed epath"


def tb_events(tb_dir):
  """The events of every TensorBoard event file in `tb_dir` (TFRecord framing)."""
  from tensorboardX.proto import event_pb2

  for file in sorted(tb_dir.iterdir()):
    raw, pos = file.read_bytes(), 0
    while pos < len(raw):
      (length,) = struct.unpack("Q", raw[pos : pos + 8])
      yield event_pb2.Event.FromString(raw[pos + 12 : pos + 12 + length])
      pos += 12 + length + 4


def tb_scalars(tb_dir) -> dict[str, list[int]]:
  """{tag: steps} of the summaries in `tb_dir`."""
  steps: dict[str, list[int]] = {}
  for event in tb_events(tb_dir):
    for value in event.summary.value:
      steps.setdefault(value.tag, []).append(event.step)
  return steps


def tb_texts(tb_dir) -> dict[str, str]:
  """{tag: text} of the text summaries in `tb_dir` (TensorBoard's text tab)."""
  return {
    value.tag: value.tensor.string_val[0].decode()
    for event in tb_events(tb_dir)
    for value in event.summary.value
    if value.tensor.string_val
  }


def test_metric_writer_on_an_object_store_rewrites_and_keeps_history(fake_gcs):
  writer = metrics.MetricWriter(RUN, total_steps=3, batch_size=1)
  writer.write(1, {"train/loss": 1.0})
  metrics_file = workdir_lib.path(RUN, metrics.METRICS_FILE)
  tb = workdir_lib.path(RUN, metrics.TB_DIR)
  assert metrics_file.read_text() == '{"step": 1, "train/loss": 1.0}\n'  # Uploaded at once,
  assert tb_scalars(tb) == {"train/loss": [1]}  # TensorBoard events too (a preemption loses none).
  writer.write(2, {"train/loss": 0.5})
  writer.close()
  time.sleep(1.1)  # Event files are named by the second they were opened in.
  config = {"optim": {"lr": 0.1}}
  resumed = metrics.MetricWriter(RUN, total_steps=3, batch_size=1, first_step=1, config=config)
  resumed.write(2, {"train/loss": 0.25})  # A resume, which ends: the config and final table.
  resumed.close(final={"val/accuracy": 0.5, "step": 2.0})
  texts = tb_texts(tb)
  assert json.dumps(config, indent=2) in texts["config/text_summary"]
  assert "val/accuracy" in texts["final_metrics/text_summary"]
  assert [json.loads(line)["step"] for line in metrics_file.read_text().splitlines()] == [1, 2, 2]
  assert metrics.read(RUN) == {"train/loss": {1: 1.0, 2: 0.25}}
  assert len(list(tb.iterdir())) == 2  # One event file per run, as locally.
  assert sorted(tb_scalars(tb)["train/loss"]) == [1, 2, 2]
  assert metrics.plot_curves(RUN) == f"{RUN}/curves.png"
  assert workdir_lib.path(RUN, "curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_training_and_evaluation_in_a_gs_workdir(fake_gcs, tiny_bert_dir, data_dir, monkeypatch):
  # orbax reaches gs:// through tensorstore's own GCS driver, which the epath mock does
  # not cover: checkpoints go to the fake bucket's local folder directly.
  real_manager = checkpoint.CheckpointManager
  monkeypatch.setattr(
    checkpoint, "CheckpointManager", lambda directory, **kw: real_manager(fake_gcs(directory), **kw)
  )
  config = tiny_config(tiny_bert_dir, data_dir)  # 6 steps, all logged, checkpoints every 2.

  def dies_fetching_step_6(n, batch):
    if n == 1 + 6:  # The trainer's shape probe, then updates 1..5 (or fewer, with prefetch).
      raise Preempted()
    return batch

  def path(name):
    return workdir_lib.path(RUN, name)

  def loss_steps(jsonl):
    return [r["step"] for r in map(json.loads, jsonl.splitlines()) if "train/loss" in r]

  real_iterator = patch_train_batches(monkeypatch, dies_fetching_step_6)
  with pytest.raises(Preempted):
    train.train(config, RUN)
  first_run = path(metrics.METRICS_FILE).read_text()
  with real_manager(fake_gcs(f"{RUN}/checkpoints"), read_only=True) as manager:
    resume_step = manager.latest_step()
  assert loss_steps(first_run)[-1] > resume_step  # Steps after the checkpoint were logged.
  monkeypatch.setattr(data, "make_train_iterator", real_iterator)
  final = train.train(config, RUN)  # Resumes from the checkpoint.

  # As a local append: the interrupted run's lines stay, the redone steps follow them.
  logged = path(metrics.METRICS_FILE).read_text()
  assert logged.startswith(first_run)
  assert loss_steps(logged[len(first_run) :]) == list(range(resume_step + 1, 7))
  assert sorted(metrics.read(RUN)["train/loss"]) == [1, 2, 3, 4, 5, 6]
  assert sorted(tb_scalars(path(metrics.TB_DIR))["train/loss"]) == sorted(loss_steps(logged))
  assert workdir_lib.read_json(path(train.FINAL_METRICS_FILE)) == pytest.approx(final)
  assert workdir_lib.read_json(path(config_lib.CONFIG_FILE)) == config_lib.to_dict(
    config_lib.with_defaults(config)
  )
  assert path(metrics.CURVES_FILE).read_bytes()[:4] == b"\x89PNG"

  saved = config_lib.load_json(path(config_lib.CONFIG_FILE))
  again = evaluate.evaluate(saved, RUN)
  assert workdir_lib.read_json(path("eval_step6.json")) == pytest.approx(again)
  assert again["val/accuracy"] == pytest.approx(final["val/accuracy"])


def test_sweep_skips_finished_runs_of_a_gs_sweep_dir(fake_gcs, tmp_path, capsys, monkeypatch):
  monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "launch"))
  import sweep

  config = tmp_path / "base.py"
  config.write_text("def get_config(arg=None):\n  return {}\n")
  argv = ["--config", str(config), "--sweep_dir", "gs://bucket/s", "--grid", "lr=1,2"]
  assert sweep.main([*argv, "--emit", "local"]) == 0
  assert len(capsys.readouterr().out.splitlines()) == 2
  # The record of the commands given is in the bucket, beside the runs.
  recorded = workdir_lib.read_json(workdir_lib.path("gs://bucket/s", "sweep.json"))
  assert [r["command"][-1] for r in recorded["runs"]] == ["--config.lr=1", "--config.lr=2"]
  workdir_lib.write_text(workdir_lib.path("gs://bucket/s/lr=1", "final_metrics.json"), "{}")
  assert sweep.main([*argv, "--emit", "local"]) == 0
  printed = capsys.readouterr().out.splitlines()  # lr=1 has finished.
  assert len(printed) == 1 and printed[0].endswith(" --workdir gs://bucket/s/lr=2 --config.lr=2")
  # Emitted with other flags, the finished run is refused, as in a local sweep.
  assert sweep.main([*argv, "--emit", "local", "--", "--config.seed=3"]) == 2
  assert "lr=1: this sweep adds --config.seed=3" in capsys.readouterr().err


def test_write_final_is_atomic(tmp_path, monkeypatch):
  train.write_final(str(tmp_path), {"val/accuracy": 0.5, "step": 10.0})
  before = (tmp_path / "final_metrics.json").read_text()
  assert before == json.dumps({"val/accuracy": 0.5, "step": 10.0}, indent=2)

  def fails_midway(self, o, _one_shot=False):  # Encoding breaks after the first chunk.
    yield "{"
    raise ValueError("not JSON-serializable")

  with monkeypatch.context() as m:
    m.setattr(json.JSONEncoder, "iterencode", fails_midway)
    with pytest.raises(ValueError, match="serializable"):
      train.write_final(str(tmp_path), {"val/accuracy": 0.9, "step": 20.0})
  assert (tmp_path / "final_metrics.json").read_text() == before

  class DiskFull:  # Writes half of the text, then fails.
    def __init__(self, f):
      self.f = f

    def write(self, text):
      self.f.write(text[: len(text) // 2])
      self.f.flush()
      raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self.f.close()

  with epath_testing.mock_epath(open=lambda original, path, mode: DiskFull(original(path, mode))):
    with pytest.raises(OSError, match="No space"):
      train.write_final(str(tmp_path), {"val/accuracy": 0.9, "step": 20.0})
  assert (tmp_path / "final_metrics.json").read_text() == before
  assert os.listdir(tmp_path) == ["final_metrics.json"]  # No temporary file left behind.


def test_only_process_0_writes_config(tmp_path, monkeypatch):
  monkeypatch.setattr(distributed, "is_main_process", lambda: False)
  config = config_lib.with_defaults(mlc.ConfigDict(dict(total_steps=10)))
  config_lib.pin(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()  # Process 0 writes it.


def test_tensorboard_events_are_written_without_importing_torch(tmp_path):
  """tensorboardX imports torch wherever it is installed (about 2 s per trainer process);
  mmtl's writer keeps it out, and torch stays importable afterwards."""
  script = textwrap.dedent(f"""\
      import sys
      from mmtl import metrics
      writer = metrics.MetricWriter({str(tmp_path)!r}, total_steps=1, batch_size=1)
      writer.write(1, {{"train/loss": 0.5}})
      writer.close()
      assert "torch" not in sys.modules, "tensorboardX imported torch"
      import torch
      """)
  process.run([sys.executable, "-c", script], check=True, timeout=120)
  assert tb_scalars(tmp_path / metrics.TB_DIR) == {"train/loss": [1]}
