"""Evaluator metrics on hand-made inputs; the evaluator kinds, their table and plumbing."""

import dataclasses
import json
import logging

import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from mmtl import config as config_lib
from mmtl import data, metrics, modalities, sharding
from mmtl import evaluators as ev
from mmtl.data import options, transforms


def test_accuracy_and_class_report():
  logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
  labels = np.array([0, 1, 1, 1])
  assert ev.accuracy(logits, labels) == 0.75
  report = ev.class_report(logits.argmax(-1), labels, 3)
  # class 0: tp=1 fp=1 fn=0 -> P 1/2, R 1, F1 2/3; class 1: tp=2 fp=0 fn=1 -> P 1, R 2/3,
  # F1 0.8; class 2 never occurs: zeros, support 0, left out of the averages.
  per_class = report["per_class"]
  assert per_class["precision"] == pytest.approx([0.5, 1.0, 0.0])
  assert per_class["recall"] == pytest.approx([1.0, 2 / 3, 0.0])
  assert per_class["f1"] == pytest.approx([2 / 3, 0.8, 0.0])
  assert per_class["support"] == [1, 3, 0]
  averages = report["averages"]
  assert averages["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
  assert averages["macro_precision"] == pytest.approx(0.75)
  assert averages["weighted_recall"] == pytest.approx((1 + 3 * 2 / 3) / 4)
  assert averages["weighted_f1"] == pytest.approx((2 / 3 + 3 * 0.8) / 4)
  assert report["confusion_matrix"] == [[1, 0, 0], [1, 2, 0], [0, 0, 0]]
  # A class only predicted counts (F1 0): the union of labels and predictions.
  only_predicted = ev.class_report(np.array([0, 1]), np.array([0, 0]), 2)["averages"]
  assert only_predicted["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)


def _pairwise_auc(scores, positive):
  """ROC-AUC as the probability that a positive outscores a negative (ties: half)."""
  pos, neg = scores[positive], scores[~positive]
  return ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (
    len(pos) * len(neg)
  )


def test_ranking_auc_binary_and_one_vs_rest():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 40)
  p1 = np.clip(0.3 * labels + rng.uniform(0, 0.7, 40), 0, 1)
  out = ev.ranking_auc(np.stack([1 - p1, p1], 1), labels)
  assert out["roc_auc"] == pytest.approx(_pairwise_auc(p1, labels == 1))
  # Average precision: the mean over positives of the precision at their rank.
  order = np.argsort(-p1)
  hits = labels[order] == 1
  precision_at_hits = np.cumsum(hits)[hits] / (np.flatnonzero(hits) + 1)
  assert out["pr_auc"] == pytest.approx(precision_at_hits.mean())
  # 4 classes, class 3 never occurs: the mean one-vs-rest AUC over classes 0-2.
  labels = rng.integers(0, 3, 60)
  probs = rng.dirichlet(np.ones(4), 60) + 0.5 * np.eye(4)[labels]
  out = ev.ranking_auc(probs, labels)
  expected = np.mean([_pairwise_auc(probs[:, c], labels == c) for c in range(3)])
  assert out["roc_auc"] == pytest.approx(expected)
  assert np.isnan(ev.ranking_auc(probs, np.zeros(60, int))["roc_auc"])


def test_calibration_error_of_hand_made_bins():
  # Bin (0.6, 0.8]: confidences 0.7, 0.7, one right -> |0.5 - 0.7|; bin (0.8, 1]: 0.9 twice,
  # both right -> |1 - 0.9|. ECE = 2/4 * 0.2 + 2/4 * 0.1.
  probs = np.array([[0.7, 0.3], [0.3, 0.7], [0.9, 0.1], [0.1, 0.9]])
  labels = np.array([0, 0, 0, 1])
  out = ev.calibration(probs, labels, num_bins=5)
  assert out["ece"] == pytest.approx(0.15)
  assert out["count"] == [0, 0, 0, 2, 2]
  assert out["accuracy"][3:] == pytest.approx([0.5, 1.0])
  assert out["confidence"][3:] == pytest.approx([0.7, 0.9])
  # A confidence on an edge falls in the bin it closes: 0.6 -> (0.4, 0.6].
  assert ev.calibration(np.array([[0.6, 0.4]]), np.array([0]), 5)["count"] == [0, 0, 1, 0, 0]


def _clusters(num_classes, per_class, noise, seed=0):
  """Features around one random direction per class."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(num_classes, 16))
  labels = np.repeat(np.arange(num_classes), per_class)
  return centres[labels] + noise * rng.normal(size=(len(labels), 16)), labels


def test_few_shot_episodes_separate_clusters_and_not_noise():
  kw = dict(ways=3, shots=(1, 5), queries=4, episodes=20, seed=0)
  clear = ev.few_shot_episodes(*_clusters(6, 12, noise=0.01), **kw)
  assert set(clear) == {"logistic_1shot", "logistic_5shot", "prototype_1shot", "prototype_5shot"}
  assert all(v.shape == (20,) and (v == 1.0).all() for v in clear.values())
  noise = ev.few_shot_episodes(*_clusters(6, 12, noise=100.0), **kw)
  assert all(0.1 < v.mean() < 0.6 for v in noise.values())  # chance: 1/3
  # Seeded: the same episodes again; more shots help on overlapping clusters.
  features, labels = _clusters(6, 30, noise=1.5, seed=1)
  kw = dict(kw, episodes=200)
  a, b = ev.few_shot_episodes(features, labels, **kw), ev.few_shot_episodes(features, labels, **kw)
  assert all((a[k] == b[k]).all() for k in a)
  assert a["prototype_5shot"].mean() > a["prototype_1shot"].mean() + 0.05
  assert a["logistic_5shot"].mean() > a["logistic_1shot"].mean() + 0.05


def test_mean_and_ci95_uses_students_t():
  mean, half = metrics.mean_and_ci95(np.array([0.0, 1.0, 0.0, 1.0]))
  # sd 0.5774, t(0.975, 3) = 3.182 (a t table): 3.182 * 0.5774 / 2.
  assert mean == 0.5 and half == pytest.approx(0.9186, abs=1e-4)


def test_few_shot_needs_enough_classes_and_examples():
  features, labels = _clusters(3, 5, noise=0.1)
  with pytest.raises(
    ValueError,
    match=r"config.evals.fs: 4-way episodes need 4 classes with at least 6 examples \(1 shots "
    r"\+ 5 queries\) each; the input has 0 \(class 0: 5, class 1: 5, class 2: 5\)",
  ):
    ev.few_shot_episodes(
      features, labels, ways=4, shots=(1,), queries=5, episodes=1, seed=0, where="config.evals.fs"
    )
  with pytest.raises(config_lib.ConfigError, match=r"config.evals.fs.ways=1; use an integer"):
    ev.make("fs", {"type": "few_shot", "ways": 1}, _context())
  with pytest.raises(config_lib.ConfigError, match=r"config.evals.fs.shots=\(0,\)"):
    ev.make("fs", {"type": "few_shot", "shots": (0,)}, _context())


def test_few_shot_evaluator_logs_mean_and_interval_per_classifier_and_k():
  features, labels = _clusters(4, 10, noise=0.5)
  batches = [{"features": features, "labels": labels, "example_weight": np.ones(40)}]
  cfg = {"type": "few_shot", "ways": 3, "shots": (2, 1), "queries": 3, "episodes": 50}
  e = ev.make("fs", cfg, _context(batches))
  out = e.run(variables=None)
  assert (
    list(out)
    == e.metric_names()
    == [
      f"fs/{m}_{k}shot{ci}"
      for m in ("logistic", "prototype")
      for k in (1, 2)
      for ci in ("", "_ci95")
    ]
  )
  direct = ev.few_shot_episodes(
    features, labels, ways=3, shots=(1, 2), queries=3, episodes=50, seed=0
  )
  assert out["fs/logistic_2shot"] == pytest.approx(direct["logistic_2shot"].mean())
  assert out["fs/logistic_2shot_ci95"] == pytest.approx(
    metrics.mean_and_ci95(direct["logistic_2shot"])[1]
  )


def test_multilabel_metrics_against_hand_computed_scores():
  truth = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0]])
  probs = np.array([[0.9, 0.2, 0.1], [0.4, 0.8, 0.3], [0.6, 0.7, 0.2], [0.1, 0.3, 0.4]])
  out = ev.multilabel_metrics(probs, truth, threshold=0.5)
  # Class 0 ranks 0.9 (+), 0.6 (-), 0.4 (+), 0.1: AP = (1/1 + 2/3) / 2; class 1 ranks
  # 0.8 (+), 0.7 (+): AP 1; class 2 has no positive and is left out.
  assert out["map"] == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)
  assert out["roc_auc"] == pytest.approx((_pairwise_auc(probs[:, 0], truth[:, 0] == 1) + 1) / 2)
  # At 0.5: predicted {0}, {1}, {0, 1}, {}: tp 3 (0,0), (1,1), (2,1); fp 1 (2,0); fn 1 (1,0).
  assert out["micro_f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
  # Per class F1: class 0 tp 1 fp 1 fn 1 -> 0.5; class 1 tp 2 -> 1; class 2 nothing -> 0.
  assert out["macro_f1"] == pytest.approx((0.5 + 1 + 0) / 3)
  assert out["exact_match"] == 0.5  # rows 0 and 3


def test_retrieval_recall_both_directions():
  image = np.eye(3)
  # text 0 matches image 0; texts 1 and 2 are swapped (each is closest to the other image).
  text = np.array([[1.0, 0, 0], [0, 0.1, 0.9], [0, 0.9, 0.1]])
  r = ev.retrieval_recall(image, text, ks=(1, 2))
  assert r["i2t_recall@1"] == pytest.approx(1 / 3) and r["i2t_recall@2"] == 1.0
  assert r["t2i_recall@1"] == pytest.approx(1 / 3) and r["t2i_recall@2"] == 1.0


def test_retrieval_recall_ties_count_against_the_positive():
  # Text 1 duplicates text 0: image 0 ties its caption with text 1 (rank 1); image 1 scores
  # 0 with every text (rank 2); text 1 ties its image 1 with image 2, below image 0 (rank 2).
  image = np.eye(3)
  text = np.array([[1.0, 0, 0], [1.0, 0, 0], [0, 0, 1.0]])
  r = ev.retrieval_recall(image, text, ks=(1, 2, 3))
  assert [r[f"i2t_recall@{k}"] for k in (1, 2, 3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
  assert [r[f"t2i_recall@{k}"] for k in (1, 2, 3)] == pytest.approx([2 / 3, 2 / 3, 1.0])


def test_retrieval_recall_of_collapsed_embeddings_is_no_better_than_chance():
  images = np.random.default_rng(0).normal(size=(50, 8))
  collapsed = np.ones((50, 8))  # Every text the same (a dead text tower, blanked text).
  r = ev.retrieval_recall(images, collapsed, ks=(1, 5, 50))
  # Image->text: all 49 wrong texts tie with the positive. Text->image: the images are
  # ranked the same for every text, so each rank occurs once: recall@k = k / 50.
  assert r == pytest.approx(
    {
      "i2t_recall@1": 0.0,
      "i2t_recall@5": 0.0,
      "i2t_recall@50": 1.0,
      "t2i_recall@1": 1 / 50,
      "t2i_recall@5": 5 / 50,
      "t2i_recall@50": 1.0,
    }
  )
  r = ev.retrieval_recall(collapsed, images, ks=(1,))  # Collapsed images: the other way round.
  assert r == pytest.approx({"i2t_recall@1": 1 / 50, "t2i_recall@1": 0.0})
  nan = ev.retrieval_recall(images, np.full((50, 8), np.nan), ks=(1, 49))
  assert set(nan.values()) == {0.0}


def _brute_force_recall(sims, text_to_image, k):
  """Recall@k from full sorts (no ties in `sims`): the definition, spelled out."""
  i2t = [any(text_to_image[j] == i for j in np.argsort(-sims[i])[:k]) for i in range(len(sims))]
  t2i = [text_to_image[j] in np.argsort(-sims[:, j])[:k] for j in range(sims.shape[1])]
  return np.mean(i2t), np.mean(t2i)


def test_retrieval_recall_with_several_captions_per_image():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(20, 4))
  text_to_image = rng.permutation(np.repeat(np.arange(20), 5))
  texts = images[text_to_image] + rng.normal(0, 1.5, (100, 4))  # Noisy captions, 5 per image.
  r = ev.retrieval_recall(images, texts, ks=(1, 5, 10), text_to_image=text_to_image)
  for k in (1, 5, 10):
    i2t, t2i = _brute_force_recall(images @ texts.T, text_to_image, k)
    assert (r[f"i2t_recall@{k}"], r[f"t2i_recall@{k}"]) == pytest.approx((i2t, t2i))
  assert 0 < r["i2t_recall@1"] < 1 and 0 < r["t2i_recall@1"] < 1


def test_retrieval_recall_multi_caption_ties():
  images = np.eye(2)
  # Image 0's two captions tie with each other at the top: a hit (they are both positives).
  # Image 1's captions score 0.5, tied with a caption of image 0: a miss at 1, a hit at 2.
  texts = np.array([[1.0, 0], [1.0, 0], [0.5, 0.5], [0.5, 0.5], [0, 0.5]])
  r = ev.retrieval_recall(images, texts, ks=(1, 2), text_to_image=np.array([0, 0, 0, 1, 1]))
  assert r["i2t_recall@1"] == 0.5 and r["i2t_recall@2"] == 1.0
  # Texts 2 and 3 tie between the images: a miss at 1 for both.
  assert r["t2i_recall@1"] == pytest.approx(3 / 5) and r["t2i_recall@2"] == 1.0
  collapsed = ev.retrieval_recall(
    np.eye(50), np.ones((250, 50)), ks=(1, 200), text_to_image=np.repeat(np.arange(50), 5)
  )
  assert collapsed["i2t_recall@1"] == 0.0 and collapsed["i2t_recall@200"] == 0.0


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(), "pass text_to_image"),
    (dict(text_to_image=np.array([0, 1, 3, 1])), r"in \[0, 3\)"),
    (dict(text_to_image=np.array([0, 0, 1, 1])), "Image 2 has no text"),
  ],
)
def test_retrieval_recall_bad_text_to_image(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ev.retrieval_recall(np.ones((3, 2)), np.ones((4, 2)), **kwargs)


def test_zeroshot_picks_nearest_class_text():
  class_embeds = np.array([[1.0, 0.0], [0.0, 1.0]])
  images = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
  assert ev.zeroshot_accuracy(images, class_embeds, np.array([0, 1, 1])) == pytest.approx(2 / 3)


def test_linear_probe_separable_features():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 3, 300)
  x = np.eye(3)[y] * 3 + rng.normal(0, 0.3, (300, 3))
  x = np.concatenate([x, rng.normal(size=(300, 5))], 1)  # plus noise dims
  assert ev.ridge_probe_accuracy(x[:200], y[:200], x[200:], y[200:], 3) > 0.95


def test_collect_drops_padding_rows():
  batches = [
    {"logits": np.ones((2, 2)), "labels": np.array([0, 1]), "example_weight": np.array([1.0, 1.0])},
    {
      "logits": np.zeros((2, 2)),
      "labels": np.array([1, 1]),
      "example_weight": np.array([1.0, 0.0]),
    },
  ]
  out = ev.collect(lambda b: b, batches, ["logits", "labels"])
  assert out["labels"].tolist() == [0, 1, 1] and out["logits"].shape == (3, 2)


def _context(batches=(), head_type="classification", **kw):
  """An EvalContext whose predict returns each batch as the model output (and a captioning
  head's generate, too: generate_texts fakes the generation)."""
  fns = {"predict": lambda params, b: b}
  if head_type == "captioning":
    fns["generate"] = fns["predict"]
    # (sum, weight) of a batch's token losses: the real rows' `loss_sum` and `target_tokens`.
    fns["token_loss"] = lambda params, b: (
      (b["loss_sum"] * b["example_weight"]).sum(),
      (b["target_tokens"] * b["example_weight"]).sum(),
    )
  if head_type == "ctc":
    fns["transcribe"] = lambda params, b, beam_size=1: b
  if head_type == "masked_lm":
    fns["masked_tokens"] = fns["predict"]
  if head_type == "classification":
    fns["explain"] = fns["predict"]
  return ev.EvalContext(
    head_type=head_type, make_batches=lambda cfg: batches, predict_fns=fns, **kw
  )


def test_evaluator_config_errors():
  with pytest.raises(config_lib.ConfigError, match="type='acc'"):
    ev.make("val", {"type": "acc"}, _context())
  with pytest.raises(config_lib.ConfigError, match=r"config\.evals\.val\.splt"):
    ev.make("val", {"type": "classification", "splt": "x"}, _context())
  with pytest.raises(config_lib.ConfigError, match="needs a 'contrastive' head"):
    ev.make("ret", {"type": "retrieval"}, _context())

  class Decoding(ev.Evaluator):  # an evaluator that calls a predict function by name
    PREDICT = "decode"

  with pytest.raises(
    config_lib.ConfigError,
    match=r"calls the head's 'decode' function; the 'classification' head gives "
    r"\['explain', 'predict'\]",
  ):
    Decoding("val", {"type": "decoding"}, _context())


def test_an_unknown_type_lists_every_kind():
  with pytest.raises(config_lib.ConfigError) as e:
    ev.make("val", {"type": "clasification"}, _context())
  assert str(e.value).startswith("config.evals.val.type='clasification'; use one of (")
  assert all(repr(kind) in str(e.value) for kind in ev.EVALUATORS)


# The table is the single source of every kind's keys, head and metric names. A fake
# model output with every key any kind reads: 6 real rows and 2 padding rows.
_RNG = np.random.default_rng(0)
_OUTPUT = {
  "logits": _RNG.normal(size=(8, 2)),
  "labels": np.array([0, 1, 1, 0, 1, 0, 0, 1]),
  "predictions": _RNG.normal(size=(8, 1)),
  "image_embeds": _RNG.normal(size=(8, 4)),
  "text_embeds": _RNG.normal(size=(8, 4)),
  "features": _RNG.normal(size=(8, 3)),
  "loss_sum": _RNG.uniform(size=8),
  "target_tokens": np.full(8, 3.0),
  # A masked_lm head's per-example masked tokens and how many it predicts right.
  "tokens": np.full(8, 4.0),
  "correct": np.array([4.0, 3, 2, 1, 0, 1, 0, 0]),
  # A ctc head's transcripts and references: label ids of the characters "abc" (5, 6, 7).
  "ids": _RNG.integers(4, 8, size=(8, 3)),
  "references": np.tile([5, 4, 6], (8, 1)),
  "loss": _RNG.uniform(size=8),
  "feasible": np.ones(8, bool),
  # A classification head's `explain` (mmtl.interpret): modality shares, maps, the images.
  "attribution": _RNG.dirichlet([1.0, 1.0], size=8),
  "rollout/image": _RNG.dirichlet(np.ones(5), size=8),
  "pixel_values": _RNG.normal(size=(8, 4, 4, 3)),
  "example_weight": np.array([1.0] * 6 + [0.0] * 2),
}
_BATCHES = [{k: v[:4] for k, v in _OUTPUT.items()}, {k: v[4:] for k, v in _OUTPUT.items()}]


def _fake_text_embedder(tokenizer, max_len):
  del tokenizer, max_len
  return lambda params, texts: np.stack([np.eye(4)[len(t) % 4] for t in texts])


def _fake_generate_texts(
  predictions=("a red circle", "yes"),
  references=(("a red circle", "one red circle"), ("yes", "no")),
):
  """A context's `generate_texts`: what a captioning model would generate, with references,
  after handing each of `_BATCHES` to `each_batch` as the real one does."""

  def generate_texts(generate, cfg, *, each_batch=None, **generate_kw):
    for batch in _BATCHES if each_batch else ():
      each_batch(batch)
    return list(predictions), [list(r) for r in references]

  return generate_texts


def _kind_context(kind_cls):
  batches = _BATCHES
  if kind_cls.HEAD == "multilabel":  # multi-hot labels: classes 0 and 1, or 1 alone
    batches = [dict(b, labels=np.stack([b["labels"], np.ones(4)], 1)) for b in _BATCHES]
  return _context(
    batches,
    head_type=kind_cls.HEAD or "classification",
    text_embedder=_fake_text_embedder,
    generate_texts=_fake_generate_texts(),
    input_config=lambda cfg: data.input_config(dict(target=dict(format="ctc", characters="abc"))),
    modalities=("image", "text"),
  )


def _required(kind):
  """The keys a kind needs besides `type` (few_shot: episodes the 6 real rows can fill)."""
  return {
    "zeroshot": dict(classnames=["cat", "horse"], tokenizer="tok"),
    "few_shot": dict(ways=2, shots=(1, 2), queries=1, episodes=4),
  }.get(kind, {})


@pytest.mark.parametrize("kind", list(ev.EVALUATORS))
def test_every_kind_returns_its_metric_names(kind):
  e = ev.make("val", {"type": kind, **_required(kind)}, _kind_context(ev.EVALUATORS[kind]))
  out = e.run(variables=None)
  assert list(out) == e.metric_names() and (e.metric_names() or kind == "attention_maps")
  assert all(isinstance(v, float) and np.isfinite(v) for v in out.values())


def _declared_value(key, spec, kind):
  """A valid value for a key declared with `spec` (a default, a type or types, a section)."""
  if key == "type":
    return kind
  if spec == config_lib.INPUT_SECTION:
    return {}
  if isinstance(spec, tuple) and spec and all(isinstance(s, type) for s in spec):
    spec = spec[0]
  return {str: "x", int: 8, list: ["x"]}[spec] if isinstance(spec, type) else spec


@pytest.mark.parametrize("kind", list(ev.EVALUATORS))
def test_every_declared_key_is_accepted_and_a_typo_is_not(kind):
  kind_cls = ev.EVALUATORS[kind]
  cfg = {k: _declared_value(k, spec, kind) for k, spec in kind_cls.keys().items()}
  ev.make("val", {**cfg, **_required(kind)}, _kind_context(kind_cls)).run(variables=None)
  with pytest.raises(
    config_lib.ConfigError,
    match=r"Unknown config key config\.evals\.val\.evry\. "
    r"Did you mean config\.evals\.val\.every\?",
  ):
    ev.make("val", {"type": kind, "evry": 3, **_required(kind)}, _kind_context(kind_cls))


@pytest.mark.parametrize("kind", list(ev.EVALUATORS))
def test_a_kind_on_a_model_with_another_head_fails_in_one_line(kind):
  head = ev.EVALUATORS[kind].HEAD
  for model_head in ("classification", "regression", "contrastive"):
    make = lambda model_head=model_head: ev.make(
      "val",
      {"type": kind, **_required(kind)},
      _context(_BATCHES, model_head, text_embedder=_fake_text_embedder),
    )
    if head in (None, model_head):
      make()
      continue
    with pytest.raises(config_lib.ConfigError) as e:
      make()
    assert str(e.value) == (
      f"config.evals.val is a {kind!r} evaluator, which needs a {head!r} "
      f"head; the model has head_type={model_head!r}."
    )


def test_config_keys_are_the_union_of_the_kinds_keys():
  union = {k for kind_cls in ev.EVALUATORS.values() for k in kind_cls.keys()}
  assert set(ev.CONFIG_KEYS) == union
  assert set(config_lib.schema()["evals"][config_lib.ANY_NAME]) == union


def test_check_opens_every_input_a_kind_reads():
  opened = []
  kw = dict(open_input=opened.append)
  ev.make("val", {"type": "classification", "input": {"split": "test"}}, _context(**kw)).check()
  probe = {"type": "linear_probe", "input": {"split": "test"}, "train_input": {"split": "train"}}
  ev.make("probe", probe, _context(**kw)).check()
  ev.make(
    "coco", {"type": "retrieval", "captions": 5}, _context(head_type="contrastive", **kw)
  ).check()
  assert [c["input"] for c in opened] == [
    {"split": "test"},
    {"split": "test"},
    {"split": "train"},
    {"eval_text": 0},
    {"eval_text": 1, "fields": modalities.blank_fields(keep=("text",))},
  ]


def test_classification_evaluator_runs_over_batches():
  batches = [
    {
      "logits": np.array([[1.0, 0.0], [0.0, 1.0]]),
      "labels": np.array([0, 0]),
      "example_weight": np.ones(2),
    }
  ]
  e = ev.make("val", {"type": "classification", "every": 5}, _context(batches))
  out = e.run(variables=None)
  assert out["val/accuracy"] == 0.5 and list(out) == [f"val/{m}" for m in e.METRICS]
  assert e.due(10, 100) and e.due(100, 100) and not e.due(7, 100)


def test_classification_evaluator_writes_its_report_and_pictures(tmp_path):
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 3, 30)
  logits = rng.normal(size=(30, 3)) + 2 * np.eye(3)[labels]
  batches = [{"logits": logits, "labels": labels, "example_weight": np.ones(30)}]
  context = _context(batches, class_names=lambda cfg: ["circle", "square", "triangle"])
  e = ev.make("val", {"type": "classification", "calibration_bins": 10}, context)
  out = e.run(variables=None, step=7, workdir=str(tmp_path))
  report = json.loads((tmp_path / "classification_step7-val.json").read_text())
  assert report["classes"] == ["circle", "square", "triangle"]
  assert np.sum(report["confusion_matrix"]) == 30
  assert report["macro_f1"] == out["val/macro_f1"]
  assert report["per_class"]["square"]["support"] == int((labels == 1).sum())
  assert len(report["calibration"]["count"]) == 10
  assert report["calibration"]["ece"] == out["val/ece"]
  for picture in ("confusion_step7-val.png", "reliability_step7-val.png"):
    assert (tmp_path / picture).read_bytes().startswith(b"\x89PNG")


def test_metrics_key_picks_what_is_logged():
  batches = [{"logits": np.eye(2), "labels": np.array([0, 1]), "example_weight": np.ones(2)}]
  e = ev.make(
    "val", {"type": "classification", "metrics": ["roc_auc", "accuracy"]}, _context(batches)
  )
  assert e.metric_names() == ["val/roc_auc", "val/accuracy"]
  assert e.run(variables=None) == {"val/roc_auc": 1.0, "val/accuracy": 1.0}


def test_metric_an_evaluator_cannot_compute_names_the_heads_that_can():
  with pytest.raises(
    config_lib.ConfigError,
    match=r"metrics asks for 'roc_auc', which a 'retrieval' evaluator does not compute \(it "
    r"gives i2t_recall@1, .*'roc_auc' comes from the evaluator type\(s\) 'classification' "
    r"\(head_type 'classification'\)",
  ):
    ev.make("val", {"type": "retrieval", "metrics": ["roc_auc"]}, _context(head_type="contrastive"))
  with pytest.raises(config_lib.ConfigError, match=r"calibration_bins=0; use a positive"):
    ev.make("val", {"type": "classification", "calibration_bins": 0}, _context())
  with pytest.raises(config_lib.ConfigError, match="no evaluator type computes it"):
    ev.make("val", {"type": "classification", "metrics": ["bleu_9"]}, _context())


def test_zeroshot_averages_each_class_prompts():
  calls = []

  def text_embedder(tokenizer, max_len):
    calls.append((tokenizer, max_len))
    # "a cat" / "the cat" point along axis 0, "a horse" / "the horse" along axis 1.
    return lambda params, texts: np.stack([np.eye(2)[int("horse" in t)] for t in texts])

  batches = [
    {
      "image_embeds": np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]),
      "labels": np.array([0, 1, 1]),
      "example_weight": np.ones(3),
    }
  ]
  cfg = {
    "type": "zeroshot",
    "classnames": ["cat", "horse"],
    "prompts": ["a {}", "the {}"],
    "tokenizer": "tok",
    "max_len": 16,
  }
  out = ev.make("zs", cfg, _context(batches, "contrastive", text_embedder=text_embedder)).run(None)
  assert out == {"zs/accuracy": pytest.approx(2 / 3)} and calls == [("tok", 16)]
  # Without classnames: the label's class names, from the dataset.
  del cfg["classnames"]
  context = _context(
    batches, "contrastive", text_embedder=text_embedder, class_names=lambda c: ["horse", "cat"]
  )
  assert ev.make("zs", cfg, context).run(None) == {"zs/accuracy": pytest.approx(1 / 3)}
  with pytest.raises(config_lib.ConfigError, match="needs `tokenizer`"):
    ev.make(
      "zs",
      {"type": "zeroshot", "classnames": ["cat"]},
      _context(batches, "contrastive", text_embedder=text_embedder),
    )


