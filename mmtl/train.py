r"""Trains a fused multimodal model from pretrained encoders.

  python -m mmtl.train --config configs/quickstart.py --workdir workdirs/quickstart \
      [--config.key=value ...] [--allow_config_change]

The workdir gets `config.json`, `metrics.jsonl`, TensorBoard events (`tb/`),
`checkpoints/`, `curves.png` and, once the run is complete,
`final_metrics.json`, and `lock.json` while it runs. Rerunning the same command
resumes from the newest intact checkpoint (params, optimizer state, step and
input-iterator state), so a killed run continues exactly where it left off.

Order: the workdir lock; `validate` (mesh, input, model + pretrained init,
sharding and optimizer rules, evaluators: everything that can fail on a bad
config, before anything is written); config.json pinned; checkpoint resume;
train loop; final evaluation. docs/reliability.md lists the faults handled.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import sys
from collections.abc import Callable, Mapping
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax

from mmtl import checkpoint
from mmtl import config as config_lib
from mmtl import data
from mmtl import distill
from mmtl import distributed
from mmtl import evaluators as evaluators_lib
from mmtl import hf
from mmtl import lora
from mmtl import losses
from mmtl import metrics as metrics_lib
from mmtl import optim
from mmtl import rules
from mmtl import sharding
from mmtl import workdir as workdir_lib
from mmtl.models import fusion

FINAL_METRICS_FILE = "final_metrics.json"
CHECKPOINT_DIR = "checkpoints"


class Diverged(RuntimeError):
  """The loss or the params became NaN/Inf; the run stopped at its last good checkpoint."""


def note(msg: str) -> None:
  if distributed.is_main_process():
    print(msg, flush=True)


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


def load_pretrained_towers(params: dict[str, Any], model_init: Mapping[str, Any]) -> dict[str, Any]:
  """`config.model_init`: {subtree: name_or_path | dict(name=..., tower=..., dont_load=[...])}.

  An empty name keeps the random init (a from-scratch baseline is one override
  away: `--config.model_init.text_encoder=`). Towers left out by
  `config.model.modalities` are skipped; any other subtree must exist.
  """
  for subtree, spec in model_init.items():
    spec = dict(name=spec) if isinstance(spec, str) else dict(spec)
    if not spec.get("name"):
      note(f"model_init: {subtree} from scratch (no checkpoint given).")
      continue
    if subtree.split("/")[0] not in params and subtree in [f"{m}_encoder" for m in fusion.MODALITIES]:
      note(f"model_init: {subtree} is not in this model (config.model.modalities); skipped.")
      continue
    note(f"model_init: {subtree} <- {spec['name']}")
    params = hf.load_params_into(params, subtree, spec["name"], tower=spec.get("tower"),
                                 dont_load=spec.get("dont_load", ()))
  return params


@dataclasses.dataclass(frozen=True)
class Objective:
  """The training loss as the step uses it.

  `forward(trainable, frozen, batch, rng)` gives the model's outputs and
  `loss(outputs, batch, teacher_params)` their `(loss sum, weight sum)` over the
  batch (mmtl.losses). `separable`: the loss sum adds up over examples, so
  microbatches' sums add up to the batch's (classification, regression,
  distillation); the contrastive loss compares each example with the whole batch.
  """
  forward: Callable[..., Any]
  loss: Callable[..., tuple[jax.Array, jax.Array]]
  separable: bool


def locked_towers(model: fusion.FusionModel, mask: Any) -> tuple[str, ...]:
  """Modalities whose tower has every param frozen in `mask` (a freeze_mask)."""
  flat = rules.flatten(mask)
  return tuple(m for m in model.modalities
               if all(frozen for path, frozen in flat.items() if path.startswith(f"{m}_encoder/")))


def make_objective(model: fusion.FusionModel, config: mlc.ConfigDict,
                   teacher_logits: Callable[[Any, Any], jax.Array] | None, mask: Any) -> Objective:
  """The Objective of `config` for the trainable set `mask`. Fully frozen towers run
  in inference mode (no dropout: LiT's locked tower), unless
  `config.model.frozen_tower_mode="train"`."""
  mode = config.model.frozen_tower_mode
  if mode not in ("inference", "train"):
    raise config_lib.ConfigError(f"config.model.frozen_tower_mode={mode!r}: use 'inference' "
                                 "(locked towers without dropout) or 'train'.")
  inference_towers = locked_towers(model, mask) if mode == "inference" else ()

  def forward(trainable, frozen, batch, rng):
    params = lora.merge(optim.combine(trainable, frozen))
    return model.apply({"params": params}, batch, train=True, inference_towers=inference_towers,
                       rngs={"dropout": rng})

  def loss(outputs, batch, teacher_params):
    total = losses.task_loss(model.head_type, outputs, batch, config.loss)
    if teacher_logits is not None:
      total = distill.student_loss(total, outputs["logits"], teacher_logits(teacher_params, batch),
                                   batch.get("example_weight"), config.distill)
    return total

  return Objective(forward, loss, separable=model.head_type in losses.SEPARABLE_HEADS)


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


def make_train_step(objective: Objective, tx: optax.GradientTransformation, mask: Any, lr_fn, *,
                    seed: int, accum_steps: int):
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
  Frozen params are passed through untouched (bit-identical).
  """

  def batch_loss(trainable, frozen, batch, rng, teacher_params):
    return objective.loss(objective.forward(trainable, frozen, batch, rng), batch, teacher_params)

  sum_and_grad = jax.value_and_grad(batch_loss, has_aux=True)  # ((sum, weight), d sum)
  steps = jnp.arange(accum_steps)

  def accumulated(trainable, frozen, batch, rng, teacher_params):
    def accumulate(carry, xs):
      i, microbatch = xs
      (loss_sum, weight), grads = sum_and_grad(trainable, frozen, microbatch,
                                               jax.random.fold_in(rng, i), teacher_params)
      return jax.tree.map(jnp.add, carry, (loss_sum, weight, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
             jax.tree.map(jnp.zeros_like, trainable))
    return jax.lax.scan(accumulate, zeros, (steps, _split(batch, accum_steps)))[0]

  def gradient_cache(trainable, frozen, batch, rng, teacher_params):
    micro = _split(batch, accum_steps)

    def forward(params, i, microbatch):
      return objective.forward(params, frozen, microbatch, jax.random.fold_in(rng, i))

    outputs = jax.lax.map(lambda xs: forward(trainable, *xs), (steps, micro))
    (loss_sum, weight), d_merged = jax.value_and_grad(
        lambda out: objective.loss(out, batch, teacher_params), has_aux=True)(
            jax.tree.map(_merge, outputs))
    d_outputs = jax.tree.map(_split_like, d_merged, outputs)

    def backprop(grads, xs):
      i, microbatch, d_out = xs
      _, vjp = jax.vjp(lambda params: forward(params, i, microbatch), trainable)
      return jax.tree.map(jnp.add, grads, vjp(d_out)[0]), None

    grads, _ = jax.lax.scan(backprop, jax.tree.map(jnp.zeros_like, trainable),
                            (steps, micro, d_outputs))
    return loss_sum, weight, grads

  def grads_of(trainable, frozen, batch, rng, teacher_params):
    """(weighted-mean loss, its gradient) over the whole batch."""
    if accum_steps == 1:
      (loss_sum, weight), grads = sum_and_grad(trainable, frozen, batch, rng, teacher_params)
    else:
      accumulate = accumulated if objective.separable else gradient_cache
      loss_sum, weight, grads = accumulate(trainable, frozen, batch, rng, teacher_params)
    weight = jnp.maximum(weight, 1e-6)
    return loss_sum / weight, jax.tree.map(lambda g: g / weight, grads)

  def train_step(state, batch, teacher_params):
    trainable, frozen = optim.split(state["params"], mask)
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), state["step"])
    loss, grads = grads_of(trainable, frozen, batch, rng, teacher_params)
    full_grads = optim.combine(grads, jax.tree.map(jnp.zeros_like, frozen))
    updates, opt_state = tx.update(full_grads, state["opt_state"], state["params"])
    trainable = optax.apply_updates(trainable, optim.split(updates, mask)[0])
    new_state = {"step": state["step"] + 1, "params": optim.combine(trainable, frozen),
                 "opt_state": opt_state}
    measurements = {"train/loss": loss, "train/grad_norm": optax.tree.norm(grads),
                    "train/param_norm": optax.tree.norm(trainable),
                    "train/lr": lr_fn(state["step"])}
    return new_state, measurements

  return train_step


