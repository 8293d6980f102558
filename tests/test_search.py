"""launch/search.py: the search space checks, pruning, resuming, shared studies, results."""

import csv
import json
import os
from pathlib import Path
import shlex
import sys
import textwrap
import time

import numpy as np
import optuna
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "launch"))
import search  # noqa: E402
from test_sweep import (  # noqa: E402, F401
  HANG,
  TINY_FLAGS,
  TINY_QUICKSTART,
  assert_gone,
  tiny_runs_env,
)

# Stands in for mmtl.train where the search's mechanics are under test. Its "checkpoint" is
# metrics.jsonl: a rerun continues after the last step there. At each step it logs
# val/accuracy = lr * step (a higher lr is better at every step), 0.05 s apart; its
# calls (workdir, first step, lr) go to FAKE_TRAIN_CALLS. With FAKE_TRAIN_INTERRUPT=S, the
# first run to reach step S sends SIGTERM to the search worker (its parent), or, with
# FAKE_TRAIN_SIGNALLED=1 too, exits as mmtl.train does on a signal; with FAKE_TRAIN_HANG=1,
# the first run hangs (test_sweep.HANG).
FAKE_TRAIN = HANG + textwrap.dedent("""\
    import json, signal
    args = sys.argv[1:]
    workdir = args[args.index("--workdir") + 1]
    flags = dict(a[len("--config."):].split("=", 1) for a in args if a.startswith("--config."))
    lr, total = float(flags.get("optim.lr", 1)), int(flags.get("total_steps", 8))
    seed = 0.1 * int(flags.get("seed", 0))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump({"total_steps": total}, f)
    log = os.path.join(workdir, "metrics.jsonl")
    done = len(open(log).readlines()) if os.path.exists(log) else 0
    with open(os.environ["FAKE_TRAIN_CALLS"], "a") as f:
      f.write(json.dumps([os.path.basename(workdir), done + 1, lr]) + "\\n")
    with open(os.environ["FAKE_TRAIN_CALLS"] + ".cache_dirs", "a") as f:
      f.write(os.environ.get("MMTL_FEATURE_CACHE_DIR", "") + "\\n")
    hung = os.path.exists(os.environ["FAKE_TRAIN_CALLS"] + ".pids")
    if os.environ.get("FAKE_TRAIN_HANG") and not hung:
      hang()
    interrupt = int(os.environ.get("FAKE_TRAIN_INTERRUPT", 0))
    for step in range(done + 1, total + 1):
      time.sleep(0.05)
      with open(log, "a") as f:
        f.write(json.dumps({"step": step, "val/accuracy": lr * step + seed}) + "\\n")
      if step == interrupt and not os.path.exists(os.environ["FAKE_TRAIN_CALLS"] + ".stop"):
        open(os.environ["FAKE_TRAIN_CALLS"] + ".stop", "w").close()
        if os.environ.get("FAKE_TRAIN_SIGNALLED"):
          sys.exit(75)  # As mmtl.train, signalled itself, after saving the step.
        os.kill(os.getppid(), signal.SIGTERM)
        time.sleep(60)
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
      json.dump({"val/accuracy": lr * total + seed, "step": total}, f)
    """)

# A valid mmtl config (its keys are checked) whose one evaluator logs val/accuracy every step.
CONFIG = textwrap.dedent("""\
    from mmtl.config import parse_arg
    def get_config(arg=None):
      arg = parse_arg(arg, seed=0)
      return dict(seed=arg.seed, evals=dict(val=dict(type="classification", every=1)))
    def get_search_space():
      return {"optim.lr": dict(low=0.1, high=1.0, log=True)}
    """)


@pytest.fixture
def fake(tmp_path, monkeypatch):
  """(run(*args) -> exit code, calls() -> [(workdir name, first step, lr)], study dir)."""
  (tmp_path / "fake_train.py").write_text(FAKE_TRAIN)
  (tmp_path / "space.py").write_text(CONFIG)
  calls = tmp_path / "calls.jsonl"
  monkeypatch.setenv("PYTHONPATH", str(tmp_path))
  monkeypatch.setenv("FAKE_TRAIN_CALLS", str(calls))
  monkeypatch.setattr(search, "POLL_S", 0.01)
  study_dir = tmp_path / "study"

  def run(*args, config=str(tmp_path / "space.py")):
    argv = ["--config", config, "--study_dir", str(study_dir), "--train_module", "fake_train"]
    return search.main([*argv, *args])

  def calls_made():
    return [tuple(json.loads(x)) for x in calls.read_text().splitlines()] if calls.exists() else []

  return run, calls_made, study_dir


