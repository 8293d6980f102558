r"""Evaluates a saved run: `python -m mmtl.evaluate --workdir DIR [--step N] [--config.key=value]`.

The config comes from `DIR/config.json`; overrides change what is evaluated,
e.g. `--config.evals.val.input.split=test` or a new split for every
evaluator. Params come from the best checkpoint (latest when no best_metric
was tracked) unless `--step` is given. Prints a table and writes
`DIR/eval_step<N>.json`.
"""
from __future__ import annotations

import json
import sys
from typing import Any

from absl import app
from absl import flags
import ml_collections as mlc
from ml_collections import config_flags

from mmtl import checkpoint
from mmtl import config as config_lib
from mmtl import distributed
from mmtl import metrics as metrics_lib
from mmtl import sharding
from mmtl import workdir as workdir_lib
from mmtl.models import fusion


def checkpoint_step(workdir: str, step: int | None = None) -> int:
  """`step`, else the run's best step (its latest when no best_metric was tracked)."""
  if step is not None:
    return step
  with checkpoint.CheckpointManager(workdir_lib.path(workdir, "checkpoints"), read_only=True) as m:
    best = m.best_step()
    if best is None:
      raise FileNotFoundError(f"No checkpoint in {workdir}/checkpoints: train the run first.")
    return best


def load_run(workdir: str, mesh, step: int | None = None,
             config: mlc.ConfigDict | None = None) -> tuple[fusion.FusionModel, Any]:
  """(model, params) of a saved run (default: its own config and best step),
  params replicated on `mesh`."""
  config = config_lib.with_defaults(
      config or config_lib.load_json(workdir_lib.path(workdir, config_lib.CONFIG_FILE)))
  params = checkpoint.restore_params_only(
      workdir_lib.path(workdir, "checkpoints"), step=checkpoint_step(workdir, step),
      shardings=sharding.replicated(mesh))
  return fusion.build(config.model), params


def evaluate(config: mlc.ConfigDict, workdir: str, step: int | None = None) -> dict[str, float]:
  """Runs `config.evals` on the checkpoint; writes DIR/eval_step<N>.json."""
  from mmtl import train  # Same evaluators and predict function as training.
  distributed.maybe_initialize()
  config = config_lib.with_defaults(config)
  mesh = sharding.make_mesh(config.mesh)
  step = checkpoint_step(workdir, step)
  model, params = load_run(workdir, mesh, step, config)
  results = {}
  for evaluator in train.make_evaluators(config, model, mesh, int(config.batch_size)):
    results.update(evaluator.run(params))
  if distributed.is_main_process():
    workdir_lib.write_text(workdir_lib.path(workdir, f"eval_step{step}.json"),
                           json.dumps(results, indent=2))
    print(metrics_lib.format_table(results, title=f"Evaluation of {workdir} at step {step}"))
  return results


def _define_config_flag(argv: list[str]) -> None:
  """`--config` defaults to the workdir's config.json, so `--config.x=y` overrides it."""
  workdir = next((a.split("=", 1)[1] for a in argv if a.startswith("--workdir=")), None)
  if workdir is None and "--workdir" in argv:
    workdir = argv[argv.index("--workdir") + 1]
  if workdir is None:
    sys.exit("--workdir=DIR is required (a training workdir with config.json).")
  path = workdir_lib.path(workdir, config_lib.CONFIG_FILE)
  if not path.exists():
    sys.exit(f"{path} not found: --workdir must be a directory written by mmtl.train.")
  config_flags.DEFINE_config_dict("config", config_lib.load_json(path), lock_config=True)
  flags.DEFINE_string("workdir", None, "A training workdir (holds config.json and checkpoints/).")
  flags.DEFINE_integer("step", None, "Checkpoint step; default: best (or latest).")


def main(argv: list[str]) -> None:
  del argv
  metrics_lib.quiet_library_logs()
  evaluate(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.step)


if __name__ == "__main__":
  _define_config_flag(sys.argv)
  app.run(main, flags_parser=config_lib.parse_flags)
