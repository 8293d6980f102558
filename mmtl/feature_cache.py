"""A locked tower computed once: its outputs cached on disk, exact, shared between runs.

A tower whose output for an example never changes during a run is run once per example
of each input split the run reads (training, evaluation), before training; the training
step and the evaluators then read its outputs from the batch
(`mmtl.models.fusion.cached_field`) instead of running it. `config.feature_cache.enable`
turns this on; the towers it applies to are those where nothing varies (`plan`):
- every param frozen in every unfreezing phase of the run (no LoRA on it either),
- run in inference mode (`config.model.frozen_tower_mode="inference"`; no BatchNorm
  statistics updated, `config.model.batch_stats` is not "all"),
- the training input of its modality is the one evaluation preprocessing gives
  (`Modality.training_randomness`: no augmentation, random crops or random text choice),
- the fusion reads its output only (bottleneck fusion runs the towers' layers together),
  and no distillation teacher (which reads the raw inputs); the grain loader.
A run that cannot cache a tower says why at start-up and runs it as usual.

Stored: per (tower, input split) an entry `<dir>/<modality>-<key>/` holding the outputs
the fusion and head read (`pooled` (N, D), and `tokens` (N, T, D) + `mask` (N, T) where they
read token sequences: `Fusion.reads_tokens`, `Head.reads_tokens`), in the model's dtype,
rows in the split's order, as raw arrays (`<part>.bin`) and `meta.json` (the key, shapes,
dtypes, sha256 of each file), written last: an entry without it is incomplete.

The key is a sha256 of everything the outputs depend on: the tower's params and BatchNorm
statistics as the run holds them (its checkpoint, or its random init), its config
(`config.model.towers.<m>`, dtypes), the parts stored, the modality's preprocessing
(`config.input.<m>`, its field, eval_text) and the dataset (name and version, split,
data_dir, builder config, example count). Any change gives another key; a read checks the
entry's meta.json against the key and each file's size and checksum, and a missing entry
names how the closest entry of that tower on that split differs. A truncated or corrupt
entry is recomputed.

Filling runs the tower jitted over the mesh in batches of config.batch_size (the shapes
the step runs it on: on CPU the features are bit-identical to the step's), sharded as in
evaluation, every process its slice; a lock file per entry lets one run fill it while
other runs wait and then read it (`launch/sweep.py` and `launch/search.py` give their
runs one directory: `$MMTL_FEATURE_CACHE_DIR`), and progress is saved every few seconds,
so a fill that is killed continues where it stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
import contextlib
import fcntl
import functools
import hashlib
import json
import os
from pathlib import Path
import shutil
import time
from typing import Any

import jax
from jax.experimental import multihost_utils
import ml_collections as mlc
import numpy as np

from mmtl import config_keys, heads, memory, optim, rules, sharding, train_step
from mmtl import metrics as metrics_lib
from mmtl import workdir as workdir_lib
from mmtl.data import corruptions, loader, options, source
from mmtl.data import device as data_device
from mmtl.modalities import MODALITIES
from mmtl.models import fusion

ENV_DIR = "MMTL_FEATURE_CACHE_DIR"  # the directory runs share when config.feature_cache.dir=""
DIR_NAME = "feature_cache"  # in the workdir, when neither is set
FORMAT = 1  # of the stored entries; part of the key
META_FILE, PROGRESS_FILE = "meta.json", "progress.json"
SAVE_EVERY_S = 10.0  # fill progress saved this often

Features = loader.Features


def directory(config: mlc.ConfigDict, workdir: str) -> Path:
  """Where the entries live: config.feature_cache.dir, else $MMTL_FEATURE_CACHE_DIR, else
  `<workdir>/feature_cache` (a local or mounted filesystem: entries are memory-mapped)."""
  chosen = config.feature_cache.dir or os.environ.get(ENV_DIR) or ""
  where = chosen or os.fspath(workdir_lib.path(workdir, DIR_NAME))
  if config.feature_cache.enable and workdir_lib.is_remote(where):
    raise config_keys.ConfigError(
      f"The feature cache would be in {where}, but its entries are memory-mapped files: set "
      "config.feature_cache.dir to a local (or mounted) directory."
    )
  return Path(where).absolute()


def plan(
  config: mlc.ConfigDict, model: fusion.FusionModel, layout: Any
) -> tuple[tuple[str, ...], dict[str, str]]:
  """(the modalities whose towers the run caches, {modality: why its tower is not cached})
  for a run with `config.feature_cache.enable`."""
  cfg = options.input_config(config.input)
  everyone = None
  if cfg.loader != "grain":
    everyone = f"config.input.loader={cfg.loader!r} (only the grain loader reads cached rows)"
  elif issubclass(fusion.FUSIONS[model.fusion_type], fusion.BottleneckFusion):
    everyone = "bottleneck fusion runs the towers' top layers together with the other towers"
  elif config.distill:
    everyone = "the distillation teacher reads the towers' inputs"
  elif config.model.frozen_tower_mode != "inference":
    everyone = "config.model.frozen_tower_mode='train' runs frozen towers with dropout"
  used = [m for m in model.modalities if cfg.fields.get(m)]
  if everyone:
    return (), dict.fromkeys(used, everyone)
  starts = [0] + [b for b in optim.phase_boundaries(config.optim) if b < config.total_steps]
  locked = set(used)
  trains_at = {}
  for start in starts:
    mask = optim.freeze_mask(layout.shapes, config.optim, start, new_layers=layout.new_layers)
    now = set(train_step.locked_towers(model, mask))
    trains_at.update({m: start for m in locked - now})
    locked &= now
  stats = rules.flatten(layout.batch_stats)
  reasons = {}
  for m in used:
    if m in trains_at:
      reasons[m] = (
        "it trains"
        if trains_at[m] == 0
        else f"gradual unfreezing trains it from step {trains_at[m]}"
      )
    elif config.model.batch_stats == "all" and any(p.startswith(f"{m}_encoder/") for p in stats):
      reasons[m] = "config.model.batch_stats='all' updates its BatchNorm statistics"
    elif why := _training_randomness(cfg, m):
      reasons[m] = why
  return tuple(m for m in used if m not in reasons), reasons


def _training_randomness(cfg: mlc.ConfigDict, m: str) -> str | None:
  if names := corruptions.modalities_changed(cfg.corruptions).get(m):
    return f"config.input.corruptions ({', '.join(names)}) change its inputs in training"
  feature = source.feature_at(source.builder(cfg).info.features, cfg.fields[m])
  return MODALITIES[m](cfg, feature, train=True).training_randomness()


def parts(model: fusion.FusionModel) -> tuple[str, ...]:
  """The tower outputs stored: tokens too where the fusion or the head reads them."""
  reads_tokens = fusion.FUSIONS[model.fusion_type].reads_tokens or (
    heads.get(model.head_type).reads_tokens
  )
  return fusion.CACHED_PARTS if reads_tokens else ("pooled",)


def params_digest(variables: Mapping[str, Any], m: str) -> str:
  """sha256 of tower `m`'s params and BatchNorm statistics in `variables` (paths, dtypes,
  values): the weights part of an entry's key."""
  h = hashlib.sha256()
  for collection in ("params", "batch_stats"):
    for path, x in sorted(rules.flatten(variables.get(collection, {})).items()):
      if path.startswith(f"{m}_encoder/"):
        h.update(f"{collection}/{path}:{x.dtype}:{x.shape}".encode())
        h.update(np.ascontiguousarray(_host(x)).tobytes())
  return h.hexdigest()


