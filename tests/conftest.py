"""Test setup shared by the whole suite.

8 simulated CPU devices so sharding tests run anywhere; this must happen before
jax is imported anywhere in the test process.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Tiny random HF checkpoints (tiny_bert_dir, tiny_vit_dir, tiny_clip_dir, tiny_siglip_dir): see
# tests/hf_fixtures.py.
import pytest  # noqa: E402

from tests.hf_fixtures import (  # noqa: E402,F401
  tiny_bert_dir,
  tiny_clip_dir,
  tiny_siglip_dir,
  tiny_vit_dir,
)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """The suite's TFDS data dir: each built-in dataset config is generated into it once,
  offline, by the first test that reads it."""
  return str(tmp_path_factory.mktemp("tfds"))
