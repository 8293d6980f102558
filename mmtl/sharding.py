"""Device mesh and parameter sharding rules.

Everything here is plain JAX SPMD: a `Mesh` with the axes `data`, `fsdp` and
`model`, `NamedSharding`s for the train state and the batch, and `jax.jit`
does the rest. The same code runs on 1 CPU, 8 GPUs or a TPU pod slice.

- `data`: pure data parallelism; params replicated along it.
- `fsdp`: the batch is split along it too, and params that a rule shards over
  `fsdp` are gathered just in time by XLA (ZeRO-3 / FSDP).
- `model`: tensor parallelism (Megatron): attention heads and the MLP hidden
  dimension are split along it; activations are not batch-split over it.

`config.sharding_rules` is a preset name (see `PRESETS`) or an ordered list of
`(regex, value)` pairs matched with `mmtl.rules` (first match wins, full-path
match). A value is `"replicate"`, `"fsdp"` (shard the largest dimension that
`fsdp` divides) or a PartitionSpec-like tuple, one entry per leading dimension
(`None`, an axis name or a tuple of axis names; missing trailing entries mean
replicated). A dimension that its axes do not divide falls back to replicated
and is logged, so one rule set serves every mesh and model size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import math
from typing import Any

from absl import logging
import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from mmtl import rules as rules_lib

AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

_ATTN_IN = r".*/(cross_)?attn/(query|key|value)"  # a decoder's cross-attention too
_ATTN_OUT = r".*/(cross_)?attn/out"
_MLP_IN = r".*/mlp/fc1"
_MLP_OUT = r".*/mlp/fc2"


def _megatron(other: str | None) -> list[tuple[str, Any]]:
  """Megatron tensor parallelism: column-split the input projections (query,
  key, value, fc1) and row-split the output projections (out, fc2), so the
  attention and the MLP each need one all-reduce forward and one backward, and
  each device computes its own heads. Dense kernels are (in, out);
  `other` (e.g. "fsdp") shards the kernels' remaining dimension. LoRA factors
  (`mmtl.lora`: lora_a (in, r), lora_b (r, out)) follow their kernel's split."""
  column, row = f"({_ATTN_IN}|{_MLP_IN})", f"({_ATTN_OUT}|{_MLP_OUT})"
  return [
    (column + "/kernel", (other, "model")),
    (column + "/bias", ("model",)),
    (column + "/lora_b", (None, "model")),
    (row + "/kernel", ("model", other)),
    (row + "/lora_a", ("model", None)),
  ]


PRESETS: dict[str, list[tuple[str, Any]]] = {
  "replicate": [(".*", "replicate")],
  "fsdp": [(".*", "fsdp")],
  "tp": _megatron(None) + [(".*", "replicate")],
  "fsdp_tp": _megatron("fsdp") + [(".*", "fsdp")],
}


