"""Metric logging: JSON lines + TensorBoard, a progress line, and a PNG of the curves.

`DIR/metrics.jsonl` holds one `{"step": s, name: value, ...}` object per write;
a resumed run appends, and readers keep the last value per (step, name), so a
re-done step after a preemption does not plot twice. The workdir may be local
or on an object store (`gs://`; see `MetricWriter`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import importlib
import io
import json
import math
import os
from pathlib import Path
import shutil
import sys
import tempfile
import time
from typing import Any

from etils import epath
import numpy as np

from mmtl import workdir as workdir_lib

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
TB_DIR = "tb"


def quiet_library_logs() -> None:
  """absl INFO logs of orbax/TFDS drown the progress lines; keep WARNING and up
  unless --verbosity was given."""
  from absl import flags, logging

  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def _scalar(value: Any) -> float:
  return float(np.asarray(value))


class MetricWriter:
  """Writes scalars to `DIR/metrics.jsonl` and TensorBoard, and prints progress.

  Only the main process (`is_main`) writes; others make every call a no-op so
  the trainer needs no `if process_index == 0` around logging. Each write
  reaches metrics.jsonl before `write` returns, in a local or a gs:// workdir
  (`_ObjectStoreLog`). `config` (JSON) goes to TensorBoard's text tab at the first step,
  the final metrics table at `close(final)`; `trackers` (mmtl.tracking: W&B, MLflow) get
  the same scalars, and the final table when they close.
  """

  def __init__(
    self,
    workdir: str,
    *,
    total_steps: int,
    batch_size: int,
    first_step: int = 0,
    is_main: bool = True,
    config: Mapping[str, Any] | None = None,
    trackers: Sequence[Any] = (),
  ):
    self.total_steps, self.batch_size, self.is_main = total_steps, batch_size, is_main
    self._last_step, self._last_time = first_step, None
    self._log, self._trackers = None, list(trackers) if is_main else []
    if is_main:
      self._log = (_ObjectStoreLog if workdir_lib.is_remote(workdir) else _LocalLog)(workdir)
      if config is not None:
        self._log.text("config", _markdown_code(json.dumps(config, indent=2)), first_step)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.is_main or not metrics:
      return
    values = {k: _scalar(v) for k, v in metrics.items()}
    self._log.write(int(step), values, json.dumps({"step": int(step), **values}) + "\n")
    for tracker in self._trackers:
      tracker.log(int(step), values)

  def progress(self, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
    """Prints `step s/N | name value ... | steps/s | examples/s | ETA` and returns
    the speed numbers (for logging). Speed is measured between consecutive calls;
    the first call only starts the clock, so compilation does not count."""
    now = time.perf_counter()
    speed = {}
    if self._last_time is not None and step > self._last_step:
      steps_per_s = (step - self._last_step) / (now - self._last_time)
      speed = {"steps_per_s": steps_per_s, "examples_per_s": steps_per_s * self.batch_size}
    self._last_step, self._last_time = step, now
    if self.is_main:
      parts = [f"step {step}/{self.total_steps}"]
      parts += [f"{k} {_scalar(v):.4g}" for k, v in metrics.items()]
      if speed:
        eta = (self.total_steps - step) / speed["steps_per_s"]
        parts += [
          f"{speed['steps_per_s']:.2f} steps/s",
          f"{speed['examples_per_s']:.0f} ex/s",
          f"ETA {format_duration(eta)}",
        ]
      print(" | ".join(parts), flush=True)
    return speed

  def close(self, final: Mapping[str, float] | None = None) -> None:
    """Closes the logs; `final` (the run's final metrics) also goes to TensorBoard's text
    tab and the trackers. Without it (a stopped run) the trackers mark the run unfinished."""
    if not self.is_main:
      return
    if final is not None:
      table = _markdown_code(format_table(final))
      self._log.text("final_metrics", table, int(final.get("step", self._last_step)))
    self._log.close()
    for tracker in self._trackers:
      tracker.close(final)


def _markdown_code(text: str) -> str:
  """`text` as a Markdown code block: TensorBoard renders its text tab as Markdown."""
  return "```\n" + text + "\n```"


def tensorboardx(module: str = "tensorboardX") -> Any:
  """A tensorboardX module, imported without torch where torch is not imported already.

  tensorboardX imports torch whenever it is installed (to accept torch tensors), which
  costs a trainer process about 2 s; mmtl logs Python floats. A `None` entry in
  sys.modules makes that one optional import fail as if torch were absent, and is removed
  again, so torch stays importable for everything else."""
  if "torch" in sys.modules:
    return importlib.import_module(module)
  sys.modules["torch"] = None  # type: ignore[assignment]
  try:
    return importlib.import_module(module)
  finally:
    del sys.modules["torch"]


class _LocalLog:
  """metrics.jsonl appended to (and flushed) at every write; tensorboardX events."""

  def __init__(self, workdir: str):
    self._file = workdir_lib.path(workdir, METRICS_FILE).open("a")
    writer = tensorboardx().SummaryWriter
    self._tb = writer(os.fspath(workdir_lib.path(workdir, TB_DIR)))

  def write(self, step: int, values: Mapping[str, float], line: str) -> None:
    self._file.write(line)
    self._file.flush()
    for name, value in values.items():
      self._tb.add_scalar(name, value, step)

  def text(self, tag: str, text: str, step: int) -> None:
    self._tb.add_text(tag, text, step)

  def close(self) -> None:
    self._file.close()
    self._tb.close()


class _ObjectStoreLog:
  """The same files in a gs:// (object store) workdir, uploaded whole at every write.

  Objects cannot be appended to, so metrics.jsonl is kept in memory, starting
  from the existing object (a resumed run keeps the lines of the interrupted
  one, as a local append does). tensorboardX reaches gs:// only through
  google-cloud-storage, and its SummaryWriter queues events for a background
  thread that cannot be waited on, so the events are written synchronously to
  a file in a local temporary directory (`EventsWriter`, what SummaryWriter
  uses underneath), which is copied to `DIR/tb/`. Both files are small (about
  100 bytes per metric and logged step); a log step costs two uploads.
  """

  def __init__(self, workdir: str):
    events_writer = tensorboardx("tensorboardX.event_file_writer").EventsWriter
    self._path = workdir_lib.path(workdir, METRICS_FILE)
    self._lines = [self._path.read_text()] if self._path.exists() else []
    self._tb_dir = workdir_lib.path(workdir, TB_DIR)
    self._tmp = tempfile.mkdtemp(prefix="mmtl_tb_")
    self._events = events_writer(os.path.join(self._tmp, "events"))

  def write(self, step: int, values: Mapping[str, float], line: str) -> None:
    from tensorboardX.proto import event_pb2
    from tensorboardX.summary import scalar

    self._lines.append(line)
    for name, value in values.items():
      self._events.write_event(
        event_pb2.Event(wall_time=time.time(), step=step, summary=scalar(name, value))
      )
    self._upload()

  def text(self, tag: str, text: str, step: int) -> None:
    from tensorboardX.proto import event_pb2
    from tensorboardX.summary import text as text_summary

    self._events.write_event(
      event_pb2.Event(wall_time=time.time(), step=step, summary=text_summary(tag, text))
    )

  def _upload(self) -> None:
    workdir_lib.write_text(self._path, "".join(self._lines))
    self._events.flush()
    for name in os.listdir(self._tmp):
      (self._tb_dir / name).write_bytes(Path(self._tmp, name).read_bytes())

  def close(self) -> None:
    self._upload()  # Also when nothing was written: the event file exists, as locally.
    self._events.close()
    shutil.rmtree(self._tmp, ignore_errors=True)


def mean_and_ci95(values: Sequence[float]) -> tuple[float, float]:
  """The mean of `values` and the half-width of its 95% confidence interval, Student's t
  with n - 1 degrees of freedom (scipy): t(0.975, n-1) sd / sqrt(n); NaN for one value."""
  from scipy import stats

  x = np.asarray(values, np.float64)
  if len(x) < 2:
    return float(x.mean()), float("nan")
  return float(x.mean()), float(stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))


def format_duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def read(workdir: str) -> dict[str, dict[int, float]]:
  """`{name: {step: value}}` from `DIR/metrics.jsonl` (last write per step wins)."""
  curves: dict[str, dict[int, float]] = {}
  path = workdir_lib.path(workdir, METRICS_FILE)
  if not path.exists():
    return curves
  for line in path.read_text().splitlines():
    record = json.loads(line)
    step = record.pop("step")
    for name, value in record.items():
      curves.setdefault(name, {})[step] = value
  return curves


def _pyplot() -> Any:
  """matplotlib.pyplot, drawing to files (no display)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _figure_bytes(fig: Any) -> bytes:
  """The figure as PNG bytes (closed: pyplot keeps no reference)."""
  png = io.BytesIO()
  fig.tight_layout()
  fig.savefig(png, format="png", dpi=100)
  _pyplot().close(fig)
  return png.getvalue()


def plot_curves(workdir: str) -> str:
  """Writes `DIR/curves.png`: one panel per metric kind (the part after the last
  `/`), so `train/loss`, `val/loss` share a panel and `val/accuracy`,
  `test/accuracy` another."""
  plt = _pyplot()
  curves = {k: v for k, v in read(workdir).items() if not k.startswith("speed/")}
  groups: dict[str, list[str]] = {}
  for name in curves:
    groups.setdefault(name.split("/")[-1], []).append(name)
  cols = min(3, max(len(groups), 1))
  rows = max(math.ceil(len(groups) / cols), 1)
  fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.5 * rows), squeeze=False)
  for ax, (group, names) in zip(axes.flat, groups.items()):
    for name in names:
      steps = sorted(curves[name])
      ax.plot(
        steps, [curves[name][s] for s in steps], label=name, marker="o" if len(steps) < 20 else None
      )
    ax.set_title(group)
    ax.set_xlabel("step")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(groups) :]:
    ax.axis("off")
  path = workdir_lib.path(workdir, CURVES_FILE)
  path.write_bytes(_figure_bytes(fig))
  return os.fspath(path)