def table(study_dir):
  with (study_dir / "results.csv").open() as f:
    return list(csv.DictReader(f))


def test_trials_share_the_studys_feature_cache(fake, monkeypatch):
  """Every trial's trainer is handed STUDY_DIR/feature_cache (mmtl.feature_cache.ENV_DIR)."""
  run, calls, study_dir = fake
  monkeypatch.delenv("MMTL_FEATURE_CACHE_DIR", raising=False)
  assert run("--trials", "2", "--sampler", "random", "--pruner", "none") == 0
  dirs = Path(os.environ["FAKE_TRAIN_CALLS"] + ".cache_dirs").read_text().splitlines()
  assert dirs == [str(study_dir.absolute() / "feature_cache")] * 2


def test_asha_prunes_bad_trials_and_the_study_continues(fake, capsys):
  run, calls, study_dir = fake
  assert run("--trials", "6", "--sampler", "random", "--pruner", "asha") == 0
  rows = table(study_dir)
  assert [r["trial"] for r in rows] == ["0", "1", "2", "3", "4", "5"]
  assert [r["run"] for r in rows] == [f"trial_000{i}" for i in range(6)]
  pruned = [r for r in rows if r["state"] == "PRUNED"]
  complete = [r for r in rows if r["state"] == "COMPLETE"]
  assert pruned and complete and len(pruned) + len(complete) == 6
  for r in complete:  # Trained to the end; the value is final_metrics.json's.
    assert int(r["steps"]) == 8
    assert float(r["val/accuracy"]) == pytest.approx(float(r["optim.lr"]) * 8)
  lrs = {r["trial"]: float(r["optim.lr"]) for r in rows}
  for r in pruned:
    # ASHA's rungs are the 1st and 3rd evaluation (reduction factor 3); the trainer was
    # stopped there, and its workdir says so.
    record = json.loads((study_dir / r["run"] / "pruned.json").read_text())
    assert record["step"] in (1, 3) and r["note"] == f"pruned at step {record['step']}"
    assert record["value"] == pytest.approx(lrs[r["trial"]] * record["step"])
    assert int(r["steps"]) < 8
    # Pruned because an earlier trial was better at that step.
    assert any(lrs[r2["trial"]] > lrs[r["trial"]] for r2 in rows[: int(r["trial"])])
  out = capsys.readouterr().out
  ran = sum(int(r["steps"]) for r in rows)
  assert (
    f"6 trials ({len(complete)} complete, {len(pruned)} pruned); {ran} steps run of the 48" in out
  )

  # The best trial as a trainer command line, and Optuna's plots.
  best = max(complete, key=lambda r: float(r["val/accuracy"]))
  line = shlex.split((study_dir / "best.txt").read_text())
  assert line[1:3] == ["-m", "fake_train"] and line[line.index("--workdir") + 1].endswith("best")
  assert f"--config.optim.lr={best['optim.lr']}" in line
  assert (study_dir / "history.png").stat().st_size > 0
  assert (study_dir / "importance.png").stat().st_size > 0

  # Rerunning continues the study: nothing new to 6 trials, two more to 8.
  assert run("--trials", "6", "--sampler", "random") == 0
  assert len(calls()) == 6
  assert run("--trials", "8", "--sampler", "random") == 0
  assert [c[0] for c in calls()[6:]] == ["trial_0006", "trial_0007"]
  assert len(table(study_dir)) == 8


