"""The trainer under bad input and faults: validation before anything is written, config
changes that do not fit, a held workdir, corrupt checkpoints, a full disk, one-line errors."""

import json
import os
from pathlib import Path
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import ml_collections as mlc
import pytest

from mmtl import checkpoint, data, evaluate, metrics, preemption, process, train
from mmtl import config as config_lib
from mmtl import workdir as workdir_lib
from mmtl.models import fusion
from tests import xla_settings
from tests.test_train import (  # noqa: F401
  TINY_VIT,
  losses,
  patch_train_batches,
  tiny_config,
)

REPO = Path(__file__).resolve().parent.parent
# Every test here starts from short_run, a trained run: end to end.
pytestmark = pytest.mark.slow


def written(workdir: Path) -> list[str]:
  """What a run left in its workdir, apart from its lock and empty directories."""
  if not workdir.exists():
    return []
  return sorted(
    str(p.relative_to(workdir))
    for p in workdir.rglob("*")
    if p.is_file() and p.name != workdir_lib.LOCK_FILE
  )


@pytest.fixture(scope="module")
def short_run(tiny_bert_dir, data_dir, tmp_path_factory):
  """(workdir, config, final metrics) of a finished 4-step run with checkpoints at 2 and 4."""
  workdir = tmp_path_factory.mktemp("short") / "run"
  config = tiny_config(tiny_bert_dir, data_dir, total_steps=4, ckpt_every=2)
  return workdir, config, train.train(config, str(workdir))


def copy_run(short_run, tmp_path) -> Path:
  shutil.copytree(short_run[0], tmp_path / "run")
  return tmp_path / "run"


def bad(config, **changes):
  config = mlc.ConfigDict(config.to_dict())
  for key, value in changes.items():
    node = config
    *parents, last = key.split(".")
    for part in parents:
      node = node[part]
    if last in node:
      del node[last]  # A ConfigDict field keeps its type: these tests set wrong ones.
    node[last] = value
  return config