def _fake_retrieval_input(images, captions):
  """A context for `images` (N, D) and `captions` (N, C, D): like the pipeline, a pass
  reads caption `input.eval_text` of each example and no image when fields.image is
  None; the last batch has a padding row."""
  calls = []

  def make_batches(cfg):
    calls.append(cfg["input"])
    index, fields = cfg["input"]["eval_text"], cfg["input"].get("fields", {})
    rows = {"text_embeds": captions[:, index], "example_weight": np.ones(len(images))}
    if fields.get("image", "image") is not None:
      rows["image_embeds"] = images
    rows = {k: np.concatenate([v, v[:1]]) for k, v in rows.items()}
    rows["example_weight"][-1] = 0.0
    return [{k: v[:2] for k, v in rows.items()}, {k: v[2:] for k, v in rows.items()}]

  return calls, ev.EvalContext(
    head_type="contrastive", make_batches=make_batches, predict_fns={"predict": lambda p, b: b}
  )


def test_retrieval_evaluator_embeds_every_caption():
  images = np.eye(3)
  # Caption 0 of image i is closest to image i - 1; caption 1 matches image i.
  captions = np.stack([0.5 * np.roll(images, 1, axis=0), images], 1)
  calls, context = _fake_retrieval_input(images, captions)
  cfg = {
    "type": "retrieval",
    "ks": (1,),
    "captions": 2,
    "input": {"fields": {"text": "captions/text"}},
  }
  out = ev.make("coco", cfg, context).run(variables=None)
  # i2t: caption 1 is top for every image. t2i: the 3 captions 1 hit, the 3 captions 0 miss.
  assert out == {"coco/i2t_recall@1": 1.0, "coco/t2i_recall@1": 0.5}
  text_only = {"text": "captions/text", **modalities.blank_fields(keep=("text",))}
  assert calls == [
    {"fields": {"text": "captions/text"}, "eval_text": 0},
    {"fields": text_only, "eval_text": 1},
  ]
  calls.clear()
  first = ev.make("coco", dict(cfg, captions=1), context).run(None)
  assert first == {"coco/i2t_recall@1": 0.0, "coco/t2i_recall@1": 0.0} and len(calls) == 1