def make_phase(config: mlc.ConfigDict, objective_for: Callable[[Any], Objective],
               params_shape: Any, param_shardings: Any, mesh, step: int, *,
               teacher_shardings: Any = None) -> Phase:
  """Optimizer and jitted step of the unfreezing phase that runs update `step`;
  `objective_for(freeze_mask)` gives the loss of that trainable set.

  The step donates the train state (updated in place) and takes the batch
  sharded over ("data", "fsdp"); mmtl.bench times exactly this function's step.
  """
  start = phase_start(step, optim.phase_boundaries(config.optim))
  mask = optim.freeze_mask(params_shape, config.optim, start)
  tx, lr_fn = optim.make(config.optim, params_shape, total_steps=int(config.total_steps),
                         step=start)
  state_shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params_shape,
                  "opt_state": jax.eval_shape(tx.init, params_shape)}
  state_shardings = sharding.state_shardings(mesh, state_shapes, param_shardings)
  step_fn = jax.jit(
      make_train_step(objective_for(mask), tx, mask, lr_fn, seed=config.seed,
                      accum_steps=int(config.grad_accum_steps)),
      in_shardings=(state_shardings, sharding.batch_sharding(mesh), teacher_shardings),
      out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))
  return Phase(start, tx, state_shardings, state_shapes, step_fn)


