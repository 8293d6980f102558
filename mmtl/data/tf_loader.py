"""How a tfrecord-only dataset is read (`config.input.loader="tf"`): with tf.data.

tf.data reads this process's slice of the split; the numpy preprocessing of
`mmtl.data.transforms` then gives the grain loader's batches. TensorFlow is
imported only when this loader is used (`mmtl.data.loader` picks it).
"""

from __future__ import annotations

from typing import Any

from absl import logging
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from mmtl import config_keys
from mmtl.data import source, transforms


def _import_tf():
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(
      "config.input.loader='tf' needs TensorFlow, which is not installed: `pip install "
      "tensorflow-cpu`, or rebuild the dataset as array_record (`tfds build NAME "
      "--file_format array_record`) and use loader='grain'."
    ) from None
  return tf


class TfIterator:
  """tf.data reader for tfrecord-only datasets, with the same numpy preprocessing.

  tf.data has no JSON-able iterator state, so `get_state` records the number of
  batches produced and `set_state` rebuilds the (seeded, deterministic)
  pipeline and skips that many batches. Each process reads its own slice of the
  split, so a state saved by another process slice does not apply: the stream
  then starts afresh (with a warning).
  """

  def __init__(
    self,
    cfg: ml_collections.ConfigDict,
    *,
    batch_size: int,
    seed: int,
    process_index: int,
    process_count: int,
    num_batches: int | None,
  ):
    """`num_batches`: None for the endless, shuffled, augmented training stream; else one eval
    pass of that many batches, padded past this process's slice with weight-0 rows."""
    tf = _import_tf()
    b = source.builder(cfg)
    source.check_split(b, cfg.split)
    decoders = source.decoders(cfg, b.info.features)
    train = num_batches is None
    self.cfg, self.batch_size, self.seed, self.train = cfg, batch_size, seed, train
    self.process_index, self.process_count = process_index, process_count
    self.num_batches = num_batches
    self.pre = transforms.Preprocess(
      cfg, b.info, train=train, class_weights=source.class_weights(cfg, b) if train else None
    )
    split = tfds.even_splits(cfg.split, n=process_count, drop_remainder=False)[process_index]
    # Fixed seeds: every rebuilt pipeline replays the same stream. Shuffling before
    # repeating keeps epochs whole (each example once per epoch), reshuffled per epoch.
    read_config = tfds.ReadConfig(
      shuffle_seed=seed, shuffle_reshuffle_each_iteration=False, interleave_cycle_length=1
    )
    try:
      ds = b.as_dataset(
        split=split, shuffle_files=train, read_config=read_config, decoders=decoders
      )
    except NotImplementedError as e:  # Prepared as array_record: no tf.data reader.
      raise config_keys.ConfigError(
        f"{b.info.full_name} is stored as {b.info.file_format.value}, which tf.data "
        "cannot read. Use config.input.loader='grain'."
      ) from e
    if train:
      ds = ds.shuffle(10_000, seed=seed).repeat()
    self._tf_ds = ds.prefetch(tf.data.AUTOTUNE)
    self.set_state({"batches": 0, "process": [process_index, process_count]})

  def _examples(self):
    rng = np.random.default_rng([self.seed, self.process_index])
    last = None
    for ex in tfds.as_numpy(self._tf_ds):
      last = self.pre.decode(ex)
      yield self.pre.example(last, rng), np.float32(1.0)
    while True:  # Eval padding up to the common number of batches.
      yield self.pre.example(last, rng), np.float32(0.0)

  def __iter__(self):
    return self

  def __next__(self) -> transforms.Batch:
    if self.num_batches is not None and self.batches >= self.num_batches:
      raise StopIteration
    rows = []
    for ex, weight in (next(self._stream) for _ in range(self.batch_size)):
      if not self.train:
        ex["example_weight"] = weight
      rows.append(ex)
    self.batches += 1
    return self.pre.tokenize(self.pre.arrays(self.pre.stack(rows)))

  def get_state(self) -> dict[str, Any]:
    return {"batches": self.batches, "process": [self.process_index, self.process_count]}

  def set_state(self, state: dict[str, Any]) -> None:
    self._stream, self.batches = self._examples(), 0
    if state["process"] != [self.process_index, self.process_count]:
      logging.warning(
        "The loader='tf' input state was saved by process %s of %s; this is process "
        "%d of %d: the data iterator starts afresh.",
        *state["process"],
        self.process_index,
        self.process_count,
      )
      return
    for _ in range(state["batches"]):
      next(self)