def test_retrieval_evaluator_captions_must_be_a_positive_count():
  with pytest.raises(config_lib.ConfigError, match=r"config\.evals\.ret\.captions='all'"):
    ev.make("ret", {"type": "retrieval", "captions": "all"}, _context(head_type="contrastive"))


class _StubModel:
  """A model for the plumbing: logits = x @ w, image_embeds = x; a text's embedding is
  (its number of tokens, the padding's)."""

  head_type = "classification"

  def __init__(self):
    self.text_shapes = []

  def apply(self, variables, batch):
    if "input_ids" in batch:
      self.text_shapes.append(batch["input_ids"].shape)
      tokens = batch["attention_mask"].sum(-1, dtype=jnp.float32)
      return {"text_embeds": jnp.stack([tokens, batch["input_ids"].shape[1] - tokens], -1)}
    return {
      "logits": batch["x"] @ variables["params"]["w"],
      "image_embeds": batch["x"],
      "logit_scale": jnp.ones(()),
    }


def test_make_evaluators_feeds_eval_inputs_through_the_model(monkeypatch, tiny_bert_dir):
  read = []

  def make_eval_iterator(input_cfg, *, batch_size, process_index, process_count, features):
    """Opens the input when called (a bad split fails here, as in the pipeline)."""
    assert features is None  # no feature cache given
    read.append((input_cfg.split, input_cfg.dataset, batch_size, process_index, process_count))
    x = np.eye(2, dtype=np.float32)[[0, 1, 1, 0, 0, 1, 1, 0]]
    return iter(
      [
        {
          "x": x,
          "labels": np.array([0, 1, 1, 0, 0, 1, 0, 0]),
          "example_weight": np.array([1.0] * 7 + [0.0]),
        }
      ]
    )

  monkeypatch.setattr(ev.data, "make_eval_iterator", make_eval_iterator)
  config = mlc.ConfigDict(
    dict(
      input=dict(dataset="shapes", split="train"),
      prefetch_to_device=2,
      evals=dict(
        val=dict(type="classification", input=dict(split="validation")),
        big=dict(type="linear_probe", batch_size=16),
      ),
    )
  )
  mesh = sharding.make_mesh(dict(data=-1))
  model = _StubModel()
  evaluators = {e.name: e for e in ev.make_evaluators(config, model, mesh, batch_size=8)}
  evaluators["val"].check()
  evaluators["big"].check()  # Its test input and its train input.
  assert read == [("validation", "shapes", 8, 0, 1)] + [("train", "shapes", 16, 0, 1)] * 2
  out = evaluators["val"].run({"params": {"w": jnp.eye(2)}})
  out = {k: out[k] for k in ("val/accuracy", "val/macro_f1", "val/loss")}
  # 7 real rows (the padding row dropped), 6 right: row 6 has label 0 and logits (0, 1).
  right, wrong = np.log1p(np.exp(-1.0)), np.log1p(np.exp(1.0))
  assert out == pytest.approx(
    {"val/accuracy": 6 / 7, "val/macro_f1": 6 / 7, "val/loss": (6 * right + wrong) / 7}
  )
  with pytest.raises(config_lib.ConfigError, match="needs a 'contrastive' head"):
    ev.make_evaluators(
      mlc.ConfigDict(
        dict(
          config, evals=dict(zs=dict(type="zeroshot", classnames=["cat"], tokenizer=tiny_bert_dir))
        )
      ),
      model,
      mesh,
      8,
    )
  model.head_type = "contrastive"
  zs = ev.make_evaluators(
    mlc.ConfigDict(
      dict(
        config,
        evals=dict(
          zs=dict(
            type="zeroshot",
            classnames=["cat", "dog"],
            prompts=["a {}", "the {}"],
            tokenizer=tiny_bert_dir,
            max_len=7,
          )
        ),
      )
    ),
    model,
    mesh,
    8,
  )[0]
  assert 0 <= zs.run({"params": {"w": jnp.eye(2)}})["zs/accuracy"] <= 1
  assert model.text_shapes == [(2, 7)]  # Both prompts of a class in one batch, max_len tokens.


