"""Two processes on localhost (jax.distributed + gloo) train like one process."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mmtl import checkpoint, distributed, metrics, preemption, process, rules, sharding
from tests import multihost_worker as worker
from tests import sharding_toy as toy
from tests import test_train, xla_settings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


# What process 0 logs when its coordinator port was taken between _free_port() and the bind.
PORT_TAKEN = "Failed to add port to server"


def _launch(workdir, *args, num_processes=2, devices=4, attempts=3, expect=0):
  """Runs `multihost_worker.py WORKDIR *ARGS` as `num_processes` processes with `devices` CPU
  devices each, which must all exit with `expect`; fails fast if one fails. A coordinator
  port taken by another program in the meantime is retried with a new one."""
  workdir.mkdir(parents=True, exist_ok=True)
  for attempt in range(attempts):
    codes = _run_processes(workdir, args, num_processes, devices, _free_port())
    logs = [(workdir / f"log_{i}.txt").read_text() for i in range(num_processes)]
    if not (codes[0] and PORT_TAKEN in logs[0] and attempt + 1 < attempts):
      break
  for i, (code, log) in enumerate(zip(codes, logs)):
    assert code == expect, f"process {i} exited with {code}:\n{log[-4000:]}"


def _run_processes(workdir, args, num_processes, devices, port) -> list[int | None]:
  """Exit codes of the processes (None: still running at the deadline, then killed)."""
  procs = []
  try:
    for i in range(num_processes):
      env = dict(
        os.environ,
        JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
        JAX_NUM_PROCESSES=str(num_processes),
        JAX_PROCESS_ID=str(i),
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=xla_settings.xla_flags(devices),
        PYTHONPATH=REPO,
      )
      with open(workdir / f"log_{i}.txt", "w") as log:
        worker_py = os.path.join(REPO, "tests", "multihost_worker.py")
        procs.append(
          process.start(
            [sys.executable, worker_py, str(workdir), *args],
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
          )
        )
    deadline = time.monotonic() + TIMEOUT_S
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
      if any(p.poll() not in (None, 0, preemption.EXIT_CODE) for p in procs):
        break  # the other process would wait for its peer until JAX's own timeout
      time.sleep(0.2)
    return [p.poll() for p in procs]
  finally:
    for p in procs:
      process.kill_group(p)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("multihost")
  _launch(workdir)
  return workdir


@pytest.mark.slow
def test_two_processes_match_one_process(two_process_run):
  # The same global mesh, in one process.
  state, losses = toy.reference_run(tuple(worker.MESH.items()), worker.RULES, worker.STEPS)
  expected = {f"params/{k}": v for k, v in rules.flatten(state["params"]).items()}
  for i in range(2):
    result = np.load(two_process_run / f"result_{i}.npz")
    np.testing.assert_allclose(result["losses"], losses, rtol=1e-5)
    assert int(result["step"]) == worker.STEPS
    assert set(result.files) == set(expected) | {"losses", "step", "host_tree_sum"}
    np.testing.assert_allclose(
      result["host_tree_sum"], sum(v.sum() for v in expected.values()), rtol=1e-5
    )
    for k, v in expected.items():
      np.testing.assert_allclose(result[k], v, rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_each_process_keeps_its_own_data_state(two_process_run):
  for i in range(2):
    assert json.loads((two_process_run / f"data_state_{i}.json").read_text()) == {"slice": [i, 2]}
  data_dir = two_process_run / "checkpoints" / str(worker.STEPS) / "data"
  names = sorted(p.name for p in data_dir.iterdir() if p.name.endswith(".json"))
  assert names == ["process_0-of-2.json", "process_1-of-2.json"]


@pytest.mark.slow
def test_two_process_checkpoint_restores_in_one_process(two_process_run):
  mesh = sharding.make_mesh(dict(data=4), devices=jax.devices()[:4])
  shapes, shardings = toy.state_shardings(mesh, "fsdp_tp")
  with checkpoint.CheckpointManager(two_process_run / "checkpoints") as manager:
    restored = manager.restore(checkpoint.abstract(shapes, shardings))
    assert manager.data_state() is None  # 1 process now, and the 2 saved different states.
  result = np.load(two_process_run / "result_0.npz")
  for k, v in rules.flatten(jax.device_get(restored["params"])).items():
    np.testing.assert_array_equal(v, result[f"params/{k}"])


@pytest.fixture(scope="module")
def trainer_config(tmp_path_factory, tiny_bert_dir, small_data_dir):
  """The real trainer's config file for these runs: 4 steps (2 epochs) on 4 CPU devices."""
  root = tmp_path_factory.mktemp("trainer")
  # SGD: params whose gradient is only rounding noise (attention key biases) stay put; Adam
  # would scale that noise up to lr-sized steps that differ between the runs.
  config = test_train.tiny_config(
    tiny_bert_dir,
    small_data_dir,
    evals={},
    total_steps=4,
    keep_ckpts=2,
    optim=dict(name="sgd", lr=0.3, schedule=dict(decay="constant")),
  )
  (root / "config.json").write_text(config.to_json())
  return root / "config.json"


