"""launch/sweep.py: grids, resuming, the results table, emitted launch commands."""

import csv
import json
import os
from pathlib import Path
import shlex
import sys
import textwrap
import time

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "launch"))
from mmtl import process  # noqa: E402
import sweep  # noqa: E402

# A trainer that hangs: hang() starts a child that ignores SIGTERM (as a stuck data worker
# might), writes both pids to $FAKE_TRAIN_CALLS.pids and sleeps; `assert_gone` checks that
# the runner's deadline ended both.
HANG = textwrap.dedent("""\
    import os, subprocess, sys, time
    def hang():
      child = subprocess.Popen([sys.executable, "-c", "import signal, time; "
                                "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
      with open(os.environ["FAKE_TRAIN_CALLS"] + ".pids", "a") as f:
        f.write(f"{os.getpid()} {child.pid}\\n")
      time.sleep(600)
    """)


def assert_gone(pids_file: Path, wait_s: float = 10.0) -> None:
  """Every pid listed in `pids_file` has exited (a zombie awaiting its reaper counts as gone)."""
  pids = [int(p) for p in pids_file.read_text().split()]
  assert pids

  def alive(pid):
    try:
      return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
      return False

  deadline = time.monotonic() + wait_s
  while (running := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
    time.sleep(0.1)
  assert not running, f"processes {running} outlived their deadline"


# Stands in for mmtl.train where only the runner's mechanics are under test: logs
# its call, and writes metrics that depend on the overrides it was given (fail=yes: exits
# with an error; stop=yes: exits as stopped by a signal; hang=yes: hangs).
FAKE_TRAIN = HANG + textwrap.dedent("""\
    import json
    args = sys.argv[1:]
    workdir = args[args.index("--workdir") + 1]
    overrides = dict(a[len("--config."):].split("=", 1) for a in args if a.startswith("--config."))
    with open(os.environ["FAKE_TRAIN_CALLS"], "a") as f:
      f.write(json.dumps(args) + "\\n")
    if overrides.get("fail") == "yes":
      sys.exit("boom: failing as asked")
    if overrides.get("stop") == "yes":
      sys.exit(75)  # As mmtl.train after saving its step on a signal.
    os.makedirs(workdir, exist_ok=True)
    if overrides.get("hang") == "yes":
      hang()
    score = float(overrides.get("lr", 0)) * 100 + len(overrides.get("fusion", ""))
    score += int(overrides.get("seed", 0)) + 0.1 * int(overrides.get("cross_validation.fold", 0))
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
      json.dump({"val/accuracy": score, "val/loss": 1 / (1 + score)}, f)
    """)


@pytest.fixture
def fake_trainer(tmp_path, monkeypatch):
  (tmp_path / "fake_train.py").write_text(FAKE_TRAIN)
  calls = tmp_path / "calls.jsonl"
  monkeypatch.setenv("PYTHONPATH", str(tmp_path))
  monkeypatch.setenv("FAKE_TRAIN_CALLS", str(calls))
  config = tmp_path / "base.py"
  config.write_text("def get_config(arg=None):\n  return {}\n")

  def run(*args):
    return sweep.main(["--config", str(config), "--train_module", "fake_train", *args])

  def workdirs_run():
    return (
      [Path(json.loads(line)[3]).name for line in calls.read_text().splitlines()]
      if calls.exists()
      else []
    )

  return run, workdirs_run, config


def test_grid_runs_resumes_and_writes_the_table(fake_trainer, tmp_path, capsys):
  run, workdirs_run, config = fake_trainer
  sweep_dir = tmp_path / "sweep"
  args = [
    "--sweep_dir",
    str(sweep_dir),
    "--grid",
    "fusion=concat,gated",
    "--grid",
    "lr=0.1,0.2",
    "--",
    "--config.total_steps=3",
  ]
  assert run(*args) == 0
  names = [
    "fusion=concat__lr=0.1",
    "fusion=concat__lr=0.2",
    "fusion=gated__lr=0.1",
    "fusion=gated__lr=0.2",
  ]
  assert workdirs_run() == names

  # Only the runs whose result is gone (or half-written) run again; the others are skipped.
  (sweep_dir / "fusion=gated__lr=0.1/final_metrics.json").unlink()
  (sweep_dir / "fusion=gated__lr=0.2/final_metrics.json").write_text('{"val/accuracy": 0.')
  assert run(*args) == 0
  assert workdirs_run() == names + ["fusion=gated__lr=0.1", "fusion=gated__lr=0.2"]
  assert "[1/4] fusion=concat__lr=0.1: done already, skipped" in capsys.readouterr().out

  table = (sweep_dir / "results.md").read_text().splitlines()
  assert table[0] == "| fusion | lr | val/accuracy | val/loss |"
  assert table[2] == "| concat | 0.1 | 16 | 0.05882 |"
  # Under the table, the command of each row.
  assert table[6:9] == ["", "Commands (each run's workdir is SWEEP_DIR/RUN):", ""]
  command = "python -m fake_train --config {} --config.fusion={} --config.lr={} " + (
    "--config.total_steps=3"
  )
  assert table[9] == f"- fusion=concat__lr=0.1: `{command.format(config, 'concat', 0.1)}`"
  assert len(table) == 13
  with (sweep_dir / "results.csv").open() as f:
    rows = list(csv.DictReader(f))
  cells = [("concat", 0.1, 16.0), ("concat", 0.2, 26.0), ("gated", 0.1, 15.0), ("gated", 0.2, 25.0)]
  assert [
    (r["run"], r["fusion"], r["lr"], float(r["val/accuracy"]), r["command"]) for r in rows
  ] == [
    (f"fusion={f}__lr={lr}", f, str(lr), acc, command.format(config, f, lr)) for f, lr, acc in cells
  ]
  # Every run got the shared flags; the sweep's own record lists the runs.
  calls = [
    json.loads(line) for line in Path(os.environ["FAKE_TRAIN_CALLS"]).read_text().splitlines()
  ]
  assert all(call[-1] == "--config.total_steps=3" for call in calls)
  assert [r["name"] for r in json.loads((sweep_dir / "sweep.json").read_text())["runs"]] == names


def test_finished_runs_are_reused_only_for_the_command_they_ran(fake_trainer, tmp_path, capsys):
  run, workdirs_run, config = fake_trainer
  sweep_dir = tmp_path / "sweep"
  grid = ["--sweep_dir", str(sweep_dir), "--grid", "fusion=concat,gated"]
  assert run(*grid, "--", "--config.total_steps=30") == 0
  record = (sweep_dir / "sweep.json").read_text()
  capsys.readouterr()

  # Other flags: refused in one line naming them; nothing runs, nothing is rewritten.
  assert run(*grid, "--", "--config.total_steps=500") == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("sweep.py: error: 2 finished run(s) in ")
  assert (
    "(fusion=concat, fusion=gated: ran --config.total_steps=30, this sweep gives "
    "--config.total_steps=500); give a new --sweep_dir to run this sweep afresh, or pass "
    "--reuse_finished" in err
  )
  assert workdirs_run() == ["fusion=concat", "fusion=gated"]
  assert (sweep_dir / "sweep.json").read_text() == record
  # Another base config (a config-file argument) differs too; the same command is reused.
  assert run("--config", f"{config}:steps=9", *grid, "--", "--config.total_steps=30") == 2
  assert f"ran --config {config}, this sweep gives --config {config}:steps=9" in (
    capsys.readouterr().err
  )
  assert run(*grid) == 2  # A flag dropped.
  assert "ran --config.total_steps=30, which this sweep drops" in capsys.readouterr().err
  assert run(*grid, "--", "--config.total_steps=30") == 0
  assert workdirs_run() == ["fusion=concat", "fusion=gated"]

  # Forced reuse: the new run gets the new flags, and the table says which command made each row.
  grid[-1] += ",sum"
  assert run(*grid, "--reuse_finished", "--", "--config.total_steps=500") == 0
  assert workdirs_run() == ["fusion=concat", "fusion=gated", "fusion=sum"]
  with (sweep_dir / "results.csv").open() as f:
    commands = {r["run"]: r["command"] for r in csv.DictReader(f)}
  assert commands["fusion=gated"].endswith("--config.fusion=gated --config.total_steps=30")
  assert commands["fusion=sum"].endswith("--config.fusion=sum --config.total_steps=500")
  # A reused result keeps the command that made it: refused again without --reuse_finished.
  assert run(*grid, "--", "--config.total_steps=500") == 2


def test_a_failed_run_stops_the_sweep_and_shows_in_the_table(fake_trainer, tmp_path, capsys):
  run, workdirs_run, _ = fake_trainer
  sweep_dir = tmp_path / "sweep"
  assert run("--sweep_dir", str(sweep_dir), "--grid", "fail=no,yes,no2") == 1
  assert workdirs_run() == ["fail=no", "fail=yes"]
  assert "boom: failing as asked" in capsys.readouterr().err
  assert run("--sweep_dir", str(sweep_dir), "--grid", "fail=no,yes,no2", "--keep_going") == 1
  assert workdirs_run() == ["fail=no", "fail=yes", "fail=yes", "fail=no2"]
  table = (sweep_dir / "results.md").read_text()
  assert "| fail | val/accuracy | val/loss | status |" in table
  assert "| yes |  |  | not started |" in table  # It died before making its workdir.


def test_a_run_stopped_by_a_signal_stops_the_sweep(fake_trainer, tmp_path, capsys):
  run, workdirs_run, _ = fake_trainer
  grid = ("--sweep_dir", str(tmp_path / "sweep"), "--grid", "stop=no,yes,no2", "--keep_going")
  assert run(*grid) == 1
  assert workdirs_run() == ["stop=no", "stop=yes"]  # --keep_going or not: a stop is a stop.
  assert "[2/3] stop=yes: stopped by a signal after saving its step; rerun this sweep to " in (
    capsys.readouterr().err
  )


@pytest.mark.timeout(60)  # Seconds when the deadline works; a hang otherwise.
def test_a_hung_run_is_stopped_at_its_deadline_and_the_sweep_goes_on(
  fake_trainer, tmp_path, capsys
):
  run, workdirs_run, _ = fake_trainer
  sweep_dir = tmp_path / "sweep"
  start = time.monotonic()
  code = run(
    "--sweep_dir", str(sweep_dir), "--grid", "hang=no,yes,no2", "--run_timeout=2", "--keep_going"
  )
  assert code == 1 and time.monotonic() - start < 30
  assert workdirs_run() == ["hang=no", "hang=yes", "hang=no2"]
  err = capsys.readouterr().err
  assert "[2/3] hang=yes: FAILED (timed out: still running after --run_timeout=2s; its " in err
  assert f"last lines of {sweep_dir / 'logs/hang=yes.log'}" in err
  assert_gone(Path(os.environ["FAKE_TRAIN_CALLS"] + ".pids"))
  with (sweep_dir / "results.csv").open() as f:
    rows = list(csv.DictReader(f))
  assert [(r["run"], r["status"]) for r in rows] == [
    ("hang=no", "done"),
    ("hang=yes", "running or failed"),
    ("hang=no2", "done"),
  ]


def test_sweep_file_combines_with_grid_and_emits_commands(fake_trainer, tmp_path, capsys):
  run, workdirs_run, config = fake_trainer
  config.write_text(
    textwrap.dedent("""\
      def get_config(arg=None):
        return {}
      def get_sweep(arg=None):
        return [dict(fusion="concat", frozen=("image_encoder/.*",)),
                dict(fusion="gated", frozen=())]
      """)
  )
  sweep_dir = tmp_path / "s"
  # The config's own get_sweep() is the sweep when no --grid is given.
  assert run("--sweep_dir", str(sweep_dir), "--emit", "local") == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines == [
    f"{sys.executable} -m fake_train --config {config} "
    f"--workdir {sweep_dir}/fusion=concat__frozen=_image_encoder_._ --config.fusion=concat "
    "'--config.frozen=('\"'\"'image_encoder/.*'\"'\"',)'",
    f"{sys.executable} -m fake_train --config {config} --workdir {sweep_dir}/fusion=gated__frozen=_"
    " --config.fusion=gated '--config.frozen=()'",
  ]
  assert workdirs_run() == []  # Emitting runs nothing.

  assert (
    run("--sweep_dir", "gs://bucket/s", "--sweep", str(config), "--grid", "lr=1,2", "--emit", "tpu")
    == 0
  )
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 4
  assert lines[0] == (
    f"{ROOT}/launch/tpu_vm.sh run --config {config} --workdir "
    "gs://bucket/s/fusion=concat__frozen=_image_encoder_.___lr=1 -- --config.fusion=concat "
    "'--config.frozen=('\"'\"'image_encoder/.*'\"'\"',)' --config.lr=1"
  )

  # Finished runs are not emitted again.
  run("--sweep_dir", str(sweep_dir))
  capsys.readouterr()
  assert run("--sweep_dir", str(sweep_dir), "--emit", "slurm") == 0
  assert capsys.readouterr().out == ""


def test_seeds_and_folds_repeat_every_cell_and_summarize_it(fake_trainer, tmp_path, capsys):
  run, workdirs_run, _ = fake_trainer
  sweep_dir = tmp_path / "s"
  assert (
    run("--sweep_dir", str(sweep_dir), "--grid", "lr=0.1,0.2", "--seeds", "2", "--folds", "2") == 0
  )
  names = [
    f"lr={lr}__seed={seed}__cross_validation.fold={fold}"
    for lr in ("0.1", "0.2")
    for seed in (0, 1)
    for fold in (0, 1)
  ]
  assert workdirs_run() == names
  calls = [
    json.loads(line) for line in Path(os.environ["FAKE_TRAIN_CALLS"]).read_text().splitlines()
  ]
  assert all("--config.cross_validation.folds=2" in call for call in calls)
  assert "--config.seed=1" in calls[2] and "--config.cross_validation.fold=1" in calls[3]
  summary = (sweep_dir / "summary.md").read_text().splitlines()
  assert summary[0] == "| lr | n | val/accuracy | val/loss |"
  # lr=0.1: 10 + seed + 0.1 fold over seeds 0, 1 and folds 0, 1: mean 10.55, sd 0.5802.
  assert summary[2].startswith("| 0.1 | 4 | 10.55 ± 0.58 [9.63, 11.5] |")
  assert "over seed, cross_validation.fold" in summary[-1]
  with (sweep_dir / "summary.csv").open() as f:
    rows = list(csv.DictReader(f))
  assert rows[1]["val/accuracy values"] == "20.0;20.1;21.0;21.1"
  assert "Wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
  "args, message",
  [
    (["--grid", "lr"], "expected KEY=V1,V2"),
    (["--grid", "lr=1", "--grid", "lr=2"], "names a key twice"),
    (["--grid", "lr=[1,"], "not a Python literal"),
    ([], "nothing to sweep"),
    (["--grid", "lr=1,1"], "identical overrides"),
    (["--sweep", "missing.py"], "missing.py does not exist"),
    (["--grid", "lr=1", "stray"], "unexpected arguments ['stray']: flags for every run go after"),
    (["--grid", "lr=1", "--bogus"], "Unknown command line flag 'bogus'"),
    (["--grid", "seed=1,2", "--seeds", "3"], "--seeds sweep(s) ['seed'], which the grid"),
    (["--seeds", "2", "--folds", "1"], "--folds 1 holds out the whole split"),
  ],
)
def test_bad_sweeps_are_explained(fake_trainer, tmp_path, capsys, args, message):
  run, workdirs_run, _ = fake_trainer
  assert run("--sweep_dir", str(tmp_path / "s"), *args) == 2
  assert message in capsys.readouterr().err
  assert workdirs_run() == []


