"""Task losses, each a weighted mean over the batch, returned as (sum, weight).

`example_weight` (B,) carries class weights and zeroes eval padding rows, so
every loss is `sum(w * loss) / sum(w)`, not a mean over the batch size. The
losses return that numerator and denominator: the trainer adds them up over
microbatches (and the devices of a sharded batch) and divides once, so
`grad_accum_steps=k` optimizes exactly the full batch's objective whatever the
weights of each microbatch.
"""

from __future__ import annotations

from collections.abc import Mapping
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

# CLIP clips the learned temperature at 100 so logits cannot blow up.
MAX_LOGIT_SCALE = math.log(100.0)  # a Python float: no JAX backend at import time


def weighted_sum(values: jax.Array, weights: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """`(sum(w * values), sum(w))` over the batch (w = 1 without weights)."""
  values = values.astype(jnp.float32)
  weights = jnp.ones_like(values) if weights is None else weights.astype(jnp.float32)
  return (values * weights).sum(), weights.sum()


def mean_of(loss_sum: jax.Array, weight_sum: jax.Array) -> jax.Array:
  """The weighted mean of a `weighted_sum` (0 for a batch of zero weight)."""
  return loss_sum / jnp.maximum(weight_sum, 1e-6)


def sigmoid_xent_per_example(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Multi-label: the binary cross-entropy of each class's sigmoid against multi-hot
  `labels` (B, C) (optax), averaged over the classes, per example."""
  losses = optax.sigmoid_binary_cross_entropy(
    logits.astype(jnp.float32), jnp.asarray(labels, jnp.float32)
  )
  return losses.mean(-1)


def softmax_xent_per_example(
  logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
) -> jax.Array:
  """Cross-entropy of integer `labels` (B,) under `logits` (B, C), per example."""
  num_classes = logits.shape[-1]
  targets = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
  return -(targets * jax.nn.log_softmax(logits.astype(jnp.float32))).sum(-1)


def contrastive_per_example(
  image_embeds: jax.Array, text_embeds: jax.Array, logit_scale: jax.Array
) -> jax.Array:
  """CLIP's symmetric InfoNCE: row i's positive is column i, both directions."""
  scale = jnp.exp(jnp.minimum(logit_scale, MAX_LOGIT_SCALE))
  logits = scale * image_embeds @ text_embeds.T
  labels = jnp.arange(logits.shape[0])
  return 0.5 * (
    softmax_xent_per_example(logits, labels) + softmax_xent_per_example(logits.T, labels)
  )


def sigmoid_per_example(
  image_embeds: jax.Array, text_embeds: jax.Array, logit_scale: jax.Array, logit_bias: jax.Array
) -> jax.Array:
  """SigLIP's pairwise sigmoid loss (Zhai et al. 2023) per text, as SiglipModel computes it:
  every (text, image) pair is a binary match / no match (the diagonal matches), with logits
  exp(logit_scale) * cosine + logit_bias (unclipped, as SigLIP trains), summed over the
  batch's images. Each row needs every image, so it does not split over microbatches."""
  logits = jnp.exp(logit_scale) * text_embeds @ image_embeds.T + logit_bias
  signs = 2.0 * jnp.eye(logits.shape[0], dtype=logits.dtype) - 1.0
  return -jax.nn.log_sigmoid(signs * logits).sum(-1)


def token_loss(
  logits: jax.Array, batch: Mapping[str, Any], label_smoothing: float = 0.0
) -> tuple[jax.Array, jax.Array]:
  """Teacher-forced next-token cross-entropy as (sum, weight) over the batch's target tokens:
  `decoder_loss_mask` (B, T) drops padding and prompt tokens, `example_weight` whole rows.
  The mean is per token (every caption token counts the same), as captioning models train."""
  per_token = softmax_xent_per_example(logits, batch["decoder_target_ids"], label_smoothing)
  weights = batch["decoder_loss_mask"].astype(jnp.float32)
  if "example_weight" in batch:
    weights = weights * batch["example_weight"].astype(jnp.float32)[:, None]
  return weighted_sum(per_token, weights)


def ctc_per_example(
  logits: jax.Array, frame_mask: jax.Array, labels: jax.Array, blank: int, reduction: str
) -> tuple[jax.Array, jax.Array]:
  """CTC loss per example (optax.ctc_loss: the negative log-likelihood of `labels` (B, L),
  padded with ids < 0, over `logits` (B, T, V) where `frame_mask` (B, T)), and whether it is
  feasible (B,): the frames can hold the labels, one each and one blank between repeats.
  `reduction` as transformers' `ctc_loss_reduction`: "mean" divides each example's loss by
  its label count (torch's `ctc_loss(reduction="mean")` before the batch mean), "sum" keeps
  it. An infeasible example's loss is 0 (optax gives it ~1e5, torch inf)."""
  label_padding = labels < 0
  per_example = optax.ctc_loss(
    logits.astype(jnp.float32),
    1.0 - frame_mask.astype(jnp.float32),
    jnp.maximum(labels, 0),
    label_padding.astype(jnp.float32),
    blank_id=blank,
  )
  num_labels = (~label_padding).sum(1)
  repeats = ((labels[:, 1:] == labels[:, :-1]) & ~label_padding[:, 1:]).sum(1)
  feasible = frame_mask.sum(1) >= num_labels + repeats
  if reduction == "mean":
    per_example = per_example / jnp.maximum(num_labels, 1)
  elif reduction != "sum":
    raise ValueError(f"Unknown ctc_loss_reduction {reduction!r}; use 'mean' or 'sum'.")
  return jnp.where(feasible, per_example, 0.0), feasible


def masked_token_loss(logits: jax.Array, batch: Mapping[str, Any]) -> tuple[jax.Array, jax.Array]:
  """Cross-entropy of the masked tokens (`mlm_labels` >= 0) as (sum, weight): a mean over
  the batch's masked tokens, as transformers' BertForMaskedLM (rows weighted by
  `example_weight`)."""
  labels = batch["mlm_labels"]
  per_token = softmax_xent_per_example(logits, jnp.maximum(labels, 0))
  weights = (labels >= 0).astype(jnp.float32)
  if "example_weight" in batch:
    weights = weights * batch["example_weight"][:, None]
  return weighted_sum(per_token, weights)
