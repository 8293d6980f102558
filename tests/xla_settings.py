"""How the tests compile: XLA's CPU backend at its fastest-compiling settings, except where a
test checks numbers against transformers.

On CPU a tiny model's program spends nearly all its compile time in LLVM's optimization
passes and the new fusion emitters, and tests run each program a few times at most: with
LLVM at -O0 and the classic emitters, the suite takes about a third less CPU time
(docs/testing.md). Those programs round differently: a BERT decoder's logits, within
1e-5 of transformers' with JAX's defaults, came out 1.5e-5 away. So the parity tests
compile their models as every real run does (`production_jit`): what they check is the
numbers users get.

Compiled programs are kept between sessions in XLA's persistent compilation cache
(`compilation_cache_dir`): its key hashes the program, the compile options and flags, and
the JAX, jaxlib and device versions, so a changed program misses it and is compiled again
while everything else is read back; a rerun of the quick loop takes about 40% less time.
"""

from collections.abc import Callable, Mapping
import os
from pathlib import Path
import shutil

# Given to every test process and to the processes the tests start (through XLA_FLAGS).
FAST_COMPILE_FLAGS = (
  "--xla_backend_optimization_level=0",
  "--xla_cpu_use_fusion_emitters=false",
)
# JAX's defaults for the same two options, per program (`jax.jit(compiler_options=...)`).
PRODUCTION_OPTIONS = {"xla_backend_optimization_level": 3, "xla_cpu_use_fusion_emitters": True}


def xla_flags(devices: int, flags: str = "") -> str:
  """XLA_FLAGS for a test process with `devices` simulated CPU devices: `flags` (e.g. the
  environment's own) and then each of ours that `flags` does not set already."""
  ours = (f"--xla_force_host_platform_device_count={devices}", *FAST_COMPILE_FLAGS)
  given = {f.split("=")[0] for f in flags.split()}
  return " ".join([*flags.split(), *(f for f in ours if f.split("=")[0] not in given)])


# Past this size the cache is emptied when a session starts (it grows as programs change).
CACHE_LIMIT_BYTES = 2 << 30


def compilation_cache_dir(environ: Mapping[str, str], limit: int = CACHE_LIMIT_BYTES) -> str:
  """XLA's compilation cache for a test session and the processes it starts: the
  environment's JAX_COMPILATION_CACHE_DIR (an empty folder measures a cold run), else
  `$XDG_CACHE_HOME/mmtl/tests-xla` (`~/.cache/...`), kept between sessions, checkouts and
  clones, and emptied here once it holds more than `limit` bytes."""
  if environ.get("JAX_COMPILATION_CACHE_DIR"):
    return environ["JAX_COMPILATION_CACHE_DIR"]
  cache_home = environ.get("XDG_CACHE_HOME") or os.path.join(environ["HOME"], ".cache")
  folder = Path(cache_home, "mmtl", "tests-xla")
  if folder.is_dir() and sum(f.stat().st_size for f in folder.iterdir()) > limit:
    shutil.rmtree(folder, ignore_errors=True)
  return str(folder)


def production_jit(fun: Callable, **kwargs) -> Callable:
  """`jax.jit`, compiled with JAX's default optimization (the numbers of a real run)."""
  import jax  # Here: conftest.py imports this module before JAX reads its environment.

  return jax.jit(fun, compiler_options=PRODUCTION_OPTIONS, **kwargs)