def test_eval_reads_text_eval_text_of_a_sequence(tiny_bert_dir):
  cfg = options.input_config(
    dict(
      fields=dict(image=None, text="captions/text", label=None),
      text=dict(tokenizer=str(tiny_bert_dir)),
      eval_text=2,
    )
  )
  example = {"captions": {"text": np.array([b"a dog", b"a cat", b"a cow"])}}
  pre = transforms.Preprocess(cfg, None, train=False)
  assert pre.example(pre.decode(example), np.random.default_rng(0))["text"] == "a cow"
  train = transforms.Preprocess(cfg, None, train=True)
  assert train.decode(example)["text"] == ["a dog", "a cat", "a cow"]
  cfg.eval_text = 3
  with pytest.raises(ValueError, match="has 3 texts; config.input.eval_text=3 needs at least 4"):
    transforms.Preprocess(cfg, None, train=False).decode(example)


def test_captioning_writes_rows_and_warns_about_empty_texts(tmp_path, caplog):
  """The captions file holds id, hypothesis and references per example; empty generated
  texts are scored (0 for BLEU) and counted in one warning line."""
  context = dataclasses.replace(
    _kind_context(ev.Captioning),
    generate_texts=_fake_generate_texts(["", "a red circle"], [["a cat"], ["x"]]),
  )
  e = ev.make("val", {"type": "captioning"}, context)
  with caplog.at_level(logging.WARNING):
    out = e.run(variables=None, step=7, workdir=str(tmp_path))
  assert "config.evals.val: 1 of 2 generated texts are empty (EOS first); they score 0." in (
    caplog.text
  )
  lines = [json.loads(x) for x in (tmp_path / "captions_step7-val.jsonl").read_text().splitlines()]
  assert lines == [
    {"id": 0, "hypothesis": "", "references": ["a cat"]},
    {"id": 1, "hypothesis": "a red circle", "references": ["x"]},
  ]
  assert out["val/bleu_1"] == pytest.approx(0.0, abs=1e-9)
  # Per target token over the real rows (the 2 padding rows dropped): 6 rows of 3 tokens.
  assert out["val/loss"] == pytest.approx(_OUTPUT["loss_sum"][:6].sum() / 18)