def _host(x: Any) -> np.ndarray:
  """The whole of a (possibly multi-host) array, on this host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def entry_key(
  input_cfg: Mapping[str, Any], m: str, config: mlc.ConfigDict, stored: tuple[str, ...], digest: str
) -> dict[str, Any]:
  """What tower `m`'s outputs on `input_cfg`'s split depend on (JSON-able)."""
  cfg = options.input_config(input_cfg)
  b = source.builder(cfg)
  return _plain(
    dict(
      format=FORMAT,
      modality=m,
      params=digest,
      tower=config.model.towers[m],
      dtype=str(config.model.dtype),
      param_dtype=str(config.model.param_dtype),
      parts=list(stored),
      field=cfg.fields[m],
      preprocessing=cfg.get(m),
      eval_text=cfg.eval_text if m == "text" else None,
      dataset=b.info.full_name,
      split=cfg.split,
      data_dir=cfg.data_dir,
      builder_config=cfg.builder_config,
      fold=cfg.fold,
      examples=source.num_examples(cfg),
    )
  )


def _plain(x: Any) -> Any:
  """`x` as JSON gives it back (ConfigDicts as dicts, tuples as lists): how keys compare."""
  return json.loads(
    json.dumps(x, default=lambda v: v.to_dict() if hasattr(v, "to_dict") else str(v))
  )


def _name(key: Mapping[str, Any]) -> str:
  blob = json.dumps(key, sort_keys=True).encode()
  return f"{key['modality']}-{hashlib.sha256(blob).hexdigest()[:20]}"


class FeatureCache:
  """The run's cached towers: `fill` their entries (once the params exist), then
  `features(input_cfg)` gives the loader their rows for an input split."""

  def __init__(
    self,
    config: mlc.ConfigDict,
    model: fusion.FusionModel,
    layout: Any,
    root: Path,
    note: Callable[[str], None] = print,
  ):
    self.config, self.root, self.note = config, root, note
    self.modalities, self.reasons = (
      plan(config, model, layout) if config.feature_cache.enable else ((), {})
    )
    self.stored = parts(model)
    self._towers = {m: _tower_fn(model, m, self.stored) for m in self.modalities}
    if self.modalities:
      _check_writable(root)
    self._digests: dict[str, str] = {}
    self._tables: dict[str, dict[str, np.ndarray]] = {}  # entry name -> {batch field: rows}

  def describe(self) -> str:
    """The start-up lines: what is cached, where, and why other towers are not."""
    if not self.config.feature_cache.enable:
      return ""
    lines = [f"Feature cache {self.root}:"]
    lines += [f"  {m} tower: cached ({', '.join(self.stored)})" for m in self.modalities]
    lines += [f"  {m} tower: not cached: {why}" for m, why in self.reasons.items()]
    return "\n".join(lines)

  def _keys(self, input_cfg: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    cfg = options.input_config(input_cfg)
    return {
      m: entry_key(cfg, m, self.config, self.stored, self._digests[m])
      for m in self.modalities
      if cfg.fields.get(m) and m in self._digests
    }

  def fill(
    self,
    variables: Mapping[str, Any],
    inputs: Iterable[Mapping[str, Any]],
    mesh: jax.sharding.Mesh,
    batch_size: int,
  ) -> None:
    """Reads, or computes and stores, the cached towers' outputs on every split of
    `inputs` (input configs) with the model's `variables`."""
    if not self.modalities:
      return
    self._digests = {m: params_digest(variables, m) for m in self.modalities}
    merged = heads.merged(variables)
    for input_cfg in inputs:
      for m, key in self._keys(input_cfg).items():
        name = _name(key)
        if name in self._tables:
          continue
        start = time.time()
        entry = self.root / name
        compute = functools.partial(
          _fill, entry, key, self._towers[m], merged, input_cfg, mesh, batch_size, self.note
        )
        filled, how = _open_or_fill(entry, key, compute, self.note)
        self._tables[name] = {fusion.cached_field(m, p): a for p, a in filled.items()}
        size = memory.human_bytes(sum(a.nbytes for a in filled.values()))
        self.note(
          f"  {m} features of {key['dataset']} {key['split']!r} ({key['examples']} examples): "
          f"{how} {entry.name} ({size}) in {time.time() - start:.1f} s"
        )

  def features(self, input_cfg: Mapping[str, Any]) -> Features | None:
    """{modality: {batch field: rows}} of the cached towers on `input_cfg`'s split (None:
    nothing filled for it; its towers run)."""
    out = {
      m: self._tables[_name(key)]
      for m, key in self._keys(input_cfg).items()
      if _name(key) in self._tables
    }
    return out or None


