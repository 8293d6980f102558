r"""Trains a fused multimodal model from pretrained encoders.

  python -m mmtl.train --config configs/quickstart.py --workdir workdirs/quickstart \
      [--config.key=value ...] [--allow_config_change]

The workdir gets `config.json`, `metrics.jsonl`, TensorBoard events (`tb/`),
`checkpoints/`, `curves.png` and, once the run is complete,
`final_metrics.json`. Rerunning the same command resumes from the latest
checkpoint (params, optimizer state, step and input-iterator state), so a
killed run continues exactly where it left off.

Sections, in order: setup, mesh, input, model + pretrained init, optimizer,
train step, checkpoint resume, evaluators, train loop, final evaluation.
"""
from __future__ import annotations

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


def make_loss_fn(model: fusion.FusionModel, config: mlc.ConfigDict,
                 teacher_logits: Callable[[Any, Any], jax.Array] | None):
  """`loss(trainable, frozen, batch, rng, teacher_params) -> scalar`."""

  def loss_fn(trainable, frozen, batch, rng, teacher_params):
    params = lora.merge(optim.combine(trainable, frozen))
    out = model.apply({"params": params}, batch, train=True, rngs={"dropout": rng})
    loss = losses.task_loss(model.head_type, out, batch, config.loss)
    if teacher_logits is not None:
      loss = distill.student_loss(loss, out["logits"], teacher_logits(teacher_params, batch),
                                  batch.get("example_weight"), config.distill)
    return loss

  return loss_fn


def make_train_step(loss_fn, tx: optax.GradientTransformation, mask: Any, lr_fn, *,
                    seed: int, accum_steps: int):
  """One optimizer update on a global batch (accumulated over `accum_steps` microbatches).

  Gradients are taken only w.r.t. trainable params: frozen towers run forward
  only, keep no activations for backward and cost no weight-gradient FLOPs.
  Frozen params are passed through untouched (bit-identical).
  """

  def grads_of(trainable, frozen, batch, rng, teacher_params):
    value_and_grad = jax.value_and_grad(loss_fn)
    if accum_steps == 1:
      return value_and_grad(trainable, frozen, batch, rng, teacher_params)
    # Microbatch j takes rows j, j+k, j+2k...: every device keeps its share of each.
    micro = jax.tree.map(
        lambda x: x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1),
        batch)

    def accumulate(carry, xs):
      i, microbatch = xs
      loss, grads = value_and_grad(trainable, frozen, microbatch, jax.random.fold_in(rng, i),
                                   teacher_params)
      return jax.tree.map(jnp.add, carry, (loss, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, trainable))
    total, _ = jax.lax.scan(accumulate, zeros, (jnp.arange(accum_steps), micro))
    return jax.tree.map(lambda x: x / accum_steps, total)

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