# The runs, one fixture each (a test waits only for those it reads): "two" as 2 processes x 2
# devices, "one" as 1 process x 4, "resumed" on 1 process from the 2-process run's step 2,
# "preempted" resumed on 2 processes from the same step 2 with a SIGTERM to process 1, then
# the same command again.
@pytest.fixture(scope="module")
def two_process_trainer_run(trainer_config):
  workdir = trainer_config.parent / "two"
  _launch(workdir, str(trainer_config), num_processes=2, devices=2)
  return workdir


@pytest.fixture(scope="module")
def one_process_trainer_run(trainer_config):
  workdir = trainer_config.parent / "one"
  _launch(workdir, str(trainer_config), num_processes=1, devices=4)
  return workdir


def _from_step_2(two_process_run, workdir):
  """`workdir` as if the 2-process run had stopped after step 2's checkpoint."""
  shutil.copytree(
    two_process_run / "checkpoints", workdir / "checkpoints", ignore=shutil.ignore_patterns("4")
  )
  return workdir


@pytest.fixture(scope="module")
def resumed_trainer_run(trainer_config, two_process_trainer_run):
  workdir = _from_step_2(two_process_trainer_run, trainer_config.parent / "resumed")
  _launch(workdir, str(trainer_config), num_processes=1, devices=4)
  return workdir


@pytest.fixture(scope="module")
def preempted_trainer_run(trainer_config, two_process_trainer_run):
  """(the workdir as the signal left it, the workdir after the same command again)."""
  workdir = _from_step_2(two_process_trainer_run, trainer_config.parent / "preempted")
  _launch(workdir, str(trainer_config), "preempt", devices=2, expect=75)
  stopped = workdir.parent / "stopped"
  shutil.copytree(workdir, stopped)
  _launch(workdir, str(trainer_config), devices=2)
  return stopped, workdir


def _assert_same_params(workdir, other):
  params = [
    jax.device_get(checkpoint.restore_variables(w / "checkpoints")["params"])
    for w in (workdir, other)
  ]
  for (path, a), b in zip(rules.flatten(params[0]).items(), rules.flatten(params[1]).values()):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=path)


@pytest.mark.slow
def test_real_trainer_on_two_processes_matches_one_process(
  two_process_trainer_run, one_process_trainer_run
):
  for workdir, files in (
    (two_process_trainer_run, ["process_0-of-2.json", "process_1-of-2.json"]),
    (one_process_trainer_run, ["process_0-of-1.json"]),
  ):
    data_dir = workdir / "checkpoints/4/data"
    assert sorted(p.name for p in data_dir.glob("*.json")) == files
  two, one = (
    metrics.read(str(w))["train/loss"] for w in (two_process_trainer_run, one_process_trainer_run)
  )
  assert sorted(two) == sorted(one) == [1, 2, 3, 4]
  np.testing.assert_allclose(
    [two[s] for s in sorted(two)], [one[s] for s in sorted(one)], rtol=1e-5
  )
  _assert_same_params(two_process_trainer_run, one_process_trainer_run)


@pytest.mark.slow
def test_two_process_run_resumes_on_one_process_with_the_same_data(
  two_process_trainer_run, one_process_trainer_run, resumed_trainer_run
):
  """The input state saved by 2 processes (the global step) continues on 1: same batches."""
  resumed = metrics.read(str(resumed_trainer_run))["train/loss"]
  one = metrics.read(str(one_process_trainer_run))["train/loss"]
  assert sorted(resumed) == [3, 4]  # Epoch 2: a restart from step 0's data would differ.
  saved = [
    json.loads(p.read_text())
    for workdir in (two_process_trainer_run, one_process_trainer_run, resumed_trainer_run)
    for p in (workdir / "checkpoints/4/data").glob("*.json")
  ]
  assert len(saved) == 4 and all(state == saved[0] for state in saved)  # Global step 4 in all.
  np.testing.assert_allclose([resumed[3], resumed[4]], [one[3], one[4]], rtol=1e-5)
  _assert_same_params(resumed_trainer_run, one_process_trainer_run)