def test_transcripts_count_infeasible_examples_and_leave_them_out_of_the_loss(caplog):
  from mmtl import ctc

  vocab = ctc.CTCVocab.of_characters("abc")
  batch = {
    "ids": np.array([[5, 6, -1], [5, -1, -1], [7, 7, -1]]),  # "ab", "a", "cc"
    "references": np.array([[5, 6, -1], [5, 4, 6], [7, -1, -1]]),  # "ab", "a b", "c"
    "loss": np.array([0.5, 1.5, 0.0]),
    "feasible": np.array([True, True, False]),
    "example_weight": np.ones(3),
  }
  with caplog.at_level(logging.WARNING):
    rows, metrics = ev.transcripts(lambda b: b, [batch], vocab, "val")
  assert [(r["hypothesis"], r["reference"]) for r in rows] == [
    ("ab", "ab"),
    ("a", "a b"),
    ("cc", "c"),
  ]
  assert metrics["infeasible"] == 1.0 and metrics["loss"] == 1.0
  assert metrics["wer"] == pytest.approx(
    2 / 4
  )  # "a b": one deletion; "c" -> "cc": one substitution
  assert metrics["cer"] == pytest.approx(3 / 6)  # " b" deleted; one "c" inserted
  assert "1 of 3 examples have fewer frames than their transcript needs" in caplog.text


