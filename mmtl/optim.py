"""Transfer-learning optimizer: one optax transformation built from `config.optim` rules.

Every per-parameter choice is a regex over the `/`-joined param path, matched by
mmtl.rules (whole-path match, first rule wins, a rule that matches nothing raises
`rules.RuleError` naming the config key):

  config.optim = dict(
    name="adamw", kwargs=dict(b1=0.9, b2=0.999),  # optax.scale_by_<name>(**kwargs)
    lr=1e-3,                                       # peak learning rate
    wd=1e-4, wd_mults=[(".*/kernel", 1.0)],        # decoupled, absolute weight decay
    lr_mults=[("text_encoder/.*", 0.1)],           # per-param LR multipliers (> 0)
    frozen=["image_encoder/.*"],                   # never updated, no optimizer state
    trainable=None,                                # if set: everything else is frozen
    preset=None,       # full | lit | linear_probe | bitfit | lora | adapters | prompts
    layer_decay=dict(rate=0.75, towers=[".*_encoder/.*"]),
    unfreeze=[(1000, ["text_encoder/encoder/layer_(10|11)/.*"]), (2000, ["text_encoder/.*"])],
    lora=dict(targets=[".*/attn/(query|value)/kernel"], rank=8, alpha=16),
    adapters=dict(targets=[".*_encoder/encoder/layer_\\d+/(attn|mlp)"], size=64),  # mmtl.adapters
    prompts=dict(towers=["text_encoder"], length=10, deep=False),  # mmtl.prompts
    prune=dict(targets=["text_encoder/encoder/.*/kernel"], sparsity=0.5),  # mmtl.pruning
    frozen_dtype="",                               # or bfloat16, int8: mmtl.low_precision
    schedule=dict(warmup_steps=100, decay="cosine", end_mult=0.0),
    grad_clip_norm=1.0,
  )

Frozen params are labelled "frozen" in an `optax.multi_transform`: their update is
`set_to_zero`, they hold no optimizer state (no Adam moments) and gradient
clipping only sees trainable gradients. Params unfrozen later by `unfreeze` form
their own group ("unfrozen_at_<step>") with their own Adam count. The trainer
differentiates only w.r.t. trainable params (`split`/`combine`), so frozen
towers keep no activations for backward and cost no weight-gradient FLOPs.

The update of a trainable param p with gradient g at step t is
  -sched(t) * (lr * lr_mult(p) * decay(p) * opt(g) + wd * wd_mult(p) * p)
i.e. weight decay is big_vision's: decoupled and *not* scaled by lr (AdamW's
weight_decay=0.05 at lr=1e-4 is wd=5e-6 here).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmtl import adapters, config_keys, lora, low_precision, memory, peft, prompts, pruning, rules
from mmtl.models import whisper

# Keys of config.optim: a default, or the type a key without one takes (see mmtl.config).
SCHEDULE_KEYS = dict(warmup_steps=0, decay="cosine", end_mult=0.0)
LAYER_DECAY_KEYS = dict(rate=float, towers=config_keys.RULES, embeddings=config_keys.RULES)
CONFIG_KEYS = dict(
  name="adamw",
  kwargs=config_keys.FREE,
  lr=float,
  wd=0.0,
  wd_mults=config_keys.RULES,
  lr_mults=config_keys.RULES,
  frozen=config_keys.RULES,
  trainable=config_keys.RULES,
  preset=str,
  layer_decay=LAYER_DECAY_KEYS,
  unfreeze=(list, tuple),
  lora=lora.CONFIG_KEYS,
  adapters=adapters.CONFIG_KEYS,
  prompts=prompts.CONFIG_KEYS,
  prune=pruning.CONFIG_KEYS,
  frozen_dtype="",
  schedule=SCHEDULE_KEYS,
  grad_clip_norm=float,
)

# A model's new layers: params no checkpoint gives, so they start random. A preset with
# `trainable` rules (bitfit, lora) always trains them too. The trainer passes the model's own
# list (`train_state.ParamLayout.new_layers`: e.g. a captioning model's projections and
# decoder cross-attention, a tower's `dont_load`); this is a fused model's.
NEW_LAYERS = ("fusion/.*", "head/.*")
# Params that are never trained, whatever the rules: the scales LoRA, parallel adapters and
# int8 storage add, and what a family reads from its checkpoint but keeps fixed (torch
# `requires_grad_(False)`: Whisper's positions).
CONSTANTS = (lora.CONSTANT, adapters.CONSTANT, low_precision.SCALE, whisper.FIXED_POSITIONS)
PRESETS: dict[str, dict[str, list[str]]] = {
  "full": {},
  "lit": dict(frozen=["image_encoder/.*"]),  # locked image, tuned text
  "linear_probe": dict(frozen=[".*_encoder/.*"]),  # every encoder locked
  "bitfit": dict(trainable=[".*/bias"]),  # biases + new layers
  "lora": dict(trainable=[lora.TRAINABLE]),  # LoRA A/B + new layers
  "adapters": dict(trainable=[adapters.TRAINABLE]),  # adapters + new layers
  "prompts": dict(trainable=[prompts.TRAINABLE]),  # prompts + new layers
}

# optax scalings by config name; anything else resolves to optax.scale_by_<name>.
_SCALERS: dict[str, Callable[..., optax.GradientTransformation]] = {
  "adamw": optax.scale_by_adam,
  "adam": optax.scale_by_adam,
  "sgd": optax.identity,
  "momentum": optax.trace,
  "adafactor": optax.scale_by_factored_rms,
}

# Embedding-like params of a tower, for layer-wise decay (lowest LR).
DEFAULT_EMBEDDINGS = (r".*/(embeddings|pre_layrnorm)/.*",)
_LAYER = re.compile(r"layer_(\d+)")


def _preset(cfg: Mapping[str, Any]) -> dict[str, list[str]]:
  name = cfg.get("preset") or "full"
  if name not in PRESETS:
    raise ValueError(f"config.optim.preset={name!r} is unknown; use one of {sorted(PRESETS)}.")
  if name in peft.SECTIONS and not cfg.get(name):  # each trains what its section adds
    example = {
      "lora": "dict(targets=[...], rank=8, alpha=16)",
      "adapters": "dict(targets=[...], size=64)",
      "prompts": "dict(towers=[...], length=10)",
    }[name]
    raise ValueError(f"config.optim.preset={name!r} needs config.optim.{name} = {example}.")
  return PRESETS[name]


def _unfreeze_phases(cfg: Mapping[str, Any]) -> list[tuple[int, list[str]]]:
  phases = []
  for i, entry in enumerate(cfg.get("unfreeze") or ()):
    if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], int)):
      raise ValueError(f"config.optim.unfreeze[{i}]={entry!r}: each entry is (step, [regex, ...]).")
    phases.append((entry[0], rules.as_list(entry[1])))
  return phases


def freeze_mask(
  params: Any,
  optim_cfg: Mapping[str, Any],
  step: int = 0,
  *,
  new_layers: Sequence[str] = NEW_LAYERS,
) -> Any:
  """Bool tree, True where a param is frozen for the update at `step` (0-based).

  Frozen = matched by `frozen` (config + preset), or not matched by `trainable`
  when that is given (a preset's `trainable` also keeps `new_layers`, the
  model's randomly initialized layers, trainable); then every `unfreeze` entry
  with `entry_step <= step` makes its matches trainable again. `CONSTANTS` (LoRA's
  scale, Whisper's sinusoidal positions) are always frozen. Every config and preset rule
  must match some param (a typo raises `rules.RuleError`); `new_layers` need not.
  """
  config_keys.check_keys(optim_cfg, CONFIG_KEYS, "config.optim")
  preset = _preset(optim_cfg)
  name = optim_cfg.get("preset")
  hint = f" (params need mmtl.{name}.init)" if name in peft.SECTIONS else ""
  flat = rules.flatten(params)
  frozen = dict.fromkeys(flat, False)
  for rule_list, what in (
    (preset.get("frozen", []), f"config.optim.preset={name!r}"),
    (rules.as_list(optim_cfg.get("frozen")), "config.optim.frozen"),
  ):
    for path, hit in rules.assign(flat, rule_list, default=False, what=what).items():
      frozen[path] |= hit
  if preset.get("trainable"):
    hits = rules.assign(
      flat, preset["trainable"], default=False, what=f"config.optim.preset={name!r}{hint}"
    )
    new = rules.assign(flat, list(new_layers), default=False, require_match=False)
    frozen = {path: f or not (hits[path] or new[path]) for path, f in frozen.items()}
  if optim_cfg.get("trainable"):
    hits = rules.assign(
      flat, rules.as_list(optim_cfg["trainable"]), default=False, what="config.optim.trainable"
    )
    frozen = {path: f or not hits[path] for path, f in frozen.items()}
  for i, (at, rule_list) in enumerate(_unfreeze_phases(optim_cfg)):
    hits = rules.assign(flat, rule_list, default=False, what=f"config.optim.unfreeze[{i}]")
    if at <= step:
      frozen = {path: f and not hits[path] for path, f in frozen.items()}
  constant = rules.assign(flat, list(CONSTANTS), default=False, require_match=False)
  frozen = {path: f or constant[path] for path, f in frozen.items()}
  return jax.tree.unflatten(jax.tree.structure(params), list(frozen.values()))


def phase_boundaries(optim_cfg: Mapping[str, Any]) -> list[int]:
  """Sorted steps > 0 at which gradual unfreezing changes the trainable set.

  At each boundary the trainer rebuilds (`make(..., step=boundary)`), carries the
  state over (`migrate_state`) and re-jits its step: one compilation per phase.
  """
  return sorted({at for at, _ in _unfreeze_phases(optim_cfg) if at > 0})


def _layer_decay(flat: Mapping[str, Any], ld: Mapping[str, Any] | None) -> dict[str, float]:
  """Per-path LR factor rate**(depth - i) for `layer_{i}` of a decayed tower.

  A tower is the first path segment; its depth is 1 + its largest layer index.
  Embeddings (`ld.embeddings`) get rate**(depth + 1), other params of the tower
  (final norm, pooler, projection) and everything outside `ld.towers` get 1.
  """
  if not ld:
    return dict.fromkeys(flat, 1.0)
  config_keys.check_keys(ld, LAYER_DECAY_KEYS, "config.optim.layer_decay")
  if "rate" not in ld or not 0.0 < ld["rate"] <= 1.0:
    raise ValueError("config.optim.layer_decay.rate must be in (0, 1], e.g. 0.75.")
  towers = [
    (t, ld["rate"]) if isinstance(t, str) else tuple(t)
    for t in rules.as_list(ld.get("towers", [".*_encoder/.*"]))
  ]
  rate = rules.assign(flat, towers, default=None, what="config.optim.layer_decay.towers")
  embeddings = rules.assign(
    flat,
    rules.as_list(ld.get("embeddings", DEFAULT_EMBEDDINGS)),
    default=False,
    what="config.optim.layer_decay.embeddings",
    require_match="embeddings" in ld,
  )
  index = {}
  for path in flat:
    found = [int(m.group(1)) for seg in path.split("/") if (m := _LAYER.fullmatch(seg))]
    index[path] = found[0] if found else None
  depth: dict[str, int] = {}
  for path in flat:
    if rate[path] is not None and index[path] is not None:
      tower = path.split("/")[0]
      depth[tower] = max(depth.get(tower, 0), index[path] + 1)
  out = {}
  for path in flat:
    if rate[path] is None:
      out[path] = 1.0
      continue
    tower = path.split("/")[0]
    if tower not in depth:
      raise rules.RuleError(
        f"config.optim.layer_decay.towers matched {path} but tower {tower!r} has no `layer_{{i}}` "
        "params; layer-wise decay needs encoder layers named layer_0, layer_1, ..."
      )
    if index[path] is not None:
      exponent = depth[tower] - index[path]
    else:
      exponent = depth[tower] + 1 if embeddings[path] else 0
    out[path] = float(rate[path]) ** exponent
  return out


def lr_mults(params: Any, optim_cfg: Mapping[str, Any]) -> Any:
  """Float tree: `lr_mults` rule value x layer-wise decay factor, per param."""
  flat = rules.flatten(params)
  mults = rules.assign(
    flat, optim_cfg.get("lr_mults") or (), default=1.0, what="config.optim.lr_mults"
  )
  if any(m <= 0 for m in mults.values()):
    raise ValueError("config.optim.lr_mults must be > 0; freeze params with config.optim.frozen.")
  decay = _layer_decay(flat, optim_cfg.get("layer_decay"))
  return jax.tree.unflatten(jax.tree.structure(params), [mults[p] * decay[p] for p in flat])


def schedule(sched_cfg: Mapping[str, Any] | None, total_steps: int) -> optax.Schedule:
  """LR multiplier in [0, 1]: linear warmup from 0, then cosine/linear decay or constant."""
  sched_cfg = dict(sched_cfg or {})
  config_keys.check_keys(sched_cfg, SCHEDULE_KEYS, "config.optim.schedule")
  sched_cfg = {**SCHEDULE_KEYS, **sched_cfg}
  warmup = int(sched_cfg["warmup_steps"])
  decay = sched_cfg["decay"]
  end = float(sched_cfg["end_mult"])
  if warmup < 0 or (total_steps and warmup > total_steps):  # 0 steps: the schedule never runs.
    raise ValueError(
      f"config.optim.schedule.warmup_steps={warmup} must be in [0, total_steps={total_steps}]."
    )
  steps = max(total_steps - warmup, 1)
  decays = {
    "cosine": lambda: optax.cosine_decay_schedule(1.0, steps, alpha=end),
    "linear": lambda: optax.linear_schedule(1.0, end, steps),
    "constant": lambda: optax.constant_schedule(1.0),
  }
  if decay not in decays:
    raise ValueError(f"config.optim.schedule.decay={decay!r}; use one of {sorted(decays)}.")
  if not warmup:
    return decays[decay]()
  return optax.join_schedules([optax.linear_schedule(0.0, 1.0, warmup), decays[decay]()], [warmup])


def _scaler(optim_cfg: Mapping[str, Any]) -> optax.GradientTransformation:
  name = optim_cfg.get("name", CONFIG_KEYS["name"])
  fn = _SCALERS.get(name) or getattr(optax, f"scale_by_{name}", None)
  if fn is None:
    raise ValueError(
      f"config.optim.name={name!r}: not one of {sorted(_SCALERS)} nor an optax.scale_by_{name}."
    )
  kwargs = dict(optim_cfg.get("kwargs") or {})
  try:
    return fn(**kwargs)
  except TypeError as e:
    raise ValueError(
      f"config.optim.kwargs={kwargs} do not fit config.optim.name={name!r}: {e}"
    ) from None


def _scale_and_decay(lr: Any, wd: Any) -> optax.GradientTransformation:
  """`u * lr + wd * p` per leaf with float trees `lr`, `wd`; skips masked-out leaves."""

  def update(updates, state, params=None):
    if params is None:
      params = updates  # only read where wd != 0

    def one(lr, wd, u, p):
      if isinstance(u, optax.MaskedNode):
        return u
      return u * lr + wd * p if wd else u * lr

    return jax.tree.map(one, lr, wd, updates, params), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _labels(params: Any, optim_cfg: Mapping[str, Any], step: int, new_layers: Sequence[str]) -> Any:
  """Per param: "frozen", "trainable" (from step 0) or "unfrozen_at_<b>" (phase boundary b).

  Each group gets its own optimizer state, so Adam's bias correction restarts
  for params unfrozen later instead of inflating their first updates.
  """
  starts = [0] + [b for b in phase_boundaries(optim_cfg) if b <= step]
  masks = [rules.flatten(freeze_mask(params, optim_cfg, b, new_layers=new_layers)) for b in starts]
  labels = []
  for path in masks[0]:
    first = next((b for b, mask in zip(starts, masks) if not mask[path]), None)
    labels.append(
      "frozen" if first is None else "trainable" if first == 0 else f"unfrozen_at_{first}"
    )
  return jax.tree.unflatten(jax.tree.structure(params), labels)


def make(
  optim_cfg: Mapping[str, Any],
  params: Any,
  *,
  total_steps: int,
  step: int = 0,
  new_layers: Sequence[str] = NEW_LAYERS,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns `(tx, lr_fn)` for the trainable set at `step` (`freeze_mask`'s).

  `tx` updates the full params tree (frozen leaves: zero update, no state);
  `lr_fn(step)` is the base LR (`lr * schedule`) for logging. `params` may be
  abstract (`jax.ShapeDtypeStruct` leaves). The schedule reads its own step
  count from the state, so a state carried over by `migrate_state` (or restored
  from a checkpoint) continues it.
  """
  sched = schedule(optim_cfg.get("schedule"), total_steps)
  tx = _build(optim_cfg, params, step, sched, new_layers, total_steps)
  return tx, lambda s: float(optim_cfg["lr"]) * sched(s)


def _build(
  optim_cfg: Mapping[str, Any],
  params: Any,
  step: int,
  sched: optax.Schedule,
  new_layers: Sequence[str],
  total_steps: int,
) -> optax.GradientTransformation:
  if "lr" not in optim_cfg:
    raise ValueError("config.optim.lr is missing: set the peak learning rate, e.g. 1e-3.")
  labels = _labels(params, optim_cfg, step, new_layers)
  groups = sorted(set(jax.tree.leaves(labels)) - {"frozen"})
  if not groups:
    raise ValueError(
      f"Every parameter is frozen at step {step}: loosen config.optim.frozen/"
      "trainable/preset or add an earlier config.optim.unfreeze entry."
    )
  base_lr = float(optim_cfg["lr"])
  lr = jax.tree.map(lambda m: base_lr * m, lr_mults(params, optim_cfg))
  wd = float(optim_cfg.get("wd") or 0.0)
  wd_mults = rules.tree_assign(
    params,
    optim_cfg.get("wd_mults", [(".*/kernel", 1.0)]),
    default=0.0,
    what="config.optim.wd_mults",
    require_match="wd_mults" in optim_cfg,
  )
  scale_and_decay = _scale_and_decay(lr, jax.tree.map(lambda m: wd * m, wd_mults))
  clip = optim_cfg.get("grad_clip_norm")
  trainable = jax.tree.map(lambda label: label != "frozen", labels)
  return optax.chain(
    optax.masked(optax.clip_by_global_norm(clip), trainable) if clip else optax.identity(),
    optax.multi_transform(
      {
        "frozen": optax.set_to_zero(),
        **{g: optax.chain(_scaler(optim_cfg), scale_and_decay) for g in groups},
      },
      labels,
    ),
    optax.scale_by_schedule(lambda count: -sched(count)),
    *_pruning(optim_cfg, params, trainable, total_steps),
  )


def _pruning(
  optim_cfg: Mapping[str, Any], params: Any, trainable: Any, total_steps: int
) -> list[optax.GradientTransformation]:
  """[mmtl.pruning's link] when `config.optim.prune` is set (its targets trainable), else []."""
  if not optim_cfg.get("prune"):
    return []
  cfg = pruning.settings(optim_cfg["prune"], total_steps)
  targets = pruning.targets(params, cfg)
  flat = rules.flatten(trainable)
  if frozen := [p for p, t in rules.flatten(targets).items() if t and not flat[p]]:
    raise config_keys.ConfigError(
      f"config.optim.prune.targets matches frozen params ({frozen[0]}, ...): pruning acts "
      "through the optimizer on params that train; train them or narrow the targets."
    )
  return [pruning.transform(cfg, targets)]


def migrate_state(old_state: Any, new_tx: optax.GradientTransformation, params: Any) -> Any:
  """`new_tx.init(params)` with every leaf that also exists in `old_state` copied over.

  Leaves are matched by their path in the state tree, so at a gradual-unfreezing
  boundary params that were trainable keep their moments and counts, the LR
  schedule continues, and newly unfrozen params start a new group with zero
  moments and their own count (fresh Adam bias correction). Jittable: run it
  under `jax.jit(..., out_shardings=...)` when the state is sharded.
  """
  old = rules.flatten(old_state)

  def pick(key_path, fresh):
    kept = old.get(rules.path_str(key_path))
    if (
      kept is not None
      and jnp.shape(kept) == jnp.shape(fresh)
      and (jnp.result_type(kept) == jnp.result_type(fresh))
    ):
      return kept
    return fresh

  return jax.tree_util.tree_map_with_path(pick, new_tx.init(params))


def split(params: Any, mask: Any) -> tuple[Any, Any]:
  """`(trainable, frozen)`: two trees shaped like `params` with None where the other holds the leaf.

  Differentiate w.r.t. `trainable` only, so no gradient or backward pass is
  computed for frozen params:

    trainable, frozen = optim.split(params, mask)
    grads = jax.grad(lambda t: loss(lora.merge(optim.combine(t, frozen))))(trainable)
    grads = optim.combine(grads, jax.tree.map(jnp.zeros_like, frozen))
    updates, opt_state = tx.update(grads, opt_state, params)
  """
  trainable = jax.tree.map(lambda p, f: None if f else p, params, mask)
  frozen = jax.tree.map(lambda p, f: p if f else None, params, mask)
  return trainable, frozen


def combine(trainable: Any, frozen: Any) -> Any:
  """Inverse of `split`: the leaf from whichever tree is not None."""
  return jax.tree.map(
    lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None
  )


def summary(
  params: Any,
  optim_cfg: Mapping[str, Any],
  opt_state: Any = None,
  *,
  step: int = 0,
  new_layers: Sequence[str] = NEW_LAYERS,
  total_steps: int = 0,
) -> str:
  """Table of trainable/frozen params (count, bytes) and LR mult range per tower, then
  the trainable share, the optimizer state and what the presets and pruning add.

  Towers are first path segments. Optimizer-state bytes come from `opt_state`,
  else from `jax.eval_shape` of a fresh state (nothing is allocated).
  """
  mask = rules.flatten(freeze_mask(params, optim_cfg, step, new_layers=new_layers))
  mults = rules.flatten(lr_mults(params, optim_cfg))
  if opt_state is None:
    tx = _build(optim_cfg, params, step, optax.constant_schedule(1.0), new_layers, total_steps)
    opt_state = jax.eval_shape(tx.init, params)
  rows: dict[str, list[Any]] = {}
  flat_params = rules.flatten(params)
  for path, leaf in flat_params.items():
    row = rows.setdefault(path.split("/")[0], [0, 0, 0, 0, []])
    col = 2 if mask[path] else 0
    row[col] += int(np.prod(jnp.shape(leaf)))
    row[col + 1] += memory.nbytes(leaf)
    if not mask[path]:
      row[4].append(mults[path])
  total = [sum(r[i] for r in rows.values()) for i in range(4)]
  lines = [
    f"optim: {optim_cfg.get('name', CONFIG_KEYS['name'])} lr={optim_cfg.get('lr')} "
    f"wd={optim_cfg.get('wd', 0.0)} preset={optim_cfg.get('preset') or 'full'} step={step} "
    f"phase boundaries={phase_boundaries(optim_cfg)}",
    f"{'tower':<20} {'trainable':>24} {'frozen':>24}  lr mult",
  ]
  for tower, (tn, tb, fn, fb, ms) in [*rows.items(), ("total", [*total, []])]:
    lr = f"{min(ms):.3g}..{max(ms):.3g}" if ms else "-"
    lines.append(
      f"{tower:<20} {f'{tn:,} ({memory.human_bytes(tb)})':>24} "
      f"{f'{fn:,} ({memory.human_bytes(fb)})':>24}  {lr}"
    )
  share = 100 * total[0] / max(total[0] + total[2], 1)
  lines.append(f"trainable: {total[0]:,} of {total[0] + total[2]:,} params ({share:.3g}%)")
  state_bytes = sum(memory.nbytes(x) for x in jax.tree.leaves(opt_state))
  lines.append(f"optimizer state: {memory.human_bytes(state_bytes)}")
  if _preset(optim_cfg).get("trainable"):
    lines.append(f"new layers (the preset trains them in full): {', '.join(new_layers)}")
  if optim_cfg.get("prune"):
    cfg = pruning.settings(optim_cfg["prune"], total_steps)
    pruned: dict[str, int] = {}
    for path, hit in rules.flatten(pruning.targets(params, cfg)).items():
      if hit:
        tower = path.split("/")[0]
        pruned[tower] = pruned.get(tower, 0) + int(np.prod(jnp.shape(flat_params[path])))
    towers = ", ".join(f"{t} {n:,}" for t, n in pruned.items())
    lines.append(
      f"pruning to sparsity {cfg['sparsity']:g} ({cfg['scope']}) at steps {cfg['start_step']}.."
      f"{cfg['end_step']} every {cfg['every']}, of the params: {towers}"
    )
  return "\n".join(lines)