def test_config_and_sweep_dir_are_required(capsys):
  assert sweep.main(["--sweep_dir", "s", "--grid", "lr=1"]) == 2
  assert "--config is required" in capsys.readouterr().err
  assert sweep.main(["--config", "c.py", "--grid", "lr=1"]) == 2
  assert "--sweep_dir is required" in capsys.readouterr().err


def test_run_names():
  assert sweep.run_name({}) == "base"
  assert (
    sweep.run_name({"model.fusion": "concat", "optim.lr": 0.001})
    == "model.fusion=concat__optim.lr=0.001"
  )
  assert sweep.parse_axis("optim.lr=[0.1, 1e-3]") == ("optim.lr", [0.1, 0.001])
  long = {"optim.frozen": tuple(f"image_encoder/encoder/layer_{i}/.*" for i in range(12))}
  name = sweep.run_name(long)
  assert len(name) <= 120 and name != sweep.run_name({"optim.frozen": long["optim.frozen"][:-1]})


def test_markdown_table_escapes_pipes(tmp_path):
  markdown = sweep.write_tables(
    ["optim.frozen", "val/accuracy"],
    [{"run": "r", "optim.frozen": "('text/(a|b)',)", "val/accuracy": 0.51234}],
    tmp_path,
  )
  assert markdown.splitlines()[2] == r"| ('text/(a\|b)',) | 0.5123 |"


