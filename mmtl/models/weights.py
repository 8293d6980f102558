"""How a Hugging Face checkpoint tensor becomes a Flax param, and back: the transform each
name map states.

A family's `hf_names()` maps each param path to an `HFName`: the state-dict key and the
`Transform` between torch's layout and Flax's (as bonsai's `Transform` enum), and for a
fused tensor (GPT-2's `c_attn`, query, key and value in one) which slice of it the param
is. mmtl.hf applies them when loading and inverts them when exporting; nothing is
decided from a leaf's name or rank.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import numpy as np


class Transform(enum.Enum):
  """Layout change from a torch state-dict tensor to the Flax param."""

  IDENTITY = "identity"  # biases, norms, embeddings, tokens, scalars: the same array
  LINEAR = "linear"  # torch Linear (out, in) -> Flax Dense (in, out)
  IN_OUT = "in_out"  # already (in, out): GPT-2's Conv1D; the same array, checked 2-D
  CONV1D = "conv1d"  # torch Conv1d (out, in/groups, k) -> Flax Conv (k, in/groups, out)
  CONV2D = "conv2d"  # torch Conv2d (out, in/groups, kh, kw) -> Flax Conv (kh, kw, in/groups, out)


# Flax axes of each torch axis (None: any rank, unchanged). A weight-normed conv's g and v
# (torch weight_norm over the kernel axis, g of shape (1, 1, k)) are both CONV1D: g
# becomes (k, 1, 1), which broadcasts against the (k, in, out) kernel built from v.
_TO_FLAX: dict[Transform, tuple[int, ...] | None] = {
  Transform.IDENTITY: None,
  Transform.LINEAR: (1, 0),
  Transform.IN_OUT: (0, 1),
  Transform.CONV1D: (2, 1, 0),
  Transform.CONV2D: (2, 3, 1, 0),
}


class HFName(NamedTuple):
  """Where a param lives in a transformers state dict."""

  key: str
  transform: Transform = Transform.IDENTITY
  # (i, n): the param is the i-th of n equal slices, along the last Flax axis, of the
  # tensor at `key` (a fused projection); None: all of it.
  part: tuple[int, int] | None = None

  def prefixed(self, prefix: str) -> HFName:
    """The same tensor under a parent module (`encoder.`, `vision_model.`)."""
    return self._replace(key=f"{prefix}{self.key}")


def to_flax(x: np.ndarray, name: HFName) -> np.ndarray:
  """The Flax param `name` reads from the state-dict tensor `x` at `name.key`."""
  axes = _TO_FLAX[name.transform]
  if axes is not None:
    if x.ndim != len(axes):
      raise ValueError(
        f"{name.key} has shape {tuple(x.shape)}, but its {name.transform.value} transform "
        f"takes a {len(axes)}-d tensor"
      )
    x = x.transpose(axes)
  if name.part is not None:
    i, n = name.part
    x = np.split(x, n, axis=-1)[i]
  return x


def to_torch(params: list[np.ndarray], name: HFName) -> np.ndarray:
  """The state-dict tensor at `name.key` from its Flax params: one, or each slice of a fused
  tensor in order (their `part`s 0..n-1). C-ordered, as safetensors writes."""
  x = params[0] if len(params) == 1 else np.concatenate(params, axis=-1)
  axes = _TO_FLAX[name.transform]
  if axes is not None:
    x = x.transpose(np.argsort(axes))
  return np.ascontiguousarray(x).reshape(x.shape)  # keep 0-d as 0-d


def by_rank(ndim: int) -> Transform:
  """The transform of a `kernel` leaf of rank `ndim` in HF's own Flax checkpoints
  (`flax_model.msgpack`: Dense, Conv1d and Conv2d kernels laid out as Flax's)."""
  return {2: Transform.LINEAR, 3: Transform.CONV1D, 4: Transform.CONV2D}.get(
    ndim, Transform.IDENTITY
  )
