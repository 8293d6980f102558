"""Why a fused classifier predicts what it does: attention maps, gates, modality attributions.

`explain(model, variables, batch)` runs the model once with its `intermediates` collection
mutable, so that the modules record what they compute only then (at no cost otherwise):
every self-attention of the shared transformer layers its probabilities
(mmtl.models.layers.Attention; every family but BEiT), the cross-attention fusion's blocks
theirs (flax's `sow_weights`), the gated fusion its per-modality gate, and the fusion model
each tower's output tokens and pooled vector. From them, per example of the batch:

  rollout/<m>         (B, T) attention rollout (Abnar & Zuidema 2020) of tower m: each
                      layer's head-averaged attention plus the identity (the residual),
                      rows renormalized, multiplied through the layers; the row of the
                      token the tower pools (CLS), or the mean row of its real tokens
                      for a mean-pooled tower. Over an image tower's patches: where the
                      image tower looks; for a video tower, its temporal layers' over the
                      frames (the frame layers attend within each frame).
  cross_attention/<q>-><k>
                      (B, T_k) how much modality q's real tokens attend to each token of
                      modality k in the cross-attention fusion (heads, q tokens and
                      blocks averaged): text over image patches, say.
  gate                (B, M) the gated fusion's mean gate per modality (M: model.modalities).
  attribution         (B, M) gradient x input per modality: the predicted class's logit
                      differentiated w.r.t. what fusion reads of each tower (its tokens
                      and pooled vector, through flax `perturb`), times those values,
                      summed in absolute value and normalized to shares per example.
  logits, labels, example_weight: as the head's `predict` gives them; pixel_values and
  input_ids: the batch's, where it has them (what a picture of the example shows).

The keys present depend on the model (a ConvNet tower has no rollout, only cross-attention
fusion has cross_attention, only gated fusion a gate). `patch_grid` lays a token map over
an image's patch grid. The `attention_maps` and `modality_contribution` evaluators
(mmtl.evaluators) write them out.
"""

from __future__ import annotations

from collections.abc import Mapping
import math
import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

INTERMEDIATES, PERTURBATIONS = "intermediates", "perturbations"
_LAYER = re.compile(r"layer_(\d+)")


def explain(model: Any, variables: Any, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
  """The maps, gates and attributions of `model` on `batch` (module docstring), from one
  forward and backward pass."""
  # The perturbations' shapes (tracing only), then zeros of them: what fusion reads.
  shapes = jax.eval_shape(lambda: model.apply(variables, batch, mutable=[PERTURBATIONS])[1])
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes[PERTURBATIONS])

  def predicted_logit(perturbations: Any) -> tuple[jax.Array, Any]:
    """The sum over the batch of each example's predicted-class logit (examples do not
    interact at inference: its gradient is each one's own), with the logits and what the
    modules recorded."""
    out, state = model.apply(
      {**variables, PERTURBATIONS: perturbations}, batch, mutable=[INTERMEDIATES]
    )
    logits = out["logits"]
    predicted = jax.lax.stop_gradient(jnp.argmax(logits, -1))
    score = jnp.take_along_axis(logits, predicted[:, None], -1).sum()
    return score, (logits, state[INTERMEDIATES])

  grads, (logits, state) = jax.grad(predicted_logit, has_aux=True)(zeros)
  weight = batch.get("example_weight", jnp.ones(logits.shape[:1], jnp.float32))
  inter = flax.core.unfreeze(state)
  attribution = _attribution(model, inter, grads, logits.shape[0])
  result = {"logits": logits, "example_weight": weight, **attribution}
  # The labels, and the inputs a picture shows (the image, the text's tokens).
  result.update({k: batch[k] for k in ("labels", "pixel_values", "input_ids") if k in batch})
  for m in model.modalities:
    if f"{m}_tokens" in inter:
      mask = inter[f"{m}_mask"][0]
      b, t = mask.shape
      extra = model.bottleneck_tokens if model.fusion_type == "bottleneck" else 0
      # The layers over the tower's own tokens (and bottleneck fusion's): not, say, a
      # video tower's frame layers, which attend within each frame.
      attention = [
        a
        for a in _self_attention(inter.get(f"{m}_encoder", {}))
        if a.shape[0] == b and a.shape[-1] in (t, t + extra)
      ]
      if attention:
        result[f"rollout/{m}"] = _rollout(attention, mask, model.pool_of(m))
  result.update(_cross_attention(model, inter))
  if "modality_gates" in inter.get("fusion", {}):
    result["gate"] = inter["fusion"]["modality_gates"][0]
  return result