def test_cli_prints_then_runs_exactly_the_unfinished_runs(fake_trainer, tmp_path):
  """`python launch/sweep.py` as docs/launch.md shows it (absl flags, aliases, overrides before and
  after `--`): the launch commands of the runs without final_metrics.json, then those runs."""
  _, workdirs_run, config = fake_trainer
  sweep_dir = tmp_path / "sweep"
  (sweep_dir / "fusion=concat__lr=0.2").mkdir(parents=True)
  (sweep_dir / "fusion=concat__lr=0.2/final_metrics.json").write_text('{"val/accuracy": 1.0}')

  def cli(*args):
    return process.run(
      [
        sys.executable,
        ROOT / "launch/sweep.py",
        "--config",
        config,
        "--sweep-dir",
        sweep_dir,
        "--grid",
        "fusion=concat,gated",
        "--grid=lr=0.1,0.2",
        "--train_module",
        "fake_train",
        "--config.total_steps",
        "3",
        *args,
        "--",
        "--config.seed=1",
      ],
      capture_output=True,
      text=True,
      timeout=120,
    )

  def command(fusion, lr):
    return [
      sys.executable,
      "-m",
      "fake_train",
      "--config",
      str(config),
      "--workdir",
      f"{sweep_dir}/fusion={fusion}__lr={lr}",
      f"--config.fusion={fusion}",
      f"--config.lr={lr}",
      "--config.total_steps=3",
      "--config.seed=1",
    ]

  unfinished = [command("concat", "0.1"), command("gated", "0.1"), command("gated", "0.2")]

  # A finished run the sweep has no record of is not reused unless asked.
  refused = cli("--emit", "local")
  assert refused.returncode == 2 and refused.stdout == ""
  assert "fusion=concat__lr=0.2: its command is not recorded" in refused.stderr
  emitted = cli("--emit", "local", "--reuse-finished")
  assert emitted.returncode == 0, emitted.stderr
  assert emitted.stdout.splitlines() == [shlex.join(c) for c in unfinished]
  assert workdirs_run() == []

  ran = cli("--keep-going", "--reuse-finished")
  assert ran.returncode == 0, ran.stderr
  calls = Path(os.environ["FAKE_TRAIN_CALLS"]).read_text().splitlines()
  assert [json.loads(call) for call in calls] == [c[3:] for c in unfinished]  # In order.
  assert "[2/4] fusion=concat__lr=0.2: done already, skipped" in ran.stdout.splitlines()

  def shown(fusion, lr):  # The command without interpreter and workdir, as the table shows it.
    words = command(fusion, lr)
    return "python -m " + shlex.join(words[2:5] + words[7:])

  with (sweep_dir / "results.csv").open() as f:
    assert [(r["run"], r["val/accuracy"], r["command"]) for r in csv.DictReader(f)] == [
      ("fusion=concat__lr=0.1", "17.0", shown("concat", "0.1")),  # 16 + seed 1
      ("fusion=concat__lr=0.2", "1.0", "unknown (no record in sweep.json)"),
      ("fusion=gated__lr=0.1", "16.0", shown("gated", "0.1")),
      ("fusion=gated__lr=0.2", "26.0", shown("gated", "0.2")),
    ]

  assert cli("--emit", "local", "--reuse-finished").stdout == ""  # Nothing left to run.
  bad = cli("--emit", "gpu")
  assert bad.returncode == 1
  assert "--emit=gpu: value should be one of <local|tpu|slurm>" in bad.stderr


