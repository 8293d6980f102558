"""Evaluators: metric functions on numpy arrays, the evaluator kinds that feed them,
and the model-facing plumbing (`make_predict_fn`, `make_evaluators`).

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

Each type is one `Evaluator` subclass that declares its config keys, the head it
needs, its metric names, the inputs it reads and how it computes its metrics;
`EVALUATORS` maps `type` to it, and every other table (`CONFIG_KEYS`, the type
list of errors) derives from that one. Adding an evaluator is one class and one
line of `EVALUATORS`. The model side, `EvalContext`, is how an evaluator reads
its batches and runs the model, so the kinds run on fakes in tests.

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

from collections.abc import Callable, Iterable, Iterator, Mapping
import dataclasses
import functools
from typing import TYPE_CHECKING, Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from sklearn import metrics as sk_metrics

from mmtl import config_keys, data, lora, losses, sharding
from mmtl.data import device

if TYPE_CHECKING:
  from mmtl.models import fusion

# Keys every evaluator config takes, with their defaults or types (see mmtl.config_keys);
# `input` entries override config.input for this evaluator.
COMMON_KEYS = dict(type=str, every=0, input=config_keys.INPUT_SECTION, batch_size=int)

Predict = Callable[[Any], Mapping[str, Any]]  # batch -> model outputs + labels + example_weight


# Metric functions (numpy in, floats out).


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  return float((np.argmax(logits, -1) == labels).mean())


def macro_f1(predictions: np.ndarray, labels: np.ndarray) -> float:
  """Mean F1 over the classes that occur in `labels` or `predictions`."""
  return float(sk_metrics.f1_score(labels, predictions, average="macro"))


def retrieval_recall(
  image_embeds: np.ndarray,
  text_embeds: np.ndarray,
  ks: Iterable[int] = (1, 5, 10),
  text_to_image: np.ndarray | None = None,
) -> dict[str, float]:
  """Recall@k both ways; text j describes image `text_to_image[j]` (None: image j).

  Image->text is a hit at k if any of the image's texts is among the top k of
  all texts; text->image, if its image is among the top k of all images. A
  positive's rank is the number of wrong candidates scoring at least as high:
  ties (and NaN) count against it, so identical embeddings never score a hit.
  """
  num_images, num_texts = len(image_embeds), len(text_embeds)
  if text_to_image is None:
    if num_images != num_texts:
      raise ValueError(
        f"{num_images} images and {num_texts} texts: pass text_to_image (the "
        "image index of each text) unless text i is image i's only caption."
      )
    text_to_image = np.arange(num_texts)
  t2i = np.asarray(text_to_image)
  if t2i.shape != (num_texts,) or not 0 <= t2i.min() <= t2i.max() < num_images:
    raise ValueError(
      f"text_to_image (shape {t2i.shape}) must give each of the {num_texts} "
      f"texts an image index in [0, {num_images})."
    )
  counts = np.bincount(t2i, minlength=num_images)
  if not counts.all():
    raise ValueError(
      f"Image {int(np.argmin(counts))} has no text in text_to_image; every "
      "image needs at least one caption."
    )
  sims = image_embeds @ text_embeds.T  # (images, texts)
  positive = sims[t2i, np.arange(num_texts)]  # Each text's score with its own image.
  # i2t: rank of an image's best caption = candidates not scoring below it, less its captions.
  best = np.full(num_images, -np.inf, sims.dtype)
  with np.errstate(invalid="ignore"):  # NaN propagates: a NaN image never hits.
    np.maximum.at(best, t2i, positive)
  not_below = ~(sims < best[:, None])
  ranks = {
    "i2t": not_below.sum(1)
    - np.bincount(t2i, not_below[t2i, np.arange(num_texts)], minlength=num_images),
    "t2i": (~(sims < positive)).sum(0) - 1,
  }  # Less the positive itself.
  return {f"{d}_recall@{k}": float((rank < k).mean()) for d, rank in ranks.items() for k in ks}


def zeroshot_accuracy(
  image_embeds: np.ndarray, class_embeds: np.ndarray, labels: np.ndarray
) -> float:
  """Accuracy of predicting the class whose (normalized) text embedding is nearest."""
  return accuracy(image_embeds @ class_embeds.T, labels)


def ridge_probe_accuracy(
  train_x: np.ndarray,
  train_y: np.ndarray,
  test_x: np.ndarray,
  test_y: np.ndarray,
  num_classes: int,
  l2_reg: float = 1.0,
) -> float:
  """Closed-form ridge regression onto +-1 one-hot targets (big_vision's few-shot probe)."""
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  x = np.concatenate([(train_x - mean) / std, np.ones((len(train_x), 1))], 1).astype(np.float64)
  y = 2.0 * np.eye(num_classes)[train_y] - 1.0
  w = np.linalg.solve(x.T @ x + l2_reg * np.eye(x.shape[1]), x.T @ y)
  tx = np.concatenate([(test_x - mean) / std, np.ones((len(test_x), 1))], 1)
  return accuracy(tx @ w, test_y)


# Evaluator kinds.


def collect(predict: Predict, batches: Iterable[Any], keys: Iterable[str]) -> dict[str, np.ndarray]:
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


@dataclasses.dataclass(frozen=True)
class EvalContext:
  """What evaluators get from the model side (`make_evaluators`; fakes in tests).

  `make_batches(eval_cfg)` yields batches of the eval input; `open_input(eval_cfg)`
  opens it without reading (dataset, split and fields: `Evaluator.check`);
  `predict(variables, batch)` returns model outputs + labels + example_weight;
  `text_embedder(tokenizer, max_len)` gives `embed(variables, texts)`, normalized text
  embeddings (zeroshot).
  """

  head_type: str
  make_batches: Callable[[Mapping[str, Any]], Iterable[Any]]
  predict: Callable[[Any, Any], Mapping[str, Any]]
  open_input: Callable[[Mapping[str, Any]], Any] | None = None
  text_embedder: Callable[[str, int], Callable[[Any, list[str]], np.ndarray]] | None = None


class Evaluator:
  """One entry of `config.evals`: which batches, how often, which metrics.

  A kind declares `KEYS` (its config keys beyond `COMMON_KEYS`, with defaults or
  types), `HEAD` (the head_type it needs; None: any), `METRICS` and `compute`, and
  overrides `inputs` when it reads more than its own input.
  """

  KEYS: ClassVar[dict[str, Any]] = {}
  HEAD: ClassVar[str | None] = None
  METRICS: ClassVar[tuple[str, ...]] = ()

  def __init__(self, name: str, cfg: Mapping[str, Any], context: EvalContext):
    config_keys.check_keys(cfg, self.keys(), f"config.evals.{name}")
    if self.HEAD and self.HEAD != context.head_type:
      raise config_keys.ConfigError(
        f"config.evals.{name} is a {cfg.get('type')!r} evaluator, which needs a {self.HEAD!r} "
        f"head; the model has head_type={context.head_type!r}."
      )
    self.name, self.cfg, self.context = name, cfg, context
    self.every = int(self.option("every"))

  @classmethod
  def keys(cls) -> dict[str, Any]:
    """Every key of this kind's config, with its default or type (see mmtl.config_keys)."""
    return {**COMMON_KEYS, **cls.KEYS}

  def option(self, key: str) -> Any:
    """`cfg[key]`, else the default this kind declares for it."""
    return self.cfg.get(key, self.keys()[key])

  def metrics(self) -> tuple[str, ...]:
    """The metrics `compute` returns: `METRICS`, unless they depend on the config."""
    return self.METRICS

  def metric_names(self) -> list[str]:
    """The names `run` logs (`<evaluator>/<metric>`)."""
    return [f"{self.name}/{m}" for m in self.metrics()]

  def inputs(self) -> list[Mapping[str, Any]]:
    """The evaluator configs of every input `compute` reads."""
    return [self.cfg]

  def check(self) -> None:
    """Opens every input this evaluator reads, so a bad split or field fails before
    training starts rather than at the first evaluation."""
    if self.context.open_input is not None:
      for cfg in self.inputs():
        self.context.open_input(cfg)

  def due(self, step: int, total_steps: int) -> bool:
    return step == total_steps or bool(self.every and step % self.every == 0)

  def batches(self, cfg: Mapping[str, Any] | None = None) -> Iterable[Any]:
    """Batches of the input of `cfg` (default: this evaluator's config)."""
    return self.context.make_batches(self.cfg if cfg is None else cfg)

  def run(self, variables: Any) -> dict[str, float]:
    """`<evaluator>/<metric>` of the model with `variables`."""
    metrics = self.compute(variables, functools.partial(self.context.predict, variables))
    return {f"{self.name}/{k}": v for k, v in metrics.items()}

  def compute(self, variables: Any, predict: Predict) -> dict[str, float]:
    """The metrics, by name, of the model `predict` runs; `variables` ({"params", and
    "batch_stats" with BatchNorm}) are its variables, for other calls of the model
    (zeroshot's text embeddings)."""
    raise NotImplementedError


class Classification(Evaluator):
  """Accuracy, macro F1 and mean cross-entropy of the classification head."""

  HEAD = "classification"
  METRICS = ("accuracy", "macro_f1", "loss")

  def compute(self, variables: Any, predict: Predict) -> dict[str, float]:
    out = collect(predict, self.batches(), ["logits", "labels"])
    loss = losses.softmax_xent_per_example(out["logits"], out["labels"]).mean()
    return {
      "accuracy": accuracy(out["logits"], out["labels"]),
      "macro_f1": macro_f1(out["logits"].argmax(-1), out["labels"]),
      "loss": float(loss),
    }


class Regression(Evaluator):
  """Mean squared and absolute error of the regression head."""

  HEAD = "regression"
  METRICS = ("mse", "mae")

  def compute(self, variables: Any, predict: Predict) -> dict[str, float]:
    out = collect(predict, self.batches(), ["predictions", "labels"])
    err = out["predictions"] - out["labels"].reshape(out["predictions"].shape)
    return {"mse": float((err**2).mean()), "mae": float(np.abs(err).mean())}


class Retrieval(Evaluator):
  """Recall@k both ways over the first `captions` captions of each image (module doc)."""

  KEYS = dict(ks=(1, 5, 10), captions=1)
  HEAD = "contrastive"

  def __init__(self, name: str, cfg: Mapping[str, Any], context: EvalContext):
    super().__init__(name, cfg, context)
    self.captions, self.ks = self.option("captions"), tuple(self.option("ks"))
    if not (isinstance(self.captions, int) and self.captions >= 1):
      raise config_keys.ConfigError(
        f"config.evals.{name}.captions={self.captions!r}; use the number of captions per "
        "image (1: the first; 5: COCO / Flickr30k)."
      )

  def metrics(self) -> tuple[str, ...]:
    return tuple(f"{d}_recall@{k}" for d in ("i2t", "t2i") for k in self.ks)

  def inputs(self) -> list[Mapping[str, Any]]:
    """The image pass, and the text-only pass of later captions."""
    return [self._caption_cfg(i) for i in range(min(self.captions, 2))]

  def _caption_cfg(self, index: int) -> dict[str, Any]:
    """The eval config that reads caption `index` of every example; past the first, text
    only: the rows come in the same order in every pass, so they line up."""
    input_cfg = dict(self.cfg.get("input", {}), eval_text=index)
    if index:
      input_cfg["fields"] = {**input_cfg.get("fields", {}), "image": None, "audio": None}
    return dict(self.cfg, input=input_cfg)

  def compute(self, variables: Any, predict: Predict) -> dict[str, float]:
    out = collect(predict, self.batches(self._caption_cfg(0)), ["image_embeds", "text_embeds"])
    texts = [out["text_embeds"]] + [
      collect(predict, self.batches(self._caption_cfg(i)), ["text_embeds"])["text_embeds"]
      for i in range(1, self.captions)
    ]
    num_images = len(out["image_embeds"])  # Text j: caption j // num_images of image j % num_images
    return retrieval_recall(
      out["image_embeds"],
      np.concatenate(texts),
      self.ks,
      text_to_image=np.tile(np.arange(num_images), len(texts)),
    )


class Zeroshot(Evaluator):
  """The class whose prompts' mean text embedding is nearest the image's (CLIP)."""

  KEYS = dict(classnames=(list, tuple), prompts=(list, tuple), tokenizer=str, max_len=32)
  HEAD = "contrastive"
  METRICS = ("accuracy",)

  def __init__(self, name: str, cfg: Mapping[str, Any], context: EvalContext):
    super().__init__(name, cfg, context)
    if not (cfg.get("classnames") and cfg.get("tokenizer")):
      raise config_keys.ConfigError(
        f"config.evals.{name}: a zeroshot evaluator needs `classnames` "
        "and `tokenizer` (and optionally `prompts`, e.g. "
        "['a photo of a {}.'])."
      )
    self._embed_texts = context.text_embedder(cfg["tokenizer"], int(self.option("max_len")))

  def compute(self, variables: Any, predict: Predict) -> dict[str, float]:
    prompts = list(self.cfg.get("prompts") or ["{}"])
    class_embeds = []
    for classname in self.cfg["classnames"]:
      e = self._embed_texts(variables, [p.format(classname) for p in prompts]).mean(0)
      class_embeds.append(e / np.linalg.norm(e))
    out = collect(predict, self.batches(), ["image_embeds", "labels"])
    return {
      "accuracy": zeroshot_accuracy(out["image_embeds"], np.stack(class_embeds), out["labels"])
    }


class LinearProbe(Evaluator):
  """Ridge probe on frozen `features`, fit on the first `num_train` of `train_input`."""

  KEYS = dict(train_input=config_keys.INPUT_SECTION, num_train=2048, l2_reg=1.0)
  METRICS = ("accuracy",)

  def inputs(self) -> list[Mapping[str, Any]]:
    return [self.cfg, self._train_cfg()]

  def _train_cfg(self) -> dict[str, Any]:
    return dict(self.cfg, input={**self.cfg.get("input", {}), **self.cfg.get("train_input", {})})

  def compute(self, variables: Any, predict: Predict) -> dict[str, float]:
    num_train = int(self.option("num_train"))
    train = collect(
      predict, _take_examples(self.batches(self._train_cfg()), num_train), ["features", "labels"]
    )
    test = collect(predict, self.batches(), ["features", "labels"])
    num_classes = int(max(train["labels"].max(), test["labels"].max())) + 1
    return {
      "accuracy": ridge_probe_accuracy(
        train["features"][:num_train],
        train["labels"][:num_train],
        test["features"],
        test["labels"],
        num_classes,
        float(self.option("l2_reg")),
      )
    }


def _take_examples(batches: Iterable[Mapping[str, Any]], num: int) -> Iterator[Mapping[str, Any]]:
  """Batches until `num` examples were seen (a train iterator never ends)."""
  seen = 0
  for batch in batches:
    if seen >= num:
      return
    yield batch
    seen += len(next(iter(batch.values())))


# config.evals.<name>.type -> its evaluator.
EVALUATORS: dict[str, type[Evaluator]] = {
  "classification": Classification,
  "regression": Regression,
  "retrieval": Retrieval,
  "zeroshot": Zeroshot,
  "linear_probe": LinearProbe,
}
# Every key any evaluator takes: config.evals.<name> (each kind checks its own).
CONFIG_KEYS = {k: v for kind in EVALUATORS.values() for k, v in kind.keys().items()}


def make(name: str, cfg: Mapping[str, Any], context: EvalContext) -> Evaluator:
  """The evaluator of `config.evals.<name>` (`cfg`), of the kind its `type` names."""
  kind = cfg.get("type")
  if not isinstance(kind, str) or kind not in EVALUATORS:
    raise config_keys.ConfigError(
      f"config.evals.{name}.type={kind!r}; use one of {tuple(EVALUATORS)}."
    )
  return EVALUATORS[kind](name, cfg, context)


# The model side.


def make_predict_fn(
  model: fusion.FusionModel, mesh: jax.sharding.Mesh
) -> Callable[[Any, Any], dict[str, Any]]:
  """Jitted eval forward pass: outputs + labels + example_weight, replicated on every host."""

  def predict(variables, batch):
    out = model.apply({**variables, "params": lora.merge(variables["params"])}, batch)
    out = {k: v for k, v in out.items() if k not in ("logit_scale", "logit_bias")}  # Scalars.
    out["example_weight"] = batch.get(
      "example_weight", jnp.ones(next(iter(out.values())).shape[:1], jnp.float32)
    )
    if "labels" in batch:
      out["labels"] = batch["labels"]
    return out

  return jax.jit(predict, out_shardings=sharding.replicated(mesh))


def make_evaluators(
  config: mlc.ConfigDict, model: fusion.FusionModel, mesh: jax.sharding.Mesh, batch_size: int
) -> list[Evaluator]:
  """One evaluator per `config.evals` entry; eval inputs are `config.input` + overrides.
  Training and mmtl.evaluate both build theirs here, so they evaluate the same way."""
  process_index, process_count = sharding.process_data_shard(mesh)
  predict = make_predict_fn(model, mesh)

  def host_batches(eval_cfg):
    input_cfg = mlc.ConfigDict(config.input.to_dict())
    input_cfg.update(eval_cfg.get("input", {}))
    local_bs = int(eval_cfg.get("batch_size", batch_size)) // process_count
    return data.make_eval_iterator(
      input_cfg, batch_size=local_bs, process_index=process_index, process_count=process_count
    )

  def text_embedder(tokenizer_name, max_len):
    from mmtl import preprocess  # Imports mmtl.hf and the models: only zeroshot needs it.

    tokenizer = preprocess.load_tokenizer(tokenizer_name)

    def embed(variables, texts):
      tokens = tokenizer(
        texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="np"
      )
      batch = {
        "input_ids": tokens["input_ids"].astype(np.int32),
        "attention_mask": tokens["attention_mask"].astype(np.int32),
      }
      if "token_type_ids" in tokens:
        batch["token_type_ids"] = tokens["token_type_ids"].astype(np.int32)
      return np.asarray(predict(variables, batch)["text_embeds"])

    return embed

  context = EvalContext(
    head_type=model.head_type,
    predict=predict,
    open_input=host_batches,
    make_batches=lambda cfg: device.to_devices(host_batches(cfg), config, mesh),
    text_embedder=text_embedder,
  )
  return [make(name, cfg, context) for name, cfg in config.evals.items()]
