"""Launch scripts: the exact gcloud commands, and a run against a fake gcloud/SLURM.

The fakes execute what the real tools would run on the machines (the workers'
--command scripts, srun's tasks) on this machine, so the remote shell code is
tested, not just printed.
"""

import json
import os
from pathlib import Path
import shlex
import signal
import socket
import sys
import textwrap
import time
from typing import Any

import pytest

from mmtl import process
from tests import xla_settings

ROOT = Path(__file__).resolve().parent.parent
TPU_VM = str(ROOT / "launch/tpu_vm.sh")

INSTALL = (
  "set -e; cd ~/mmtl; command -v uv >/dev/null || [ -x ~/.local/bin/uv ] || "
  "python3 -m pip install -q --user uv; export PATH=~/.local/bin:$PATH; "
  "[ -x .venv/bin/python ] || uv venv -q --python 3.11 .venv; "
  "uv pip install -q --python .venv/bin/python -r requirements.txt "
  "\"jax[tpu]\" \"etils[epath-gcs]\""
)


def start(workdir, extra_env=""):
  return (
    "set -e; cd ~/mmtl; if [ -f train.pid ] && kill -0 \"$(cat train.pid)\" 2>/dev/null; "
    "then echo \"a run is still going on this TPU VM: launch/tpu_vm.sh stop it first\" >&2; "
    "exit 1; fi; setsid nohup env "
    f"{extra_env}.venv/bin/python -m mmtl.train --config configs/quickstart.py --workdir {workdir} "
    "--config.total_steps=100 >train.log 2>&1 </dev/null & echo $! >train.pid"
  )


def expected_run(name, accelerator_type, workdir, extra_env=""):
  """`run` on a new VM: describe, create, pack, copy, unpack, install, start, stream."""
  gcloud = "gcloud compute tpus tpu-vm"
  zone = "--zone=us-central2-b"
  return [
    [*gcloud.split(), "describe", name, zone, "--format=value(state)"],
    [
      *gcloud.split(),
      "create",
      name,
      zone,
      f"--accelerator-type={accelerator_type}",
      "--version=tpu-ubuntu2204-base",
    ],
    [
      "bash",
      "-c",
      f"cd {ROOT} && git ls-files -z --cached --others --exclude-standard | "
      f"tar -czf /tmp/mmtl-code-{name}.tgz --null -T -",
    ],
    [
      *gcloud.split(),
      "scp",
      f"/tmp/mmtl-code-{name}.tgz",
      f"{name}:mmtl.tgz",
      zone,
      "--worker=all",
    ],
    [
      *gcloud.split(),
      "ssh",
      name,
      zone,
      "--worker=all",
      "--command",
      "set -e; mkdir -p ~/mmtl; tar -xzf mmtl.tgz -C ~/mmtl; rm mmtl.tgz",
    ],
    [*gcloud.split(), "ssh", name, zone, "--worker=all", "--command", INSTALL],
    [*gcloud.split(), "ssh", name, zone, "--worker=all", "--command", start(workdir, extra_env)],
    [
      *gcloud.split(),
      "ssh",
      name,
      zone,
      "--worker=0",
      "--command",
      'tail -n +1 -F --pid="$(cat ~/mmtl/train.pid)" ~/mmtl/train.log',
    ],
  ]


