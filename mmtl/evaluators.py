"""Evaluators: metric functions on numpy arrays, and runners that feed them.

  config.evals.val = dict(type="classification", every=100,
                          input=dict(split="validation"))  # overrides of config.input

Types (metrics are logged as `<name>/<metric>`):
  classification: accuracy, macro_f1, loss
  regression:     mse, mae
  retrieval:      image->text and text->image Recall@k, `ks` (1, 5, 10), of contrastive
                  models over the first `captions` captions of each image (see below)
  zeroshot:       accuracy of "the class whose prompts' text embedding is
                  closest" (contrastive models): `classnames`, `prompts`
                  (templates with `{}`, averaged as in CLIP), `tokenizer`, `max_len`
  linear_probe:   accuracy of a ridge-regression classifier on frozen
                  `features`, fit on `train_input` (first `num_train` examples)

Padding rows of the last eval batch have `example_weight == 0` and are dropped.

Retrieval protocol: the first `captions` captions of each image (a sequence
field such as "captions/text"; caption c is read with `input.eval_text=c`).
`captions=1` (the default): image i and its first caption are the only positive
pair. `captions=5`: the COCO 5k / Flickr30k protocol of published numbers:
image->text is a hit at k if any of the image's 5 captions ranks in the top k
among all captions, and each caption retrieves its image among all images
(25,000 texts on COCO 5k, where a few images have more than 5). Every image
needs that many captions; each caption past the first costs one text-only pass
over the split. Ties count against the positive: a wrong candidate scoring equal
to it (or NaN) ranks above it, so collapsed embeddings (a dead tower, blanked
text) score 0, not 1. Metric names do not say which protocol made them, so that
`config.best_metric` and sweep tables keep one name per evaluator; the protocol
is the evaluator's `captions`, saved in the run's config.json: name the
evaluator after it (e.g. `config.evals.coco5k`) for numbers that leave the run.
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
    "retrieval": dict(ks=(1, 5, 10), captions=1),
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
                     ks: Iterable[int] = (1, 5, 10),
                     text_to_image: np.ndarray | None = None) -> dict[str, float]:
  """Recall@k both ways; text j describes image `text_to_image[j]` (None: image j).

  Image->text is a hit at k if any of the image's texts is among the top k of
  all texts; text->image, if its image is among the top k of all images. A
  positive's rank is the number of wrong candidates scoring at least as high:
  ties (and NaN) count against it, so identical embeddings never score a hit.
  """
  num_images, num_texts = len(image_embeds), len(text_embeds)
  if text_to_image is None:
    if num_images != num_texts:
      raise ValueError(f"{num_images} images and {num_texts} texts: pass text_to_image (the "
                       "image index of each text) unless text i is image i's only caption.")
    text_to_image = np.arange(num_texts)
  t2i = np.asarray(text_to_image)
  if t2i.shape != (num_texts,) or not 0 <= t2i.min() <= t2i.max() < num_images:
    raise ValueError(f"text_to_image (shape {t2i.shape}) must give each of the {num_texts} "
                     f"texts an image index in [0, {num_images}).")
  counts = np.bincount(t2i, minlength=num_images)
  if not counts.all():
    raise ValueError(f"Image {int(np.argmin(counts))} has no text in text_to_image; every "
                     "image needs at least one caption.")
  sims = image_embeds @ text_embeds.T  # (images, texts)
  positive = sims[t2i, np.arange(num_texts)]  # Each text's score with its own image.
  # i2t: rank of an image's best caption = candidates not scoring below it, less its captions.
  best = np.full(num_images, -np.inf, sims.dtype)
  with np.errstate(invalid="ignore"):  # NaN propagates: a NaN image never hits.
    np.maximum.at(best, t2i, positive)
  not_below = ~(sims < best[:, None])
  ranks = {"i2t": not_below.sum(1) - np.bincount(t2i, not_below[t2i, np.arange(num_texts)],
                                                  minlength=num_images),
           "t2i": (~(sims < positive)).sum(0) - 1}  # Less the positive itself.
  return {f"{d}_recall@{k}": float((rank < k).mean()) for d, rank in ranks.items() for k in ks}


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
      raise config_lib.ConfigError(f"config.evals.{name} is a {kind!r} evaluator, which needs a "
                                   f"{needs!r} head; the model has head_type={head_type!r}.")
    captions = cfg.get("captions", _KEYS["retrieval"]["captions"])
    if kind == "retrieval" and not (isinstance(captions, int) and captions >= 1):
      raise config_lib.ConfigError(f"config.evals.{name}.captions={captions!r}; use the number of "
                                   "captions per image (1: the first; 5: COCO / Flickr30k).")
    if kind == "zeroshot" and not (cfg.get("classnames") and cfg.get("tokenizer")):
      raise config_lib.ConfigError(f"config.evals.{name}: a zeroshot evaluator needs `classnames` "
                                   "and `tokenizer` (and optionally `prompts`, e.g. "
                                   "['a photo of a {}.']).")
    self.name, self.cfg, self.kind = name, cfg, kind
    self.captions, self.ks = captions, tuple(cfg.get("ks", _KEYS["retrieval"]["ks"]))
    self.every = int(cfg.get("every", 0))
    self._make_batches, self._predict, self._embed_texts = make_batches, predict, embed_texts
    self._open_input = open_input

  def _inputs(self) -> list[Mapping[str, Any]]:
    """The evaluator configs of every input it reads (linear_probe: its train input too)."""
    if self.kind == "linear_probe":
      return [self.cfg, self._train_cfg()]
    if self.kind == "retrieval":  # The image pass, and the text-only pass of later captions.
      return [self._caption_cfg(i) for i in range(min(self.captions, 2))]
    return [self.cfg]

  def _caption_cfg(self, index: int) -> dict[str, Any]:
    """The eval config that reads caption `index` of every example; past the first, text
    only: the rows come in the same order in every pass, so they line up."""
    input_cfg = dict(self.cfg.get("input", {}), eval_text=index)
    if index:
      input_cfg["fields"] = {**input_cfg.get("fields", {}), "image": None, "audio": None}
    return dict(self.cfg, input=input_cfg)

  def _train_cfg(self) -> dict[str, Any]:
    return dict(self.cfg, input={**self.cfg.get("input", {}), **self.cfg.get("train_input", {})})

  def metric_names(self) -> list[str]:
    """The names `run` logs (`<evaluator>/<metric>`)."""
    names = {"classification": ["accuracy", "macro_f1", "loss"], "regression": ["mse", "mae"],
             "retrieval": [f"{d}_recall@{k}" for d in ("i2t", "t2i") for k in self.ks],
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
    out = collect(predict, self._make_batches(self._caption_cfg(0)),
                  ["image_embeds", "text_embeds"])
    texts = [out["text_embeds"]] + [
        collect(predict, self._make_batches(self._caption_cfg(i)), ["text_embeds"])["text_embeds"]
        for i in range(1, self.captions)]
    num_images = len(out["image_embeds"])  # Text j: caption j // num_images of image j % num_images
    return retrieval_recall(out["image_embeds"], np.concatenate(texts), self.ks,
                            text_to_image=np.tile(np.arange(num_images), len(texts)))

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
    probe = {**_KEYS["linear_probe"], **self.cfg}
    num_train = int(probe["num_train"])
    train = collect(predict, _take_examples(self._make_batches(train_cfg), num_train),
                    ["features", "labels"])
    test = collect(predict, self._make_batches(self.cfg), ["features", "labels"])
    num_classes = int(max(train["labels"].max(), test["labels"].max())) + 1
    return {"accuracy": ridge_probe_accuracy(
        train["features"][:num_train], train["labels"][:num_train], test["features"],
        test["labels"], num_classes, float(probe["l2_reg"]))}


def _take_examples(batches: Iterable[Mapping[str, Any]], num: int):
  """Batches until `num` examples were seen (a train iterator never ends)."""
  seen = 0
  for batch in batches:
    if seen >= num:
      return
    yield batch
    seen += len(next(iter(batch.values())))
