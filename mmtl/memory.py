"""How much device memory a train state and its step take.

`memory_estimate` is the per-device line the trainer prints at start: params and
optimizer state under their shardings (exact), and the activations autodiff keeps
for the backward pass (`activation_bytes`, traced from the step's loss).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import math
from typing import Any

import jax
from jax.extend import core as jax_core
from jax.sharding import Mesh
import numpy as np


def bytes_per_device(tree: Any, shardings: Any) -> int:
  """Bytes one device holds of `tree` (shapes or arrays) under `shardings`."""

  def leaf_bytes(x, sharding):
    shard = sharding.shard_shape(np.shape(x))
    return math.prod(shard) * np.dtype(x.dtype).itemsize

  return sum(jax.tree.leaves(jax.tree.map(leaf_bytes, tree, shardings)))


def activation_bytes(loss_fn: Callable[..., Any], *args: Any, has_aux: bool = False) -> int:
  """Bytes of forward values that autodiff of `loss_fn` w.r.t. its first
  argument keeps for the backward pass (its residuals), for the whole global
  batch, excluding the arguments themselves. Traced, not compiled: cheap.

  This honours remat (`nn.remat` / `jax.checkpoint` policies): a
  rematerialized layer keeps only what its policy saves. XLA may fuse or
  reorder, so treat the number as an estimate.
  """
  leaves, treedef = jax.tree.flatten(args)

  def forward_for_backward(*leaves):
    first, *rest = jax.tree.unflatten(treedef, leaves)
    return jax.vjp(lambda p: loss_fn(p, *rest), first, has_aux=has_aux)

  closed, out_shape = jax.make_jaxpr(forward_for_backward, return_shape=True)(*leaves)
  jaxpr = closed.jaxpr
  num_residuals = len(jax.tree.leaves(out_shape[1]))
  residuals = jaxpr.outvars[len(jaxpr.outvars) - num_residuals :]
  inputs = set(jaxpr.invars) | set(jaxpr.constvars)
  saved = {v for v in residuals if isinstance(v, jax_core.Var)} - inputs
  return sum(math.prod(v.aval.shape) * np.dtype(v.aval.dtype).itemsize for v in saved)


def memory_estimate(
  mesh: Mesh, state: Any, shardings: Any, *, activations: int = 0
) -> dict[str, int]:
  """Per-device bytes: params, the rest of the train state (optimizer), and
  `activations` (global bytes, e.g. from `activation_bytes`) split over the
  batch shards. Gradients (~ trainable params) and XLA scratch come on top."""
  params = bytes_per_device(state["params"], shardings["params"])
  rest = {k: v for k, v in state.items() if k != "params"}
  other = bytes_per_device(rest, {k: shardings[k] for k in rest})
  acts = activations // (mesh.shape["data"] * mesh.shape["fsdp"])
  return dict(params=params, opt_state=other, activations=acts, total=params + other + acts)


def format_memory(estimate: Mapping[str, int], device: jax.Device | None = None) -> str:
  """One line for the log, with the device's memory limit when it reports one."""
  parts = ", ".join(f"{k} {human_bytes(v)}" for k, v in estimate.items() if k != "total")
  line = (
    f"Estimated memory per device: {human_bytes(estimate['total'])} ({parts}; + grads, XLA temps)"
  )
  device = device or jax.local_devices()[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and "bytes_limit" in stats:
    line += f" of {human_bytes(stats['bytes_limit'])} on {device.device_kind}"
  return line


def nbytes(leaf: Any) -> int:
  """Bytes of a whole array or ShapeDtypeStruct."""
  return math.prod(np.shape(leaf)) * np.dtype(leaf.dtype).itemsize


def human_bytes(num_bytes: float) -> str:
  """1536 -> '1.5 KiB'; whole bytes below 1 KiB."""
  value = float(num_bytes)
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if value < 1024 or unit == "TiB":
      break
    value /= 1024
  return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