def _attribution(model: Any, inter: Mapping[str, Any], grads: Mapping[str, Any], b: int) -> dict:
  """{"attribution": (B, M)} shares of |gradient x input| per modality (0: not given)."""
  totals = jnp.zeros((b, len(model.modalities)), jnp.float32)
  for i, m in enumerate(model.modalities):
    for part in ("tokens", "pooled"):
      if f"{m}_{part}" in inter:
        x, g = inter[f"{m}_{part}"][0], grads[f"{m}_{part}"]
        totals = totals.at[:, i].add(jnp.abs(x * g).reshape(b, -1).sum(-1))
  return {"attribution": totals / jnp.maximum(totals.sum(1, keepdims=True), 1e-12)}


def _self_attention(tower: Mapping[str, Any]) -> list[jax.Array]:
  """The self-attention probabilities (B', heads, T', T') a tower recorded, in layer order."""
  found = {
    path: v[0]
    for path, v in flax.traverse_util.flatten_dict(tower).items()
    if path[-1] in ("attention", "attention_weights")  # ours; flax's (a video's temporal layers)
  }
  return [found[path] for path in sorted(found, key=_layer_index)]


def _layer_index(path: tuple[str, ...]) -> int:
  match = _LAYER.search("/".join(path))
  return int(match.group(1)) if match else 0


def _rollout(attention: list[jax.Array], mask: jax.Array, pool: str) -> jax.Array:
  """Attention rollout (module docstring) read at the pooled token(s): (B, T). Layers that
  also attend to tokens appended after the tower's own (bottleneck fusion's) count the
  tower's tokens only."""
  t = mask.shape[1]
  rollout = None
  for a in attention:
    a = a[:, :, :t, :t].mean(1)  # the tower's tokens; heads averaged
    a = 0.5 * a + 0.5 * jnp.eye(a.shape[-1])[None]
    a = a / a.sum(-1, keepdims=True)
    rollout = a if rollout is None else a @ rollout
  if pool == "cls":
    return rollout[:, 0]
  real = mask.astype(jnp.float32)
  return (rollout * real[:, :, None]).sum(1) / jnp.maximum(real.sum(1, keepdims=True), 1.0)


def _cross_attention(model: Any, inter: Mapping[str, Any]) -> dict[str, jax.Array]:
  """{"cross_attention/<q>-><k>": (B, T_k)} of a cross-attention fusion's blocks."""
  blocks = inter.get("fusion", {})
  given = [m for m in model.modalities if f"{m}_tokens" in inter]
  out = {}
  for q in given:
    weights = [
      block["attn"]["attention_weights"][0]
      for name, block in sorted(blocks.items())
      if name.startswith(f"cross_{q}_") and "attn" in block
    ]
    if not weights:
      continue
    real = inter[f"{q}_mask"][0].astype(jnp.float32)  # (B, Tq)
    per_key = jnp.mean(jnp.stack([w.mean(1) for w in weights]), 0)  # (B, Tq, Tkv)
    per_key = (per_key * real[:, :, None]).sum(1) / jnp.maximum(real.sum(1, keepdims=True), 1.0)
    start = 0
    for k in (m for m in model.modalities if m != q):  # the keys: the others, in order
      length = inter[f"{k}_tokens"][0].shape[1] if k in given else 1  # absent: a zero stand-in
      if k in given:
        out[f"cross_attention/{q}->{k}"] = per_key[:, start : start + length]
      start += length
  return out


def patch_grid(values: np.ndarray) -> np.ndarray | None:
  """Token values (T,) of an image tower as its square patch grid, dropping the leading
  CLS / distillation tokens (up to 2) that make T a square plus them; None if no square fits."""
  for extra in (1, 0, 2):
    side = math.isqrt(len(values) - extra) if len(values) > extra else 0
    if side and side * side == len(values) - extra:
      return np.asarray(values[extra:]).reshape(side, side)
  return None