def make_predict_fn(model: fusion.FusionModel, mesh) -> Callable[[Any, Any], dict[str, Any]]:
  """Jitted eval forward pass: outputs + labels + example_weight, replicated on every host."""

  def predict(params, batch):
    out = model.apply({"params": lora.merge(params)}, batch)
    out = {k: v for k, v in out.items() if k != "logit_scale"}
    out["example_weight"] = batch.get("example_weight",
                                      jnp.ones(next(iter(out.values())).shape[:1], jnp.float32))
    if "labels" in batch:
      out["labels"] = batch["labels"]
    return out

  return jax.jit(predict, out_shardings=sharding.replicated(mesh))


def to_devices(batches, config: mlc.ConfigDict, mesh) -> sharding.DevicePrefetch:
  """Host batches (this process's rows) -> global device batches, `config.prefetch_to_device`
  of them in flight; train and eval input both go through here."""
  return sharding.DevicePrefetch(batches, functools.partial(sharding.put_batch, mesh=mesh),
                                 int(config.prefetch_to_device))


def make_evaluators(config: mlc.ConfigDict, model: fusion.FusionModel, mesh,
                    batch_size: int) -> list[evaluators_lib.Evaluator]:
  """One Evaluator per `config.evals` entry; eval inputs are `config.input` + overrides."""
  process_index, process_count = sharding.process_data_shard(mesh)
  predict = make_predict_fn(model, mesh)

  def host_batches(eval_cfg):
    input_cfg = mlc.ConfigDict(config.input.to_dict())
    input_cfg.update(eval_cfg.get("input", {}))
    local_bs = int(eval_cfg.get("batch_size", batch_size)) // process_count
    return data.make_eval_iterator(input_cfg, batch_size=local_bs, process_index=process_index,
                                   process_count=process_count)

  def embed_texts(eval_cfg):
    from mmtl import preprocess
    tokenizer = preprocess.load_tokenizer(eval_cfg["tokenizer"])

    def embed(params, texts):
      tokens = tokenizer(texts, padding="max_length", truncation=True,
                         max_length=int(eval_cfg.get("max_len", 32)), return_tensors="np")
      batch = {"input_ids": tokens["input_ids"].astype(np.int32),
               "attention_mask": tokens["attention_mask"].astype(np.int32)}
      if "token_type_ids" in tokens:
        batch["token_type_ids"] = tokens["token_type_ids"].astype(np.int32)
      return np.asarray(predict(params, batch)["text_embeds"])

    return embed

  return [evaluators_lib.Evaluator(
      name, cfg, head_type=model.head_type,
      make_batches=lambda cfg: to_devices(host_batches(cfg), config, mesh),
      open_input=host_batches, predict=predict,
      embed_texts=embed_texts(cfg) if cfg.get("type") == "zeroshot" else None)
          for name, cfg in config.evals.items()]