def _check_writable(root: Path) -> None:
  """A ConfigError unless `root` is, or can be made, a writable directory; writes nothing
  (the run is still being validated)."""
  existing = root
  while not existing.exists():
    existing = existing.parent
  if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
    raise config_keys.ConfigError(
      f"Cannot create the feature cache directory {root} ({existing} is not a writable "
      "directory): set config.feature_cache.dir to a writable directory."
    )


def _is_main() -> bool:
  return jax.process_index() == 0


def _agree(value: int) -> int:
  """Process 0's `value` on every process."""
  if jax.process_count() == 1:
    return value
  return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


@contextlib.contextmanager
def _entry_lock(entry: Path, note: Callable[[str], None]):
  """The entry's lock (process 0 takes it; a flock, released if its holder dies): one run
  fills an entry, the others wait for it."""
  if not _is_main():
    yield
    return
  entry.parent.mkdir(parents=True, exist_ok=True)
  with open(entry.parent / f"{entry.name}.lock", "a") as f:
    waited = False
    while True:
      try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except BlockingIOError:
        if not waited:
          note(f"  waiting for {entry.name}: another run is filling it")
          waited = True
        time.sleep(0.5)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _open_or_fill(
  entry: Path, key: dict[str, Any], compute: Callable[[], str], note: Callable[[str], None]
) -> tuple[dict[str, np.ndarray], str]:
  """The entry's arrays, and how they came: "read", or what `compute` (which fills it)
  says."""
  how = "read"
  with _entry_lock(entry, note):
    complete = 0
    if _is_main():
      problem = _check(entry, key)
      complete = problem is None
      if problem and problem != "missing":
        note(f"  {entry.name}: {problem}; recomputing it")
        (entry / META_FILE).unlink(missing_ok=True)
      elif problem == "missing" and (other := _closest(entry.parent, key)):
        note(f"  no entry for this key; {other}")
    if not _agree(int(complete)):
      how = compute()
  if jax.process_count() > 1:  # every process reads what process 0 wrote
    multihost_utils.sync_global_devices(f"mmtl.feature_cache.{entry.name}")
  return _read(entry), how


