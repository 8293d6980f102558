"""One process of the jobs launched by tests/test_multihost.py.

    JAX_COORDINATOR_ADDRESS=localhost:PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=i \
    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/multihost_worker.py WORKDIR

Joins the job (`mmtl.distributed`), trains on the global (2,2,2) mesh with this
process's slice of every batch, checkpoints with orbax, restores the
checkpoint fully replicated and writes what it got to WORKDIR/result_<i>.npz.

    ... python tests/multihost_worker.py WORKDIR CONFIG.json

runs the real trainer, `mmtl.train.train(CONFIG, WORKDIR)`, on any number of
processes (JAX_NUM_PROCESSES=1 or unset: one process); `... CONFIG.json preempt`
sends process 1 a SIGTERM during the run.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmtl import distributed  # noqa: E402

MESH = dict(data=2, fsdp=2, model=2)
RULES = "fsdp_tp"
STEPS = 3


def train(workdir: str) -> list[float]:
  """Trains STEPS steps and checkpoints the final state in WORKDIR/checkpoints."""
  from mmtl import checkpoint, sharding
  from tests import sharding_toy as toy

  mesh = sharding.make_mesh(MESH)
  state, losses = toy.run(mesh, RULES, STEPS)
  with checkpoint.CheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
    manager.save(STEPS, state, data_state={"slice": list(sharding.process_data_shard(mesh))})
    manager.wait()
  return losses


def main(workdir: str) -> None:
  assert distributed.maybe_initialize(), "expected a multi-process launch"
  import jax
  import numpy as np

  from mmtl import checkpoint, rules, sharding
  from tests import sharding_toy as toy

  assert jax.process_count() == 2 and jax.device_count() == 8, (jax.process_count(), jax.devices())

  losses = train(workdir)

  # Read the checkpoint back, replicated, so every process holds every value.
  mesh = sharding.make_mesh(MESH)
  shapes, _ = toy.state_shardings(mesh, RULES)
  target = checkpoint.abstract(shapes, jax.tree.map(lambda _: sharding.replicated(mesh), shapes))
  with checkpoint.CheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
    state = manager.restore(target)
    data_state = manager.data_state()
  arrays = {f"params/{k}": np.asarray(v) for k, v in rules.flatten(state["params"]).items()}

  # Values every process holds in full (pretrained weights) -> global sharded arrays.
  host = jax.device_get(state["params"])
  placed = jax.device_put(host, sharding.param_shardings(mesh, host, RULES))
  total = jax.jit(
    lambda t: sum(x.sum() for x in jax.tree.leaves(t)), out_shardings=sharding.replicated(mesh)
  )
  arrays["host_tree_sum"] = np.asarray(total(placed))
  np.savez(
    os.path.join(workdir, f"result_{jax.process_index()}.npz"),
    losses=np.asarray(losses),
    step=np.asarray(state["step"]),
    **arrays,
  )
  with open(os.path.join(workdir, f"data_state_{jax.process_index()}.json"), "w") as f:
    json.dump(data_state, f)
  print(f"process {jax.process_index()} is_main={distributed.is_main_process()} done")


def run_trainer(workdir: str, config_path: str, preempt: str = "") -> None:
  """The trainer; `preempt`="preempt": process 1 gets SIGTERM while the trainer starts, as a
  preempted host would, and each batch after takes a second (time for the notice to reach
  process 0 before the run ends). Exits with the trainer's status."""
  import signal
  import time

  import jax
  import ml_collections as mlc
  import pytest

  from mmtl import preemption, train
  from tests import test_train

  distributed.maybe_initialize()
  if preempt and jax.process_index() == 1:

    def preempted_host(n, batch):  # n = 1 is the trainer's shape probe, before the loop.
      if n == 1:
        os.kill(os.getpid(), signal.SIGTERM)
      else:
        time.sleep(1)
      return batch

    test_train.patch_train_batches(pytest.MonkeyPatch(), preempted_host)
  with open(config_path) as f:
    try:
      train.train(mlc.ConfigDict(json.load(f)), workdir)
    except train.Stopped as e:
      print(f"Stopped: {e}", flush=True)
      sys.exit(preemption.EXIT_CODE)


if __name__ == "__main__":
  if len(sys.argv) >= 3:
    run_trainer(*sys.argv[1:])
  else:
    main(sys.argv[1])
