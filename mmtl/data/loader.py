"""Which batches each process yields, in which order: the train and eval iterators.

Loader: grain over `tfds.data_source` (array_record, no TensorFlow needed) by
default; `loader="tf"` reads tfrecord-only datasets with tf.data where
TensorFlow is installed (`mmtl.data.tf_loader`). Both loaders share the numpy
preprocessing of `mmtl.data.transforms`, so batches are identical.

Training order (grain): the whole split, decoded -> shuffle -> repeat (or class-balanced
epochs, mmtl.data.sampling) ->
per-example random_map (crop/resize, draw augmentation and modality dropout
decisions from the element's own RNG) -> batch -> this process's share of each
global batch -> per-batch map (colour jitter, flip, normalize, blanking) ->
[threads/processes] -> batch tokenization. The shuffle seed and each element's
RNG depend only on (seed, position in the global stream), so global batch k is
a pure function of (seed, global batch size, k), whatever the number of
processes: a 2-host run sees the 1-host run's batches, split row-wise. The
grain iterator state (a small JSON-able dict) is the global step, so it resumes
at exactly the same example, on any number of processes (see
mmtl/checkpoint.py). The tf.data loader shards per process instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
import math
from typing import Any

from absl import flags
import grain
import ml_collections
import numpy as np

from mmtl import config_keys
from mmtl.data import options, source, tf_loader, transforms


def _grain_seed(seed: int) -> int:
  """config.seed -> grain's 32-bit seed; the same on every process."""
  return int(np.random.SeedSequence(seed).generate_state(1)[0])


def _check_process(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise config_keys.ConfigError(
      f"process_index={process_index} must be in [0, process_count={process_count})."
    )


def _check_loader(cfg: ml_collections.ConfigDict) -> None:
  if cfg.loader != "grain":
    raise config_keys.ConfigError(f"config.input.loader={cfg.loader!r}; choose 'grain' or 'tf'.")


def _to_iterator(
  ds: grain.MapDataset, cfg: ml_collections.ConfigDict, pre: transforms.Preprocess
) -> grain.DatasetIterator:
  read = grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch)
  ds = ds.to_iter_dataset(read)
  ds = ds.map(pre.tokenize)  # Once per batch; in the consumer thread or in the workers.
  if cfg.num_workers:
    if not flags.FLAGS.is_parsed():  # grain workers read absl flags; outside absl.app use defaults.
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
  return iter(ds)


# Cached tower outputs of a split (mmtl.feature_cache): {modality: {batch field: array
# (examples, ...) in the split's order}}.
Features = Mapping[str, Mapping[str, np.ndarray]]


def _decode_fn(
  pre: transforms.Preprocess, src: Any, features: Features | None
) -> Callable[[int], dict[str, Any]]:
  """Example i of `src` decoded, with its rows of `features`."""
  arrays = {k: a for fields in (features or {}).values() for k, a in fields.items()}
  if bad := {k: len(a) for k, a in arrays.items() if len(a) != len(src)}:
    raise ValueError(f"Cached features {bad} do not have one row per example ({len(src)}).")

  def decode(i: int) -> dict[str, Any]:
    ex = pre.decode(src[i])
    if arrays:
      ex[transforms.CACHED_ROWS] = {k: np.asarray(a[i]) for k, a in arrays.items()}
    return ex

  return decode


def _decoded(
  cfg: ml_collections.ConfigDict,
  pre: transforms.Preprocess,
  src: Any,
  process_index: int = 0,
  process_count: int = 1,
  features: Features | None = None,
) -> grain.MapDataset:
  """The slice `process_index::process_count` of `src` (default: all of it), decoded, with
  each example's rows of `features` (and held in memory when cfg.cache)."""
  decode = _decode_fn(pre, src, features)
  ds = grain.MapDataset.range(len(src))[process_index::process_count].map(decode)
  if cfg.cache:
    ds = grain.MapDataset.source(list(ds))
  return ds


