r"""Trains a fused multimodal model from pretrained encoders.

  python -m mmtl.train --config configs/quickstart.py --workdir workdirs/quickstart \
      [--config.key=value ...] [--allow_config_change]

The workdir gets `config.json`, `metrics.jsonl`, TensorBoard events (`tb/`),
`checkpoints/`, `curves.png` and, once the run is complete,
`final_metrics.json`, and `lock.json` while it runs. Rerunning the same command
resumes from the newest intact checkpoint (params, optimizer state, step and
input-iterator state), so a killed run continues exactly where it left off. SIGTERM or
SIGINT (a preemption, `scancel`, Ctrl-C) saves the step in flight on every host and
exits with status 75 (`mmtl.preemption`); the same command continues from that step.

Order: the workdir lock; `validate` (mesh, input, model + pretrained init,
sharding and optimizer rules, evaluators: everything that can fail on a bad
config, before anything is written); config.json pinned; checkpoint resume;
train loop; final evaluation. docs/reliability.md lists the faults handled.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import contextlib
import dataclasses
import functools
import json
import sys
from typing import Any

from absl import app, flags
import jax
from jax.experimental import multihost_utils
import ml_collections as mlc
import numpy as np

from mmtl import (
  checkpoint,
  config_keys,
  ctc,
  data,
  distill,
  distributed,
  domain_adaptation,
  feature_cache,
  heads,
  hf,
  memory,
  optim,
  preemption,
  rules,
  sharding,
  tracking,
  train_state,
  train_step,
)
from mmtl import config as config_lib
from mmtl import evaluators as evaluators_lib
from mmtl import metrics as metrics_lib
from mmtl import workdir as workdir_lib
from mmtl.data import device as data_device
from mmtl.data import folds, transforms
from mmtl.modalities import MODALITIES
from mmtl.models import fusion

FINAL_METRICS_FILE = "final_metrics.json"


class Diverged(RuntimeError):
  """The loss or the params became NaN/Inf; the run stopped at its last good checkpoint."""


class Stopped(RuntimeError):
  """A signal stopped the run after saving its current step; `main` exits with
  preemption.EXIT_CODE."""


def note(msg: str) -> None:
  if distributed.is_main_process():
    print(msg, flush=True)


def write_final(workdir: str, final: Mapping[str, float]) -> None:
  """`DIR/final_metrics.json`, atomically: it marks the run finished (launch/sweep.py
  skips runs that have it), so a half-written one must never exist."""
  if distributed.is_main_process():
    workdir_lib.write_text(
      workdir_lib.path(workdir, FINAL_METRICS_FILE), json.dumps(dict(final), indent=2)
    )


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
    held = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not held and error is None:
      error = workdir_lib.WorkdirLocked(
        f"Workdir {workdir} is held by another run (process 0 says by whom)."
      )
  if error is not None:
    raise error
  stopped = False
  try:
    yield
  except Stopped:
    stopped = True
    raise
  finally:
    if lock is not None:
      lock.release()
    if stopped and jax.process_count() > 1:
      # Every host stops at the same step; none exits before all saved and the lock is
      # released (a launcher such as `srun --kill-on-bad-exit` ends the others at the first
      # exit, and a requeued job on other nodes could not take over a left lock).
      multihost_utils.sync_global_devices("mmtl.train.stopped")


def describe_towers(
  model_cfg: Mapping[str, Any], model_init: Mapping[str, Any], model: fusion.FusionModel
) -> str:
  """Which towers (and decoder) run, from which weights, built without which optional parts
  (those their checkpoint does not hold, mmtl.hf.left_out), and which are configured but
  left out."""

  def line(what: str, name: Any, init: Any, extra: str = "", without: Any = ()) -> str:
    arch = name.get("model_type", "config dict") if hasattr(name, "get") else name
    init = init.get("name") if hasattr(init, "get") else init
    weights = f"weights from {init}" if init else "random init"
    left_out = "".join(f"; no {part}: the checkpoint holds none" for part in without)
    return f"  {what}: {arch}{extra} ({weights}{left_out})"

  used = fusion.selected_towers(model_cfg)
  lines = [
    line(
      m,
      t["name"],
      model_init.get(f"{m}_encoder"),
      without=hf.left_out(model.tower(m), chosen=t.get("kwargs") or {}).values(),
    )
    for m, t in used.items()
  ]
  if model_cfg["head"] == "captioning":
    decoder = model_cfg["decoder"]
    cross = " with cross-attention" if decoder.get("cross_attention", True) else ""
    lines.append(line("decoder", decoder.get("name"), model_init.get("decoder"), cross))
  spare = model_cfg.get("unused_towers") or ()
  unused = [m for m in model_cfg["towers"] if m not in used and m not in spare]
  if unused:
    lines.append(
      f"  configured but unused (config.model.modalities={model_cfg['modalities']!r}): "
      + ", ".join(unused)
    )
  if spare:
    lines.append(f"  kept unused (config.model.unused_towers): {', '.join(spare)}")
  return "Towers:\n" + "\n".join(lines)


@dataclasses.dataclass
class Validated:
  """What `validate` built and opened, for the run to use."""

  mesh: jax.sharding.Mesh
  train_iter: Any
  model: fusion.FusionModel
  layout: train_state.ParamLayout
  initial_variables: Any  # fresh runs: random init + pretrained towers (+ LoRA), placed; else None
  build_phase: Callable[[int], train_step.Phase]  # optimizer and step of the phase of `step`
  activations: Callable[[int], int]  # activation bytes of the step of the phase of `step`
  teacher_variables: Any
  evaluators: list[evaluators_lib.Evaluator]
  features: feature_cache.FeatureCache
  open_train_input: Callable[[data.Features | None], Any]  # the train iterator, given features


def validate(config: mlc.ConfigDict, *, fresh: bool, workdir: str = "") -> Validated:
  """Builds and opens everything the run will use, writing nothing: the mesh and the
  batch split, the training input and every evaluator's input, the model, the
  sharding, freezing, LR and LoRA rules, the teacher. A typo anywhere fails here,
  before config.json is pinned or anything trains; errors raised by the libraries
  underneath (a missing split, a bad checkpoint) become one-line ConfigErrors.
  A `fresh` run (no checkpoint to resume) also loads its pretrained towers here.
  `workdir` holds the feature cache unless config.feature_cache.dir says otherwise.
  """
  try:
    return _validate(config, fresh, workdir)
  except (ValueError, KeyError, FileNotFoundError) as e:
    if isinstance(e, (config_lib.ConfigError, rules.RuleError, hf.CheckpointError)):
      raise  # mmtl's own errors, already one line for the user.
    message = f"missing key {e.args[0]!r}" if isinstance(e, KeyError) and e.args else str(e)
    raise config_lib.ConfigError(message) from e


def _validate(config: mlc.ConfigDict, fresh: bool, workdir: str) -> Validated:
  total_steps, accum = int(config.total_steps), int(config.grad_accum_steps)
  tracking.check(config.tracking, workdir)  # Its backends installed, before anything else.

  # Mesh.
  mesh = sharding.make_mesh(config.mesh)
  process_index, process_count = sharding.process_data_shard(mesh)
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  batch_size = int(config.batch_size)
  if batch_size <= 0 or batch_size % (accum * batch_shards):
    raise config_lib.ConfigError(
      f"config.batch_size={batch_size} must be a positive multiple of grad_accum_steps ({accum}) "
      f"x batch shards (mesh data*fsdp = {batch_shards}); e.g. "
      f"--config.batch_size={max(1, batch_size // (accum * batch_shards)) * accum * batch_shards}."
    )
  note(f"Mesh {dict(mesh.shape)}; global batch {batch_size} in {accum} microbatch(es).")

  # Input (with domain adaptation: the target domain's stream beside it).
  da = domain_adaptation.check(config)
  target_input = domain_adaptation.target_input(config, da) if da is not None else None
  stream = dict(
    batch_size=batch_size // process_count,
    seed=config.seed,
    process_index=process_index,
    process_count=process_count,
  )

  def open_train_input(features: data.Features | None = None) -> Any:
    source = data.make_train_iterator(config.input, features=features, **stream)
    if da is None:
      return source
    target = data.make_train_iterator(target_input, **stream)
    return domain_adaptation.PairedIterator(source, target)

  train_iter = open_train_input()
  start_state = train_iter.get_state()
  example_batch = next(train_iter)  # Shapes for init; the iterator is rewound below.
  train_iter.set_state(start_state)
  if da is not None:
    domain_adaptation.check_batches(example_batch)
    note(
      f"Domain adaptation: {da['method']} (lambda {da['schedule']}, weight {da['weight']}); "
      f"unlabeled target domain {target_input['dataset']}:{target_input['split']}."
    )
  absent = [f for f in heads.get(config.model.head).fields if f not in example_batch]
  if absent:
    raise config_lib.ConfigError(
      f"config.model.head={config.model.head!r} learns from the batch field(s) {absent}, which "
      f"config.input does not give (its batches hold {sorted(example_batch)}): name the dataset "
      "feature in config.input.fields (label=...; target=... for captioning, and for the ctc "
      "head with config.input.target.format='ctc'); the masked_lm head's mlm_labels come "
      "from config.input.text.mlm_probability (e.g. 0.15)."
    )

  # Model and its params' layout (every sharding rule matched here); a fresh run
  # creates its params sharded and loads its pretrained towers now.
  model = fusion.build(config.model)
  for m in model.modalities:
    if MODALITIES[m].primary() in example_batch:
      MODALITIES[m].check_tower(model.tower(m), example_batch)
  target_cfg = data.input_config(config.input).target
  if model.head_type == "captioning":
    transforms.TargetTokens.from_config(target_cfg).check_vocab(model.vocab_size)
  if model.head_type == "ctc":
    vocab = ctc.CTCVocab.from_config(target_cfg)
    vocab.check_head(model.head_config["vocab_size"], model.head_config["blank_id"])
  layout = train_state.param_layout(model, config, mesh)
  initial_variables = (
    train_state.init_variables(model, config, layout, note=note) if fresh else None
  )

  def shapes_of(batch: Mapping[str, Any]) -> dict[str, Any]:
    return {
      k: shapes_of(v)
      if isinstance(v, Mapping)
      else jax.ShapeDtypeStruct((batch_size, *np.shape(v)[1:]), np.asarray(v).dtype)
      for k, v in batch.items()
    }

  batch_shape = shapes_of(example_batch)

  # Distillation teacher and optimizer (every rule is matched against the params here).
  teacher_logits, teacher_variables, teacher_shardings = None, None, None
  if config.distill:
    distill.check_config(config.distill, model.head_type)
    teacher, teacher_variables = train_state.load_run(config.distill.teacher_workdir, mesh)

    def teacher_logits(variables, batch):  # its LoRA merged, low-precision params read back
      return teacher.apply(heads.merged(variables), batch)["logits"]

    teacher_shardings = jax.tree.map(lambda x: x.sharding, teacher_variables)
    note(
      f"Distilling from {config.distill.teacher_workdir} "
      f"(T={config.distill.get('temperature', 2.0)}, alpha={config.distill.get('alpha', 0.5)})."
    )
  objective_for = functools.partial(
    train_step.make_objective,
    model,
    config,
    teacher_logits,
    batch_stats_shape=layout.batch_stats,
  )
  boundaries = optim.phase_boundaries(config.optim)
  phases: dict[int, train_step.Phase] = {}

  def build_phase(step: int) -> train_step.Phase:  # Once per phase: validated here, reused.
    start = train_step.phase_start(step, boundaries)
    if start not in phases:
      phases[start] = train_step.make_phase(
        config,
        objective_for,
        layout,
        mesh,
        start,
        teacher_shardings=teacher_shardings,
      )
    return phases[start]

  def activations(step: int) -> int:
    phase = build_phase(step)
    mask = optim.freeze_mask(layout.shapes, config.optim, phase.start, new_layers=layout.new_layers)
    return train_step.activation_bytes(
      objective_for(mask),
      mask,
      layout,
      batch_shape,
      accum_steps=accum,
      teacher_variables=teacher_variables,
    )

  for boundary in [0] + [b for b in boundaries if b < total_steps]:
    build_phase(boundary)  # Phase 0 even of a 0-step run: it holds the initial model's state.

  # The feature cache's plan (filled once the params exist) and the evaluators, each with its
  # input opened (dataset, split, fields, tokenizer).
  features = feature_cache.FeatureCache(
    config, model, layout, feature_cache.directory(config, workdir), note=note
  )
  evaluators = evaluators_lib.make_evaluators(
    config, model, mesh, batch_size, features=features.features
  )
  for evaluator in evaluators:
    evaluator.check()
  metric_names = [n for e in evaluators for n in e.metric_names()]
  if config.best_metric and config.best_metric not in metric_names:
    raise config_lib.ConfigError(
      f"config.best_metric={config.best_metric!r} is not a metric of the evaluators; they "
      f"log {', '.join(metric_names) or 'nothing (config.evals is empty)'}."
    )
  return Validated(
    mesh=mesh,
    train_iter=train_iter,
    model=model,
    layout=layout,
    initial_variables=initial_variables,
    build_phase=build_phase,
    activations=activations,
    teacher_variables=teacher_variables,
    evaluators=evaluators,
    features=features,
    open_train_input=open_train_input,
  )


def check_restorable(
  ckpt: checkpoint.CheckpointManager, step: int, params_shape: Any, opt_state_shape: Any
) -> None:
  """A changed config must fit the checkpoint it resumes: same param paths and shapes,
  same optimizer-state shapes. Checked on the checkpoint's metadata, before anything
  is written; a mismatch is a ConfigError listing the first differences."""
  saved = rules.flatten(ckpt.item_metadata(step, "params"))
  wanted = rules.flatten(params_shape)
  problems = [f"{p} missing from the checkpoint" for p in wanted if p not in saved]
  problems += [f"{p} in the checkpoint but not in the model" for p in saved if p not in wanted]
  problems += [
    f"{p} is {tuple(saved[p].shape)} in the checkpoint, {tuple(wanted[p].shape)} now"
    for p in wanted
    if p in saved and tuple(saved[p].shape) != tuple(wanted[p].shape)
  ]
  shapes = lambda tree: sorted(tuple(x.shape) for x in jax.tree.leaves(tree))  # noqa: E731
  if not problems and shapes(ckpt.item_metadata(step, "opt_state")) != shapes(opt_state_shape):
    problems.append("the optimizer state differs (the trainable set or the optimizer changed)")
  if problems:
    raise config_lib.ConfigError(
      f"The changed config does not fit the checkpoint at step {step} in {ckpt.directory}: "
      + "; ".join(problems[:5])
      + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
      + ". Nothing was changed; start this config in a new --workdir."
    )


def train(
  config: mlc.ConfigDict, workdir: str, *, allow_config_change: bool = False
) -> dict[str, float]:
  """Runs (or resumes) the training described by `config` in `workdir`.

  Returns the final metrics (also written to `DIR/final_metrics.json`).
  Raises `Diverged` if the loss became NaN/Inf (the last good checkpoint stays),
  `Stopped` after saving the current step on SIGTERM/SIGINT,
  `workdir.WorkdirLocked` if another run holds the workdir, ConfigError before
  anything is written if the config cannot run.
  """
  distributed.maybe_initialize()
  config = config_lib.with_defaults(config)
  folds.apply(config)  # Cross-validation: the folds the input and the evaluator read.
  with hold_workdir(workdir):
    return _train(config, workdir, allow_config_change)


def _train(config: mlc.ConfigDict, workdir: str, allow_config_change: bool) -> dict[str, float]:
  ##############################################################################
  # Setup: everything validated before config.json is pinned.
  ##############################################################################
  note(
    f"mmtl.train: process {jax.process_index()}/{jax.process_count()}, "
    f"{jax.local_device_count()}/{jax.device_count()} devices, workdir {workdir}"
  )
  ckpt_dir = workdir_lib.path(workdir, checkpoint.CHECKPOINT_DIR)
  saved_steps = checkpoint.saved_steps(ckpt_dir)
  changes = config_lib.saved_changes(config, workdir)
  if changes and saved_steps and not allow_config_change:
    raise config_lib.refuse_change(workdir, changes)
  v = validate(config, fresh=not saved_steps, workdir=workdir)
  note(describe_towers(config.model, config.model_init, v.model))
  if description := v.features.describe():
    note(description)
  if saved_steps:
    train_state.check_tower_parts(
      v.model, config.model, train_state.saved_params(ckpt_dir, saved_steps[-1]), ckpt_dir
    )
  if changes and saved_steps:
    latest = saved_steps[-1]
    phase = v.build_phase(max(latest - 1, 0))
    with checkpoint.CheckpointManager(ckpt_dir, read_only=True) as reader:
      check_restorable(reader, latest, v.layout.shapes, phase.state_shapes["opt_state"])
    note("Config changed (--allow_config_change): " + config_lib.format_changes(changes))
  elif changes:
    note(
      f"{workdir} holds the config.json of an attempt that saved no checkpoint; it is "
      "replaced by this config."
    )
  config_lib.pin(config, workdir, step=saved_steps[-1] if saved_steps else None)

  ##############################################################################
  # Checkpoint resume (the newest intact checkpoint), or init + pretrained weights.
  ##############################################################################
  ckpt = checkpoint.CheckpointManager(
    ckpt_dir,
    keep=int(config.keep_ckpts),
    best_metric=config.best_metric or None,
    best_mode=config.best_mode,
  )
  try:
    return _train_loop(config, workdir, v, ckpt)
  finally:
    ckpt.close()


def _train_loop(
  config: mlc.ConfigDict, workdir: str, v: Validated, ckpt: checkpoint.CheckpointManager
) -> dict[str, float]:
  total_steps = int(config.total_steps)
  mesh, layout = v.mesh, v.layout
  train_iter, build_phase, teacher_variables = v.train_iter, v.build_phase, v.teacher_variables
  boundaries = optim.phase_boundaries(config.optim)

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
    resume_step, phase = 0, build_phase(0)
    state = train_state.init_state(v.initial_variables, phase.tx, phase.state_shardings)
  phase = build_phase(max(resume_step - 1, 0))
  first_step = int(jax.device_get(state["step"]))
  if v.features.modalities:
    # The locked towers' outputs on every split the run reads, then batches that carry them.
    inputs = [config.input] + [
      evaluators_lib.eval_input_config(config, cfg) for e in v.evaluators for cfg in e.all_inputs()
    ]
    v.features.fill(
      train_state.variables_of(state), inputs, mesh, batch_size=int(config.batch_size)
    )
    position = train_iter.get_state()
    train_iter = v.open_train_input(v.features.features(config.input))
    train_iter.set_state(position)
  note(
    optim.summary(
      layout.shapes,
      config.optim,
      phase.state_shapes["opt_state"],
      step=phase.start,
      new_layers=layout.new_layers,
      total_steps=total_steps,
    )
  )
  note(
    memory.format_memory(
      memory.memory_estimate(
        mesh, phase.state_shapes, phase.state_shardings, activations=v.activations(phase.start)
      )
    )
  )

  ##############################################################################
  # Evaluators, metrics, early stopping.
  ##############################################################################
  evaluators = v.evaluators
  is_main, config_dict = distributed.is_main_process(), config_lib.to_dict(config)
  writer = metrics_lib.MetricWriter(
    workdir,
    total_steps=total_steps,
    batch_size=int(config.batch_size),
    first_step=first_step,
    is_main=is_main,
    config=config_dict,
    trackers=tracking.open_trackers(config_dict, workdir) if is_main else (),
  )
  best_value, evals_since_best = None, 0  # Early stopping; patience restarts on resume.
  if config.best_metric and ckpt.best_step() is not None:
    best_value = (ckpt.metrics(ckpt.best_step()) or {}).get(config.best_metric)
  sign = 1.0 if config.best_mode == "max" else -1.0

  ##############################################################################
  # Train loop.
  ##############################################################################
  if first_step < total_steps:
    note(f"Training steps {first_step + 1}..{total_steps} (compiling the first step)...")
  device_batches = data_device.to_devices(train_iter, config, mesh)
  last_eval: dict[str, tuple[int, dict[str, float]]] = {}  # evaluator -> (step, metrics)
  stop = False
  try:
    with preemption.StopSignals() as stop_signals:
      for step in range(first_step, total_steps):
        if train_step.phase_start(step, boundaries) != phase.start:
          old_opt_state = state["opt_state"]
          phase = build_phase(step)
          note(
            f"Step {step}: gradual unfreezing, new trainable set:\n"
            + optim.summary(layout.shapes, config.optim, step=step, new_layers=layout.new_layers)
          )
          state["opt_state"] = jax.jit(
            functools.partial(optim.migrate_state, new_tx=phase.tx),
            out_shardings=phase.state_shardings["opt_state"],
          )(old_opt_state, params=state["params"])
        state, measurements = phase.step_fn(state, next(device_batches), teacher_variables)
        done = step + 1
        ckpt.check_for_errors()  # A failed background save stops the run at once.
        # A signal: save this step (the same on every host) now, skipping its evaluations, so
        # the save completes within a preemption's grace period.
        signalled = stop_signals.reached()

        due = [] if signalled else [e for e in evaluators if e.due(done, total_steps)]
        save_now = (
          signalled
          or done % config.ckpt_every == 0
          or done == total_steps
          or bool(due and config.best_metric)
        )
        if done % config.log_every == 0 or done == first_step + 1 or save_now or due:
          measurements = {k: float(v) for k, v in jax.device_get(measurements).items()}
          if not all(np.isfinite(v) for v in measurements.values()):
            ckpt.wait()
            writer.close()
            last = ckpt.latest_step()
            raise Diverged(
              f"NaN/Inf by step {done}: {measurements}. Stopped without saving this state; the "
              "last good checkpoint is "
              + (
                f"step {last} in {ckpt.directory}"
                if last is not None
                else "none (nothing saved yet)"
              )
              + ". Lower config.optim.lr, set config.optim.grad_clip_norm or check the inputs; "
              "rerunning the same command resumes from that checkpoint."
            )
          speed = writer.progress(done, {k: measurements[k] for k in ("train/loss", "train/lr")})
          writer.write(done, {**measurements, **{f"speed/{k}": v for k, v in speed.items()}})

        eval_metrics = {}
        for evaluator in due:
          result = evaluator.run(train_state.variables_of(state), step=done, workdir=workdir)
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
          ckpt.save(
            done,
            state,
            data_state=device_batches.get_state(),
            metrics=eval_metrics if config.best_metric in eval_metrics else None,
          )
        if stop:
          note(
            f"Early stopping at step {done}: {config.best_metric} did not improve by more than "
            f"{config.early_stopping.min_delta} in the last {evals_since_best} evaluations."
          )
          break
        if signalled:  # The `finally` below commits the save before Stopped leaves.
          writer.close()
          raise Stopped(
            f"{stop_signals.describe()} after step {done} of {total_steps}: saved checkpoint "
            f"step {done} in {ckpt.directory}; rerun the same command to continue from it."
          )
  finally:
    ckpt.wait()  # However the loop ended, the last checkpoint started gets committed.
  if total_steps == 0 and ckpt.latest_step() is None:
    # The initial model (model_init weights: zero-shot, a probe's start) is the run's
    # step 0, so mmtl.evaluate and mmtl.export read it like any trained run.
    ckpt.save(0, state, data_state=device_batches.get_state())
    ckpt.wait()

  ##############################################################################
  # Final metrics: of the best checkpoint when config.best_metric is tracked.
  ##############################################################################
  final_step = int(jax.device_get(state["step"]))
  variables = train_state.variables_of(state)
  best_step = ckpt.best_step() if config.best_metric else None
  if best_step is not None and best_step != final_step:
    note(f"Final evaluation on the best checkpoint (step {best_step} by {config.best_metric}).")
    variables = ckpt.restore(
      checkpoint.abstract(layout.variables(), layout.variables("shardings")), best_step
    )
    final_step = best_step
  final = {}
  for evaluator in evaluators:
    step_and_metrics = last_eval.get(evaluator.name)
    final.update(
      step_and_metrics[1]
      if step_and_metrics and step_and_metrics[0] == final_step
      else evaluator.run(variables, step=final_step, workdir=workdir)
    )
  final["step"] = float(final_step)
  writer.close(final)
  write_final(workdir, final)
  if is_main:
    metrics_lib.plot_curves(workdir)
    note(metrics_lib.format_table(final, title=f"Final metrics ({workdir}, step {final_step})"))
  return final


# The one-line errors of a run that cannot start or stopped on purpose.
USER_ERRORS = (
  Diverged,
  config_lib.ConfigError,
  rules.RuleError,
  workdir_lib.WorkdirLocked,
  checkpoint.CheckpointError,
  hf.CheckpointError,
)


def main(argv: list[str]) -> None:
  del argv
  metrics_lib.quiet_library_logs()
  if not flags.FLAGS.workdir:
    sys.exit("--workdir is required (where checkpoints, metrics and config.json go).")
  if flags.FLAGS.config is None:
    sys.exit("--config is required, e.g. --config configs/quickstart.py.")
  try:
    train(
      config_lib.from_flags(),
      flags.FLAGS.workdir,
      allow_config_change=flags.FLAGS.allow_config_change,
    )
  except USER_ERRORS as e:
    sys.exit(config_keys.error_line(e))
  except Stopped as e:
    print(config_keys.error_line(e), file=sys.stderr, flush=True)
    sys.exit(preemption.EXIT_CODE)


if __name__ == "__main__":
  config_lib.define_flags()
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and config.json.")
  flags.DEFINE_bool(
    "allow_config_change", False, "Resume a workdir whose config.json differs from --config."
  )
  app.run(main, flags_parser=config_lib.parse_flags)
