"""Unsupervised domain adaptation: an unlabeled target-domain stream beside the labeled
source batches, and a loss that pulls the fused features of both domains together.

  config.domain_adaptation = dict(
      method="dann",  # or "coral", "mmd"
      input=dict(dataset="mmtl_shapes/colour_shifted", split="train"),  # over config.input
      weight=1.0, schedule="ganin", gamma=10.0)
  config.model.domain_classifier = 256  # DANN's domain classifier (hidden width)

Each training batch carries the target rows under `TARGET` (as many as source rows,
from `config.input` overlaid with `input`; no label is read). The model runs once on
source and target rows together, the task loss sees the source rows only, and the
domain loss compares the fused `features` (the head's input) of the two halves:

  * dann (Ganin et al. 2016): a domain classifier (`fusion.DomainClassifier`) learns to
    tell target from source (binary cross-entropy, optax's); between it and the features
    a gradient reversal layer scales the gradient by -lambda, so the towers and the fusion
    learn features the classifier cannot separate.
  * coral (Sun & Saenko 2016, Deep CORAL): ||C_s - C_t||_F^2 / (4 d^2), the distance
    between the two domains' feature covariances.
  * mmd (Long et al. 2015, DAN): the squared maximum mean discrepancy between the domains'
    features under a sum of Gaussian kernels (`mmd_kernels` bandwidths, each
    `mmd_kernel_mul` times the last, centred on the batch's mean squared distance),
    the biased (V-statistic) estimate over the batch.

lambda follows Ganin et al.'s schedule, `weight * (2 / (1 + exp(-gamma p)) - 1)` with p
the fraction of training done (0 -> weight, so the random features of the first steps
are not aligned), or stays at `weight` (`schedule="constant"`, as Deep CORAL and DAN
train). CORAL and MMD are estimated on each (micro)batch, as the papers do.

The data side is deterministic and resumable like the source stream: the target
iterator is the trainer's own (`mmtl.data.make_train_iterator`), its state saved beside
the source's in every checkpoint. Without `config.domain_adaptation` nothing of this
runs and the step is the plain one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import optax

from mmtl import config_keys

METHODS = ("dann", "coral", "mmd")
SCHEDULES = ("ganin", "constant")
# The keys of config.domain_adaptation ("input": any config.input keys).
CONFIG_KEYS = dict(
  method=str,
  input=config_keys.INPUT_SECTION,
  weight=1.0,
  schedule="ganin",
  gamma=10.0,
  mmd_kernels=5,
  mmd_kernel_mul=2.0,
)
TARGET = "target_domain"  # the batch key of the target rows
# Heads whose loss adds up over examples and whose model exposes the fused `features`.
HEADS = ("classification", "regression")


def settings(da_cfg: Mapping[str, Any] | None) -> dict[str, Any] | None:
  """config.domain_adaptation with its defaults, checked; None when it is not set."""
  if not da_cfg:
    return None
  da_cfg = da_cfg.to_dict() if isinstance(da_cfg, mlc.ConfigDict) else dict(da_cfg)
  config_keys.check_keys(da_cfg, CONFIG_KEYS, "config.domain_adaptation")
  out = {k: v for k, v in CONFIG_KEYS.items() if k not in ("method", "input")}
  out.update(da_cfg)
  where = "config.domain_adaptation"
  if out.get("method") not in METHODS:
    raise config_keys.ConfigError(
      f"{where}.method={out.get('method')!r}: use one of {METHODS} (or leave "
      f"{where} empty to train on the source domain only)."
    )
  if not out.get("input"):
    raise config_keys.ConfigError(
      f"{where}.input is empty: name the target domain's unlabeled training data, e.g. "
      "dict(dataset='mmtl_shapes/colour_shifted', split='train') (config.input keys, over "
      "config.input)."
    )
  if out["schedule"] not in SCHEDULES:
    raise config_keys.ConfigError(
      f"{where}.schedule={out['schedule']!r}: use 'ganin' (lambda rises from 0 to weight) or "
      "'constant'."
    )
  if out["weight"] < 0 or out["gamma"] <= 0:
    raise config_keys.ConfigError(f"{where}: weight must be >= 0 and gamma > 0.")
  if out["mmd_kernels"] < 1 or out["mmd_kernel_mul"] <= 1:
    raise config_keys.ConfigError(f"{where}: mmd_kernels must be >= 1 and mmd_kernel_mul > 1.")
  return out


def check(config: mlc.ConfigDict) -> dict[str, Any] | None:
  """`settings` of the run, refused where they cannot work: one line naming the fix."""
  da = settings(config.get("domain_adaptation"))
  width = int(config.model.get("domain_classifier", 0) or 0)
  if da is None:
    if width:
      raise config_keys.ConfigError(
        "config.model.domain_classifier is set, but only DANN trains a domain classifier: set "
        "config.domain_adaptation.method='dann' (and its input), or domain_classifier=0."
      )
    return None
  method = da["method"]
  if (method == "dann") != bool(width):
    raise config_keys.ConfigError(
      "config.domain_adaptation.method='dann' needs config.model.domain_classifier (the domain "
      "classifier's hidden width, e.g. 256)."
      if method == "dann"
      else f"config.model.domain_classifier={width} is trained only by DANN; "
      f"method={method!r} does not use it: set it to 0."
    )
  if config.model.head not in HEADS:
    raise config_keys.ConfigError(
      f"config.domain_adaptation aligns the fused features a {' or '.join(HEADS)} head "
      f"reads; config.model.head={config.model.head!r} has none: use one of those heads."
    )
  if config.feature_cache.get("enable"):
    raise config_keys.ConfigError(
      "config.domain_adaptation reads the target domain's inputs, which the feature cache does "
      "not hold: set config.feature_cache.enable=False."
    )
  return da


def target_input(config: mlc.ConfigDict, da: Mapping[str, Any]) -> dict[str, Any]:
  """The target stream's config.input: the run's, overlaid with `da["input"]` (nested
  sections key by key); no label, target text, class rebalancing or cross-validation fold
  (the target domain is unlabeled)."""
  from mmtl.data import options  # pylint: disable=g-import-not-at-top

  cfg = mlc.ConfigDict(options.input_config(config.input).to_dict())
  cfg.update(da["input"])
  cfg.fields.update(label=None, target=None)
  cfg.update(class_weights=None, class_sampling=None, fold=None)
  return options.input_config(cfg).to_dict()


def input_fields() -> set[str]:
  """The batch fields a model reads: every modality's inputs and presence flags."""
  from mmtl.modalities import MODALITIES  # pylint: disable=g-import-not-at-top

  return {f for name, m in MODALITIES.items() for f in (*m.inputs, f"{name}_present")}


