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

from mmtl import config as config_lib
from mmtl import losses

TYPES = ("classification", "regression", "retrieval", "zeroshot", "linear_probe")
# Keys of an evaluator config, with their defaults or types (see mmtl.config); `input`
# entries override config.input for this evaluator.
_KEYS = {
    "common": dict(type=str, every=0, input=config_lib.INPUT_SECTION, batch_size=int),
    "classification": {},
    "regression": {},
    "retrieval": dict(ks=(1, 5, 10)),
    "zeroshot": dict(classnames=(list, tuple), prompts=(list, tuple), tokenizer=str, max_len=32),
    "linear_probe": dict(train_input=config_lib.INPUT_SECTION, num_train=2048, l2_reg=1.0),
}
# Every key any evaluator takes: config.evals.<name> (each kind checks its own).
CONFIG_KEYS = {k: v for keys in _KEYS.values() for k, v in keys.items()}


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
               embed_texts: Callable[[Any, list[str]], np.ndarray] | None = None,
               open_input: Callable[[Mapping[str, Any]], Any] | None = None):
    """`make_batches(eval_cfg)` yields batches of the eval input; `open_input(eval_cfg)`
    opens it without reading (dataset, split and fields checked: `check`);
    `predict(params, batch)` returns model outputs + labels + example_weight;
    `embed_texts(params, texts)` returns normalized text embeddings (zeroshot)."""
    kind = cfg.get("type")
    if kind not in TYPES:
      raise config_lib.ConfigError(f"config.evals.{name}.type={kind!r}; use one of {TYPES}.")
    config_lib.check_keys(cfg, {**_KEYS["common"], **_KEYS[kind]}, f"config.evals.{name}")
    needs = {"classification": "classification", "linear_probe": None, "regression": "regression",
             "retrieval": "contrastive", "zeroshot": "contrastive"}[kind]
    if needs and needs != head_type:
      raise config_lib.ConfigError(f"config.evals.{name} is a {kind!r} evaluator, which needs a {needs!r} "
                       f"head; the model has head_type={head_type!r}.")
    if kind == "zeroshot" and not (cfg.get("classnames") and cfg.get("tokenizer")):
      raise config_lib.ConfigError(f"config.evals.{name}: a zeroshot evaluator needs `classnames` and "
                       "`tokenizer` (and optionally `prompts`, e.g. ['a photo of a {}.']).")
    self.name, self.cfg, self.kind = name, cfg, kind
    self.every = int(cfg.get("every", 0))
    self._make_batches, self._predict, self._embed_texts = make_batches, predict, embed_texts
    self._open_input = open_input

  def _inputs(self) -> list[Mapping[str, Any]]:
    """The evaluator configs of every input it reads (linear_probe: its train input too)."""
    if self.kind == "linear_probe":
      return [self.cfg, self._train_cfg()]
    return [self.cfg]

  def _train_cfg(self) -> dict[str, Any]:
    return dict(self.cfg, input={**self.cfg.get("input", {}), **self.cfg.get("train_input", {})})

  def metric_names(self) -> list[str]:
    """The names `run` logs (`<evaluator>/<metric>`)."""
    ks = self.cfg.get("ks", _KEYS["retrieval"]["ks"])
    names = {"classification": ["accuracy", "macro_f1", "loss"], "regression": ["mse", "mae"],
             "retrieval": [f"{d}_recall@{k}" for d in ("i2t", "t2i") for k in ks],
             "zeroshot": ["accuracy"], "linear_probe": ["accuracy"]}[self.kind]
    return [f"{self.name}/{n}" for n in names]

  def check(self) -> None:
    """Opens every input this evaluator reads, so a bad split or field fails before
    training starts rather than at the first evaluation."""
    if self._open_input is not None:
      for cfg in self._inputs():
        self._open_input(cfg)

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
    return retrieval_recall(out["image_embeds"], out["text_embeds"], self.cfg.get("ks", _KEYS["retrieval"]["ks"]))

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
    train_cfg = self._train_cfg()
    num_train = int(self.cfg.get("num_train", _KEYS["linear_probe"]["num_train"]))
    train = collect(predict, _take_examples(self._make_batches(train_cfg), num_train),
                    ["features", "labels"])
    test = collect(predict, self._make_batches(self.cfg), ["features", "labels"])
    num_classes = int(max(train["labels"].max(), test["labels"].max())) + 1
    return {"accuracy": ridge_probe_accuracy(
        train["features"][:num_train], train["labels"][:num_train], test["features"],
        test["labels"], num_classes, float(self.cfg.get("l2_reg", _KEYS["linear_probe"]["l2_reg"])))}


def _take_examples(batches: Iterable[Mapping[str, Any]], num: int):
  """Batches until `num` examples were seen (a train iterator never ends)."""
  seen = 0
  for batch in batches:
    if seen >= num:
      return
    yield batch
    seen += len(next(iter(batch.values())))
