"""Gradual magnitude pruning in the optimizer (Zhu & Gupta 2017).

  config.optim.prune = dict(
    targets=[r"text_encoder/encoder/.*/kernel"],  # params (mmtl.rules), trainable ones
    sparsity=0.5,         # final fraction of exact zeros
    scope="layer",        # "layer": each param loses its own smallest |w|; "global": all at once
    start_step=0,         # first pruning step
    end_step=0,           # last one; 0: three quarters of total_steps (the rest recovers)
    every=100,            # steps between pruning steps
  )

`transform` is the last link of mmtl.optim's chain: at each pruning step t it keeps the
weights of largest magnitude after the update and zeroes the others, to the sparsity

  s_t = sparsity * (1 - (1 - (t - start_step) / (end_step - start_step)) ** 3)

(Zhu & Gupta's cubic schedule from 0), and in between it applies the same masks after
every update, so a pruned weight stays exactly zero; the masks are optimizer state,
saved and restored with it. Exactly floor(s_t * n) weights are zero in each param
("layer") or among all targets ("global"), ties broken by position. Pruned weights are
plain zeros in the params: checkpoints and exported models (mmtl.export) keep them.
"""

from __future__ import annotations

from collections.abc import Mapping
import itertools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from mmtl import config_keys, rules

CONFIG_KEYS = dict(
  targets=config_keys.RULES,
  sparsity=float,
  scope="layer",
  start_step=0,
  end_step=0,
  every=100,
)
SCOPES = ("layer", "global")


class PruneState(NamedTuple):
  count: jax.Array  # updates done
  masks: Any  # True where a weight is kept, per target (optax.MaskedNode elsewhere)


def settings(prune_cfg: Mapping[str, Any], total_steps: int) -> dict[str, Any]:
  """`prune_cfg` with defaults filled and checked."""
  config_keys.check_keys(prune_cfg, CONFIG_KEYS, "config.optim.prune")
  cfg = {**CONFIG_KEYS, **prune_cfg}
  if not cfg["targets"]:
    raise config_keys.ConfigError(
      "config.optim.prune.targets is empty: give regexes of the params to prune, e.g. "
      "['text_encoder/encoder/.*/kernel']."
    )
  if "sparsity" not in prune_cfg:
    raise config_keys.ConfigError("config.optim.prune.sparsity is missing: e.g. 0.5.")
  if not isinstance(cfg["sparsity"], (int, float)) or not 0 < cfg["sparsity"] < 1:
    raise config_keys.ConfigError(
      f"config.optim.prune.sparsity={cfg['sparsity']!r} must be in (0, 1), e.g. 0.5."
    )
  if cfg["scope"] not in SCOPES:
    raise config_keys.ConfigError(
      f"config.optim.prune.scope={cfg['scope']!r}: use one of {SCOPES}."
    )
  cfg["end_step"] = int(cfg["end_step"]) or max(total_steps * 3 // 4, 1)
  if not 0 <= cfg["start_step"] < cfg["end_step"] or int(cfg["every"]) < 1:
    raise config_keys.ConfigError(
      f"config.optim.prune: need 0 <= start_step ({cfg['start_step']}) < end_step "
      f"({cfg['end_step']}) and every ({cfg['every']}) >= 1."
    )
  return cfg


def targets(params: Any, prune_cfg: Mapping[str, Any]) -> Any:
  """Bool tree: True at the params `prune_cfg.targets` matches."""
  return rules.tree_assign(
    params, rules.as_list(prune_cfg["targets"]), default=False, what="config.optim.prune.targets"
  )


def sparsity_at(cfg: Mapping[str, Any], step: jax.Array) -> jax.Array:
  """Zhu & Gupta's s_t at (0-based) update `step`, constant after `end_step`."""
  span = cfg["end_step"] - cfg["start_step"]
  progress = jnp.clip((step - cfg["start_step"]) / span, 0.0, 1.0)
  return cfg["sparsity"] * (1.0 - (1.0 - progress) ** 3)


def prunes_at(cfg: Mapping[str, Any], step: jax.Array) -> jax.Array:
  """Whether update `step` recomputes the masks."""
  offset = step - cfg["start_step"]
  return (
    (offset >= 0)
    & (step <= cfg["end_step"])
    & ((offset % cfg["every"] == 0) | (step == cfg["end_step"]))
  )


def _keep(magnitudes: jax.Array, sparsity: jax.Array) -> jax.Array:
  """True except at the floor(sparsity * n) smallest entries of the flat `magnitudes`."""
  n = magnitudes.size
  k = jnp.floor(sparsity * n).astype(jnp.int32)
  ranks = jnp.argsort(jnp.argsort(magnitudes, stable=True), stable=True)
  return ranks >= k


def _masks(weights: list[jax.Array], sparsity: jax.Array, scope: str) -> list[jax.Array]:
  flat = [jnp.abs(x).astype(jnp.float32).ravel() for x in weights]
  if scope == "layer":
    kept = [_keep(x, sparsity) for x in flat]
  else:
    everything = _keep(jnp.concatenate(flat), sparsity)
    ends = list(itertools.accumulate(x.size for x in flat))
    kept = [everything[end - x.size : end] for x, end in zip(flat, ends)]
  return [k.reshape(x.shape) for k, x in zip(kept, weights)]


def transform(cfg: Mapping[str, Any], target_mask: Any) -> optax.GradientTransformation:
  """The pruning link (module docstring) for the params `target_mask` marks; `cfg` is
  `settings(...)`'s. A kept weight's update passes unchanged; a pruned one's is -w."""

  def init(params):
    return PruneState(
      jnp.zeros((), jnp.int32),
      jax.tree.map(
        lambda p, t: jnp.ones(p.shape, bool) if t else optax.MaskedNode(), params, target_mask
      ),
    )

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("mmtl.pruning.transform needs the params in tx.update(..., params).")
    u, treedef = jax.tree.flatten(updates)
    p, hits = treedef.flatten_up_to(params), treedef.flatten_up_to(target_mask)
    chosen = [i for i, hit in enumerate(hits) if hit]
    masks = jax.lax.cond(
      prunes_at(cfg, state.count),
      lambda: _masks([p[i] + u[i] for i in chosen], sparsity_at(cfg, state.count), cfg["scope"]),
      lambda: jax.tree.leaves(state.masks),
    )
    for i, keep in zip(chosen, masks):
      u[i] = jnp.where(keep, u[i], -p[i]).astype(u[i].dtype)
    masks = jax.tree.unflatten(jax.tree.structure(state.masks), masks)
    return treedef.unflatten(u), PruneState(state.count + 1, masks)

  return optax.GradientTransformation(init, update)


def sparsity(params: Any, target_mask: Any) -> dict[str, jax.Array]:
  """{tower: fraction of exact zeros among its targeted weights}, towers as first path parts."""
  zeros: dict[str, Any] = {}
  sizes: dict[str, int] = {}
  mask = rules.flatten(target_mask)
  for path, x in rules.flatten(params).items():
    if mask[path]:
      tower = path.split("/")[0]
      zeros[tower] = zeros.get(tower, 0) + jnp.sum(x == 0)
      sizes[tower] = sizes.get(tower, 0) + math.prod(x.shape)
  return {tower: zeros[tower] / sizes[tower] for tower in zeros}
