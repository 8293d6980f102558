"""The tests' compile settings: fast compiles everywhere, JAX's defaults for parity."""

import os
import sys
import textwrap

import jax
import numpy as np

from mmtl import process
from tests import xla_settings

# A program whose float32 rounding depends on how XLA compiles it (dots, erf, exp, rsqrt).
PROGRAM = textwrap.dedent("""\
    import jax, jax.numpy as jnp, numpy as np

    def f(x, w):
      for _ in range(6):
        x = jax.nn.gelu(x @ w, approximate=False) + jnp.tanh(x) * jnp.exp(-x * x)
        x = x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)
      return x

    x = np.random.default_rng(0).normal(size=(33, 47)).astype(np.float32)
    w = np.random.default_rng(1).normal(size=(47, 47)).astype(np.float32) * 0.3
    """)


def test_flags_add_ours_after_the_environments_own():
  assert xla_settings.xla_flags(2, "--xla_dump_to=/d --xla_backend_optimization_level=3") == (
    "--xla_dump_to=/d --xla_backend_optimization_level=3 "
    "--xla_force_host_platform_device_count=2 --xla_cpu_use_fusion_emitters=false"
  )
  assert xla_settings.xla_flags(4).split() == [
    "--xla_force_host_platform_device_count=4",
    *xla_settings.FAST_COMPILE_FLAGS,
  ]
  for flag in xla_settings.FAST_COMPILE_FLAGS:  # conftest.py gave them to this process
    assert flag in os.environ["XLA_FLAGS"].split()


def test_production_jit_computes_what_jax_defaults_compile(tmp_path):
  """Bit for bit what a process with no XLA_FLAGS computes; this process's own fast
  compiles round differently (else the parity tests would not need production_jit)."""
  scope: dict = {}
  exec(PROGRAM, scope)
  ours = np.asarray(xla_settings.production_jit(scope["f"])(scope["x"], scope["w"]))
  fast = np.asarray(jax.jit(scope["f"])(scope["x"], scope["w"]))
  out = tmp_path / "y.npy"
  script = PROGRAM + f"np.save({str(out)!r}, np.asarray(jax.jit(f)(x, w)))\n"
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
  process.run([sys.executable, "-c", script], env=env, check=True, timeout=120)
  np.testing.assert_array_equal(ours, np.load(out))
  assert not np.array_equal(fast, ours)


def test_the_compilation_cache_is_kept_between_sessions_up_to_its_limit(tmp_path):
  env = {"HOME": str(tmp_path / "home")}
  assert xla_settings.compilation_cache_dir(env) == str(tmp_path / "home/.cache/mmtl/tests-xla")
  folder = tmp_path / "cache/mmtl/tests-xla"
  folder.mkdir(parents=True)
  (folder / "a-cache").write_bytes(bytes(600))
  env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
  assert xla_settings.compilation_cache_dir(env, limit=1000) == str(folder)
  assert (folder / "a-cache").exists()  # Under its limit: kept.
  (folder / "b-cache").write_bytes(bytes(600))
  xla_settings.compilation_cache_dir(env, limit=1000)
  assert not folder.exists()  # Over it: emptied.
  env["JAX_COMPILATION_CACHE_DIR"] = "/elsewhere"  # The environment's own wins.
  assert xla_settings.compilation_cache_dir(env) == "/elsewhere"
