r"""A sweep's results over repeats: mean and standard deviation per cell, with what each
cell costs to train.

  python launch/summarize.py --sweep_dir runs/peft --over seed

reads SWEEP_DIR/results.csv (written by launch/sweep.py), groups its finished runs by
every swept key except the `--over` ones (e.g. the seed), and writes SWEEP_DIR/summary.md
and summary.csv: per group the number of runs n, each metric's mean and sample standard
deviation (ddof=1; a single run, or runs that agree, show the value), and from each
run's own records
  trainable       the trainable parameter count (the trainer's start-up summary)
  memory_mib      the trainer's estimated memory per device (params + optimizer state +
                  activations kept for backward; mmtl.memory)
  steps_per_s     the median of the run's logged `speed/steps_per_s` (compilation and
                  evaluations excluded as far as the logging intervals allow)
Step rates of runs measured on a busy machine are not comparable: time them alone.

  python launch/summarize.py --sweep_dir runs/peft_prune --over seed --plot sparsity:val/accuracy

also draws SWEEP_DIR/summary_<metric>.png: the metric's mean (error bars: one standard
deviation) against a numeric swept key, one line per group of the other keys.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
import re
import statistics
import sys

from absl import app, flags

_TRAINABLE = re.compile(r"^trainable: ([\d,]+) of ([\d,]+) params")
_MEMORY = re.compile(r"^Estimated memory per device: ([\d.]+) (B|KiB|MiB|GiB|TiB)")
_UNITS = {"B": 2**-20, "KiB": 2**-10, "MiB": 1.0, "GiB": 2**10, "TiB": 2**20}


def run_costs(sweep_dir: Path, run: str) -> dict[str, float]:
  """trainable, memory_mib (from the run's sweep log) and steps_per_s (its metrics.jsonl);
  what a run has no record of is left out."""
  out: dict[str, float] = {}
  log = sweep_dir / "logs" / f"{run}.log"
  for line in log.read_text().splitlines() if log.exists() else ():
    if m := _TRAINABLE.match(line):
      out["trainable"] = float(m.group(1).replace(",", ""))
    elif m := _MEMORY.match(line):
      out["memory_mib"] = float(m.group(1)) * _UNITS[m.group(2)]
  metrics = sweep_dir / run / "metrics.jsonl"
  rates = [
    record["speed/steps_per_s"]
    for record in map(json.loads, metrics.read_text().splitlines() if metrics.exists() else ())
    if "speed/steps_per_s" in record
  ]
  if rates:
    out["steps_per_s"] = statistics.median(rates)
  return out


def summarize(sweep_dir: Path, over: list[str]) -> tuple[list[str], list[dict[str, str]]]:
  """(columns, rows) of the summary table."""
  path = sweep_dir / "results.csv"
  if not path.exists():
    raise FileNotFoundError(f"No {path}: run launch/sweep.py (or its --collect) first.")
  with path.open() as f:
    reader = csv.DictReader(f)
    rows = [r for r in reader if r.get("status", "done") in ("done", "")]
    fields = reader.fieldnames or []
  if not rows:
    raise ValueError(f"{path} has no finished run yet.")
  unknown = [k for k in over if k not in fields]
  if unknown:
    raise ValueError(f"--over {unknown}: not columns of {path} ({', '.join(fields)}).")
  metrics = [f for f in fields if "/" in f]  # metric names are `<evaluator>/<name>`
  keys = [f for f in fields if f not in (*metrics, *over, "run", "step", "command", "status")]
  groups: dict[tuple[str, ...], list[dict[str, float]]] = {}
  for row in rows:
    values = {m: float(row[m]) for m in metrics if row.get(m)}
    values.update(run_costs(sweep_dir, row["run"]))
    groups.setdefault(tuple(row[k] for k in keys), []).append(values)
  names = [*metrics, "trainable", "memory_mib", "steps_per_s"]
  table = []
  for group, runs in groups.items():
    out = {**dict(zip(keys, group)), "n": str(len(runs))}
    for name in names:
      values = [r[name] for r in runs if name in r]
      if not values:
        continue
      mean = statistics.fmean(values)
      if name == "trainable":
        out[name] = f"{mean:,.0f}"
      elif len(values) > 1 and len(set(values)) > 1:
        out[name] = f"{mean:.4g} ± {statistics.stdev(values):.2g}"
      else:
        out[name] = f"{mean:.4g}"
    table.append(out)
  columns = [*keys, "n", *[n for n in names if any(n in r for r in table)]]
  return columns, table


def write(sweep_dir: Path, columns: list[str], table: list[dict[str, str]]) -> str:
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(r.get(c, "") for c in columns) + " |" for r in table]
  markdown = "\n".join(lines) + "\n"
  (sweep_dir / "summary.md").write_text(markdown)
  with (sweep_dir / "summary.csv").open("w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(table)
  return markdown


def plot(
  sweep_dir: Path,
  columns: list[str],
  table: list[dict[str, str]],
  over: list[str],
  x_key: str,
  metric: str,
) -> Path:
  """SWEEP_DIR/summary_<metric>.png of `metric` (mean, sd bars) against `x_key`, from
  `summarize`'s (columns, table) over the `over` keys."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  if x_key not in columns or metric not in columns:
    raise ValueError(f"--plot {x_key}:{metric}: the summary has columns {columns}.")
  lines: dict[str, list[tuple[float, float, float]]] = {}
  for row in table:
    label = ", ".join(f"{k}={row[k]}" for k in columns[: columns.index("n")] if k != x_key)
    mean, _, sd = row[metric].partition(" ± ")
    lines.setdefault(label, []).append((float(row[x_key]), float(mean), float(sd or 0)))
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for label, points in lines.items():
    xs, ys, sds = zip(*sorted(points))
    ax.errorbar(xs, ys, yerr=sds, marker="o", capsize=3, label=label or None)
  ax.set_xlabel(x_key)
  ax.set_ylabel(metric)
  n = sorted({row["n"] for row in table})
  ax.set_title(f"mean ± sd over {', '.join(over)} (n={'/'.join(n)})", fontsize=9)
  if any(lines):
    ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  out = sweep_dir / f"summary_{metric.replace('/', '_')}.png"
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)
  return out


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  if not f.sweep_dir:
    sys.exit("--sweep_dir is required (a launch/sweep.py sweep directory).")
  try:
    columns, table = summarize(Path(f.sweep_dir), f.over)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"{type(e).__name__}: {e}")
  print(write(Path(f.sweep_dir), columns, table), end="")
  if f.plot:
    x_key, _, metric = f.plot.partition(":")
    try:
      print(f"Wrote {plot(Path(f.sweep_dir), columns, table, f.over, x_key, metric)}")
    except ValueError as e:
      sys.exit(f"{type(e).__name__}: {e}")


if __name__ == "__main__":
  flags.DEFINE_string("sweep_dir", None, "A launch/sweep.py sweep directory.")
  flags.DEFINE_multi_string("over", ["seed"], "Swept keys to average over (repeatable).")
  flags.DEFINE_string("plot", None, "KEY:METRIC: draw the metric against a numeric swept key.")
  app.run(main)