def printed_commands(stdout):
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def tpu_vm(*args, env=None, check=True):
  """Runs tpu_vm.sh with the TPU_* defaults of `env` only (none of the caller's shell)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")} | (env or {})
  result = process.run(
    [TPU_VM, *args], capture_output=True, text=True, env=env, timeout=120, cwd=ROOT
  )
  if check:
    assert result.returncode == 0, result.stderr
  return result


def test_tpu_vm_dry_run_single_host_v4_8():
  out = tpu_vm(
    "run",
    "--dry-run",
    "--name",
    "mmtl-v4-8",
    "--zone",
    "us-central2-b",
    "--accelerator-type",
    "v4-8",
    "--config",
    "configs/quickstart.py",
    "--workdir",
    "runs/q",
    "--",
    "--config.total_steps=100",
    env={"TMPDIR": "/tmp"},
  ).stdout
  assert printed_commands(out) == expected_run("mmtl-v4-8", "v4-8", "runs/q")
  # The printed lines are literal shell commands, quoted where needed.
  assert (
    "+ gcloud compute tpus tpu-vm describe mmtl-v4-8 --zone=us-central2-b '--format=value(state)'"
    in out
  )


def test_tpu_vm_dry_run_pod_slice_v4_32_runs_on_all_workers():
  out = tpu_vm(
    "run",
    "--dry-run",
    "--name",
    "mmtl-v4-32",
    "--zone",
    "us-central2-b",
    "--accelerator-type",
    "v4-32",
    "--config",
    "configs/quickstart.py",
    "--workdir",
    "gs://bucket/runs/q",
    "--env",
    "TFDS_DATA_DIR=gs://bucket/tfds",
    "--delete-after",
    "--",
    "--config.total_steps=100",
    env={"TMPDIR": "/tmp"},
  ).stdout
  expected = expected_run(
    "mmtl-v4-32", "v4-32", "gs://bucket/runs/q", "TFDS_DATA_DIR=gs://bucket/tfds "
  )
  expected.append(
    "gcloud compute tpus tpu-vm delete mmtl-v4-32 --zone=us-central2-b --quiet".split()
  )
  assert printed_commands(out) == expected


def test_tpu_vm_pod_slice_takes_a_shared_local_workdir_when_told():
  out = tpu_vm(
    "run",
    "--dry-run",
    "--name",
    "p",
    "--zone",
    "z",
    "--accelerator-type",
    "v4-32",
    "--config",
    "c.py",
    "--workdir",
    "/mnt/nfs/runs/q",
    "--shared-workdir",
  ).stdout
  assert "--workdir /mnt/nfs/runs/q" in printed_commands(out)[-2][-1]


def test_tpu_vm_takes_defaults_from_the_environment():
  out = tpu_vm(
    "up",
    "--dry-run",
    env={"TPU_NAME": "vm", "TPU_ZONE": "z", "TPU_ACCELERATOR_TYPE": "v5litepod-16"},
  )
  assert printed_commands(out.stdout)[1] == [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "create",
    "vm",
    "--zone=z",
    "--accelerator-type=v5litepod-16",
    "--version=tpu-ubuntu2204-base",
  ]


def test_tpu_vm_flags_and_repo_mode():
  out = tpu_vm(
    "up",
    "--dry-run",
    "--name",
    "t",
    "--zone",
    "z",
    "--project",
    "p",
    "--spot",
    "--repo",
    "https://example.com/mmtl.git",
    "--ref",
    "v1",
  ).stdout
  commands = printed_commands(out)
  assert commands[1] == [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "create",
    "t",
    "--zone=z",
    "--project=p",
    "--accelerator-type=v4-8",
    "--version=tpu-ubuntu2204-base",
    "--spot",
  ]
  assert commands[2][-1] == (
    "set -e; [ -d ~/mmtl/.git ] || git clone -q https://example.com/mmtl.git ~/mmtl; "
    "git -C ~/mmtl fetch -q origin v1; git -C ~/mmtl checkout -q --force FETCH_HEAD"
  )
  assert len(commands) == 4  # describe, create, fetch, install: `up` starts nothing.


@pytest.mark.parametrize(
  "args, message",
  [
    (
      [
        "run",
        "--name",
        "p",
        "--zone",
        "z",
        "--accelerator-type",
        "v4-32",
        "--config",
        "c.py",
        "--workdir",
        "runs/x",
      ],
      "pass a shared --workdir gs://",
    ),
    (["run", "--name", "p", "--zone", "z", "--workdir", "runs/x"], "run needs --config"),
    (["run", "--zone", "z", "--config", "c.py", "--workdir", "w"], "--name is required"),
    (["launch", "--name", "p", "--zone", "z"], "unknown command 'launch'"),
    (["up", "--name", "p", "--zone", "z", "--bogus"], "unknown option '--bogus'"),
    (
      [
        "run",
        "--name",
        "p",
        "--zone",
        "z",
        "--accelerator-type",
        "v4",
        "--config",
        "c",
        "--workdir",
        "w",
      ],
      "cannot read the slice size",
    ),
  ],
)
def test_tpu_vm_bad_arguments_are_explained(args, message):
  result = tpu_vm(*args, "--dry-run", check=False)
  assert result.returncode == 2
  assert message in result.stderr
  assert "gcloud" not in result.stdout


FAKE_GCLOUD = textwrap.dedent("""\
    #!/usr/bin/env python3
    # Plays one TPU VM whose workers are this machine, with ~ = $HOME.
    import json, os, shutil, subprocess, sys
    args = sys.argv[1:]
    with open(os.environ["GCLOUD_CALLS"], "a") as f:
      f.write(json.dumps(["gcloud", *args]) + "\\n")
    verb = args[3]
    state_file = os.environ["GCLOUD_CALLS"] + ".state"
    if verb == "describe":
      if not os.path.exists(state_file):
        sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND")
      print(open(state_file).read())
    if verb == "create":
      open(state_file, "w").write("READY")
    if verb == "scp":
      shutil.copy(args[4], os.path.join(os.environ["HOME"], args[5].split(":", 1)[1]))
    if verb == "ssh":
      command = args[args.index("--command") + 1]
      sys.exit(subprocess.run(["bash", "-c", command], cwd=os.environ["HOME"]).returncode)
    """)

FAKE_TRAINER = textwrap.dedent("""\
    #!/usr/bin/env bash
    echo "trainer args: $*"
    echo "TFDS_DATA_DIR=${TFDS_DATA_DIR:-}"
    sleep "${FAKE_TRAIN_SECONDS:-0}"
    echo "training finished"
    """)


@pytest.fixture
def fake_tpu_vm(tmp_path):
  """A HOME playing the workers (venv already installed) and a gcloud playing the API."""
  home, bin_dir = tmp_path / "home", tmp_path / "bin"
  for path, text in [
    (bin_dir / "gcloud", FAKE_GCLOUD),
    (bin_dir / "uv", "#!/bin/sh\nexit 0\n"),
    (home / "mmtl/.venv/bin/python", FAKE_TRAINER),
  ]:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
  env = {
    "HOME": str(home),
    "TMPDIR": str(tmp_path),
    "PATH": f"{bin_dir}:{os.environ['PATH']}",
    "GCLOUD_CALLS": str(tmp_path / "calls.jsonl"),
  }
  yield home, env
  pid_file = home / "mmtl/train.pid"
  if pid_file.exists():  # A trainer the test left running.
    try:
      os.killpg(int(pid_file.read_text()), signal.SIGKILL)
    except ProcessLookupError:
      pass


def gcloud_calls(env):
  return [json.loads(line) for line in Path(env["GCLOUD_CALLS"]).read_text().splitlines()]


def test_tpu_vm_run_executes_what_it_prints(fake_tpu_vm):
  home, env = fake_tpu_vm
  out = tpu_vm(
    "run",
    "--name",
    "vm",
    "--zone",
    "z",
    "--accelerator-type",
    "v4-32",
    "--config",
    "configs/quickstart.py",
    "--workdir",
    "gs://b/run 1",
    "--env",
    "TFDS_DATA_DIR=gs://b/tfds",
    "--delete-after",
    "--",
    "--config.total_steps=7",
    env=env,
  ).stdout
  printed = [c for c in printed_commands(out) if c[0] == "gcloud"]
  assert printed == gcloud_calls(env)
  assert [c[4] for c in printed] == [
    "describe",
    "create",
    "scp",
    "ssh",
    "ssh",
    "ssh",
    "ssh",
    "delete",
  ]
  # The code arrived, the trainer ran with its flags and env, and its log was streamed to the end.
  assert (home / "mmtl/launch/tpu_vm.sh").is_file() and not (home / "mmtl.tgz").exists()
  assert (
    "trainer args: -m mmtl.train --config configs/quickstart.py --workdir gs://b/run 1 "
    "--config.total_steps=7"
  ) in out
  assert "TFDS_DATA_DIR=gs://b/tfds" in out
  assert out.index("training finished") < out.index("tpu-vm delete")


def test_tpu_vm_refuses_a_second_run_and_stops_the_first(fake_tpu_vm):
  home, env = fake_tpu_vm
  env["FAKE_TRAIN_SECONDS"] = "60"
  args = ["--name", "vm", "--zone", "z", "--config", "c.py", "--workdir", "w"]
  tpu_vm("run", *args, "--no-follow", env=env)
  assert "reusing" not in tpu_vm("run", *args, "--dry-run", env=env).stdout  # Dry runs ask nothing.
  second = tpu_vm("run", *args, "--no-follow", env=env, check=False)
  assert second.returncode == 1
  assert "reusing it" in second.stdout
  assert "a run is still going on this TPU VM" in second.stderr
  pid = int((home / "mmtl/train.pid").read_text())
  tpu_vm("stop", *args, env=env)
  for _ in range(100):
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      break
    time.sleep(0.1)
  else:
    pytest.fail("stop left the trainer running")
  assert "training finished" not in (home / "mmtl/train.log").read_text()


def test_tpu_vm_refuses_a_vm_that_is_not_ready(fake_tpu_vm, tmp_path):
  _, env = fake_tpu_vm
  (tmp_path / "calls.jsonl.state").write_text("PREEMPTED")
  result = tpu_vm(
    "run",
    "--name",
    "vm",
    "--zone",
    "z",
    "--spot",
    "--config",
    "c.py",
    "--workdir",
    "w",
    env=env,
    check=False,
  )
  assert result.returncode == 2
  assert "TPU VM vm exists but is PREEMPTED, not READY; delete it" in result.stderr
  assert [call[4] for call in gcloud_calls(env)] == [
    "describe"
  ]  # Nothing created, copied or started.


def test_gpu_sh_dry_run():
  result = process.run(
    [
      ROOT / "launch/gpu.sh",
      "--config",
      "configs/quickstart.py",
      "--workdir",
      "runs/q",
      "--gpus",
      "0,1,2,3",
      "--python",
      "python3",
      "--dry-run",
      "--",
      "--config.seed=1",
    ],
    capture_output=True,
    text=True,
    env={**os.environ, "XLA_FLAGS": "--xla_dump_to=/tmp/d"},
    timeout=120,
  )
  assert result.returncode == 0, result.stderr
  assert printed_commands(result.stdout) == [
    [
      "env",
      "CUDA_VISIBLE_DEVICES=0,1,2,3",
      "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9",
      "XLA_FLAGS=--xla_dump_to=/tmp/d --xla_gpu_enable_latency_hiding_scheduler=true",
      f"PYTHONPATH={ROOT}{os.pathsep + os.environ['PYTHONPATH'] if os.environ.get('PYTHONPATH') else ''}",  # noqa: E501
      "python3",
      "-m",
      "mmtl.train",
      "--config",
      "configs/quickstart.py",
      "--workdir",
      "runs/q",
      "--config.seed=1",
    ]
  ]
  bad = process.run(
    [ROOT / "launch/gpu.sh", "--config", "c", "--workdir", "w", "--gpus", "all"],
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert bad.returncode == 2 and "--gpus expects comma-separated GPU indices" in bad.stderr


FAKE_SRUN = textwrap.dedent("""\
    #!/usr/bin/env bash
    # Starts $SLURM_NTASKS tasks of the command on this machine, like srun does on the nodes.
    [ "$1" = --kill-on-bad-exit=1 ] && shift
    pids=()
    for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i "$@" & pids+=($!); done
    status=0  # The highest exit code of the tasks, as srun's.
    for pid in "${pids[@]}"; do
      wait "$pid" || { code=$?; (( code > status )) && status=$code; }
    done
    exit $status
    """)
# `scontrol show hostnames`: a long node list, more names than a pipe holds once the first
# one is read; `scontrol requeue ID`: noted in $REQUEUED.
FAKE_SCONTROL = textwrap.dedent("""    #!/bin/sh
    if [ "$1" = requeue ]; then echo "$@" >> "$REQUEUED"; exit 0; fi
    echo localhost
    seq -f 'node%g' 2 200000
    """)

# Stands in for `python -m mmtl.train`: joins the job with mmtl.distributed.
FAKE_PYTHON = textwrap.dedent(f"""\
    #!/usr/bin/env bash
    exec {sys.executable} -c '
    import os, sys, jax
    from mmtl import distributed
    assert distributed.maybe_initialize()
    line = (f"process {{jax.process_index()}}/{{jax.process_count()}} "
            f"devices {{jax.device_count()}} args")
    # One write: the tasks share stdout.
    os.write(1, " ".join([line, *sys.argv[1:]]).encode() + b"\\n")
    jax.distributed.shutdown()
    ' "$@"
    """)


def run_sbatch(tmp_path, python: str, *args: str) -> tuple[Any, int]:
  """launch/slurm.sbatch as a 2-node job of the fake srun, scontrol and `python`; the
  coordinator port it was given."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, text in [("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("python", python)]:
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = {
    **os.environ,
    "PATH": f"{bin_dir}:{os.environ['PATH']}",
    "PYTHON": str(bin_dir / "python"),
    "REQUEUED": str(tmp_path / "requeued.txt"),
    "SLURM_JOB_NODELIST": "localhost,node2",
    "SLURM_NTASKS": "2",
    "SLURM_JOB_ID": "7",
    "SLURM_SUBMIT_DIR": str(ROOT),
    "MMTL_COORDINATOR_PORT": str(port),
    "XLA_FLAGS": xla_settings.xla_flags(2),
    "JAX_PLATFORMS": "cpu",
  }
  result = process.run(
    ["bash", ROOT / "launch/slurm.sbatch", *args],
    capture_output=True,
    text=True,
    env=env,
    timeout=180,
  )
  return result, port