def make_mesh(
  mesh_cfg: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """A (data, fsdp, model) mesh; one size may be -1 for "all remaining devices".

  `jax.make_mesh` orders devices for the physical topology (TPU ICI, GPU
  hosts). Axis types are `Auto`: shardings are propagated by the compiler
  from the NamedShardings we give, not enforced per op (`Explicit`).
  """
  mesh_cfg = dict(mesh_cfg or {"data": -1})
  unknown = set(mesh_cfg) - set(AXES)
  if unknown:
    raise ValueError(
      f"config.mesh: unknown axes {sorted(unknown)}; the mesh axes are {AXES}, "
      f"e.g. config.mesh = dict(data=-1, fsdp=1, model=1)."
    )
  devices = list(jax.devices() if devices is None else devices)
  sizes = [int(mesh_cfg.get(a, 1)) for a in AXES]
  n = len(devices)
  if sizes.count(-1) > 1 or any(s < 1 and s != -1 for s in sizes):
    raise ValueError(f"config.mesh={mesh_cfg}: sizes must be positive, with at most one -1.")
  known = math.prod(s for s in sizes if s != -1)
  if n % known:
    raise ValueError(
      f"config.mesh={mesh_cfg}: the fixed axis sizes (product {known}) do not "
      f"divide the {n} devices; pick sizes whose product divides {n}."
    )
  sizes = [n // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != n:
    raise ValueError(
      f"config.mesh={mesh_cfg} uses {math.prod(sizes)} devices but there are {n}; "
      f"set one axis to -1 or make the sizes multiply to {n}."
    )
  return jax.make_mesh(tuple(sizes), AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def _resolve_rules(sharding_rules: str | Sequence[Any] | None) -> tuple[list[Any], bool]:
  """(rules, strict): a preset name expands to its rules, matched non-strictly
  (a preset is generic: a model without MLPs may still use "tp"); user rules
  are strict, a rule that matches no param is an error (`mmtl.rules`)."""
  if sharding_rules is None:
    return PRESETS["replicate"], False
  if isinstance(sharding_rules, str):
    if sharding_rules not in PRESETS:
      raise ValueError(
        f"config.sharding_rules={sharding_rules!r} is not a preset; use one of "
        f"{sorted(PRESETS)} or a list of (regex, spec) pairs."
      )
    return PRESETS[sharding_rules], False
  return list(sharding_rules), True


def _axes(entry: Any) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def _spec(path: str, shape: Sequence[int], value: Any, mesh: Mesh) -> P:
  """The PartitionSpec that rule `value` gives a param of `shape` on `mesh`."""
  if value == "replicate":
    return P()
  if value == "fsdp":
    n = mesh.shape["fsdp"]
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
      if n > 1 and shape[dim] % n == 0:
        return P(*[None] * dim, "fsdp")
    if n > 1:
      logging.info(
        "sharding: %s %s has no dimension divisible by fsdp=%d; replicated.", path, tuple(shape), n
      )
    return P()
  if isinstance(value, str) or not isinstance(value, Sequence):
    raise ValueError(
      f"sharding rule for {path}: {value!r} is not 'replicate', 'fsdp' or a "
      f"PartitionSpec-like tuple such as (None, 'model')."
    )
  if len(value) > len(shape):
    raise ValueError(
      f"sharding rule for {path}: spec {tuple(value)} has {len(value)} entries but "
      f"the param has shape {tuple(shape)}; give at most {len(shape)}."
    )
  entries = []
  for dim, entry in enumerate(value):
    axes = _axes(entry)
    bad = [a for a in axes if a not in mesh.shape]
    if bad:
      raise ValueError(f"sharding rule for {path}: unknown mesh axes {bad}; the axes are {AXES}.")
    n = math.prod(mesh.shape[a] for a in axes)
    if shape[dim] % n:
      logging.info(
        "sharding: %s dim %d (size %d) not divisible by %s=%d; replicated.",
        path,
        dim,
        shape[dim],
        axes,
        n,
      )
      axes = ()
    entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  while entries and entries[-1] is None:  # P('fsdp', None) == P('fsdp') in meaning, not in ==
    entries.pop()
  return P(*entries)


def param_shardings(mesh: Mesh, params: Any, sharding_rules: str | Sequence[Any] | None) -> Any:
  """Tree of NamedSharding for `params` (arrays or ShapeDtypeStructs)."""
  rules, strict = _resolve_rules(sharding_rules)
  flat = rules_lib.flatten(params)
  values = rules_lib.assign(
    flat, rules, default="replicate", what="config.sharding_rules", require_match=strict
  )
  specs = [_spec(path, np.shape(x), values[path], mesh) for path, x in flat.items()]
  return jax.tree.unflatten(jax.tree.structure(params), [NamedSharding(mesh, s) for s in specs])


def state_shardings(mesh: Mesh, state: Any, params_shardings: Any) -> Any:
  """Tree of NamedSharding for a whole train state (e.g. {'step','params','opt_state'}).

  A leaf takes the sharding of the param whose path is the longest suffix of
  the leaf's path and whose shape equals the leaf's (params themselves, Adam's
  mu/nu, EMA copies...). Everything else is replicated: optax `count`, scalars,
  factored statistics of another shape.
  """
  by_path = rules_lib.flatten(params_shardings)
  replicated = NamedSharding(mesh, P())

  def pick(key_path, leaf):
    parts = rules_lib.path_str(key_path).split("/")
    for start in range(len(parts)):
      sharding = by_path.get("/".join(parts[start:]))
      if sharding is not None:
        return sharding if _shape_fits(leaf, sharding) else replicated
    return replicated

  return jax.tree_util.tree_map_with_path(pick, state)


def _shape_fits(leaf: Any, sharding: NamedSharding) -> bool:
  shape = np.shape(leaf)
  if len(sharding.spec) > len(shape):
    return False
  for dim, entry in enumerate(sharding.spec):
    if shape[dim] % math.prod(sharding.mesh.shape[a] for a in _axes(entry)):
      return False
  return True


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch dimension split over ("data", "fsdp"); replicated over "model"."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def process_data_shard(mesh: Mesh) -> tuple[int, int]:
  """(index, count): which 1/count slice of every global batch this process
  must load (pass to the `mmtl.data` iterators as process_index/process_count).

  Processes whose devices hold the same batch rows (e.g. a `model` axis across
  hosts) must load the same data, so this is not always jax.process_index().
  """
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  index_map = batch_sharding(mesh).devices_indices_map((shards,))
  rows: dict[int, set[int]] = {}
  for device, (rows_slice,) in index_map.items():
    rows.setdefault(device.process_index, set()).add(rows_slice.start or 0)
  blocks = sorted({tuple(sorted(r)) for r in rows.values()})
  for block in blocks:
    if block != tuple(range(block[0], block[0] + len(block))):
      raise ValueError(
        f"Mesh {dict(mesh.shape)} gives a process the batch rows {block}, not one "
        "contiguous slice; build the mesh with make_mesh so that hosts own "
        "contiguous devices."
      )
  return blocks.index(tuple(sorted(rows[jax.process_index()]))), len(blocks)
