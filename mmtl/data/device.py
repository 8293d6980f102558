"""Host batches onto the device mesh: global arrays from each process's rows, prefetched.

Train and eval input both go through `to_devices`: numpy batches (this
process's rows, see `sharding.process_data_shard`) become global `jax.Array`s
sharded over ("data", "fsdp"), with a few in flight so the host-to-device copy
overlaps the step.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator, Mapping
import functools
from typing import Any

import jax
from jax.sharding import Mesh
import numpy as np

from mmtl import rules as rules_lib
from mmtl import sharding as sharding_lib
from mmtl.data import transforms


def put_batch(local_batch: Any, mesh: Mesh) -> Any:
  """Global jax.Arrays from this process's numpy slice of the batch.

  Each process passes only its own rows (see `process_data_shard`); the
  global batch is local rows x number of data slices. Host-only fields
  (`transforms.HOST_FIELDS`: reference texts) stay behind.
  """
  if isinstance(local_batch, Mapping):
    local_batch = {k: v for k, v in local_batch.items() if k not in transforms.HOST_FIELDS}
  sharding = sharding_lib.batch_sharding(mesh)
  _, count = sharding_lib.process_data_shard(mesh)
  local_shards = mesh.shape["data"] * mesh.shape["fsdp"] // count

  def put(path, x):
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] % local_shards:
      raise ValueError(
        f"put_batch: {rules_lib.path_str(path)} has shape {x.shape}; its first "
        f"(batch) dimension must be a multiple of the {local_shards} batch shards "
        f"on this process. Make batch_size a multiple of data*fsdp="
        f"{mesh.shape['data'] * mesh.shape['fsdp']}."
      )
    global_shape = (x.shape[0] * count, *x.shape[1:])
    return jax.make_array_from_process_local_data(sharding, x, global_shape)

  return jax.tree_util.tree_map_with_path(put, local_batch)


class DevicePrefetch:
  """Iterator of device batches that keeps `size` more in flight.

  `put` (e.g. `put_batch`) starts an asynchronous host-to-device copy, so the
  copy of batch i+size overlaps the step on batch i. `get_state()` is the
  wrapped iterator's state right after the last batch handed out, not after
  the ones in flight: a checkpoint taken between steps resumes at the first
  batch no step has seen.
  """

  def __init__(self, batches: Iterator[Any], put: Callable[[Any], Any], size: int = 2):
    self._batches, self._put, self._size = batches, put, size
    self._queue: collections.deque = collections.deque()
    self._state = self._source_state()

  def _source_state(self) -> Any:
    return self._batches.get_state() if hasattr(self._batches, "get_state") else None

  def __iter__(self) -> DevicePrefetch:
    return self

  def __next__(self) -> Any:
    while len(self._queue) <= self._size:
      try:
        batch = next(self._batches)
      except StopIteration:
        break
      self._queue.append((self._put(batch), self._source_state()))
    if not self._queue:
      raise StopIteration
    batch, self._state = self._queue.popleft()
    return batch

  def get_state(self) -> Any:
    return self._state


def to_devices(batches: Iterator[Any], config: Mapping[str, Any], mesh: Mesh) -> DevicePrefetch:
  """Host batches (this process's rows) -> global device batches, `config.prefetch_to_device`
  of them in flight."""
  return DevicePrefetch(
    batches, functools.partial(put_batch, mesh=mesh), int(config["prefetch_to_device"])
  )