@pytest.fixture(scope="module")
def locked_text_configs(trainer_config):
  """The trainer config with its text tower locked and an evaluation, with the feature
  cache (in the workdir) and without it."""
  config = json.loads(trainer_config.read_text())
  config["optim"]["frozen"] = ["text_encoder/.*"]
  config["evals"] = {"val": {"type": "classification", "input": {"split": "validation[:32]"}}}
  files = {}
  for enable in (True, False):
    config["feature_cache"] = {"enable": enable}
    files[enable] = trainer_config.parent / f"locked_text_cache={enable}.json"
    files[enable].write_text(json.dumps(config))
  return files


@pytest.mark.slow
def test_features_cached_by_two_processes_train_as_one_process_without_them(locked_text_configs):
  """Each process computes its slice of every batch; process 0 writes the rows in the
  split's order, which both then read: the run matches one process running the tower."""
  cached, plain = (locked_text_configs[True].parent / name for name in ("cached", "plain"))
  _launch(cached, str(locked_text_configs[True]), num_processes=2, devices=2)
  _launch(plain, str(locked_text_configs[False]), num_processes=1, devices=4)
  log = (cached / "log_0.txt").read_text()
  assert log.count(": computed text-") == 2, log[-3000:]
  two, one = (metrics.read(str(w)) for w in (cached, plain))
  for key in ("train/loss", "val/accuracy", "val/loss"):
    assert sorted(two[key]) == sorted(one[key])
    np.testing.assert_allclose(
      [two[key][s] for s in sorted(two[key])], [one[key][s] for s in sorted(one[key])], rtol=1e-5
    )
  _assert_same_params(cached, plain)


def test_when_maybe_initialize_initializes(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: False)
  for var in (
    "JAX_COORDINATOR_ADDRESS",
    "JAX_NUM_PROCESSES",
    "JAX_PROCESS_ID",
    "MMTL_DISTRIBUTED",
    "SLURM_NTASKS",
    "OMPI_COMM_WORLD_SIZE",
  ):
    monkeypatch.delenv(var, raising=False)
  assert distributed.maybe_initialize() is False and not calls  # a plain single process
  assert distributed.is_main_process()
  monkeypatch.setenv("JAX_NUM_PROCESSES", "1")
  assert distributed.maybe_initialize() is False and not calls
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  with pytest.raises(ValueError, match="JAX_COORDINATOR_ADDRESS"):
    distributed.maybe_initialize()
  monkeypatch.delenv("JAX_NUM_PROCESSES")
  monkeypatch.setenv("SLURM_NTASKS", "4")  # a cluster JAX detects: no arguments needed
  distributed.maybe_initialize()
  assert calls == [dict(coordinator_address=None, num_processes=None, process_id=None)]


@pytest.mark.slow
def test_sigterm_on_one_host_saves_one_step_on_both_and_the_rerun_matches(
  two_process_trainer_run, preempted_trainer_run
):
  """A resumed run whose process 1 is signalled before the first step: both processes save
  the same step and exit 75; the same command then ends with the uninterrupted run's params.
  The step is 3 (the first) unless process 0 ran a step before the notice reached it (JAX's
  service polls for SIGTERM every second): then 4."""
  stopped, preempted = preempted_trainer_run
  with checkpoint.CheckpointManager(stopped / "checkpoints", read_only=True) as saved:
    step = saved.latest_step()
    assert step in (3, 4) and saved.verify(step)
  for i in range(2):  # Both processes stopped after that step; only process 1 was signalled.
    log = (stopped / f"log_{i}.txt").read_text()
    assert f"to one of the 2 processes after step {step} of 4: saved checkpoint step" in log, log
  assert sorted(metrics.read(str(stopped))["train/loss"]) == list(range(3, step + 1))
  assert not (stopped / "lock.json").exists()  # Released before either process exited.
  # The same command again: step 4, and the params of the uninterrupted run, bit for bit.
  assert sorted(metrics.read(str(preempted))["train/loss"]) == [3, 4]
  params = [
    jax.device_get(checkpoint.restore_variables(w / "checkpoints")["params"])
    for w in (two_process_trainer_run, preempted)
  ]
  for (path, a), b in zip(rules.flatten(params[0]).items(), rules.flatten(params[1]).values()):
    np.testing.assert_array_equal(a, b, err_msg=path)
