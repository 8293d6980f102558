"""Evaluator metrics on hand-made inputs, and the evaluator runner's checks."""
import numpy as np
import pytest

from mmtl import evaluators as ev


def test_accuracy_and_macro_f1():
  logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [0.0, 5.0]])
  labels = np.array([0, 1, 1, 1])
  assert ev.accuracy(logits, labels) == 0.75
  # class 0: tp=1 fp=1 fn=0 -> 2/3; class 1: tp=2 fp=0 fn=1 -> 0.8
  assert ev.macro_f1(logits.argmax(-1), labels) == pytest.approx((2 / 3 + 0.8) / 2)


def test_retrieval_recall_both_directions():
  image = np.eye(3)
  # text 0 matches image 0; texts 1 and 2 are swapped (each is closest to the other image).
  text = np.array([[1.0, 0, 0], [0, 0.1, 0.9], [0, 0.9, 0.1]])
  r = ev.retrieval_recall(image, text, ks=(1, 2))
  assert r["i2t_recall@1"] == pytest.approx(1 / 3) and r["i2t_recall@2"] == 1.0
  assert r["t2i_recall@1"] == pytest.approx(1 / 3) and r["t2i_recall@2"] == 1.0


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
  batches = [{"logits": np.ones((2, 2)), "labels": np.array([0, 1]), "example_weight": np.array([1.0, 1.0])},
             {"logits": np.zeros((2, 2)), "labels": np.array([1, 1]), "example_weight": np.array([1.0, 0.0])}]
  out = ev.collect(lambda b: b, batches, ["logits", "labels"])
  assert out["labels"].tolist() == [0, 1, 1] and out["logits"].shape == (3, 2)


def test_evaluator_config_errors():
  kw = dict(make_batches=lambda c: [], predict=lambda p, b: b)
  with pytest.raises(ValueError, match="type='acc'"):
    ev.Evaluator("val", {"type": "acc"}, head_type="classification", **kw)
  with pytest.raises(ValueError, match=r"config\.evals\.val\.splt"):
    ev.Evaluator("val", {"type": "classification", "splt": "x"}, head_type="classification", **kw)
  with pytest.raises(ValueError, match="needs a 'contrastive' head"):
    ev.Evaluator("ret", {"type": "retrieval"}, head_type="classification", **kw)


def test_classification_evaluator_runs_over_batches():
  batches = [{"logits": np.array([[1.0, 0.0], [0.0, 1.0]]), "labels": np.array([0, 0]),
              "example_weight": np.ones(2)}]
  e = ev.Evaluator("val", {"type": "classification", "every": 5}, head_type="classification",
                   make_batches=lambda c: batches, predict=lambda params, b: b)
  out = e.run(params=None)
  assert out["val/accuracy"] == 0.5 and set(out) == {"val/accuracy", "val/macro_f1", "val/loss"}
  assert e.due(10, 100) and e.due(100, 100) and not e.due(7, 100)
