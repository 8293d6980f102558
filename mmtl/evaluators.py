"""Evaluators: metric functions on numpy arrays, and runners that feed them.

  config.evals.val = dict(type="classification", every=100,
                          input=dict(split="validation"))  # overrides of config.input

Types (metrics are logged as `<name>/<metric>`):
  classification: accuracy, macro_f1, loss
  regression:     mse, mae
  retrieval:      image->text and text->image Recall@1/5/10 (contrastive models;
                  example i's caption is the positive for image i)
  zeroshot:       accuracy of "the class whose prompts' text embedding is
                  closest" (contrastive models): `classnames`, `prompts`
                  (templates with `{}`, averaged as in CLIP), `tokenizer`, `max_len`
  linear_probe:   accuracy of a ridge-regression classifier on frozen
                  `features`, fit on `train_input` (first `num_train` examples)

Padding rows of the last eval batch have `example_weight == 0` and are dropped.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np

from mmtl import losses

TYPES = ("classification", "regression", "retrieval", "zeroshot", "linear_probe")
_KEYS = {
    "common": ("type", "every", "input", "batch_size"),
    "classification": (),
    "regression": (),
    "retrieval": ("ks",),
    "zeroshot": ("classnames", "prompts", "tokenizer", "max_len"),
    "linear_probe": ("train_input", "num_train", "l2_reg"),
}


# Metric functions (numpy in, floats out).


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  return float((np.argmax(logits, -1) == labels).mean())


def macro_f1(predictions: np.ndarray, labels: np.ndarray) -> float:
  """Mean F1 over the classes that occur in `labels` or `predictions` (sklearn's default)."""
  scores = []
  for c in np.union1d(labels, predictions):
    tp = np.sum((predictions == c) & (labels == c))
    fp = np.sum((predictions == c) & (labels != c))
    fn = np.sum((predictions != c) & (labels == c))
    scores.append(2 * tp / (2 * tp + fp + fn))
  return float(np.mean(scores))


def retrieval_recall(image_embeds: np.ndarray, text_embeds: np.ndarray,
                     ks: Iterable[int] = (1, 5, 10)) -> dict[str, float]:
  """Recall@k both ways; pair i (image i, text i) is the only positive."""
  sims = image_embeds @ text_embeds.T
  out = {}
  for direction, s in (("i2t", sims), ("t2i", sims.T)):
    # Rank of the positive = number of candidates scoring strictly higher.
    rank = (s > np.diag(s)[:, None]).sum(1)
    for k in ks:
      out[f"{direction}_recall@{k}"] = float((rank < k).mean())
  return out


def zeroshot_accuracy(image_embeds: np.ndarray, class_embeds: np.ndarray,
                      labels: np.ndarray) -> float:
  """Accuracy of predicting the class whose (normalized) text embedding is nearest."""
  return accuracy(image_embeds @ class_embeds.T, labels)


def ridge_probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                         test_y: np.ndarray, num_classes: int, l2_reg: float = 1.0) -> float:
  """Closed-form ridge regression onto +-1 one-hot targets (big_vision's few-shot probe)."""
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  x = np.concatenate([(train_x - mean) / std, np.ones((len(train_x), 1))], 1).astype(np.float64)
  y = 2.0 * np.eye(num_classes)[train_y] - 1.0
  w = np.linalg.solve(x.T @ x + l2_reg * np.eye(x.shape[1]), x.T @ y)
  tx = np.concatenate([(test_x - mean) / std, np.ones((len(test_x), 1))], 1)
  return accuracy(tx @ w, test_y)


# Runners.


def collect(predict: Callable[[Any], Mapping[str, Any]], batches: Iterable[Any],
            keys: Iterable[str]) -> dict[str, np.ndarray]:
  """Concatenated `keys` of `predict(batch)` over all batches, padding rows dropped."""
  keys = list(keys)
  parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
  for batch in batches:
    out = jax.device_get(predict(batch))
    real = np.asarray(out["example_weight"]) > 0
    for k in keys:
      parts[k].append(np.asarray(out[k])[real])
  if not parts[keys[0]]:
    raise ValueError("The evaluation split gave no batches; check its `input.split`.")
  return {k: np.concatenate(v) for k, v in parts.items()}