def test_masked_lm_metrics_are_per_masked_token():
  out = ev.make("val", {"type": "masked_lm"}, _context(_BATCHES, "masked_lm")).run(None)
  real = slice(0, 6)  # the last two rows are padding
  loss = _OUTPUT["loss_sum"][real].sum() / 24.0
  assert out["val/loss"] == pytest.approx(loss)
  assert out["val/accuracy"] == pytest.approx(11 / 24)
  assert out["val/perplexity"] == pytest.approx(np.exp(loss))


def test_a_masked_lm_evaluator_of_unmasked_text_is_refused():
  context = _context(_BATCHES, "masked_lm", input_config=lambda cfg: data.input_config({}))
  with pytest.raises(config_lib.ConfigError, match="its input masks none"):
    ev.make("val", {"type": "masked_lm"}, context).check()


def test_attention_maps_need_images():
  def no_images(cfg):
    return data.input_config(dict(fields=dict(image=None, text="question", label="label")))

  with pytest.raises(config_lib.ConfigError, match=r"draws its maps over images.*fields\.image"):
    ev.make("maps", {"type": "attention_maps"}, _context(input_config=no_images))


def test_modality_contribution_blanks_each_modality_in_turn():
  """Accuracy of the blanked passes comes from the input with that modality blanked; the
  attribution is the mean share over the real rows."""
  blanked_logits = {(): [[0.0, 1.0]] * 4, ("image",): [[1.0, 0.0]] * 4, ("text",): [[0.0, 1.0]] * 4}

  def make_batches(cfg):
    blank = tuple(cfg.get("input", {}).get("blank", ()))
    return [
      dict(
        logits=np.array(blanked_logits[blank]),
        labels=np.array([1, 1, 1, 0]),
        attribution=np.array([[0.8, 0.2], [0.6, 0.4], [0.7, 0.3], [0.0, 1.0]]),
        example_weight=np.array([1.0, 1.0, 1.0, 0.0]),
      )
    ]

  context = ev.EvalContext(
    head_type="classification",
    make_batches=make_batches,
    predict_fns={"predict": lambda params, b: b, "explain": lambda params, b: b},
    modalities=("image", "text"),
  )
  out = ev.make("c", {"type": "modality_contribution"}, context).run(None)
  assert out == pytest.approx(
    {
      "c/accuracy": 1.0,
      "c/accuracy_without_image": 0.0,
      "c/accuracy_without_text": 1.0,
      "c/attribution_image": 0.7,
      "c/attribution_text": 0.3,
    }
  )