def write_final(workdir: str, final: Mapping[str, float]) -> None:
  """`DIR/final_metrics.json`, atomically: it marks the run finished (launch/sweep.py
  skips runs that have it), so a half-written one must never exist."""
  if distributed.is_main_process():
    workdir_lib.write_text(workdir_lib.path(workdir, FINAL_METRICS_FILE),
                           json.dumps(dict(final), indent=2))


@contextlib.contextmanager
def hold_workdir(workdir: str):
  """The workdir's run lock for the whole run: process 0 takes it, every process
  learns whether it did, so a second launch on the same workdir stops at once
  (on every host) instead of mixing two runs' checkpoints and metrics."""
  lock, error = None, None
  if distributed.is_main_process():
    lock = workdir_lib.RunLock(workdir)
    try:
      lock.acquire()
    except workdir_lib.WorkdirLocked as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    held = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not held and error is None:
      error = workdir_lib.WorkdirLocked(f"Workdir {workdir} is held by another run (process 0 "
                                        "says by whom).")
  if error is not None:
    raise error
  try:
    yield
  finally:
    if lock is not None:
      lock.release()


def describe_towers(model_cfg: Mapping[str, Any], model_init: Mapping[str, Any]) -> str:
  """Which towers run (and from which weights) and which are configured but left out."""
  used = fusion.selected_towers(model_cfg)
  lines = []
  for m, tower in used.items():
    name = tower["name"]
    arch = name.get("model_type", "config dict") if hasattr(name, "get") else name
    init = model_init.get(f"{m}_encoder")
    init = init.get("name") if hasattr(init, "get") else init
    lines.append(f"  {m}: {arch} ({f'weights from {init}' if init else 'random init'})")
  unused = [m for m in model_cfg["towers"] if m not in used]
  if unused:
    lines.append(f"  configured but unused (config.model.modalities={model_cfg['modalities']!r}): "
                 + ", ".join(unused))
  return "Towers:\n" + "\n".join(lines)


@dataclasses.dataclass
class Validated:
  """What `validate` built and opened, for the run to use."""
  mesh: jax.sharding.Mesh
  train_iter: Any
  model: fusion.FusionModel
  params_shape: Any
  param_shardings: Any
  initial_params: Any  # fresh runs: random init + pretrained towers (+ LoRA), placed; else None
  build_phase: Callable[[int], Phase]  # optimizer and step of the phase that runs update `step`
  teacher_params: Any
  evaluators: list[evaluators_lib.Evaluator]


def validate(config: mlc.ConfigDict, *, fresh: bool) -> Validated:
  """Builds and opens everything the run will use, writing nothing: the mesh and the
  batch split, the training input and every evaluator's input, the model, the
  sharding, freezing, LR and LoRA rules, the teacher. A typo anywhere fails here,
  before config.json is pinned or anything trains; errors raised by the libraries
  underneath (a missing split, a bad checkpoint) become one-line ConfigErrors.
  A `fresh` run (no checkpoint to resume) also loads its pretrained towers here.
  """
  try:
    return _validate(config, fresh)
  except (ValueError, KeyError, FileNotFoundError, rules.RuleError) as e:
    if isinstance(e, (config_lib.ConfigError, rules.RuleError)):
      raise
    message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    raise config_lib.ConfigError(f"{type(e).__name__}: {message}") from e


