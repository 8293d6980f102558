"""Frozen params stored in low precision: a locked tower at a half or a quarter of its
float32 memory, its trained neighbours untouched.

`config.optim.frozen_dtype` chooses how the params frozen for the whole run (every
unfreezing phase) are kept in the train state, its checkpoints and the feature cache key:

  ""          as loaded (float32)
  "bfloat16"  every frozen float leaf rounded to bfloat16 (half the bytes)
  "int8"      weight-only int8 by qwix (`qwix.quantize`, symmetric absmax): each frozen
              leaf of 2 or more dims (kernels, embedding tables) becomes int8 at its own
              path plus a float32 scale `<name>_qscale` per output channel (per row of an
              embedding table), a quarter of the bytes; biases and norms (1-D) become
              bfloat16

The model reads `model_params(params)`: int8 leaves dequantized by `qwix.dequantize`,
bfloat16 leaves as they are (Flax layers compute in their `dtype`, float32 unless the
model says otherwise, so a bfloat16 weight is promoted inside the layer), then LoRA merged
(mmtl.lora), in the jitted step: the float kernels exist only while the step runs. Trained
params keep their precision and their optimizer state.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import qwix

from mmtl import config_keys, lora, rules

DTYPES = ("", "bfloat16", "int8")
SCALE_SUFFIX = "_qscale"
SCALE = r".*" + SCALE_SUFFIX  # rule for the optimizer: the scales never train


def check(frozen_dtype: str) -> str:
  if frozen_dtype not in DTYPES:
    raise config_keys.ConfigError(
      f"config.optim.frozen_dtype={frozen_dtype!r}: use one of {DTYPES} ('': as loaded)."
    )
  return frozen_dtype


def _channel_axis(path: str, ndim: int) -> int:
  """The axis that keeps its own scales: an embedding table's rows, else the outputs."""
  return 0 if path.endswith("embedding") else ndim - 1


def store(params: Any, frozen: Mapping[str, bool], frozen_dtype: str) -> dict[str, Any]:
  """`params` with the leaves `frozen` ({path: bool}) marks stored in `frozen_dtype`.
  Traceable: run it under jax.jit (or jax.eval_shape for the shapes)."""
  check(frozen_dtype)
  out: dict[str, Any] = {}
  for path, x in rules.flatten(params).items():
    if not frozen.get(path) or not frozen_dtype or not jnp.issubdtype(x.dtype, jnp.floating):
      out[path] = x
    elif frozen_dtype == "int8" and x.ndim >= 2:
      q = qwix.quantize(x, jnp.int8, channelwise_axes=(_channel_axis(path, x.ndim),))
      out[path] = q.qvalue
      out[path + SCALE_SUFFIX] = q.scale.astype(jnp.float32)
    else:
      out[path] = x.astype(jnp.bfloat16)
  return rules.unflatten(out)


def dequantize(params: Any) -> Any:
  """Each int8 leaf with a `<name>_qscale` sibling back to float32, the scales dropped;
  no-op without them."""
  flat = rules.flatten(params)
  if not any(p.endswith(SCALE_SUFFIX) for p in flat):
    return params
  out = {}
  for path, x in flat.items():
    if path.endswith(SCALE_SUFFIX):
      continue
    scale = flat.get(path + SCALE_SUFFIX)
    out[path] = x if scale is None else qwix.dequantize(qwix.QArray(x, scale, qtype=jnp.int8))
  return rules.unflatten(out)


def model_params(params: Any) -> Any:
  """The params the model computes with: stored low-precision leaves read back, LoRA merged."""
  return lora.merge(dequantize(params))
