"""Knowledge distillation: a frozen teacher (any finished mmtl run) guides a student.

  config.distill = dict(teacher_workdir="workdirs/big", temperature=2.0, alpha=0.5)

The student's loss is `(1 - alpha) * task_loss + alpha * kd_loss`, with Hinton
et al.'s KD term `T^2 * KL(softmax(teacher / T) || softmax(student / T))`
(the T^2 keeps its gradient scale independent of T). The teacher is rebuilt from
its own `config.json` and best checkpoint (`mmtl.train_state.load_run`, as
`python -m mmtl.evaluate` loads a run), runs in the train step without
gradients, and may have other towers than the student, as long as both
classify into the same classes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from mmtl import config_keys, losses

CONFIG_KEYS = dict(teacher_workdir=str, temperature=2.0, alpha=0.5)


def kd_loss_per_example(
  student_logits: jax.Array, teacher_logits: jax.Array, temperature: float
) -> jax.Array:
  t = temperature
  teacher = jax.nn.softmax(teacher_logits.astype(jnp.float32) / t)
  log_student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t)
  log_teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t)
  return t * t * (teacher * (log_teacher - log_student)).sum(-1)


def check_config(distill_cfg: Mapping[str, Any], head_type: str) -> None:
  config_keys.check_keys(distill_cfg, CONFIG_KEYS, "config.distill")
  if not distill_cfg.get("teacher_workdir"):
    raise ValueError(
      "config.distill.teacher_workdir is not set: give the workdir of a finished "
      "mmtl run (it holds config.json and checkpoints)."
    )
  if head_type != "classification":
    raise ValueError(
      f"Distillation matches classification logits; the student has "
      f"head_type={head_type!r}. Remove config.distill or use a classifier."
    )
  if not 0.0 <= distill_cfg.get("alpha", CONFIG_KEYS["alpha"]) <= 1.0:
    raise ValueError("config.distill.alpha must be in [0, 1] (weight of the KD term).")


def student_loss(
  task_loss: tuple[jax.Array, jax.Array],
  student_logits: jax.Array,
  teacher_logits: jax.Array,
  weights: jax.Array | None,
  distill_cfg: Mapping[str, Any],
) -> tuple[jax.Array, jax.Array]:
  """`(1 - alpha) * task_loss + alpha * KD` as (sum, weight) like `task_loss`
  (both terms weighted by `example_weight`); teacher logits carry no gradient."""
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(
      f"Student logits {student_logits.shape} and teacher logits "
      f"{teacher_logits.shape} differ: both must classify into the same classes."
    )
  alpha = distill_cfg.get("alpha", CONFIG_KEYS["alpha"])
  kd_sum, _ = losses.weighted_sum(
    kd_loss_per_example(
      student_logits,
      jax.lax.stop_gradient(teacher_logits),
      distill_cfg.get("temperature", CONFIG_KEYS["temperature"]),
    ),
    weights,
  )
  task_sum, weight_sum = task_loss
  return (1.0 - alpha) * task_sum + alpha * kd_sum, weight_sum