def _validate(config: mlc.ConfigDict, fresh: bool) -> Validated:
  total_steps, accum = int(config.total_steps), int(config.grad_accum_steps)

  # Mesh.
  mesh = sharding.make_mesh(config.mesh)
  process_index, process_count = sharding.process_data_shard(mesh)
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  batch_size = int(config.batch_size)
  if batch_size <= 0 or batch_size % (accum * batch_shards):
    raise config_lib.ConfigError(
        f"config.batch_size={batch_size} must be a positive multiple of grad_accum_steps ({accum}) "
        f"x batch shards (mesh data*fsdp = {batch_shards}); e.g. "
        f"--config.batch_size={max(1, batch_size // (accum * batch_shards)) * accum * batch_shards}.")
  note(f"Mesh {dict(mesh.shape)}; global batch {batch_size} in {accum} microbatch(es).")

  # Input.
  train_iter = data.make_train_iterator(
      config.input, batch_size=batch_size // process_count, seed=config.seed,
      process_index=process_index, process_count=process_count)
  start_state = train_iter.get_state()
  example_batch = next(train_iter)  # Shapes for init; the iterator is rewound below.
  train_iter.set_state(start_state)

  # Model.
  model = fusion.build(config.model)
  init_batch = {k: v[:1] for k, v in example_batch.items()}
  rng_init, rng_lora = jax.random.split(jax.random.PRNGKey(config.seed))

  def init(rng):
    return model.init(rng, init_batch)["params"]

  def add_lora(params):
    return lora.init(params, config.optim.lora, rng_lora) if config.optim.get("lora") else params

  params_shape = jax.eval_shape(lambda: add_lora(init(rng_init)))
  param_shardings = sharding.param_shardings(mesh, params_shape, config.sharding_rules)
  initial_params = None
  if fresh:
    # Initialized unsharded (LoRA leaves are added after the pretrained load),
    # then every leaf is placed where the sharding rules say.
    initial_params = jax.device_put(
        add_lora(load_pretrained_towers(jax.jit(init)(rng_init), config.model_init)),
        param_shardings)

  # Distillation teacher and optimizer (every rule is matched against the params here).
  teacher_logits, teacher_params, teacher_shardings = None, None, None
  if config.distill:
    distill.check_config(config.distill, model.head_type)
    teacher_logits, teacher_params = distill.load_teacher(config.distill.teacher_workdir, mesh)
    teacher_shardings = jax.tree.map(lambda x: x.sharding, teacher_params)
    note(f"Distilling from {config.distill.teacher_workdir} "
         f"(T={config.distill.get('temperature', 2.0)}, alpha={config.distill.get('alpha', 0.5)}).")
  objective_for = functools.partial(make_objective, model, config, teacher_logits)
  boundaries = optim.phase_boundaries(config.optim)
  phases: dict[int, Phase] = {}

  def build_phase(step: int) -> Phase:  # Built once per phase: validated here, reused by the run.
    start = phase_start(step, boundaries)
    if start not in phases:
      phases[start] = make_phase(config, objective_for, params_shape, param_shardings, mesh, start,
                                 teacher_shardings=teacher_shardings)
    return phases[start]

  for boundary in [0] + boundaries:
    if boundary < total_steps:
      build_phase(boundary)

  # Evaluators, each with its input opened (dataset, split, fields, tokenizer).
  evaluators = make_evaluators(config, model, mesh, batch_size)
  for evaluator in evaluators:
    evaluator.check()
  metric_names = [n for e in evaluators for n in e.metric_names()]
  if config.best_metric and config.best_metric not in metric_names:
    raise config_lib.ConfigError(
        f"config.best_metric={config.best_metric!r} is not a metric of the evaluators; they "
        f"log {', '.join(metric_names) or 'nothing (config.evals is empty)'}.")
  return Validated(
      mesh=mesh, train_iter=train_iter, model=model, params_shape=params_shape,
      param_shardings=param_shardings, initial_params=initial_params, build_phase=build_phase, teacher_params=teacher_params, evaluators=evaluators)