def _check(entry: Path, key: Mapping[str, Any]) -> str | None:
  """None if the entry is complete and intact, else what is wrong with it."""
  try:
    meta = json.loads((entry / META_FILE).read_text())
  except FileNotFoundError:
    return "missing"
  except ValueError:
    return "its meta.json is unreadable"
  if meta.get("key") != key:
    differs = ", ".join(_differences(meta.get("key") or {}, key))
    return f"its meta.json is of another key (it differs in {differs})"
  for part, spec in meta["arrays"].items():
    file = entry / f"{part}.bin"
    want = int(np.prod(spec["shape"])) * np.dtype(spec["dtype"]).itemsize
    size = file.stat().st_size if file.exists() else 0
    if size != want:
      return f"{file.name} is truncated ({size} of {want} bytes)"
    if _sha256(file) != spec["sha256"]:
      return f"{file.name} does not match its checksum"
  return None


def _differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
  return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _closest(root: Path, key: Mapping[str, Any]) -> str | None:
  """How the nearest complete entry in `root` of the same tower on the same split differs
  from `key` (the entry a user expected to be reused)."""
  best = None
  for meta_file in root.glob(f"{key['modality']}-*/{META_FILE}"):
    try:
      other = json.loads(meta_file.read_text()).get("key") or {}
    except ValueError:
      continue
    if (other.get("dataset"), other.get("split")) != (key["dataset"], key["split"]):
      continue
    diff = _differences(other, key)
    if best is None or len(diff) < len(best[1]):
      best = (meta_file.parent.name, diff)
  if best is None:
    return None
  return f"not reusing {best[0]}, whose key differs in {', '.join(best[1])}"


def _sha256(file: Path) -> str:
  h = hashlib.sha256()
  with open(file, "rb") as f:
    for chunk in iter(functools.partial(f.read, 1 << 24), b""):
      h.update(chunk)
  return h.hexdigest()


def _dtype(name: str) -> np.dtype:
  return jax.numpy.dtype(name)  # knows bfloat16 (ml_dtypes)


def _read(entry: Path) -> dict[str, np.ndarray]:
  """The entry's arrays, memory-mapped read-only (every process reads the file)."""
  meta = json.loads((entry / META_FILE).read_text())
  return {
    part: np.memmap(
      entry / f"{part}.bin", dtype=_dtype(spec["dtype"]), mode="r", shape=tuple(spec["shape"])
    )
    for part, spec in meta["arrays"].items()
  }


def _tower_fn(model: fusion.FusionModel, m: str, stored: tuple[str, ...]) -> Callable[..., Any]:
  """The jitted tower `m` of `model` giving the `stored` parts (made once per run: every
  split it fills has the run's batch size, so it compiles once)."""

  def run(variables, batch):
    return {
      p: x
      for p, x in model.apply(variables, batch, m, method=type(model).tower_outputs).items()
      if p in stored
    }

  return jax.jit(run)


