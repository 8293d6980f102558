"""Workdir files on a local disk or an object store (`gs://bucket/run`), through etils.epath.

A TPU pod slice has no filesystem that all its hosts share, so its workdir is a
bucket: orbax writes the checkpoints there, and the trainer's own files
(config.json, metrics.jsonl, TensorBoard events, curves.png, final_metrics.json,
eval_step<N>.json) are read and written with these functions. Local paths stay
plain files. epath reaches gs:// through fsspec + gcsfs (imported only when such
a path is used; with TensorFlow installed it uses tf.io.gfile instead).
"""
from __future__ import annotations

import json
import os
from typing import Any

from etils import epath


def is_remote(location: epath.PathLike) -> bool:
  """Whether `location` is on an object store (`gs://`, `s3://`...): no appends, no directories."""
  return "://" in os.fspath(location)


def path(workdir: epath.PathLike, *names: str) -> epath.Path:
  """`workdir/names...`. A local workdir is made absolute (orbax requires absolute
  paths); a remote one is joined as a string (os.path.abspath would mangle gs://)."""
  base = os.fspath(workdir)
  return epath.Path(base if is_remote(base) else os.path.abspath(base)).joinpath(*names)


def makedirs(workdir: epath.PathLike) -> None:
  """Creates a local workdir. Object stores need no directories, and creating one
  could create a bucket (gcsfs does when the bucket is missing), so remote
  workdirs are left alone."""
  if not is_remote(workdir):
    path(workdir).mkdir(parents=True, exist_ok=True)


def write_text(file: epath.PathLike, text: str) -> None:
  """Replaces `file` with `text` atomically: a reader (or a run killed mid-write)
  sees the old content or the new one, never a part. Locally: a temporary file
  renamed over it. An object store makes an uploaded object visible only once
  it is complete, so there one write is already atomic (and a rename is a copy)."""
  file = epath.Path(file)
  if is_remote(file):
    file.write_text(text)
    return
  tmp = file.with_name(file.name + ".tmp")
  try:
    tmp.write_text(text)
    tmp.replace(file)
  finally:
    tmp.unlink(missing_ok=True)  # Only left after a failed write.


def read_json(file: epath.PathLike) -> Any:
  return json.loads(epath.Path(file).read_text())
