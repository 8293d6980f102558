"""The training objective and the jitted optimizer step over the device mesh.

`make_objective` says what is minimized (task loss, distillation, which towers
run locked, which BatchNorm statistics train); `make_train_step` turns it into
one optimizer update on a global batch (gradient accumulation, the gradient
cache for contrastive losses, gradients only w.r.t. trainable params);
`make_phase` jits that step with the train state's shardings for one
gradual-unfreezing phase. The trainer
(mmtl/train.py) and the benchmark (mmtl/bench.py) both run `make_phase`'s step.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import optax

from mmtl import (
  config_keys,
  distill,
  domain_adaptation,
  heads,
  low_precision,
  memory,
  optim,
  pruning,
  rules,
  sharding,
)
from mmtl.models import fusion, layers

# config.model.batch_stats: which BatchNorm layers normalize with batch statistics and
# update their running ones in training ("trainable": those whose scale/bias train; "none":
# no layer, every BatchNorm uses its running statistics; "all": every layer of the towers
# that run in training mode, frozen ones included).
BATCH_STATS_MODES = ("trainable", "none", "all")


@dataclasses.dataclass
class Phase:
  """Optimizer and compiled step for one trainable set (gradual unfreezing phase)."""

  start: int
  tx: optax.GradientTransformation
  state_shardings: Any
  state_shapes: Any
  step_fn: Callable[..., Any]


def phase_start(step: int, boundaries: list[int]) -> int:
  """First step of the unfreezing phase that runs update `step` (0-based)."""
  return max([0] + [b for b in boundaries if b <= step])


@dataclasses.dataclass(frozen=True)
class Objective:
  """The training loss as the step uses it.

  `forward(trainable, frozen, batch_stats, batch, rng, step)` gives the model's outputs
  and the updated BatchNorm statistics (`batch_stats` as given, {} without BatchNorm,
  with the statistics of the layers that train them updated), and
  `loss(outputs, batch, teacher_variables)` their `(loss sum, weight sum)` over the
  batch (mmtl.losses). `separable`: the loss sum adds up over examples, so
  microbatches' sums add up to the batch's (classification, regression,
  distillation); the contrastive loss compares each example with the whole batch.
  `logged`: scalar outputs the step reports as `train/<name>` (their weighted mean over
  microbatches).
  """

  forward: Callable[..., Any]
  loss: Callable[..., tuple[jax.Array, jax.Array]]
  separable: bool
  logged: tuple[str, ...] = ()


def locked_towers(model: fusion.FusionModel, mask: Any) -> tuple[str, ...]:
  """Modalities whose tower has every param frozen in `mask` (a freeze_mask)."""
  flat = rules.flatten(mask)
  return tuple(
    m
    for m in model.modalities
    if all(frozen for path, frozen in flat.items() if path.startswith(f"{m}_encoder/"))
  )


def frozen_batch_stats(batch_stats: Any, mask: Any, mode: str) -> dict[str, bool]:
  """{batch_stats path: True if the statistic stays as it is} for `config.model.batch_stats`
  `mode` and the trainable set `mask` (a BatchNorm's `mean`/`var` follow its `scale`)."""
  if mode not in BATCH_STATS_MODES:
    raise config_keys.ConfigError(
      f"config.model.batch_stats={mode!r}: use one of {BATCH_STATS_MODES} ('trainable': the "
      "statistics of BatchNorm layers whose params train are updated)."
    )
  flat_mask = rules.flatten(mask)
  out = {}
  for path in rules.flatten(batch_stats):
    if mode == "trainable":
      out[path] = bool(flat_mask[f"{path.rsplit('/', 1)[0]}/scale"])
    else:
      out[path] = mode == "none"
  return out


def _partition(tree: Any, frozen: dict[str, bool]) -> tuple[dict[str, Any], dict[str, Any]]:
  flat = rules.flatten(tree)
  return (
    rules.unflatten({p: x for p, x in flat.items() if not frozen[p]}),
    rules.unflatten({p: x for p, x in flat.items() if frozen[p]}),
  )


def make_objective(
  model: fusion.FusionModel,
  config: mlc.ConfigDict,
  teacher_logits: Callable[[Any, Any], jax.Array] | None,
  mask: Any,
  batch_stats_shape: Any = None,
) -> Objective:
  """The Objective of `config` for the trainable set `mask`. Fully frozen towers run
  in inference mode (no dropout: LiT's locked tower), unless
  `config.model.frozen_tower_mode="train"`. BatchNorm statistics (`batch_stats_shape`:
  the train state's, None without BatchNorm) train as `config.model.batch_stats` says; the
  ones that do not are passed as `layers.FROZEN_BATCH_STATS` and come back bit-identical.
  With `config.domain_adaptation` the model runs on the source rows and the batch's target
  rows together, and the domain loss of mmtl.domain_adaptation joins the task loss."""
  mode = config.model.frozen_tower_mode
  if mode not in ("inference", "train"):
    raise config_keys.ConfigError(
      f"config.model.frozen_tower_mode={mode!r}: use 'inference' "
      "(locked towers without dropout) or 'train'."
    )
  head = heads.get(model.head_type)
  inference_towers = locked_towers(model, mask) if mode == "inference" else ()
  stats_frozen = frozen_batch_stats(batch_stats_shape or {}, mask, config.model.batch_stats)
  da = domain_adaptation.settings(config.get("domain_adaptation"))

  def apply(params, batch_stats, inputs, kw):
    if not batch_stats:
      return model.apply({"params": params}, inputs, **kw), batch_stats
    updating, kept = _partition(batch_stats, stats_frozen)
    variables = {"params": params, "batch_stats": updating, layers.FROZEN_BATCH_STATS: kept}
    outputs, updates = model.apply(variables, inputs, mutable=["batch_stats"], **kw)
    merged = {**rules.flatten(kept), **rules.flatten(updates.get("batch_stats", updating))}
    return outputs, jax.tree.unflatten(
      jax.tree.structure(batch_stats), [merged[p] for p in rules.flatten(batch_stats)]
    )

  def forward(trainable, frozen, batch_stats, batch, rng, step):
    params = low_precision.model_params(optim.combine(trainable, frozen))
    kw = dict(train=True, inference_towers=inference_towers, rngs={"dropout": rng})
    if da is None:
      return apply(params, batch_stats, batch, kw)
    lam = domain_adaptation.coefficient(step, int(config.total_steps), da)
    inputs, n = domain_adaptation.joint_inputs(batch)
    if da["method"] == "dann":
      kw["domain_grl"] = lam
    outputs, batch_stats = apply(params, batch_stats, inputs, kw)
    domain = domain_adaptation.domain_loss(outputs, n, da, lam)
    outputs = domain_adaptation.source_rows(outputs, n)
    return {**outputs, "domain_loss": domain, "domain_lambda": lam}, batch_stats

  def loss(outputs, batch, teacher_variables):
    total = head.loss(outputs, batch, {**config.loss, **model.head_config})
    if teacher_logits is not None:
      total = distill.student_loss(
        total,
        outputs["logits"],
        teacher_logits(teacher_variables, batch),
        batch.get("example_weight"),
        config.distill,
      )
    if da is not None:  # the domain loss counts as a batch mean: weight it by the batch's weight
      total = (total[0] + outputs["domain_loss"] * total[1], total[1])
    return total

  logged = ("domain_loss", "domain_lambda") if da is not None else ()
  return Objective(forward, loss, separable=head.separable, logged=logged)


def _split(batch: Any, k: int) -> Any:
  """(k, B/k, ...) microbatches; microbatch j takes rows j, j+k, j+2k...: every device
  keeps its share of each."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)


def _merge(stacked: jax.Array) -> jax.Array:
  """Inverse of `_split` for one output stacked over microbatches; a scalar output
  (e.g. the learned temperature, the same param in every microbatch) is taken once."""
  if stacked.ndim == 1:
    return stacked[0]
  return stacked.swapaxes(0, 1).reshape(-1, *stacked.shape[2:])


def _split_like(merged_grad: jax.Array, stacked: jax.Array) -> jax.Array:
  """The gradient of a `_merge`d output, back per microbatch (a scalar's to the first)."""
  if stacked.ndim == 1:
    return jnp.zeros_like(stacked).at[0].set(merged_grad)
  return _split(merged_grad, stacked.shape[0])


def make_train_step(
  objective: Objective,
  tx: optax.GradientTransformation,
  mask: Any,
  lr_fn,
  *,
  seed: int,
  accum_steps: int,
  prune_targets: Any = None,
):
  """One optimizer update on a global batch (accumulated over `accum_steps` microbatches).

  The loss is the batch's weighted mean, `sum(w * loss) / sum(w)`, whatever the
  microbatching: separable losses add up each microbatch's sum and weight and
  divide once (so class weights give the full batch's objective), and the
  contrastive loss takes its negatives from the whole batch by the gradient cache
  (Gao et al. 2021): every microbatch is embedded without gradients, the loss and
  its gradient w.r.t. the embeddings are computed on the whole batch, then each
  microbatch is run again and backpropagated with its part of that gradient. The
  result equals the full batch's step to float rounding, at the activation memory
  of one microbatch and one extra forward pass.

  Gradients are taken only w.r.t. trainable params: frozen towers run forward
  only, keep no activations for backward and cost no weight-gradient FLOPs.
  Frozen params are passed through untouched (bit-identical), and so are the
  BatchNorm statistics the objective keeps (`config.model.batch_stats`); the
  others are updated by every microbatch in turn, from that microbatch's
  statistics over all devices.
  """

  def batch_loss(trainable, frozen, stats, batch, rng, step, teacher_variables):
    outputs, stats = objective.forward(trainable, frozen, stats, batch, rng, step)
    loss_sum, weight = objective.loss(outputs, batch, teacher_variables)
    logged = {k: outputs[k] * weight for k in objective.logged}
    return loss_sum, (weight, stats, logged)

  # ((sum, (weight, stats, weighted logged outputs)), d sum)
  sum_and_grad = jax.value_and_grad(batch_loss, has_aux=True)
  steps = jnp.arange(accum_steps)

  def accumulated(trainable, frozen, stats, batch, rng, step, teacher_variables):
    # BatchNorm statistics are updated by each microbatch in turn.
    def accumulate(carry, xs):
      i, microbatch = xs
      totals, stats = carry
      (loss_sum, (weight, stats, logged)), grads = sum_and_grad(
        trainable, frozen, stats, microbatch, jax.random.fold_in(rng, i), step, teacher_variables
      )
      return (jax.tree.map(jnp.add, totals, (loss_sum, weight, grads, logged)), stats), None

    zeros = (
      jnp.zeros((), jnp.float32),
      jnp.zeros((), jnp.float32),
      jax.tree.map(jnp.zeros_like, trainable),
      {k: jnp.zeros((), jnp.float32) for k in objective.logged},
    )
    (totals, stats), _ = jax.lax.scan(
      accumulate, (zeros, stats), (steps, _split(batch, accum_steps))
    )
    return (*totals, stats)

  def gradient_cache(trainable, frozen, stats, batch, rng, step, teacher_variables):
    micro = _split(batch, accum_steps)

    def forward(params, stats, i, microbatch):
      return objective.forward(params, frozen, stats, microbatch, jax.random.fold_in(rng, i), step)

    def embed(stats, xs):  # BatchNorm statistics are updated here, once per microbatch
      outputs, stats = forward(trainable, stats, *xs)
      return stats, outputs

    new_stats, outputs = jax.lax.scan(embed, stats, (steps, micro))
    (loss_sum, weight), d_merged = jax.value_and_grad(
      lambda out: objective.loss(out, batch, teacher_variables), has_aux=True
    )(jax.tree.map(_merge, outputs))
    d_outputs = jax.tree.map(_split_like, d_merged, outputs)

    def backprop(grads, xs):
      # Outputs do not depend on the statistics passed (training BatchNorm normalizes with
      # the batch's): the first pass's updates stand.
      i, microbatch, d_out = xs
      _, vjp = jax.vjp(lambda params: forward(params, stats, i, microbatch)[0], trainable)
      return jax.tree.map(jnp.add, grads, vjp(d_out)[0]), None

    grads, _ = jax.lax.scan(
      backprop, jax.tree.map(jnp.zeros_like, trainable), (steps, micro, d_outputs)
    )
    logged = {k: outputs[k].mean() * weight for k in objective.logged}  # one per microbatch
    return loss_sum, weight, grads, logged, new_stats

  def grads_of(trainable, frozen, stats, batch, rng, step, teacher_variables):
    """(weighted-mean loss, its gradient, the logged outputs' weighted means, updated
    BatchNorm statistics) over the batch."""
    if accum_steps == 1:
      (loss_sum, (weight, stats, logged)), grads = sum_and_grad(
        trainable, frozen, stats, batch, rng, step, teacher_variables
      )
    else:
      accumulate = accumulated if objective.separable else gradient_cache
      loss_sum, weight, grads, logged, stats = accumulate(
        trainable, frozen, stats, batch, rng, step, teacher_variables
      )
    weight = jnp.maximum(weight, 1e-6)
    mean = lambda x: x / weight  # noqa: E731
    return mean(loss_sum), jax.tree.map(mean, grads), jax.tree.map(mean, logged), stats

  def train_step(state, batch, teacher_variables):
    trainable, frozen = optim.split(state["params"], mask)
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), state["step"])
    stats = state.get("batch_stats", {})
    loss, grads, logged, stats = grads_of(
      trainable, frozen, stats, batch, rng, state["step"], teacher_variables
    )
    full_grads = optim.combine(grads, jax.tree.map(jnp.zeros_like, frozen))
    updates, opt_state = tx.update(full_grads, state["opt_state"], state["params"])
    trainable = optax.apply_updates(trainable, optim.split(updates, mask)[0])
    new_state = {
      **state,
      "step": state["step"] + 1,
      "params": optim.combine(trainable, frozen),
      "opt_state": opt_state,
    }
    if "batch_stats" in state:
      new_state["batch_stats"] = stats
    measurements = {
      "train/loss": loss,
      "train/grad_norm": optax.tree.norm(grads),
      "train/param_norm": optax.tree.norm(trainable),
      "train/lr": lr_fn(state["step"]),
      **{f"train/{k}": v for k, v in logged.items()},
    }
    if prune_targets is not None:  # mmtl.pruning: zeros among each tower's pruned params
      for tower, share in pruning.sparsity(new_state["params"], prune_targets).items():
        measurements[f"train/sparsity_{tower}"] = share
    return new_state, measurements

  return train_step


