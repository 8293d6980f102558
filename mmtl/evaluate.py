r"""Evaluates a saved run.

  python -m mmtl.evaluate --workdir DIR [--step N] [--name NAME] [--config.key=value]

The config comes from `DIR/config.json`; overrides change what is evaluated,
e.g. `--config.evals.val.input.split=test`, or a missing-modality evaluation
`--config.evals.val.input.blank=text`. Params come from the best checkpoint
(latest when no best_metric was tracked) unless `--step` is given. Prints a
table and writes `DIR/eval_step<N>.json` for the run's own settings; an
evaluation with changed settings writes `DIR/eval_step<N>-<NAME>.json`, NAME
being `--name` or the changed keys and values, so it never replaces the record
of the run's own evaluation.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags
import ml_collections as mlc

from mmtl import config as config_lib
from mmtl import config_keys, distributed, evaluators, sharding, train_state
from mmtl import metrics as metrics_lib
from mmtl import workdir as workdir_lib


def results_file(workdir: str, step: int, config: mlc.ConfigDict, name: str | None = None) -> str:
  """`eval_step<N>.json` for the run's own config, `eval_step<N>-<name>.json` otherwise
  (`name`: given, or made of the keys and values that differ from config.json)."""
  if not name:
    changes = config_lib.saved_changes(config, workdir) or []
    if changes:
      name = "__".join(f"{key.removeprefix('evals.')}={new}" for key, _, new in changes)
  return f"eval_step{step}" + (f"-{workdir_lib.safe_name(name)}" if name else "") + ".json"


def evaluate(
  config: mlc.ConfigDict, workdir: str, step: int | None = None, name: str | None = None
) -> dict[str, float]:
  """Runs `config.evals` on the checkpoint; writes DIR/eval_step<N>[-<name>].json.

  The evaluators, their inputs and the predict function are the trainer's own
  (mmtl.evaluators.make_evaluators); variables are restored in the run's sharding."""
  distributed.maybe_initialize()
  config = config_lib.with_defaults(config)
  mesh = sharding.make_mesh(config.mesh)
  step = train_state.checkpoint_step(workdir, step)
  model, variables = train_state.load_run(workdir, mesh, step, config)
  results = {}
  for evaluator in evaluators.make_evaluators(config, model, mesh, int(config.batch_size)):
    results.update(evaluator.run(variables, step=step, workdir=workdir))
  if distributed.is_main_process():
    file = workdir_lib.path(workdir, results_file(workdir, step, config, name))
    workdir_lib.write_text(file, json.dumps(results, indent=2))
    print(
      metrics_lib.format_table(
        results, title=f"Evaluation of {workdir} at step {step} ({file.name})"
      )
    )
  return results


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "A training workdir (holds config.json and checkpoints/).")
  flags.DEFINE_integer("step", None, "Checkpoint step; default: best (or latest).")
  flags.DEFINE_string(
    "name",
    None,
    "Names the results file eval_step<N>-<name>.json; default: "
    "the changed config keys (none changed: eval_step<N>.json).",
  )


def main(argv: list[str]) -> None:
  del argv
  metrics_lib.quiet_library_logs()
  workdir = flags.FLAGS.workdir
  if not workdir:
    sys.exit("--workdir=DIR is required (a training workdir with config.json).")
  path = workdir_lib.path(workdir, config_lib.CONFIG_FILE)
  if not path.exists():
    sys.exit(f"{path} not found: --workdir must be a directory written by mmtl.train.")
  try:
    config = config_lib.from_flags(base=config_lib.load_json(path))
    evaluate(config, workdir, flags.FLAGS.step, flags.FLAGS.name)
  except train_state.LOAD_RUN_ERRORS as e:
    sys.exit(config_keys.error_line(e))


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=config_lib.parse_flags)