@pytest.mark.timeout(60)  # Seconds when the deadline works; a hang otherwise.
def test_a_hung_trial_fails_at_its_deadline_and_the_study_goes_on(fake, monkeypatch, capsys):
  run, calls, study_dir = fake
  monkeypatch.setenv("FAKE_TRAIN_HANG", "1")
  start = time.monotonic()
  assert run("--trials", "3", "--pruner", "none", "--run_timeout", "2", "--keep_going") == 1
  assert time.monotonic() - start < 30
  assert_gone(Path(os.environ["FAKE_TRAIN_CALLS"] + ".pids"))
  rows = table(study_dir)
  assert [r["state"] for r in rows] == ["FAIL", "COMPLETE", "COMPLETE"]
  assert rows[0]["note"] == (
    "timed out: still running after --run_timeout=2s; its processes were stopped: "
    "see logs/trial_0000.log"
  )
  assert [c[0] for c in calls()] == ["trial_0000", "trial_0001", "trial_0002"]
  assert "[trial 0] FAILED (timed out" in capsys.readouterr().err


def test_seeds_train_each_trial_per_seed_and_score_the_mean(fake, capsys):
  run, calls, study_dir = fake
  assert run("--trials", "2", "--sampler", "random", "--pruner", "median", "--seeds", "2") == 0
  assert sorted(c[0] for c in calls()) == ["seed=0", "seed=0", "seed=1", "seed=1"]
  rows = table(study_dir)
  study = optuna.load_study(study_name="study", storage=search.journal_storage(study_dir))
  for row, trial in zip(rows, study.trials):
    lr = float(row["optim.lr"])
    # The fake trainer scores lr * step + 0.1 * seed: the mean over seeds 0, 1 adds 0.05.
    assert float(row["val/accuracy"]) == pytest.approx(lr * 8 + 0.05)
    assert [float(v) for v in row["val/accuracy values"].split(";")] == pytest.approx(
      [lr * 8, lr * 8 + 0.1]
    )
    assert float(row["val/accuracy sd"]) == pytest.approx(0.1 / np.sqrt(2))
    assert trial.intermediate_values[3] == pytest.approx(lr * 3 + 0.05)
    assert int(row["steps"]) == 16  # both seeds' steps
    for seed in (0, 1):
      assert (study_dir / row["run"] / f"seed={seed}" / "final_metrics.json").exists()
  out = capsys.readouterr().out
  assert "done: val/accuracy" in out and "(mean over 2 seeds)" in out
  assert ", mean over 2 seeds); " in out  # the best trial's line
  assert run("--trials", "2", "--seeds", "3") == 2  # another search in the same study
  assert "seeds" in capsys.readouterr().err


def test_median_pruner(fake):
  run, _, study_dir = fake
  assert run("--trials", "8", "--sampler", "random", "--seed", "1", "--pruner", "median") == 0
  rows = table(study_dir)
  # Optuna's median pruner waits for 5 complete trials; then a trial stops where it is
  # below the median of the complete trials at that step.
  assert all(r["state"] == "COMPLETE" for r in rows[:5])
  assert "PRUNED" in {r["state"] for r in rows[5:]}
  study = optuna.load_study(study_name="study", storage=search.journal_storage(study_dir))
  for trial in study.trials[5:]:
    step = max(trial.intermediate_values)
    complete = [t for t in study.trials[: trial.number] if t.state.name == "COMPLETE"]
    median = np.median([t.intermediate_values[step] for t in complete])
    assert (trial.state.name == "PRUNED") == (trial.intermediate_values[step] < median)


@pytest.mark.parametrize("signalled", ["worker", "trainer"])
def test_interrupted_worker_requeues_and_the_rerun_resumes_the_workdir(
  fake, monkeypatch, capsys, signalled
):
  run, calls, study_dir = fake
  monkeypatch.setenv("FAKE_TRAIN_INTERRUPT", "3")
  if signalled == "trainer":
    monkeypatch.setenv("FAKE_TRAIN_SIGNALLED", "1")
  assert run("--trials", "2", "--pruner", "none") == 130  # SIGTERM at step 3 of trial 0.
  assert (
    "[trial 0] interrupted: re-queued"
    if signalled == "worker"
    else "[trial 0] stopped by a signal after saving: re-queued; rerun to resume it"
  ) in capsys.readouterr().out
  assert calls() == [("trial_0000", 1, calls()[0][2])]
  # The rerun runs the queued retry first, in trial 0's workdir, from where it stopped.
  assert run("--trials", "2", "--pruner", "none") == 0
  lr = calls()[0][2]
  assert calls()[1] == ("trial_0000", 4, lr)
  assert calls()[2][0] == "trial_0002"  # Workdirs are named after trial numbers.
  rows = table(study_dir)
  assert [(r["trial"], r["run"], r["state"]) for r in rows] == [
    ("0", "trial_0000", "FAIL"),
    ("1", "trial_0000", "COMPLETE"),
    ("2", "trial_0002", "COMPLETE"),
  ]
  assert rows[0]["note"] == "re-queued as trial 1" and float(rows[1]["optim.lr"]) == lr
  assert "2 trials (2 complete); 16 steps run of the 16" in capsys.readouterr().out