def test_config_arguments_are_swept_through_the_config_path(fake_trainer, tmp_path, capsys):
  run, workdirs_run, config = fake_trainer
  sweep_dir = tmp_path / "s"
  assert (
    run(
      "--sweep_dir",
      str(sweep_dir),
      "--grid",
      "arg.modalities=['image,text', 'image']",
      "--grid",
      "lr=0.5",
      "--emit",
      "local",
    )
    == 0
  )
  commands = [line.split() for line in capsys.readouterr().out.splitlines()]
  assert [(c[c.index("--config") + 1], c[-1]) for c in commands] == [
    (f"{config}:modalities=image,text", "--config.lr=0.5"),
    (f"{config}:modalities=image", "--config.lr=0.5"),
  ]
  # Appended after the base config's own arguments, so the swept value wins.
  run(
    "--config",
    f"{config}:modalities=text,steps=3",
    "--sweep_dir",
    str(sweep_dir),
    "--grid",
    "arg.modalities=image",
    "--emit",
    "local",
  )
  assert f"--config {config}:modalities=text,steps=3,modalities=image " in capsys.readouterr().out
  assert run("--sweep_dir", str(sweep_dir), "--grid", "arg.modalities=['image,text', 'image']") == 0
  assert workdirs_run() == ["modalities=image_text", "modalities=image"]
  assert (
    (sweep_dir / "results.md").read_text().startswith("| modalities | val/accuracy | val/loss |\n")
  )


