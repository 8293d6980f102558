"""Test setup shared by the whole suite.

8 simulated CPU devices so sharding tests run anywhere, programs compiled for compile speed
(tests/xla_settings.py), and a compilation cache; this must happen before jax is imported
anywhere in the test process.
"""

import os
import sys

from tests import xla_settings

# XLA_FLAGS as the environment gives them, plus 8 devices and fast compiles where not given.
os.environ["XLA_FLAGS"] = xla_settings.xla_flags(8, os.environ.get("XLA_FLAGS", ""))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# XLA's persistent compilation cache, kept between sessions (xla_settings), shared by the
# tests, pytest-xdist's workers and the trainer subprocesses they start (all inherit this
# environment): a program compiled once is read back wherever and whenever it is compiled
# again, however small (the many one-op programs of code run outside jit, too).
os.environ["JAX_COMPILATION_CACHE_DIR"] = xla_settings.compilation_cache_dir(os.environ)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# Tiny random HF checkpoints (tiny_bert_dir, tiny_vit_dir, tiny_clip_dir, tiny_siglip_dir,
# tiny_wav2vec2_dir, tiny_whisper_dir, tiny_ast_dir): see tests/hf_fixtures.py.
import pytest  # noqa: E402

from tests.hf_fixtures import (  # noqa: E402,F401
  tiny_ast_dir,
  tiny_bert_dir,
  tiny_clip_dir,
  tiny_siglip_dir,
  tiny_vit_dir,
  tiny_wav2vec2_dir,
  tiny_whisper_dir,
)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """The suite's TFDS data dir: each built-in dataset config is generated into it once,
  offline, by the first test that reads it."""
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def small_data_dir(data_dir):
  """`data_dir` with `mmtl_shapes/small` generated in it before a test starts the trainer
  processes that read it (once here, not in each of them)."""
  from mmtl import data  # Here: importing mmtl imports JAX, after the settings above.

  data.builder(dict(dataset="mmtl_shapes/small", data_dir=data_dir))
  return data_dir


@pytest.fixture
def coco_without_tensorflow(monkeypatch):
  """TFDS's `coco` / `coco_captions` builders constructible without TensorFlow: their
  feature spec names one TensorFlow dtype (`tf.int64`), given here as numpy's."""
  import types  # pylint: disable=g-import-not-at-top

  import numpy as np  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.object_detection import coco  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(coco, "tf", types.SimpleNamespace(int64=np.int64))


# The splits of the real datasets the shipped configs read, as their TFDS builders name them:
# a builder whose data is not prepared knows its features (code) but not its splits (data).
REAL_SPLITS = {
  "cifar10": ("train", "test"),
  "coco_captions": ("train", "restval", "val", "test"),  # Karpathy's
  "imagenet2012": ("train", "validation", "test"),
  "imagenette": ("train", "validation"),
}
MOCK_EXAMPLES = 24  # per split


@pytest.fixture
def mock_real_datasets(coco_without_tensorflow, monkeypatch):
  """The real TFDS builders of `REAL_SPLITS` (their feature specs, from code) serving
  random examples, through `tfds.testing.mock_data`: no download, no TensorFlow.

  Each split holds `MOCK_EXAMPLES` decoded examples drawn from the builder's features by
  TFDS's own `RandomFakeGenerator` (images of random sizes, random strings, class ids in
  range, sequences of 5-49 items). Configs read them with `download=True`: mock_data makes
  `download_and_prepare` a no-op."""
  import zlib  # pylint: disable=g-import-not-at-top

  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.testing import mocking  # pylint: disable=g-import-not-at-top

  def splits(name):
    template = dict(data_dir="/nonexistent", dataset_name=name, filetype_suffix="x")
    return tfds.core.SplitDict(
      [
        tfds.core.SplitInfo(
          name=split,
          shard_lengths=[MOCK_EXAMPLES],
          num_bytes=0,
          filename_template=tfds.core.ShardedFileTemplate(split=split, **template),
        )
        for split in REAL_SPLITS[name]
      ]
    )

  real_splits = tfds.core.DatasetInfo.splits.fget
  monkeypatch.setattr(
    tfds.core.DatasetInfo,
    "splits",
    property(lambda info: splits(info.name) if info.name in REAL_SPLITS else real_splits(info)),
  )

  def as_data_source(builder, split, decoders=None, **kw):
    del decoders, kw  # Decoded examples: the unused features are small.
    size, seed = builder.info.splits[split].num_examples, zlib.crc32(split.encode())
    # Each split its own examples, the same in every run.
    return list(mocking.RandomFakeGenerator(builder.info.features, size, seed=seed))

  with tfds.testing.mock_data(as_data_source_fn=as_data_source):
    yield


def pytest_collection_modifyitems(items):
  """Modules with end-to-end (`slow`) tests first, each module's tests in their order.

  pytest-xdist gives each idle worker the next module in this order, so the long modules
  (a notebook, two-process runs, sweeps) start first and the short ones fill in at the end,
  instead of one worker finishing a long module alone while the other is idle."""
  slow = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.module.__name__ not in slow)  # stable: modules stay whole


@pytest.hookimpl(tryfirst=True)
def pytest_unconfigure(config):
  """A pytest-xdist worker ends as soon as its results are sent, without tearing down.

  Its teardown frees nothing the run needs and reports nothing (the results went to the
  main process in its `workerfinished` message, sent at the end of the session): it
  took 4-6 s at the end of every run (pytest's repeated `gc.collect()` for unraisable
  exceptions, JAX's cache clearing at exit, freeing the interpreter's objects), while the
  main process waited for it. A single-process run (`-n 0`) tears down as usual."""
  if hasattr(config, "workerinput"):  # set by pytest-xdist in its workers only
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
