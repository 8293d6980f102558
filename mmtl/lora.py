"""LoRA on the params tree, so it works for every model without touching model code.

For each dense kernel `X/kernel` of shape (d_in, d_out) chosen by
`config.optim.lora.targets` (regexes, see mmtl.rules), `init` adds siblings

  X/lora_a      (d_in, rank)   random, as in PEFT (kaiming-uniform bound 1/sqrt(d_in))
  X/lora_b      (rank, d_out)  zeros, so the model starts exactly at the base
  X/lora_scale  ()             alpha / rank, a constant that mmtl.optim always freezes

`merge(params)` returns the plain tree the model expects: `X/kernel + scale * A @ B`
and no lora leaves. The trainer applies the model to `merge(params)` inside the
loss, so gradients reach A and B through the merge, the base kernels stay frozen
by the optimizer mask (`config.optim.preset = "lora"`), and exporting `merge(params)`
gives exactly the model that was trained. Keeping A and B next to their kernel
means layer-wise LR decay, per-tower summaries and sharding rules see them in
their layer. The merge costs one (d_in, rank) @ (rank, d_out) product per target
and step, small next to the activations.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from mmtl import config_keys, rules

# Rules (mmtl.rules syntax) for what the optimizer trains and never trains.
TRAINABLE = r".*/lora_(a|b)"
CONSTANT = r".*/lora_scale"
_SUFFIXES = ("/lora_a", "/lora_b", "/lora_scale")
CONFIG_KEYS = dict(targets=(list, tuple), rank=8, alpha=float)  # alpha: rank when unset


def init(params: Any, lora_cfg: Mapping[str, Any], rng: jax.Array) -> dict[str, Any]:
  """Returns `params` plus LoRA leaves for each kernel matched by `lora_cfg.targets`.

  `lora_cfg = dict(targets=[regex, ...], rank=8, alpha=rank)`; targets must match
  whole paths of 2-D `.../kernel` leaves, e.g. `.*/attn/(query|value)/kernel`.
  """
  config_keys.check_keys(lora_cfg, CONFIG_KEYS, "config.optim.lora")
  if not lora_cfg.get("targets"):
    raise ValueError(
      "config.optim.lora.targets is empty: give regexes of dense kernels to adapt, "
      "e.g. ['.*/attn/(query|value)/kernel']."
    )
  rank = int(lora_cfg.get("rank", CONFIG_KEYS["rank"]))
  alpha = float(lora_cfg.get("alpha") or rank)
  flat = rules.flatten(params)
  if any(p.endswith(_SUFFIXES) for p in flat):
    raise ValueError("params already hold LoRA leaves: call lora.init once, on base params.")
  hits = rules.assign(
    flat, [(t, True) for t in lora_cfg["targets"]], default=False, what="config.optim.lora.targets"
  )
  out = {}
  for i, (path, leaf) in enumerate(flat.items()):
    out[path] = leaf
    if not hits[path]:
      continue
    if not path.endswith("/kernel") or jnp.ndim(leaf) != 2:
      raise rules.RuleError(
        f"config.optim.lora.targets matched {path} (shape {jnp.shape(leaf)}); LoRA adapts 2-D "
        "dense kernels only: end each target with '/kernel' and match Dense layers."
      )
    d_in, d_out = leaf.shape
    if not 0 < rank <= min(d_in, d_out):
      raise ValueError(
        f"config.optim.lora.rank={rank} must be in [1, {min(d_in, d_out)}] for {path}."
      )
    prefix = path[: -len("/kernel")]
    bound = 1.0 / d_in**0.5
    out[prefix + "/lora_a"] = jax.random.uniform(
      jax.random.fold_in(rng, i), (d_in, rank), leaf.dtype, -bound, bound
    )
    out[prefix + "/lora_b"] = jnp.zeros((rank, d_out), leaf.dtype)
    out[prefix + "/lora_scale"] = jnp.asarray(alpha / rank, jnp.float32)
  return rules.unflatten(out)


def merge(params: Any) -> dict[str, Any]:
  """Plain params with every `kernel + scale * lora_a @ lora_b` applied; no-op without LoRA.

  Differentiable and jittable: call it inside the loss and for export.
  """
  flat = rules.flatten(params)
  if not any(p.endswith("/lora_a") for p in flat):
    return params
  out = {}
  for path, leaf in flat.items():
    if path.endswith(_SUFFIXES):
      continue
    prefix = path[: -len("/kernel")]
    if path.endswith("/kernel") and prefix + "/lora_a" in flat:
      a, b = flat[prefix + "/lora_a"], flat[prefix + "/lora_b"]
      delta = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST) * flat[prefix + "/lora_scale"]
      dtype = jnp.promote_types(leaf.dtype, a.dtype)  # a bfloat16-stored base: merged in A's
      leaf = leaf.astype(dtype) + delta.astype(dtype)
    out[path] = leaf
  return rules.unflatten(out)