def test_slurm_sbatch_joins_one_jax_job(tmp_path):
  result, port = run_sbatch(
    tmp_path, FAKE_PYTHON, "configs/quickstart.py", "/shared/w", "--config.seed=3"
  )
  assert result.returncode == 0, result.stdout + result.stderr
  assert f"coordinator localhost:{port}, 2 processes" in result.stdout
  for i in range(2):  # Both tasks are in one job of 2 x 2 devices, with the trainer's flags.
    assert (
      f"process {i}/2 devices 4 args -m mmtl.train --config configs/quickstart.py --workdir "
      "/shared/w "
      "--config.seed=3"
    ) in result.stdout


@pytest.mark.parametrize("task_exit", [75, 1])
def test_slurm_sbatch_requeues_a_job_stopped_by_a_signal(tmp_path, task_exit):
  """Exit 75 (mmtl.train saved its step on SIGTERM): the job is requeued; a failure is not."""
  result, _ = run_sbatch(tmp_path, f"#!/bin/sh\nexit {task_exit}\n", "c.py", "/shared/w")
  assert result.returncode == task_exit, result.stdout + result.stderr
  requeued = tmp_path / "requeued.txt"
  if task_exit == 75:
    assert requeued.read_text() == "requeue 7\n"
    assert "requeueing job 7 to continue" in result.stdout
  else:
    assert not requeued.exists()
  header = (ROOT / "launch/slurm.sbatch").read_text()
  for line in ("#SBATCH --signal=TERM@300", "#SBATCH --requeue", "#SBATCH --open-mode=append"):
    assert line in header


def test_slurm_sbatch_needs_slurm(tmp_path):
  result = process.run(
    ["bash", ROOT / "launch/slurm.sbatch", "c.py", "w"],
    capture_output=True,
    text=True,
    env={**os.environ, "SLURM_SUBMIT_DIR": str(ROOT), "SLURM_JOB_NODELIST": ""},
    timeout=120,
  )
  assert result.returncode == 2 and "submit this script with sbatch" in result.stderr
  elsewhere = process.run(
    ["bash", ROOT / "launch/slurm.sbatch", "c.py", "w"],
    capture_output=True,
    text=True,
    env={**os.environ, "SLURM_SUBMIT_DIR": str(tmp_path)},
    timeout=120,
  )
  assert elsewhere.returncode == 2 and "set MMTL_ROOT" in elsewhere.stderr
  usage = process.run(
    ["bash", ROOT / "launch/slurm.sbatch", "--help"], capture_output=True, text=True, timeout=120
  )
  assert (
    usage.returncode == 0 and "sbatch --nodes=4 launch/slurm.sbatch CONFIG WORKDIR" in usage.stdout
  )