def make_phase(
  config: mlc.ConfigDict,
  objective_for: Callable[[Any], Objective],
  layout: Any,
  mesh,
  step: int,
  *,
  teacher_shardings: Any = None,
) -> Phase:
  """Optimizer and jitted step of the unfreezing phase that runs update `step`;
  `objective_for(freeze_mask)` gives the loss of that trainable set; `layout` is the
  model's `train_state.ParamLayout`.

  The step donates the train state (updated in place) and takes the batch
  sharded over ("data", "fsdp"); mmtl.bench times exactly this function's step.
  """
  start = phase_start(step, optim.phase_boundaries(config.optim))
  mask = optim.freeze_mask(layout.shapes, config.optim, start, new_layers=layout.new_layers)
  tx, lr_fn = optim.make(
    config.optim,
    layout.shapes,
    total_steps=int(config.total_steps),
    step=start,
    new_layers=layout.new_layers,
  )
  state_shapes = {
    "step": jax.ShapeDtypeStruct((), jnp.int32),
    **layout.variables(),
    "opt_state": jax.eval_shape(tx.init, layout.shapes),
  }
  state_shardings = sharding.state_shardings(mesh, state_shapes, layout.shardings)
  step_fn = jax.jit(
    make_train_step(
      objective_for(mask),
      tx,
      mask,
      lr_fn,
      seed=config.seed,
      accum_steps=int(config.grad_accum_steps),
      prune_targets=(
        pruning.targets(layout.shapes, config.optim.prune) if config.optim.get("prune") else None
      ),
    ),
    in_shardings=(state_shardings, sharding.batch_sharding(mesh), teacher_shardings),
    out_shardings=(state_shardings, sharding.replicated(mesh)),
    donate_argnums=(0,),
  )
  return Phase(start, tx, state_shardings, state_shapes, step_fn)


def activation_bytes(
  objective: Objective,
  mask: Any,
  layout: Any,
  batch_shape: Any,
  *,
  accum_steps: int,
  teacher_variables: Any = None,
) -> int:
  """Bytes of forward values one microbatch keeps for backward in the step of the
  trainable set `mask` (all batch shards together; `memory.memory_estimate` splits
  them). Traced on shapes, not compiled. Accumulation (and the gradient cache)
  backpropagates one microbatch at a time, so this is the step's activation peak."""
  trainable, frozen = optim.split(layout.shapes, mask)
  micro = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct((x.shape[0] // accum_steps, *x.shape[1:]), x.dtype), batch_shape
  )

  def loss_sum(trainable, frozen, stats, batch, rng, step, teacher_variables):
    outputs, _ = objective.forward(trainable, frozen, stats, batch, rng, step)
    return objective.loss(outputs, batch, teacher_variables)[0]

  rng = jax.ShapeDtypeStruct((2,), jnp.uint32)
  step = jax.ShapeDtypeStruct((), jnp.int32)
  return memory.activation_bytes(
    loss_sum, trainable, frozen, layout.batch_stats, micro, rng, step, teacher_variables
  )