def test_a_dead_workers_trial_is_retried_after_its_heartbeat_stops(fake, monkeypatch):
  run, calls, study_dir = fake
  assert run("--trials", "1", "--collect") == 0  # Creates the study, runs nothing.
  # A worker that died in trial 0 at step 2: RUNNING, last heartbeat long ago.
  study = optuna.load_study(study_name="study", storage=search.journal_storage(study_dir))
  trial = study.ask(search.load_space(str(study_dir.parent / "space.py")))
  trial.set_user_attr("heartbeat", time.time())
  monkeypatch.setattr(search, "STALE_S", 0.5)
  time.sleep(0.6)
  (study_dir / "trial_0000").mkdir()
  lines = [{"step": s, "val/accuracy": 0.0} for s in (1, 2)]
  (study_dir / "trial_0000/metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  assert run("--trials", "1") == 0
  assert calls() == [("trial_0000", 3, trial.params["optim.lr"])]
  assert [(r["run"], r["state"]) for r in table(study_dir)] == [
    ("trial_0000", "FAIL"),
    ("trial_0000", "COMPLETE"),
  ]


@pytest.mark.parametrize(
  "space, extra, message",
  [
    ("{}", [], "get_search_space() returned {}; it needs at least one key"),
    ('{"optim.lrr": [0.1]}', [], "search space optim.lrr=0.1: --config.optim.lrr=0.1: "),
    ('{"arg.colour": ["red"]}', [], "search space arg.colour='red':"),
    ('{"model.width": ["wide"]}', [], "search space model.width='wide':"),
    ('{"optim.lr": dict(low=1, high=0.1)}', [], "search space optim.lr="),
    ('{"optim.lr": 0.1}', [], "use a list of choices"),
    ('{"optim.lr": [0.1]}', ["--metric", "val/recall"], "--metric val/recall: no evaluator"),
    ('{"optim.lr": [0.1]}', ["--", "--config.evals.val.every=0"], "--pruner asha needs eval"),
    (None, [], "defines no get_search_space()"),
  ],
)
def test_bad_input_is_one_line_and_writes_nothing(fake, tmp_path, capsys, space, extra, message):
  run, calls, study_dir = fake
  config = tmp_path / "bad.py"
  text = CONFIG.split("def get_search_space")[0]
  if space is not None:
    text += f"def get_search_space():\n  return {space}\n"
  config.write_text(text)
  assert run("--trials", "2", *extra, config=str(config)) == 2
  err = capsys.readouterr().err
  assert err.startswith("search.py: error: ") and message in err and err.count("\n") == 1, err
  assert not study_dir.exists() and calls() == []


def test_quickstart_space_is_checked_against_the_config(capsys):
  space = search.load_space(str(ROOT / "configs/quickstart.py"))
  assert isinstance(space["optim.lr"], optuna.distributions.FloatDistribution)
  assert space["optim.lr"].log
  assert isinstance(space["model.width"], optuna.distributions.IntDistribution)
  assert space["arg.fusion"].choices == ("bilinear", "concat", "gated")
  # The quickstart evaluates at the end only: pruning needs evaluations on the way.
  assert (
    search.main(
      ["--config", str(ROOT / "configs/quickstart.py"), "--study_dir", "s", "--trials", "1"]
    )
    == 2
  )
  assert "add --config.evals.val.every=STEPS after --" in capsys.readouterr().err


def test_a_study_of_another_search_is_refused(fake, tmp_path, capsys):
  run, calls, study_dir = fake
  assert run("--trials", "1", "--", "--config.total_steps=4") == 0
  journal = (study_dir / "study.journal").read_bytes()
  other = tmp_path / "other.py"
  other.write_text(CONFIG)
  for args, config, what in [
    (["--", "--config.total_steps=5"], str(tmp_path / "space.py"), "train_flags"),
    (["--", "--config.total_steps=4"], str(other), "config"),
    (["--mode", "min", "--", "--config.total_steps=4"], str(tmp_path / "space.py"), "mode"),
  ]:
    assert run("--trials", "2", *args, config=config) == 2
    err = capsys.readouterr().err
    assert f"holds study 'study' of another search ({what} " in err and "new --study_dir" in err
  assert (study_dir / "study.journal").read_bytes() == journal and len(calls()) == 1


def test_emit_prints_worker_commands(fake, capsys):
  run, calls, study_dir = fake
  args = ["--trials", "20", "--workers", "2", "--seed", "5", "--", "--config.total_steps=4"]
  assert run("--emit", "local", *args) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 2
  words = shlex.split(lines[1])
  assert words[:2] == [sys.executable, str(ROOT / "launch/search.py")]
  assert words[words.index("--seed") + 1] == "6" and words[-2:] == ["--", "--config.total_steps=4"]
  assert words[words.index("--study_dir") + 1] == str(study_dir) and "--emit" not in words

  assert run("--emit", "slurm", *args) == 0
  (line,) = capsys.readouterr().out.splitlines()
  sbatch = shlex.split(line)
  assert sbatch[:3] == ["sbatch", "--array=0-1", "--job-name=mmtl-search"]
  assert "--seed $((5 + SLURM_ARRAY_TASK_ID)) -- --config.total_steps=4" in sbatch[-1]

  assert run("--emit", "tpu", *args) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith(f'{ROOT}/launch/tpu_vm.sh up --name "${{TPU_NAME}}-0" && gcloud ')
  assert "cd ~/mmtl && setsid nohup .venv/bin/python launch/search.py" in lines[0]
  assert calls() == [] and not study_dir.exists()


@pytest.mark.slow
def test_real_trainer_trials_report_and_prune(tmp_path, tiny_runs_env):  # noqa: F811
  """Two trials of the tiny quickstart through mmtl.train, evaluated at every step: a
  sane learning rate, then one so large that its first evaluation's loss is far worse,
  which ASHA prunes there."""
  config = tmp_path / "tiny.py"
  quickstart = str(ROOT / "configs/quickstart.py")
  config.write_text(
    textwrap.dedent(f"""\
      import importlib.util
      spec = importlib.util.spec_from_file_location("quickstart", {quickstart!r})
      quickstart = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(quickstart)
      get_config = quickstart.get_config
      def get_search_space():
        return {{"optim.lr": [0.003, 1000.0]}}
      """)
  )
  study_dir = tmp_path / "study"
  spec = str(config) + TINY_QUICKSTART.partition(".py")[2] + ",train=64"
  argv = ["--config", spec, "--study_dir", str(study_dir), "--trials", "2", "--metric", "val/loss"]
  argv += ["--mode", "min", "--sampler", "random", "--seed", "10"]  # Seed 10: lr 0.003, then 1000.
  assert search.main([*argv, "--", *TINY_FLAGS, "--config.evals.val.every=1"]) == 0
  rows = table(study_dir)
  assert [(r["optim.lr"], r["state"]) for r in rows] == [
    ("0.003", "COMPLETE"),
    ("1000.0", "PRUNED"),
  ]
  study = optuna.load_study(study_name="study", storage=search.journal_storage(study_dir))
  for r, trial in zip(rows, study.trials):
    workdir = study_dir / r["run"]
    curve = {
      x["step"]: x["val/loss"]
      for x in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
      if "val/loss" in x
    }
    # Optuna got the evaluations the trainer logged, up to the one it was pruned at.
    assert trial.intermediate_values == {s: curve[s] for s in trial.intermediate_values}
    assert not (workdir / "lock.json").exists()  # Released, also by the trainer stopped.
  complete, pruned = study.trials
  assert sorted(complete.intermediate_values) == [1, 2]
  final = json.loads((study_dir / "trial_0000/final_metrics.json").read_text())
  assert complete.value == final["val/loss"]
  assert json.loads((study_dir / "trial_0001/pruned.json").read_text())["step"] == 1
  assert pruned.intermediate_values[1] > complete.intermediate_values[1]
  best = shlex.split((study_dir / "best.txt").read_text())
  assert best[best.index("--config") + 1] == spec and "--config.optim.lr=0.003" in best
