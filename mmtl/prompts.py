"""Prompt tuning (Lester et al. 2021) and prefix tuning (Li & Liang 2021) of chosen towers.

`init` adds `<tower>/prompts` to each tower subtree that `config.optim.prompts.towers`
matches (regexes over subtree names, e.g. `text_encoder`; mmtl.rules syntax):

  deep=False  (length, hidden): soft prompt vectors inserted after the first token (CLS) of
              the tower's embedded sequence, run through every layer like the tokens
              (Lester et al.'s prompt tuning; VPT-shallow, Jia et al. 2022, for ViTs).
  deep=True   (layers, length, hidden): at the input of every layer the prompt positions
              hold that layer's own vectors: every layer's activations at the prefix are
              free parameters, Li & Liang's prefix tuning (without their MLP
              reparametrization; P-tuning v2 and VPT-deep are the same construction).

Prompt positions are real tokens to the attention mask and carry no position embedding.
After the tower's last layer they are dropped, so its pooling (CLS, mean, pooler), its
final norm and everything after the tower see the tower's own tokens. The prompts start
uniform in [-0.5, 0.5] (Lester et al.'s random initialization). As with mmtl.adapters,
the params tree is the only record: FusionModel inserts a tower's prompts when its params
hold them (`insert`, `run_layers`, `remove`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmtl import config_keys, rules

LEAF = "prompts"
TRAINABLE = r"[^/]+/prompts"  # rule for the optimizer: every tower's prompts
CONFIG_KEYS = dict(towers=config_keys.RULES, length=10, deep=False)


def init(
  params: Any,
  prompts_cfg: Mapping[str, Any],
  rng: jax.Array,
  towers: Mapping[str, tuple[int, int]],
) -> dict[str, Any]:
  """`params` plus `<tower>/prompts` for each of `towers` ({subtree: (num_layers,
  hidden_size)}) that `prompts_cfg.towers` matches."""
  config_keys.check_keys(prompts_cfg, CONFIG_KEYS, "config.optim.prompts")
  cfg = {**CONFIG_KEYS, **prompts_cfg}
  chosen = rules.as_list(cfg["towers"])
  if not chosen:
    raise config_keys.ConfigError(
      "config.optim.prompts.towers is empty: give the towers to prompt, e.g. ['text_encoder']."
    )
  length = int(cfg["length"])
  if length < 1:
    raise config_keys.ConfigError(f"config.optim.prompts.length={length} must be >= 1.")
  hits = rules.assign(towers, chosen, default=False, what="config.optim.prompts.towers")
  out = dict(params)
  for i, (tower, (num_layers, hidden)) in enumerate(towers.items()):
    if not hits[tower]:
      continue
    if not num_layers:
      raise config_keys.ConfigError(
        f"config.optim.prompts.towers matched {tower}, a tower without token layers (a CNN): "
        "prompts need a transformer tower; use adapters or LoRA for it."
      )
    if LEAF in params[tower]:
      raise ValueError(f"{tower} already holds prompts: call prompts.init once, on base params.")
    shape = (num_layers, length, hidden) if cfg["deep"] else (length, hidden)
    leaves = jax.tree.leaves(params[tower])
    dtype = leaves[0].dtype if leaves else jnp.float32
    values = jax.random.uniform(jax.random.fold_in(rng, i), shape, dtype, -0.5, 0.5)
    out[tower] = {**params[tower], LEAF: values}
  return out


def of(tower: nn.Module) -> jax.Array | None:
  """The prompts a (bound) tower's params hold, else None."""
  return tower.get_variable("params", LEAF) if tower.has_variable("params", LEAF) else None


def _replace(x: jax.Array, prompts: jax.Array) -> jax.Array:
  """`x` (B, T, D) with positions 1..n replaced by `prompts` (n, D)."""
  p = jnp.broadcast_to(prompts.astype(x.dtype), (x.shape[0], *prompts.shape))
  return jnp.concatenate([x[:, :1], p, x[:, 1 + prompts.shape[0] :]], axis=1)


def insert(tower: nn.Module, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The embedded sequence with the tower's prompts after its first token (unchanged
  without prompts)."""
  prompts = of(tower)
  if prompts is None:
    return x, mask
  first = prompts if prompts.ndim == 2 else prompts[0]
  n = first.shape[0]
  p = jnp.broadcast_to(first.astype(x.dtype), (x.shape[0], *first.shape))
  x = jnp.concatenate([x[:, :1], p, x[:, 1:]], axis=1)
  ones = jnp.ones((mask.shape[0], n), mask.dtype)
  return x, jnp.concatenate([mask[:, :1], ones, mask[:, 1:]], axis=1)


def run_layers(
  tower: nn.Module, x: jax.Array, mask: jax.Array, start: int, stop: int, *, deterministic: bool
) -> jax.Array:
  """`tower.run_layers`, with deep prompts put in place at each layer's input."""
  prompts = of(tower)
  if prompts is None or prompts.ndim == 2:
    return tower.run_layers(x, mask, start, stop, deterministic=deterministic)
  for k in range(start, stop):
    x = tower.run_layers(_replace(x, prompts[k]), mask, k, k + 1, deterministic=deterministic)
  return x


def remove(tower: nn.Module, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Inverse of `insert`: the tower's own positions."""
  prompts = of(tower)
  if prompts is None:
    return x, mask
  n = prompts.shape[-2]
  drop = lambda y: jnp.concatenate([y[:, :1], y[:, 1 + n :]], axis=1)  # noqa: E731
  return drop(x), drop(mask)