def make_phase(config: mlc.ConfigDict, loss_fn, params_shape: Any, param_shardings: Any, mesh,
               step: int, *, teacher_shardings: Any = None) -> Phase:
  """Optimizer and jitted step of the unfreezing phase that runs update `step`.

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
      make_train_step(loss_fn, tx, mask, lr_fn, seed=config.seed,
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

  def make_batches(eval_cfg):
    input_cfg = mlc.ConfigDict(config.input.to_dict())
    input_cfg.update(eval_cfg.get("input", {}))
    local_bs = int(eval_cfg.get("batch_size", batch_size)) // process_count
    return to_devices(data.make_eval_iterator(input_cfg, batch_size=local_bs,
                                              process_index=process_index,
                                              process_count=process_count), config, mesh)

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
      name, cfg, head_type=model.head_type, make_batches=make_batches, predict=predict,
      embed_texts=embed_texts(cfg) if cfg.get("type") == "zeroshot" else None)
          for name, cfg in config.evals.items()]


def write_final(workdir: str, final: Mapping[str, float]) -> None:
  """`DIR/final_metrics.json`, atomically: it marks the run finished (launch/sweep.py
  skips runs that have it), so a half-written one must never exist."""
  if distributed.is_main_process():
    workdir_lib.write_text(workdir_lib.path(workdir, FINAL_METRICS_FILE),
                           json.dumps(dict(final), indent=2))


def train(config: mlc.ConfigDict, workdir: str, *, allow_config_change: bool = False) -> dict[str, float]:
  """Runs (or resumes) the training described by `config` in `workdir`.

  Returns the final metrics (also written to `DIR/final_metrics.json`).
  Raises `Diverged` if the loss became NaN/Inf (the last good checkpoint stays).
  """

  ##############################################################################
  # Setup: config checked and pinned to the workdir.
  ##############################################################################
  distributed.maybe_initialize()
  config = config_lib.with_defaults(config)
  config_lib.save_or_check(config, workdir, allow_change=allow_config_change)
  note(f"mmtl.train: process {jax.process_index()}/{jax.process_count()}, "
       f"{jax.local_device_count()}/{jax.device_count()} devices, workdir {workdir}")
  total_steps, accum = int(config.total_steps), int(config.grad_accum_steps)

  ##############################################################################
  # Mesh.
  ##############################################################################
  mesh = sharding.make_mesh(config.mesh)
  process_index, process_count = sharding.process_data_shard(mesh)
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  batch_size = int(config.batch_size)
  if batch_size % (accum * batch_shards):
    raise ValueError(f"config.batch_size={batch_size} must be a multiple of grad_accum_steps "
                     f"({accum}) x batch shards (data*fsdp={batch_shards}).")
  note(f"Mesh {dict(mesh.shape)}; global batch {batch_size} in {accum} microbatch(es).")

  ##############################################################################
  # Input.
  ##############################################################################
  train_iter = data.make_train_iterator(
      config.input, batch_size=batch_size // process_count, seed=config.seed,
      process_index=process_index, process_count=process_count)
  start_state = train_iter.get_state()
  example_batch = next(train_iter)  # Shapes for init; the iterator is rewound below.
  train_iter.set_state(start_state)

  ##############################################################################
  # Model and pretrained init.
  ##############################################################################
  model = fusion.build(config.model)
  init_batch = {k: v[:1] for k, v in example_batch.items()}
  rng_init, rng_lora = jax.random.split(jax.random.PRNGKey(config.seed))

  def init(rng):
    return model.init(rng, init_batch)["params"]

  def add_lora(params):
    return lora.init(params, config.optim.lora, rng_lora) if config.optim.get("lora") else params

  params_shape = jax.eval_shape(lambda: add_lora(init(rng_init)))
  param_shardings = sharding.param_shardings(mesh, params_shape, config.sharding_rules)

  ##############################################################################
  # Optimizer (rebuilt once per gradual-unfreezing phase).
  ##############################################################################
  teacher_logits, teacher_params, teacher_shardings = None, None, None
  if config.distill:
    distill.check_config(config.distill, model.head_type)
    teacher_logits, teacher_params = distill.load_teacher(config.distill.teacher_workdir, mesh)
    teacher_shardings = jax.tree.map(lambda x: x.sharding, teacher_params)
    note(f"Distilling from {config.distill.teacher_workdir} "
         f"(T={config.distill.get('temperature', 2.0)}, alpha={config.distill.get('alpha', 0.5)}).")
  loss_fn = make_loss_fn(model, config, teacher_logits)
  boundaries = optim.phase_boundaries(config.optim)
  replicated = sharding.replicated(mesh)

  build_phase = functools.partial(make_phase, config, loss_fn, params_shape, param_shardings, mesh,
                                  teacher_shardings=teacher_shardings)

  ##############################################################################
  # Checkpoint resume, or init + pretrained weights.
  ##############################################################################
  ckpt = checkpoint.CheckpointManager(
      workdir_lib.path(workdir, CHECKPOINT_DIR), keep=int(config.keep_ckpts),
      best_metric=config.best_metric or None, best_mode=config.best_mode)
  resume_step = ckpt.latest_step()
  # A saved opt_state has the structure of the phase that produced it.
  phase = build_phase(max((resume_step or 0) - 1, 0))
  if resume_step is not None:
    note(f"Resuming from {ckpt.directory}/{resume_step}.")
    state = ckpt.restore(checkpoint.abstract(phase.state_shapes, phase.state_shardings))
    data_state = ckpt.data_state()
    if data_state is not None:
      train_iter.set_state(data_state)
  else:
    # Initialized unsharded (LoRA leaves are added after the pretrained load),
    # then every leaf is placed where the sharding rules say.
    params = add_lora(load_pretrained_towers(jax.jit(init)(rng_init), config.model_init))
    params = jax.device_put(params, param_shardings)
    opt_state = jax.jit(phase.tx.init, out_shardings=phase.state_shardings["opt_state"])(params)
    state = {"step": jax.device_put(jnp.zeros((), jnp.int32), replicated), "params": params,
             "opt_state": opt_state}
  first_step = int(jax.device_get(state["step"]))
  note(optim.summary(params_shape, config.optim, phase.state_shapes["opt_state"], step=phase.start))
  note(sharding.format_memory(sharding.memory_estimate(mesh, phase.state_shapes,
                                                       phase.state_shardings)))

  ##############################################################################
  # Evaluators, metrics, early stopping.
  ##############################################################################
  evaluators = make_evaluators(config, model, mesh, batch_size)
  writer = metrics_lib.MetricWriter(workdir, total_steps=total_steps, batch_size=batch_size,
                                    first_step=first_step, is_main=distributed.is_main_process())
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
  ckpt.close()
  write_final(workdir, final)
  if distributed.is_main_process():
    metrics_lib.plot_curves(workdir)
    note(metrics_lib.format_table(final, title=f"Final metrics ({workdir}, step {final_step})"))
  return final


def main(argv: list[str]) -> None:
  del argv
  metrics_lib.quiet_library_logs()
  if not flags.FLAGS.workdir:
    sys.exit("--workdir is required (where checkpoints, metrics and config.json go).")
  if flags.FLAGS.config is None:
    sys.exit("--config is required, e.g. --config configs/quickstart.py.")
  try:
    train(flags.FLAGS.config, flags.FLAGS.workdir,
          allow_config_change=flags.FLAGS.allow_config_change)
  except (Diverged, config_lib.ConfigError, rules.RuleError) as e:
    sys.exit(f"{type(e).__name__}: {e}")


if __name__ == "__main__":
  config_lib.define_flags()
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and config.json.")
  flags.DEFINE_bool("allow_config_change", False,
                    "Resume a workdir whose config.json differs from --config.")
  app.run(main, flags_parser=config_lib.parse_flags)