def plot_confusion_matrix(
  file: epath.PathLike, matrix: Sequence[Sequence[int]], classes: Sequence[str], title: str
) -> None:
  """The confusion matrix as a PNG: rows true classes, columns predicted, each cell the
  share of its row (its count written in it up to 20 classes)."""
  plt = _pyplot()
  counts = np.asarray(matrix, np.float64)
  shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
  n = len(classes)
  size = min(3 + 0.45 * n, 14)
  fig, ax = plt.subplots(figsize=(size + 1, size))
  image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
  fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
  if n <= 50:
    ax.set_xticks(range(n), classes, rotation=90, fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
  if n <= 20:
    for (i, j), count in np.ndenumerate(counts):
      colour = "white" if shares[i, j] > 0.5 else "black"
      ax.text(j, i, f"{count:.0f}", ha="center", va="center", fontsize=7, color=colour)
  ax.set_xlabel("predicted")
  ax.set_ylabel("true")
  ax.set_title(f"{title}: confusion matrix ({int(counts.sum())} examples)", fontsize=10)
  epath.Path(file).write_bytes(_figure_bytes(fig))


def plot_attention(
  file: epath.PathLike, image: np.ndarray, maps: Mapping[str, np.ndarray], title: str
) -> None:
  """One example as a PNG: its image, then each map (a (h, w) patch grid, e.g. an
  attention rollout) over the image as a heatmap of its patches, scaled to its own range."""
  plt = _pyplot()
  image = np.asarray(image, np.float32)
  image = (image - image.min()) / max(float(image.max() - image.min()), 1e-6)  # for display
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  fig, axes = plt.subplots(1, 1 + len(maps), figsize=(2.6 * (1 + len(maps)), 3.0), squeeze=False)
  axes[0, 0].imshow(image)
  axes[0, 0].set_title("input", fontsize=8)
  extent = (-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5)  # imshow's pixel edges
  for ax, (name, grid) in zip(axes[0, 1:], maps.items()):
    grid = np.asarray(grid, np.float32)
    grid = (grid - grid.min()) / max(float(grid.max() - grid.min()), 1e-12)
    ax.imshow(image)
    ax.imshow(grid, cmap="inferno", alpha=0.6, extent=extent, interpolation="nearest")  # patches
    ax.set_title(name, fontsize=8)
  for ax in axes.flat:
    ax.axis("off")
  fig.suptitle(title, fontsize=8)
  epath.Path(file).write_bytes(_figure_bytes(fig))


def plot_reliability(file: epath.PathLike, bins: Mapping[str, Any], title: str) -> None:
  """The reliability diagram of `mmtl.evaluators.calibration`'s bins: accuracy against
  confidence per bin (the diagonal: perfect calibration), and how many examples each
  bin holds."""
  plt = _pyplot()
  edges, count = np.asarray(bins["edges"]), np.asarray(bins["count"])
  centres, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
  used = count > 0
  fig, (top, bottom) = plt.subplots(
    2, 1, figsize=(4.5, 5.5), sharex=True, gridspec_kw=dict(height_ratios=(3, 1))
  )
  top.bar(
    centres[used],
    np.asarray(bins["accuracy"])[used],
    width=width[used],
    edgecolor="black",
    label="accuracy",
  )
  top.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
  top.plot(centres[used], np.asarray(bins["confidence"])[used], "r.", label="mean confidence")
  top.set_ylabel("accuracy")
  top.set_ylim(0, 1)
  top.legend(fontsize=8, loc="upper left")
  top.set_title(f"{title}: ECE {bins['ece']:.3f} ({len(count)} equal-width bins)", fontsize=10)
  bottom.bar(centres, count, width=width, color="grey")
  bottom.set_xlabel("confidence (top-class probability)")
  bottom.set_ylabel("examples")
  bottom.set_xlim(0, 1)
  epath.Path(file).write_bytes(_figure_bytes(fig))


def format_table(metrics: Mapping[str, float], title: str = "Final metrics") -> str:
  """A two-column Markdown table of a flat metrics dict."""
  width = max([len(k) for k in metrics] + [6])
  lines = [
    f"{title}",
    f"| {'metric':<{width}} | {'value':>8} |",
    f"|{'-' * (width + 2)}|{'-' * 10}|",
  ]
  lines += [f"| {k:<{width}} | {v:>8.4f} |" for k, v in metrics.items()]
  return "\n".join(lines)