class PairedIterator:
  """Source batches, each carrying the model inputs of the next target batch under
  `TARGET`. Its state is both iterators' states, so a resumed run continues both streams
  where they were."""

  def __init__(self, source: Iterator[Any], target: Iterator[Any]):
    self.source, self.target = source, target
    self.fields = input_fields()

  def __iter__(self) -> PairedIterator:
    return self

  def __next__(self) -> dict[str, Any]:
    batch = dict(next(self.source))
    target = next(self.target)
    batch[TARGET] = {k: v for k, v in target.items() if k in self.fields and k in batch}
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"source": self.source.get_state(), "target": self.target.get_state()}

  def set_state(self, state: Mapping[str, Any]) -> None:
    self.source.set_state(state["source"])
    self.target.set_state(state["target"])


def check_batches(batch: Mapping[str, Any]) -> None:
  """A `PairedIterator` batch's target rows give every model input the source rows do, in
  the same shape."""
  target = batch[TARGET]
  for key in sorted(input_fields() & set(batch)):
    if key not in target:
      raise config_keys.ConfigError(
        f"The target domain's batches have no {key!r}, which the source batches feed the "
        "model: give the same modalities in config.domain_adaptation.input.fields."
      )
    if jnp.shape(target[key]) != jnp.shape(batch[key]):
      raise config_keys.ConfigError(
        f"{key!r} is {jnp.shape(target[key])} in the target domain's batches and "
        f"{jnp.shape(batch[key])} in the source's: give both the same preprocessing "
        "(config.domain_adaptation.input overrides config.input)."
      )