def check_restorable(ckpt: checkpoint.CheckpointManager, step: int, params_shape: Any,
                     opt_state_shape: Any) -> None:
  """A changed config must fit the checkpoint it resumes: same param paths and shapes,
  same optimizer-state shapes. Checked on the checkpoint's metadata, before anything
  is written; a mismatch is a ConfigError listing the first differences."""
  saved = rules.flatten(ckpt.item_metadata(step, "params"))
  wanted = rules.flatten(params_shape)
  problems = [f"{p} missing from the checkpoint" for p in wanted if p not in saved]
  problems += [f"{p} in the checkpoint but not in the model" for p in saved if p not in wanted]
  problems += [f"{p} is {tuple(saved[p].shape)} in the checkpoint, {tuple(wanted[p].shape)} now"
               for p in wanted if p in saved and tuple(saved[p].shape) != tuple(wanted[p].shape)]
  shapes = lambda tree: sorted(tuple(x.shape) for x in jax.tree.leaves(tree))  # noqa: E731
  if not problems and shapes(ckpt.item_metadata(step, "opt_state")) != shapes(opt_state_shape):
    problems.append("the optimizer state differs (the trainable set or the optimizer changed)")
  if problems:
    raise config_lib.ConfigError(
        f"The changed config does not fit the checkpoint at step {step} in {ckpt.directory}: "
        + "; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
        + ". Nothing was changed; start this config in a new --workdir.")


def train(config: mlc.ConfigDict, workdir: str, *, allow_config_change: bool = False) -> dict[str, float]:
  """Runs (or resumes) the training described by `config` in `workdir`.

  Returns the final metrics (also written to `DIR/final_metrics.json`).
  Raises `Diverged` if the loss became NaN/Inf (the last good checkpoint stays),
  `workdir.WorkdirLocked` if another run holds the workdir, ConfigError before
  anything is written if the config cannot run.
  """
  distributed.maybe_initialize()
  config = config_lib.with_defaults(config)
  with hold_workdir(workdir):
    return _train(config, workdir, allow_config_change)


def _train(config: mlc.ConfigDict, workdir: str, allow_config_change: bool) -> dict[str, float]:
  ##############################################################################
  # Setup: everything validated before config.json is pinned.
  ##############################################################################
  note(f"mmtl.train: process {jax.process_index()}/{jax.process_count()}, "
       f"{jax.local_device_count()}/{jax.device_count()} devices, workdir {workdir}")
  ckpt_dir = workdir_lib.path(workdir, CHECKPOINT_DIR)
  saved_steps = checkpoint.saved_steps(ckpt_dir)
  changes = config_lib.saved_changes(config, workdir)
  if changes and saved_steps and not allow_config_change:
    raise config_lib.refuse_change(workdir, changes)
  v = validate(config, fresh=not saved_steps)
  note(describe_towers(config.model, config.model_init))
  if changes and saved_steps:
    latest = saved_steps[-1]
    phase = v.build_phase(max(latest - 1, 0))
    with checkpoint.CheckpointManager(ckpt_dir, read_only=True) as reader:
      check_restorable(reader, latest, v.params_shape, phase.state_shapes["opt_state"])
    note("Config changed (--allow_config_change): " + config_lib.format_changes(changes))
  elif changes:
    note(f"{workdir} holds the config.json of an attempt that saved no checkpoint; it is "
         "replaced by this config.")
  config_lib.pin(config, workdir, step=saved_steps[-1] if saved_steps else None)

  ##############################################################################
  # Checkpoint resume (the newest intact checkpoint), or init + pretrained weights.
  ##############################################################################
  ckpt = checkpoint.CheckpointManager(
      ckpt_dir, keep=int(config.keep_ckpts),
      best_metric=config.best_metric or None, best_mode=config.best_mode)
  try:
    return _train_loop(config, workdir, v, ckpt)
  finally:
    ckpt.close()


