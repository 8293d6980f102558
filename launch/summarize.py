r"""A sweep's results over repeats: mean, standard deviation and 95% interval per cell,
with what each cell costs to train.

  python launch/summarize.py --sweep_dir runs/peft --over seed

reads SWEEP_DIR/results.csv (written by launch/sweep.py), groups its finished runs by
every swept key except the `--over` ones (seeds, folds), and writes SWEEP_DIR/summary.md
and summary.csv: per group the number of runs n, and for each metric its mean, sample
standard deviation (ddof=1) and the 95% confidence interval of the mean from Student's
t distribution, mean ± t(0.975, n-1) sd / sqrt(n) (mmtl.metrics.mean_and_ci95; none for one run):
`0.85 ± 0.012 [0.82, 0.88]` in the Markdown; in the CSV `<metric> mean`, `sd`,
`ci95_low`, `ci95_high` and `values` (every run's value, in the order of results.csv, ";"
between them). Over folds the interval is the usual one but optimistic: the folds'
training sets overlap, so their scores are not independent (Bengio & Grandvalet, 2004).
From each run's own records
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
import dataclasses
import json
from pathlib import Path
import re
import statistics
import sys
from typing import Any

from absl import app, flags

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # For mmtl.metrics, run as a script from anywhere.
  sys.path.insert(0, str(REPO_ROOT))
from mmtl import metrics as metrics_lib  # noqa: E402

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


@dataclasses.dataclass(frozen=True)
class Spread:
  """A cell's values over its runs: mean, sample sd and the 95% t-interval of the mean."""

  values: tuple[float, ...]

  @property
  def mean(self) -> float:
    return statistics.fmean(self.values)

  @property
  def sd(self) -> float:
    return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

  @property
  def ci95(self) -> tuple[float, float] | None:
    """The 95% interval of the mean (mmtl.metrics.mean_and_ci95); None for one run."""
    if len(self.values) < 2:
      return None
    mean, half = metrics_lib.mean_and_ci95(self.values)
    return mean - half, mean + half

  def markdown(self, interval: bool = True) -> str:
    if len(set(self.values)) < 2:  # one run, or runs that agree
      return f"{self.mean:.4g}"
    text = f"{self.mean:.4g} ± {self.sd:.2g}"
    if interval:
      low, high = self.ci95
      text += f" [{low:.3g}, {high:.3g}]"
    return text

  def csv(self, name: str) -> dict[str, str]:
    ci = self.ci95
    return {
      f"{name} mean": repr(self.mean),
      f"{name} sd": repr(self.sd) if ci else "",
      f"{name} ci95_low": repr(ci[0]) if ci else "",
      f"{name} ci95_high": repr(ci[1]) if ci else "",
      f"{name} values": ";".join(map(repr, self.values)),
    }


COSTS = ("trainable", "memory_mib", "steps_per_s")


def summarize(sweep_dir: Path, over: list[str]) -> tuple[list[str], list[dict[str, Any]]]:
  """(columns, rows) of the summary table: per row the group's key values (strings), `n`,
  and a `Spread` per metric and cost."""
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
  names = [*metrics, *COSTS]
  table: list[dict[str, Any]] = []
  for group, runs in groups.items():
    out: dict[str, Any] = {**dict(zip(keys, group)), "n": str(len(runs))}
    for name in names:
      if values := tuple(r[name] for r in runs if name in r):
        out[name] = Spread(values)
    table.append(out)
  columns = [*keys, "n", *[n for n in names if any(n in r for r in table)]]
  return columns, table


def markdown_cell(name: str, value: Any) -> str:
  """A summary cell: metrics with their interval, costs without; counts as integers."""
  if not isinstance(value, Spread):
    return str(value)
  if name == "trainable":
    return f"{value.mean:,.0f}"
  return value.markdown(interval=name not in COSTS)


def write(sweep_dir: Path, columns: list[str], table: list[dict[str, Any]], over: list[str]) -> str:
  """Writes summary.md (with a line saying what the intervals are) and summary.csv."""
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += [
    "| " + " | ".join(markdown_cell(c, r.get(c, "")) for c in columns) + " |" for r in table
  ]
  lines += [
    "",
    f"Mean ± sample standard deviation over {', '.join(over)} (n runs) [95% confidence "
    "interval of the mean, Student's t with n - 1 degrees of freedom].",
  ]
  markdown = "\n".join(lines) + "\n"
  (sweep_dir / "summary.md").write_text(markdown)
  rows = [
    {
      k: v
      for c in columns
      for k, v in (r[c].csv(c) if isinstance(r.get(c), Spread) else {c: r.get(c, "")}).items()
    }
    for r in table
  ]
  fields = list(dict.fromkeys(k for row in rows for k in row))
  with (sweep_dir / "summary.csv").open("w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
  return markdown


def plot(
  sweep_dir: Path,
  columns: list[str],
  table: list[dict[str, Any]],
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
    spread = row[metric]
    lines.setdefault(label, []).append((float(row[x_key]), spread.mean, spread.sd))
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
  print(write(Path(f.sweep_dir), columns, table, f.over), end="")
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