def joint_inputs(batch: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
  """(source rows followed by target rows of every field the target gives, the number of
  source rows)."""
  target = batch[TARGET]
  n = batch[next(iter(target))].shape[0]
  joint = {k: jnp.concatenate([batch[k], v], axis=0) for k, v in target.items()}
  return joint, n


def source_rows(outputs: Mapping[str, Any], n: int) -> dict[str, Any]:
  """The outputs of the first `n` rows (batched outputs; scalars as they are)."""
  return {k: v[:n] if jnp.ndim(v) else v for k, v in outputs.items()}


def coefficient(step: jax.Array, total_steps: int, da: Mapping[str, Any]) -> jax.Array:
  """lambda at (0-based) `step`: Ganin et al.'s 2 / (1 + exp(-gamma p)) - 1 times `weight`
  (p = step / total_steps), or `weight` throughout."""
  if da["schedule"] == "constant":
    return jnp.float32(da["weight"])
  p = jnp.asarray(step, jnp.float32) / max(int(total_steps), 1)
  return da["weight"] * (2.0 / (1.0 + jnp.exp(-da["gamma"] * p)) - 1.0)


def coral(source: jax.Array, target: jax.Array) -> jax.Array:
  """Deep CORAL's loss: ||C_s - C_t||_F^2 / (4 d^2) of (n, d) features (unbiased
  covariances, as Sun & Saenko)."""

  def covariance(x):
    x = x.astype(jnp.float32)
    x = x - x.mean(0, keepdims=True)
    return x.T @ x / max(x.shape[0] - 1, 1)

  d = source.shape[-1]
  return jnp.sum((covariance(source) - covariance(target)) ** 2) / (4.0 * d * d)


def mmd(source: jax.Array, target: jax.Array, kernels: int = 5, kernel_mul: float = 2.0):
  """Squared MMD of (n, d) and (m, d) features under the sum of `kernels` Gaussian kernels
  exp(-|x - y|^2 / s_k), s_k = base * kernel_mul^(k - kernels // 2), base the batch's mean
  squared distance (no gradient through the bandwidths); the biased estimate
  mean k(s, s') + mean k(t, t') - 2 mean k(s, t)."""
  x = jnp.concatenate([source, target], axis=0).astype(jnp.float32)
  sq = jnp.sum(x * x, axis=-1)
  dist = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)
  total = x.shape[0]
  base = jax.lax.stop_gradient(dist.sum() / (total * total - total))
  widths = base * kernel_mul ** (jnp.arange(kernels, dtype=jnp.float32) - kernels // 2)
  k = jnp.exp(-dist[None] / jnp.maximum(widths[:, None, None], 1e-12)).sum(0)
  n = source.shape[0]
  return k[:n, :n].mean() + k[n:, n:].mean() - 2.0 * k[:n, n:].mean()


def domain_classifier_loss(domain_logits: jax.Array, n: int) -> jax.Array:
  """DANN's domain loss: mean binary cross-entropy of the domain classifier's logits
  (rows :n source, label 0; the rest target, label 1)."""
  labels = (jnp.arange(domain_logits.shape[0]) >= n).astype(jnp.float32)
  return optax.sigmoid_binary_cross_entropy(domain_logits.astype(jnp.float32), labels).mean()


def domain_loss(
  outputs: Mapping[str, jax.Array], n: int, da: Mapping[str, Any], lam: jax.Array
) -> jax.Array:
  """The domain term added to the task loss, of the joint outputs (`n` source rows first):
  DANN's classifier loss (lambda acts in its gradient reversal), or lambda x CORAL / MMD
  of the fused features."""
  if da["method"] == "dann":
    return domain_classifier_loss(outputs["domain_logits"], n)
  features = outputs["features"]
  if da["method"] == "coral":
    return lam * coral(features[:n], features[n:])
  return lam * mmd(features[:n], features[n:], da["mmd_kernels"], da["mmd_kernel_mul"])