def make_train_iterator(
  input_cfg: Mapping[str, Any],
  *,
  batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  features: Features | None = None,
) -> Iterator[transforms.Batch]:
  """Endless, shuffled (reshuffled per epoch), augmented batches: this process's share.

  `batch_size` is per process; the global batch is B = batch_size *
  process_count. With grain, all processes shuffle the whole split the same way
  and global batch k is rows [k*B, (k+1)*B) of that one stream; process p
  yields its contiguous rows [k*B + p*batch_size, k*B + (p+1)*batch_size), so
  concatenating the processes' batches (as `mmtl.data.device.put_batch` does)
  gives the 1-process batch of size B, row for row, random augmentation
  included. Only those rows are read and decoded, except with `cache`, where
  each process holds the whole decoded split. The returned iterator has
  `get_state() -> dict` and `set_state(dict)`: restoring a saved state
  continues with exactly the batch that would have come next; a grain state is
  the global step, valid for any process count with the same global batch
  (loader="tf" instead reads a per-process slice of the split, and its state
  only for the same process). `features`: cached tower outputs of the split
  (mmtl.feature_cache), which the batches carry instead of those modalities' inputs.
  """
  cfg = options.input_config(input_cfg)
  _check_process(process_index, process_count)
  if cfg.loader == "tf":
    _check_tf(cfg, "class_sampling")
    return tf_loader.TfIterator(
      cfg,
      batch_size=batch_size,
      seed=seed,
      process_index=process_index,
      process_count=process_count,
      num_batches=None,
    )
  _check_loader(cfg)
  src, b = source.data_source(cfg)
  pre = transforms.Preprocess(
    cfg,
    b.info,
    train=True,
    class_weights=source.class_weights(cfg, b),
    cached=tuple(features or ()),
  )
  # Lazy without cache: reads only what this process's rows need.
  ds = _decoded(cfg, pre, src, features=features)
  if len(ds) < batch_size * process_count:
    raise config_keys.ConfigError(
      f"{cfg.dataset}:{cfg.split} has only {len(ds)} examples, fewer than the "
      f"global batch size {batch_size} x {process_count} processes."
    )
  order = source.class_sampling(cfg, b, seed)
  if order is None:
    ds = ds.seed(_grain_seed(seed)).shuffle().repeat(None)
  else:  # Class-balanced epochs: stream position -> example (mmtl.data.sampling).
    picks = grain.MapDataset.range(len(ds)).repeat(None).map_with_index(order)
    ds = picks.map(ds.__getitem__).seed(_grain_seed(seed))
  ds = ds.random_map(pre.example)
  # Local-size batches; global batch k is local batches k*P..k*P+P-1: this process takes the p-th.
  ds = ds.batch(batch_size, drop_remainder=True, batch_fn=pre.stack)[process_index::process_count]
  return _to_iterator(ds.map(pre.arrays), cfg, pre)


def _check_tf(cfg: ml_collections.ConfigDict, *keys: str) -> None:
  """Refuses the `config.input` settings only grain reads: folds, and `keys`."""
  set_by = {"fold": " (cross-validation folds: config.cross_validation)"}
  for key in ("fold", *keys):
    if cfg[key] is not None:
      raise config_keys.ConfigError(
        f"config.input.{key}{set_by.get(key, '')} needs config.input.loader='grain'."
      )


def eval_num_batches(num: int, *, batch_size: int, process_count: int) -> int:
  """Batches every process yields for a `num`-example split (equal on all processes)."""
  return max(1, math.ceil(math.ceil(num / process_count) / batch_size))


def make_eval_iterator(
  input_cfg: Mapping[str, Any],
  *,
  batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
  features: Features | None = None,
  start_batch: int = 0,
) -> Iterator[transforms.Batch]:
  """One ordered pass over this process's slice; no augmentation or modality dropout.

  Every process yields the same number of batches (`eval_num_batches`), as
  multi-host steps require; rows past the end repeat an example with
  `example_weight` 0.0 (real rows have 1.0). Batch k holds rows [k*batch_size,
  (k+1)*batch_size) of the slice (`start_batch`: the pass begins at batch k).
  `features` as in `make_train_iterator`.
  """
  cfg = options.input_config(input_cfg)
  _check_process(process_index, process_count)
  if cfg.loader == "tf":
    _check_tf(cfg)
    num_batches = eval_num_batches(
      source.num_examples(cfg), batch_size=batch_size, process_count=process_count
    )
    return tf_loader.TfIterator(
      cfg,
      batch_size=batch_size,
      seed=0,
      process_index=process_index,
      process_count=process_count,
      num_batches=num_batches,
    )
  _check_loader(cfg)
  src, b = source.data_source(cfg)
  pre = transforms.Preprocess(cfg, b.info, train=False, cached=tuple(features or ()))
  shard = _decoded(cfg, pre, src, process_index, process_count, features)
  num_batches = eval_num_batches(len(src), batch_size=batch_size, process_count=process_count)
  fallback = _decode_fn(pre, src, features)(0)

  def padded(i: int):
    return (shard[i], np.float32(1.0)) if i < len(shard) else (fallback, np.float32(0.0))

  def example(item, rng):
    ex, weight = item
    out = pre.example(ex, rng)
    out["example_weight"] = weight
    return out

  ds = grain.MapDataset.range(num_batches * batch_size).map(padded).seed(0).random_map(example)
  ds = ds.batch(batch_size, batch_fn=pre.stack)[start_batch:].map(pre.arrays)
  return _to_iterator(ds, cfg, pre)
