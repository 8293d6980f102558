"""Joining a multi-process (multi-host) JAX job, and who does the host-only work.

One Python process per host (per GPU node, per TPU VM worker) runs the same
program; `jax.distributed.initialize` connects them so `jax.devices()` lists
every device of the job and one `jax.jit` spans them all. Call
`maybe_initialize()` first thing in a main, before any other JAX call.

When it initializes:
- explicit arguments (e.g. from flags), or the environment variables
  JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
  JAX_PROCESS_ID, set by a launcher;
- MMTL_DISTRIBUTED=1: let JAX detect the cluster (Cloud TPU pod slices,
  SLURM, Open MPI, Kubernetes) and take every setting from it;
- automatically on Cloud TPU VMs (JAX reads the slice's hosts from the TPU
  metadata; a single-host VM becomes a job of one), and under SLURM or Open
  MPI with more than one task.
Otherwise it does nothing: a single process needs no coordinator.
"""

from __future__ import annotations

import glob
import importlib.util
import os

from absl import logging
import jax


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"Environment variable {name}={value!r} must be an integer.") from None


def _launched_by_cluster() -> bool:
  """Started by a cluster (manager) whose processes JAX can discover by itself."""
  if os.environ.get("MMTL_DISTRIBUTED", "").lower() in ("1", "true", "auto"):
    return True
  for count in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    if (_env_int(count) or 1) > 1:
      return True
  return _on_cloud_tpu_vm()


def _on_cloud_tpu_vm() -> bool:
  """TPU chips attached (the device files JAX's TPU backend opens) and libtpu installed."""
  chips = glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")
  return bool(chips) and importlib.util.find_spec("libtpu") is not None


def maybe_initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> bool:
  """Initializes jax.distributed when launched as several processes.

  Returns whether the job has more than one process. Safe to call twice.
  """
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
  explicit = (coordinator_address, num_processes, process_id)
  if num_processes == 1 or (all(v is None for v in explicit) and not _launched_by_cluster()):
    return False
  if None in explicit and not _launched_by_cluster():
    raise ValueError(
      f"Multi-process launch needs all of coordinator_address={coordinator_address!r}, "
      f"num_processes={num_processes!r}, process_id={process_id!r} (or the env vars "
      "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); set the missing ones, or "
      "MMTL_DISTRIBUTED=1 on a cluster JAX detects (TPU pod, SLURM, Open MPI, Kubernetes)."
    )
  # CPU processes exchange collectives over gloo (TCP); GPUs/TPUs use their own links.
  if not jax.config.jax_cpu_collectives_implementation:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )
  logging.info(
    "jax.distributed: process %d of %d, %d local / %d global devices.",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  return jax.process_count() > 1


def is_main_process() -> bool:
  """Process 0 writes logs, metrics, plots and other host-side files."""
  return jax.process_index() == 0