def _fill(
  entry: Path,
  key: dict[str, Any],
  run: Callable[..., Any],
  variables: Mapping[str, Any],
  input_cfg: Mapping[str, Any],
  mesh: jax.sharding.Mesh,
  batch_size: int,
  note: Callable[[str], None],
) -> str:
  """Runs the tower (`run`: `_tower_fn`'s) over the split (only its modality read), writing
  rows in the split's order, with its progress (and ETA) noted every SAVE_EVERY_S; resumes
  from the progress a killed fill saved. Says which it did."""
  m = key["modality"]
  cfg = options.input_config(input_cfg).to_dict()
  cfg.update(
    fields={**dict.fromkeys(cfg["fields"]), m: cfg["fields"][m]},
    blank=(),
    modality_dropout=dict.fromkeys(cfg["modality_dropout"], 0.0),
    cache=False,
  )
  process_index, process_count = sharding.process_data_shard(mesh)
  n = int(key["examples"])
  local = batch_size // process_count
  num_batches = loader.eval_num_batches(n, batch_size=local, process_count=process_count)
  name = _name(key)
  progress = None
  if _is_main():
    entry.mkdir(parents=True, exist_ok=True)
    try:
      progress = json.loads((entry / PROGRESS_FILE).read_text())
    except (FileNotFoundError, ValueError):
      pass
    if not progress or progress.get("entry") != name:
      progress = None
  done = _agree(progress["batches"] if progress else 0)
  batches = loader.make_eval_iterator(
    cfg,
    batch_size=local,
    process_index=process_index,
    process_count=process_count,
    start_batch=done,
  )
  arrays: dict[str, np.memmap] = {}
  if progress:  # a killed fill's rows so far
    arrays = {
      p: np.memmap(
        entry / f"{p}.bin.partial", dtype=_dtype(s["dtype"]), mode="r+", shape=tuple(s["shape"])
      )
      for p, s in progress["arrays"].items()
    }
  started = saved = time.time()
  for k, host in enumerate(batches, start=done):
    out = {p: _host(x) for p, x in run(variables, data_device.put_batch(host, mesh)).items()}
    rows = np.arange(len(next(iter(out.values()))))
    proc, j = rows // local, rows % local  # global row -> (process, row of its batch)
    index = (k * local + j) * process_count + proc  # -> example of the split
    real = index < n
    if not _is_main():
      continue
    if not arrays:
      specs = {p: jax.ShapeDtypeStruct((n, *x.shape[1:]), x.dtype) for p, x in out.items()}
      _check_space(entry, specs)
      arrays = {
        p: np.memmap(entry / f"{p}.bin.partial", dtype=s.dtype, mode="w+", shape=s.shape)
        for p, s in specs.items()
      }
    for p, x in out.items():
      arrays[p][index[real]] = x[real]
    if time.time() - saved > SAVE_EVERY_S and k + 1 < num_batches:
      _save_progress(entry, name, arrays, k + 1)
      saved = time.time()
      rate = (k + 1 - done) / (saved - started)
      note(
        f"  {name}: batch {k + 1}/{num_batches}, {rate * batch_size:.0f} examples/s, "
        f"ETA {metrics_lib.format_duration((num_batches - k - 1) / rate)}"
      )
  how = f"computed (from batch {done} of {num_batches})" if done else "computed"
  if not _is_main():
    return how
  specs = {}
  for p, a in arrays.items():
    a.flush()
    partial = entry / f"{p}.bin.partial"
    specs[p] = dict(shape=list(a.shape), dtype=a.dtype.name, sha256=_sha256(partial))
    partial.replace(entry / f"{p}.bin")
  meta = dict(key=key, arrays=specs)
  workdir_lib.write_text(entry / META_FILE, json.dumps(meta, indent=1))
  (entry / PROGRESS_FILE).unlink(missing_ok=True)
  return how


def _check_space(entry: Path, specs: Mapping[str, jax.ShapeDtypeStruct]) -> None:
  """A ConfigError, before writing, when the entry's arrays (by part) would not fit on its
  filesystem."""
  need = sum(memory.nbytes(s) for s in specs.values())
  free = shutil.disk_usage(entry).free
  if need > free:
    raise config_keys.ConfigError(
      f"The feature cache entry {entry} needs {memory.human_bytes(need)}, and its filesystem "
      f"has {memory.human_bytes(free)} free: free space there, set config.feature_cache.dir "
      "to a larger disk, or run without the cache."
    )


def _save_progress(entry: Path, name: str, arrays: Mapping[str, np.memmap], batches: int) -> None:
  for a in arrays.values():
    a.flush()
  specs = {p: dict(shape=list(a.shape), dtype=a.dtype.name) for p, a in arrays.items()}
  progress = dict(entry=name, batches=batches, arrays=specs)
  workdir_lib.write_text(entry / PROGRESS_FILE, json.dumps(progress))