class Evaluator:
  """One entry of `config.evals`: which batches, how often, which metrics."""

  def __init__(self, name: str, cfg: Mapping[str, Any], *, head_type: str,
               make_batches: Callable[[Mapping[str, Any]], Iterable[Any]],
               predict: Callable[[Any, Any], Mapping[str, Any]],
               embed_texts: Callable[[Any, list[str]], np.ndarray] | None = None):
    """`make_batches(eval_cfg)` yields batches of the eval input;
    `predict(params, batch)` returns model outputs + labels + example_weight;
    `embed_texts(params, texts)` returns normalized text embeddings (zeroshot)."""
    kind = cfg.get("type")
    if kind not in TYPES:
      raise ValueError(f"config.evals.{name}.type={kind!r}; use one of {TYPES}.")
    allowed = _KEYS["common"] + _KEYS[kind]
    for key in cfg.keys():
      if key not in allowed:
        raise ValueError(f"config.evals.{name}.{key} is not a key of a {kind!r} evaluator "
                         f"(allowed: {', '.join(allowed)}).")
    needs = {"classification": "classification", "linear_probe": None, "regression": "regression",
             "retrieval": "contrastive", "zeroshot": "contrastive"}[kind]
    if needs and needs != head_type:
      raise ValueError(f"config.evals.{name} is a {kind!r} evaluator, which needs a {needs!r} "
                       f"head; the model has head_type={head_type!r}.")
    if kind == "zeroshot" and not (cfg.get("classnames") and cfg.get("tokenizer")):
      raise ValueError(f"config.evals.{name}: a zeroshot evaluator needs `classnames` and "
                       "`tokenizer` (and optionally `prompts`, e.g. ['a photo of a {}.']).")
    self.name, self.cfg, self.kind = name, cfg, kind
    self.every = int(cfg.get("every", 0))
    self._make_batches, self._predict, self._embed_texts = make_batches, predict, embed_texts

  def due(self, step: int, total_steps: int) -> bool:
    return step == total_steps or bool(self.every and step % self.every == 0)

  def run(self, params: Any) -> dict[str, float]:
    predict = functools.partial(self._predict, params)
    metrics = getattr(self, f"_{self.kind}")(params, predict)
    return {f"{self.name}/{k}": v for k, v in metrics.items()}

  def _classification(self, params, predict):
    out = collect(predict, self._make_batches(self.cfg), ["logits", "labels"])
    loss = losses.softmax_xent_per_example(out["logits"], out["labels"]).mean()
    return {"accuracy": accuracy(out["logits"], out["labels"]),
            "macro_f1": macro_f1(out["logits"].argmax(-1), out["labels"]),
            "loss": float(loss)}

  def _regression(self, params, predict):
    out = collect(predict, self._make_batches(self.cfg), ["predictions", "labels"])
    err = out["predictions"] - out["labels"].reshape(out["predictions"].shape)
    return {"mse": float((err ** 2).mean()), "mae": float(np.abs(err).mean())}

  def _retrieval(self, params, predict):
    out = collect(predict, self._make_batches(self.cfg), ["image_embeds", "text_embeds"])
    return retrieval_recall(out["image_embeds"], out["text_embeds"], self.cfg.get("ks", (1, 5, 10)))

  def _zeroshot(self, params, predict):
    prompts = list(self.cfg.get("prompts") or ["{}"])
    class_embeds = []
    for classname in self.cfg["classnames"]:
      e = self._embed_texts(params, [p.format(classname) for p in prompts]).mean(0)
      class_embeds.append(e / np.linalg.norm(e))
    out = collect(predict, self._make_batches(self.cfg), ["image_embeds", "labels"])
    return {"accuracy": zeroshot_accuracy(out["image_embeds"], np.stack(class_embeds),
                                          out["labels"])}

  def _linear_probe(self, params, predict):
    train_cfg = dict(self.cfg, input={**self.cfg.get("input", {}), **self.cfg.get("train_input", {})})
    num_train = int(self.cfg.get("num_train", 2048))
    train = collect(predict, _take_examples(self._make_batches(train_cfg), num_train),
                    ["features", "labels"])
    test = collect(predict, self._make_batches(self.cfg), ["features", "labels"])
    num_classes = int(max(train["labels"].max(), test["labels"].max())) + 1
    return {"accuracy": ridge_probe_accuracy(
        train["features"][:num_train], train["labels"][:num_train], test["features"],
        test["labels"], num_classes, float(self.cfg.get("l2_reg", 1.0)))}


def _take_examples(batches: Iterable[Mapping[str, Any]], num: int):
  """Batches until `num` examples were seen (a train iterator never ends)."""
  seen = 0
  for batch in batches:
    if seen >= num:
      return
    yield batch
    seen += len(next(iter(batch.values())))