# The quickstart shrunk to seconds: the small mmtl_shapes config, an image-only
# model with a 1-layer ViT of width 16, 2 steps of batch 8, 16 eval examples.
TINY_QUICKSTART = "configs/quickstart.py:modalities=image,init=scratch,steps=2"
TINY_FLAGS = [
  "--config.input.dataset=mmtl_shapes/small",
  "--config.batch_size=8",
  "--config.evals.val.input.split=validation[:16]",
  "--config.evals.val_iid.input.split=validation_iid[:16]",
  "--config.model.towers.image.name.hidden_size=16",
  "--config.model.towers.image.name.num_hidden_layers=1",
  "--config.model.towers.image.name.intermediate_size=32",
  "--config.model.towers.image.name.num_attention_heads=2",
]


@pytest.fixture
def tiny_runs_env(small_data_dir, monkeypatch):
  """For trainer subprocesses: the session's data dir, the small dataset in it (XLA's
  persistent cache, which conftest.py sets up, is in their environment)."""
  monkeypatch.setenv("TFDS_DATA_DIR", small_data_dir)
  monkeypatch.chdir(ROOT)


@pytest.mark.slow
def test_real_trainer_grid_resume_and_table(tmp_path, tiny_runs_env):
  sweep_dir = tmp_path / "sweep"
  # Training-set size x seed: a data-efficiency ablation whose 4 runs share one compiled step.
  argv = [
    "--config",
    TINY_QUICKSTART,
    "--sweep_dir",
    str(sweep_dir),
    "--grid",
    "arg.train=32,64",
    "--grid",
    "seed=0,1",
    "--",
    *TINY_FLAGS,
  ]
  assert sweep.main(argv) == 0
  names = ["train=32__seed=0", "train=32__seed=1", "train=64__seed=0", "train=64__seed=1"]
  for name, split, seed in zip(
    names, ["train[:32]", "train[:32]", "train[:64]", "train[:64]"], [0, 1, 0, 1]
  ):
    config = json.loads(
      (sweep_dir / name / "config.json").read_text()
    )  # Each run got its own settings.
    assert (config["input"]["split"], config["seed"]) == (split, seed), name
  mtimes = {name: (sweep_dir / name / "final_metrics.json").stat().st_mtime_ns for name in names}

  (sweep_dir / names[2] / "final_metrics.json").unlink()
  assert sweep.main(argv) == 0
  for name in names:  # Only the run without a result ran again.
    rewritten = (sweep_dir / name / "final_metrics.json").stat().st_mtime_ns != mtimes[name]
    assert rewritten == (name == names[2]), name

  with (sweep_dir / "results.csv").open() as f:
    rows = list(csv.DictReader(f))
  assert [r["run"] for r in rows] == names
  assert [(r["train"], r["seed"]) for r in rows] == [
    ("32", "0"),
    ("32", "1"),
    ("64", "0"),
    ("64", "1"),
  ]
  assert all(0.0 <= float(r["val/accuracy"]) <= 1.0 for r in rows)
  table = (sweep_dir / "results.md").read_text().splitlines()
  assert table[0].startswith("| train | seed | val/accuracy |") and len(table) == 13
  assert table[9].startswith(  # The commands, under the table.
    f"- train=32__seed=0: `python -m mmtl.train --config {TINY_QUICKSTART},train=32 "
    "--config.seed=0 "
  )