@pytest.mark.parametrize(
  "change,message",
  [
    ({"model.fusion": "gatd"}, r"fusion"),
    ({"optim.frozen": ("txt_encoder/.*",)}, r"config\.optim\.frozen.*txt_encoder"),
    ({"evals.val.input.split": "validaton[:32]"}, r"Unknown split 'validaton'"),
    ({"input.fields.text": "questoin"}, r"Feature 'questoin' not in the dataset"),
    (
      {"batch_size": 12},
      r"config\.batch_size=12 must be a positive multiple of .* e\.g\. "
      r"--config\.batch_size=8",
    ),
    ({"input.split": "train[:0]"}, r"Split 'train\[:0\]' of .* has no examples"),
    (
      {"model.num_classes": "2"},
      r"config\.model\.num_classes='2' is a string; expected an integer",
    ),
    ({"best_metric": "val/acc"}, r"best_metric='val/acc' is not a metric .* val/accuracy"),
    ({"model_init.text_encoder": "/no/such/checkpoint"}, r"/no/such/checkpoint"),
    ({"model.towers.imgae": {"name": "x"}}, r"no modality is named 'imgae'; did you mean"),
    ({"evals.val.type": "clasification"}, r"config\.evals\.val\.type='clasification'"),
  ],
)
def test_a_typo_fails_before_anything_is_written(short_run, tmp_path, change, message):
  with pytest.raises(train.USER_ERRORS, match=message):
    train.train(bad(short_run[1], **change), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()  # Not even the folder (the lock was released on the error).


def test_an_image_tower_on_a_text_checkpoint_names_both(short_run, tiny_bert_dir, tmp_path):
  config = bad(short_run[1], **{"model.towers.image.name": tiny_bert_dir})
  with pytest.raises(
    config_lib.ConfigError,
    match=r"config\.model\.towers\.image: .* builds a Bert.*inputs are "
    r"\['input_ids'.*an image tower takes pixel_values",
  ):
    train.train(config, str(tmp_path / "w"))


def test_the_corrected_command_runs_after_a_typo(short_run, tmp_path):
  workdir = str(tmp_path / "w")
  with pytest.raises(config_lib.ConfigError, match="Unknown split"):
    train.train(bad(short_run[1], **{"evals.val.input.split": "tset"}), workdir)
  final = train.train(bad(short_run[1], total_steps=2), workdir)  # Not "a different config".
  assert final["step"] == 2


def test_an_incompatible_config_change_keeps_the_run(short_run, tmp_path):
  workdir = copy_run(short_run, tmp_path)
  before = (workdir / "config.json").read_text()
  gated = bad(short_run[1], **{"model.fusion": "gated"})
  with pytest.raises(
    config_lib.ConfigError,
    match=r"config\.model\.fusion: 'concat' -> 'gated'.*"
    r"--allow_config_change",
  ):
    train.train(gated, str(workdir))
  with pytest.raises(
    config_lib.ConfigError,
    match=r"does not fit the checkpoint at step 4 .*fusion/.* Nothing was changed",
  ):
    train.train(gated, str(workdir), allow_config_change=True)
  assert (workdir / "config.json").read_text() == before
  assert not list(workdir.glob("config.*.json"))
  saved = config_lib.load_json(workdir / "config.json")
  assert evaluate.evaluate(saved, str(workdir))["val/accuracy"] == pytest.approx(
    short_run[2]["val/accuracy"]
  )


def test_a_compatible_config_change_keeps_the_previous_config(short_run, tmp_path):
  workdir = copy_run(short_run, tmp_path)
  before = (workdir / "config.json").read_text()
  final = train.train(bad(short_run[1], total_steps=6), str(workdir), allow_config_change=True)
  assert final["step"] == 6
  assert (workdir / "config.4.json").read_text() == before
  assert config_lib.load_json(workdir / "config.json").total_steps == 6


def test_a_tower_typo_is_refused_even_with_allow_config_change(short_run, tmp_path):
  workdir = copy_run(short_run, tmp_path)
  before = {p: (workdir / p).read_bytes() for p in written(workdir)}
  typo = bad(short_run[1], **{"model.towers.imgae": {"name": "x"}})
  with pytest.raises(config_lib.ConfigError, match=r"no modality is named 'imgae'"):
    train.train(typo, str(workdir), allow_config_change=True)
  assert {p: (workdir / p).read_bytes() for p in written(workdir)} == before  # config.json too


def test_a_held_workdir_is_refused_at_once(short_run, tmp_path):
  workdir = copy_run(short_run, tmp_path)
  before = {p: (workdir / p).read_bytes() for p in written(workdir)}
  with workdir_lib.RunLock(str(workdir), run_id="the-other-run"):
    with pytest.raises(workdir_lib.WorkdirLocked, match=r"the-other-run.*lock\.json"):
      train.train(short_run[1], str(workdir))
  assert {p: (workdir / p).read_bytes() for p in written(workdir)} == before


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(short_run, tmp_path, capsys):
  workdir = copy_run(short_run, tmp_path)
  (workdir / "final_metrics.json").unlink()
  step4 = workdir / "checkpoints" / "4"
  victim = max(
    (p for p in step4.rglob("*") if p.is_file() and "params" in p.parts),
    key=lambda p: p.stat().st_size,
  )
  raw = bytearray(victim.read_bytes())
  raw[len(raw) // 2] ^= 0xFF  # One flipped byte: orbax would load it without complaint.
  victim.write_bytes(bytes(raw))
  final = train.train(short_run[1], str(workdir))
  out = capsys.readouterr()
  assert "Resuming from" in out.out and "/2." in out.out
  assert final["step"] == 4
  moved = list((workdir / checkpoint.CORRUPT_DIR).iterdir())
  assert [p.name.split(".")[0] for p in moved] == ["4"]  # Set aside, not deleted.
  # Steps 3 and 4 were trained again from step 2's state and data position: the same losses.
  assert losses(workdir)[3] == pytest.approx(losses(short_run[0])[3], rel=1e-6)
  assert losses(workdir)[4] == pytest.approx(losses(short_run[0])[4], rel=1e-6)


def test_a_lost_input_state_is_not_a_silent_restart(short_run, tmp_path):
  workdir = copy_run(short_run, tmp_path)
  (workdir / "final_metrics.json").unlink()
  for f in (workdir / "checkpoints" / "4" / checkpoint.DATA_ITEM).glob("process_*.json"):
    f.unlink()
  train.train(short_run[1], str(workdir))
  assert losses(workdir)[4] == pytest.approx(losses(short_run[0])[4], rel=1e-6)
  assert [p.name.split(".")[0] for p in (workdir / checkpoint.CORRUPT_DIR).iterdir()] == ["4"]


@pytest.fixture
def small_disk(tmp_path):
  """A 16 MiB tmpfs (CI runs as root, as here); skipped where mounting is not allowed."""
  mount = tmp_path / "disk"
  mount.mkdir()
  result = process.run(
    ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
    capture_output=True,
    text=True,
    timeout=60,
  )
  if result.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
  try:
    yield mount
  finally:
    process.run(["umount", "-l", str(mount)], check=False, timeout=60)


def test_a_full_disk_stops_at_the_first_failed_save(short_run, small_disk, monkeypatch):
  workdir = small_disk / "run"
  filler = small_disk / "filler"

  def fill_disk_after_step_2(n, batch):
    if n == 1 + 5:  # Fetched while step 3 runs (1 shape probe, 2 batches in flight).
      deadline = time.monotonic() + 60
      while not (workdir / "checkpoints" / "2").exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # Step 2's checkpoint is committed in the background.
      with open(filler, "wb") as f:
        try:
          while True:
            f.write(b"\0" * (1 << 16))
        except OSError:
          pass
    return batch

  real = patch_train_batches(monkeypatch, fill_disk_after_step_2)
  with pytest.raises(
    checkpoint.CheckpointSaveError, match=r"No space left on device.*last intact checkpoint.* 2\b"
  ):
    train.train(short_run[1], str(workdir))
  monkeypatch.setattr(data, "make_train_iterator", real)
  filler.unlink()  # Space again: the same command resumes from step 2.
  assert train.train(short_run[1], str(workdir))["step"] == 4
  assert losses(workdir)[4] == pytest.approx(losses(short_run[0])[4], rel=1e-6)


def test_evaluation_with_changed_settings_writes_its_own_file(short_run, tmp_path):
  workdir = copy_run(short_run, tmp_path)
  saved = config_lib.load_json(workdir / "config.json")
  own = evaluate.evaluate(saved, str(workdir))
  record = (workdir / "eval_step4.json").read_text()
  assert json.loads(record) == pytest.approx(own)
  test = config_lib.apply_overrides(saved, [("evals.val.input.split", "validation[:16]")])
  evaluate.evaluate(test, str(workdir))
  assert (workdir / "eval_step4.json").read_text() == record
  assert (workdir / "eval_step4-val.input.split=validation_16_.json").exists()
  blank = config_lib.apply_overrides(saved, [("evals.val.input.blank", "text")])
  image_only = evaluate.evaluate(blank, str(workdir), name="image_only")
  assert set(image_only) == set(own)
  assert json.loads((workdir / "eval_step4-image_only.json").read_text()) == pytest.approx(
    image_only
  )
  assert (workdir / "eval_step4.json").read_text() == record


def test_the_summary_names_unused_towers(short_run):
  model_cfg = config_lib.with_defaults(bad(short_run[1], **{"model.modalities": "image"})).model
  text = train.describe_towers(model_cfg, short_run[1].model_init, fusion.build(model_cfg))
  assert "image: vit (random init)" in text
  assert "configured but unused (config.model.modalities='image'): text" in text


def test_a_run_saved_with_a_part_its_tower_now_leaves_out(short_run, tmp_path):
  """A run whose tower had a pooler (kept with dont_load) while its checkpoint now builds the
  tower without one: resuming or evaluating it is one line naming the option that builds it,
  and nothing is written."""
  import torch
  import transformers

  folder = tmp_path / "vit_classifier"  # short_run's image tower, saved without a pooler
  torch.manual_seed(0)
  vit = {k: v for k, v in TINY_VIT.items() if k != "model_type"}
  transformers.ViTForImageClassification(transformers.ViTConfig(**vit)).save_pretrained(folder)
  workdir = copy_run(short_run, tmp_path)
  before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
  config = bad(short_run[1], **{"model.towers.image.name": str(folder)})
  fix = "set config.model.towers.image.kwargs.add_pooling_layer=True to build it"
  with pytest.raises(config_lib.ConfigError, match=f"holds image_encoder/pooler.*{fix}"):
    train.train(config, str(workdir), allow_config_change=True)
  with pytest.raises(config_lib.ConfigError, match=fix):
    evaluate.evaluate(config, str(workdir))
  assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before


def run_cli(*args, cwd=REPO, timeout=300):
  return process.run(
    [sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd
  )


def config_file(tmp_path, config, **extra) -> str:
  """A config file returning `config` (+ `extra` keys, written as Python source)."""
  path = tmp_path / "config.py"
  path.write_text(
    textwrap.dedent(f"""\
      import ml_collections as mlc
      def get_config(arg=None):
        config = mlc.ConfigDict({config.to_dict()!r})
        config.update({extra!r})
        return config
      """)
  )
  return str(path)


def test_command_line_errors_are_one_line(short_run, tmp_path):
  """Flag typos, wrongly typed values, bad batch sizes: one line, no traceback, nothing written."""
  good = config_file(tmp_path, short_run[1])
  (tmp_path / "s").mkdir()
  quoted = config_file(tmp_path / "s", bad(short_run[1], **{"optim.lr": "3e-3"}))
  cases = [
    (
      [f"--config={good}", "--config.total_steps=abc"],
      "ConfigError: --config.total_steps=abc: config.total_steps expects an integer (its value "
      "is 4).",
    ),
    (
      [f"--config={quoted}"],
      "ConfigError: config.optim.lr='3e-3' is a string; expected a number (a number in quotes is a "
      "string: write it without quotes).",
    ),
    (
      [f"--config={good}", "--config.batch_size=12"],
      "ConfigError: config.batch_size=12 must be a positive multiple of grad_accum_steps (1) x "
      "batch shards (mesh data*fsdp = 8); e.g. --config.batch_size=8.",
    ),
    (  # A library's error inside the run's validation: named once, its message one line.
      [f"--config={good}", "--config.model_init.text_encoder=/no/such/checkpoint"],
      "CheckpointError: '/no/such/checkpoint' is neither an existing folder nor a valid hub id "
      "(owner/name): check the path.",
    ),
  ]
  for args, line in cases:
    result = run_cli("mmtl.train", f"--workdir={tmp_path / 'runs/w'}", *args)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == line
    assert not (tmp_path / "runs").exists()  # Nor the folder above it that it created.


def test_two_runs_started_together_one_trains(short_run, tmp_path):
  config = config_file(tmp_path, bad(short_run[1], evals={}, total_steps=3))
  workdir = tmp_path / "w"
  cmd = [sys.executable, "-m", "mmtl.train", f"--config={config}", f"--workdir={workdir}"]
  env = dict(os.environ, XLA_FLAGS=xla_settings.xla_flags(1))
  stderrs = [tmp_path / f"stderr_{i}.txt" for i in range(2)]  # Files: no pipe fills up unread.
  procs = []
  try:
    for stderr in stderrs:
      with stderr.open("w") as err:
        procs.append(process.start(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err))
    codes = [p.wait(timeout=240) for p in procs]
  finally:
    for p in procs:
      process.kill_group(p)
  results = list(zip(codes, (stderr.read_text() for stderr in stderrs)))
  codes = sorted(code for code, _ in results)
  assert codes == [0, 1], results
  refused = next(err for code, err in results if code == 1)
  assert refused.strip().splitlines()[-1].startswith("WorkdirLocked: ")
  steps = [
    r["step"]
    for r in map(json.loads, (workdir / metrics.METRICS_FILE).read_text().splitlines())
    if "train/loss" in r
  ]
  assert steps == [1, 2, 3]  # One run's lines, once each.
  assert not (workdir / workdir_lib.LOCK_FILE).exists()


def test_sigterm_saves_the_current_step_and_exits_75(short_run, tmp_path):
  """The command line under a preemption notice: the step in flight saved, status 75, one
  line; a second SIGTERM right after changes nothing."""
  config = config_file(tmp_path, bad(short_run[1], evals={}, total_steps=500, ckpt_every=1000))
  workdir = tmp_path / "w"
  cmd = [sys.executable, "-m", "mmtl.train", f"--config={config}", f"--workdir={workdir}"]
  env = dict(os.environ, XLA_FLAGS=xla_settings.xla_flags(1))
  with (tmp_path / "stderr.txt").open("w") as err:
    proc = process.start(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
  try:
    deadline = time.monotonic() + 240
    while not metrics.read(str(workdir)).get("train/loss") and time.monotonic() < deadline:
      assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=120)
  finally:
    process.kill_group(proc)
  stderr = (tmp_path / "stderr.txt").read_text()
  assert code == preemption.EXIT_CODE, stderr
  with checkpoint.CheckpointManager(workdir / "checkpoints") as saved:
    (step,) = saved.all_steps()
    assert saved.verify(step)
  assert 1 <= step < 500
  assert stderr.strip().splitlines()[-1] == (
    f"Stopped: SIGTERM after step {step} of 500: saved checkpoint step {step} in "
    f"{workdir / 'checkpoints'}; rerun the same command to continue from it."
  )
  assert not (workdir / workdir_lib.LOCK_FILE).exists()