def _train_loop(config: mlc.ConfigDict, workdir: str, v: Validated,
                ckpt: checkpoint.CheckpointManager) -> dict[str, float]:
  total_steps = int(config.total_steps)
  mesh, params_shape, param_shardings = v.mesh, v.params_shape, v.param_shardings
  train_iter, build_phase, teacher_params = v.train_iter, v.build_phase, v.teacher_params
  boundaries = optim.phase_boundaries(config.optim)
  replicated = sharding.replicated(mesh)

  def target(step):  # A saved opt_state has the structure of the phase that produced it.
    phase = build_phase(max(step - 1, 0))
    return checkpoint.abstract(phase.state_shapes, phase.state_shardings)

  restored = ckpt.restore_latest_intact(target)
  if restored is not None:
    resume_step, state, data_state = restored
    note(f"Resuming from {ckpt.directory}/{resume_step}.")
    if data_state is not None:
      train_iter.set_state(data_state)
  else:
    resume_step, params = 0, v.initial_params
    phase = build_phase(0)
    opt_state = jax.jit(phase.tx.init, out_shardings=phase.state_shardings["opt_state"])(params)
    state = {"step": jax.device_put(jnp.zeros((), jnp.int32), replicated), "params": params,
             "opt_state": opt_state}
  phase = build_phase(max(resume_step - 1, 0))
  first_step = int(jax.device_get(state["step"]))
  note(optim.summary(params_shape, config.optim, phase.state_shapes["opt_state"], step=phase.start))
  note(sharding.format_memory(sharding.memory_estimate(mesh, phase.state_shapes,
                                                       phase.state_shardings)))

  ##############################################################################
  # Evaluators, metrics, early stopping.
  ##############################################################################
  evaluators = v.evaluators
  writer = metrics_lib.MetricWriter(workdir, total_steps=total_steps,
                                    batch_size=int(config.batch_size), first_step=first_step,
                                    is_main=distributed.is_main_process())
  best_value, evals_since_best = None, 0  # Early stopping; patience restarts on resume.
  if config.best_metric and ckpt.best_step() is not None:
    best_value = (ckpt.metrics(ckpt.best_step()) or {}).get(config.best_metric)
  sign = 1.0 if config.best_mode == "max" else -1.0

  ##############################################################################
  # Train loop.
  ##############################################################################
  if first_step < total_steps:
    note(f"Training steps {first_step + 1}..{total_steps} (compiling the first step)...")
  device_batches = to_devices(train_iter, config, mesh)
  last_eval: dict[str, tuple[int, dict[str, float]]] = {}  # evaluator -> (step, metrics)
  stop = False
  try:
    for step in range(first_step, total_steps):
      if phase_start(step, boundaries) != phase.start:
        old_opt_state = state["opt_state"]
        phase = build_phase(step)
        note(f"Step {step}: gradual unfreezing, new trainable set:\n"
             + optim.summary(params_shape, config.optim, step=step))
        state["opt_state"] = jax.jit(
            functools.partial(optim.migrate_state, new_tx=phase.tx),
            out_shardings=phase.state_shardings["opt_state"])(old_opt_state, params=state["params"])
      state, measurements = phase.step_fn(state, next(device_batches), teacher_params)
      done = step + 1
      ckpt.check_for_errors()  # A failed background save stops the run at once.

      due = [e for e in evaluators if e.due(done, total_steps)]
      save_now = (done % config.ckpt_every == 0 or done == total_steps
                  or bool(due and config.best_metric))
      if done % config.log_every == 0 or done == first_step + 1 or save_now or due:
        measurements = {k: float(v) for k, v in jax.device_get(measurements).items()}
        if not all(np.isfinite(v) for v in measurements.values()):
          ckpt.wait()
          writer.close()
          last = ckpt.latest_step()
          raise Diverged(
              f"NaN/Inf by step {done}: {measurements}. Stopped without saving this state; the "
              "last good checkpoint is "
              + (f"step {last} in {ckpt.directory}" if last is not None else "none (nothing saved yet)")
              + ". Lower config.optim.lr, set config.optim.grad_clip_norm or check the inputs; "
              "rerunning the same command resumes from that checkpoint.")
        speed = writer.progress(done, {k: measurements[k] for k in ("train/loss", "train/lr")})
        writer.write(done, {**measurements, **{f"speed/{k}": v for k, v in speed.items()}})

      eval_metrics = {}
      for evaluator in due:
        result = evaluator.run(state["params"])
        last_eval[evaluator.name] = (done, result)
        eval_metrics.update(result)
      if eval_metrics:
        writer.write(done, eval_metrics)
        note(" | ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
      if config.best_metric in eval_metrics:
        value = eval_metrics[config.best_metric]
        if best_value is None or sign * (value - best_value) > config.early_stopping.min_delta:
          best_value, evals_since_best = value, 0
        else:
          evals_since_best += 1
        stop = 0 < config.early_stopping.patience <= evals_since_best
      if save_now or stop:
        ckpt.save(done, state, data_state=device_batches.get_state(),
                  metrics=eval_metrics if config.best_metric in eval_metrics else None)
      if stop:
        note(f"Early stopping at step {done}: {config.best_metric} did not improve by more than "
             f"{config.early_stopping.min_delta} in the last {evals_since_best} evaluations.")
        break
  finally:
    ckpt.wait()  # However the loop ended, the last checkpoint started gets committed.

  ##############################################################################
  # Final metrics: of the best checkpoint when config.best_metric is tracked.
  ##############################################################################
  final_step = int(jax.device_get(state["step"]))
  params = state["params"]
  best_step = ckpt.best_step() if config.best_metric else None
  if best_step is not None and best_step != final_step:
    note(f"Final evaluation on the best checkpoint (step {best_step} by {config.best_metric}).")
    params = ckpt.restore({"params": checkpoint.abstract(params_shape, param_shardings)},
                          best_step)["params"]
    final_step = best_step
  final = {}
  for evaluator in evaluators:
    step_and_metrics = last_eval.get(evaluator.name)
    final.update(step_and_metrics[1] if step_and_metrics and step_and_metrics[0] == final_step
                 else evaluator.run(params))
  final["step"] = float(final_step)
  writer.close()
  write_final(workdir, final)
  if distributed.is_main_process():
    metrics_lib.plot_curves(workdir)
    note(metrics_lib.format_table(final, title=f"Final metrics ({workdir}, step {final_step})"))
  return final


# The one-line errors of a run that cannot start or stopped on purpose.
USER_ERRORS = (Diverged, config_lib.ConfigError, rules.RuleError, workdir_lib.WorkdirLocked,
               checkpoint.CheckpointError)


def main(argv: list[str]) -> None:
  del argv
  metrics_lib.quiet_library_logs()
  if not flags.FLAGS.workdir:
    sys.exit("--workdir is required (where checkpoints, metrics and config.json go).")
  if flags.FLAGS.config is None:
    sys.exit("--config is required, e.g. --config configs/quickstart.py.")
  try:
    train(config_lib.from_flags(), flags.FLAGS.workdir,
          allow_config_change=flags.FLAGS.allow_config_change)
  except USER_ERRORS as e:
    sys.exit(f"{type(e).__name__}: {e}")


if __name__ == "__main__":
  config_lib.define_flags()
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and config.json.")
  flags.DEFINE_bool("allow_config_change", False,
                    "Resume a workdir whose config.json differs from --config.")
  app.run(main, flags_parser=config_lib.parse_flags)