@pytest.mark.slow
def test_runs_of_a_sweep_share_a_locked_towers_features(tmp_path, tiny_runs_env):
  """Two runs that lock the same (random, seed 0) image tower: the first computes its
  features on the three splits, the second reads them from SWEEP_DIR/feature_cache."""
  sweep_dir = tmp_path / "sweep"
  argv = ["--config", f"{TINY_QUICKSTART},train=64", "--sweep_dir", str(sweep_dir)]
  argv += ["--grid", "optim.lr=0.001,0.003", "--", *TINY_FLAGS]
  argv += ["--config.optim.frozen=(r'image_encoder/.*',)", "--config.feature_cache.enable=True"]
  assert sweep.main(argv) == 0
  first, second = (log.read_text() for log in sorted((sweep_dir / "logs").glob("*.log")))
  assert first.count(": computed image-") == 3 and ": read image-" not in first
  assert second.count(": read image-") == 3 and ": computed image-" not in second
  assert len([p for p in (sweep_dir / "feature_cache").iterdir() if p.is_dir()]) == 3


def test_summarize_averages_over_seeds_with_each_runs_costs(tmp_path):
  """launch/summarize.py: one row per cell, mean ± sample sd over the seeds, the trainable
  count and memory from each run's sweep log, the median logged step rate."""
  import summarize  # pylint: disable=g-import-not-at-top

  runs = {
    ("a", 0): 0.5,
    ("a", 1): 0.7,
    ("b", 0): 0.9,
  }
  with (tmp_path / "results.csv").open("w", newline="") as f:
    writer = csv.DictWriter(f, ["run", "method", "seed", "val/accuracy", "step", "command"])
    writer.writeheader()
    for (method, seed), acc in runs.items():
      name = f"method={method}__seed={seed}"
      writer.writerow(
        dict(run=name, method=method, seed=seed, step=10, command="x", **{"val/accuracy": acc})
      )
      (tmp_path / "logs").mkdir(exist_ok=True)
      (tmp_path / "logs" / f"{name}.log").write_text(
        "trainable: 1,024 of 4,096 params (25%)\n"
        f"Estimated memory per device: {1.5 if method == 'a' else 512} "
        f"{'MiB' if method == 'a' else 'KiB'} (params ...)\n"
      )
      (tmp_path / name).mkdir()
      (tmp_path / name / "metrics.jsonl").write_text(
        "\n".join(
          json.dumps({"step": s, "speed/steps_per_s": r}) for s, r in ((1, 2.0), (2, 4.0), (3, 9.0))
        )
      )
  columns, table = summarize.summarize(tmp_path, ["seed"])
  assert columns == ["method", "n", "val/accuracy", "trainable", "memory_mib", "steps_per_s"]
  cells = [{c: summarize.markdown_cell(c, row[c]) for c in columns} for row in table]
  # Two runs: t(0.975, 1) = 12.706 (a t table), sd = 0.1414, half-width 12.706 * 0.1414 / sqrt 2.
  assert cells == [
    {
      "method": "a",
      "n": "2",
      "val/accuracy": "0.6 ± 0.14 [-0.671, 1.87]",
      "trainable": "1,024",
      "memory_mib": "1.5",
      "steps_per_s": "4",
    },
    {
      "method": "b",
      "n": "1",
      "val/accuracy": "0.9",
      "trainable": "1,024",
      "memory_mib": "0.5",
      "steps_per_s": "4",
    },
  ]
  summarize.write(tmp_path, columns, table, ["seed"])
  markdown = (tmp_path / "summary.md").read_text().splitlines()
  assert markdown[2].startswith("| a | 2 | 0.6 ± 0.14 [-0.671, 1.87] |")
  assert "95% confidence interval of the mean, Student's t" in markdown[-1]
  with (tmp_path / "summary.csv").open() as f:
    rows = list(csv.DictReader(f))
  assert float(rows[0]["val/accuracy mean"]) == pytest.approx(0.6)
  assert float(rows[0]["val/accuracy ci95_low"]) == pytest.approx(0.6 - 12.7062 * 0.1, abs=1e-4)
  assert rows[0]["val/accuracy values"] == "0.5;0.7" and rows[1]["val/accuracy sd"] == ""
  with pytest.raises(ValueError, match=r"--over \['fold'\]: not columns"):
    summarize.summarize(tmp_path, ["fold"])
  with pytest.raises(ValueError, match=r"--plot method:val/f1: the summary has columns"):
    summarize.plot(tmp_path, columns, table, ["seed"], "method", "val/f1")


def test_summarize_plots_a_metric_against_a_numeric_key(tmp_path):
  import summarize  # pylint: disable=g-import-not-at-top

  with (tmp_path / "results.csv").open("w", newline="") as f:
    writer = csv.DictWriter(f, ["run", "sparsity", "seed", "val/accuracy"])
    writer.writeheader()
    for sparsity, seed, acc in [(0.5, 0, 0.8), (0.5, 1, 0.82), (0.0, 0, 0.9), (0.9, 0, 0.6)]:
      writer.writerow(
        {"run": f"r{sparsity}{seed}", "sparsity": sparsity, "seed": seed, "val/accuracy": acc}
      )
  columns, table = summarize.summarize(tmp_path, ["seed"])
  png = summarize.plot(tmp_path, columns, table, ["seed"], "sparsity", "val/accuracy")
  assert png == tmp_path / "summary_val_accuracy.png" and png.read_bytes()[:4] == b"\x89PNG"
