"""Test setup shared by the whole suite.

8 simulated CPU devices so sharding tests run anywhere; this must happen before
jax is imported anywhere in the test process.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
