"""Evaluator metrics on hand-made inputs, and the evaluator runner's checks."""
import numpy as np
import pytest

from mmtl import evaluators as ev
from mmtl.data import pipeline


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
  assert r == pytest.approx({"i2t_recall@1": 0.0, "i2t_recall@5": 0.0, "i2t_recall@50": 1.0,
                             "t2i_recall@1": 1 / 50, "t2i_recall@5": 5 / 50, "t2i_recall@50": 1.0})
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
  collapsed = ev.retrieval_recall(np.eye(50), np.ones((250, 50)), ks=(1, 200),
                                  text_to_image=np.repeat(np.arange(50), 5))
  assert collapsed["i2t_recall@1"] == 0.0 and collapsed["i2t_recall@200"] == 0.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "pass text_to_image"),
    (dict(text_to_image=np.array([0, 1, 3, 1])), r"in \[0, 3\)"),
    (dict(text_to_image=np.array([0, 0, 1, 1])), "Image 2 has no text"),
])
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


def _fake_retrieval_input(images, captions):
  """make_batches/predict for `images` (N, D) and `captions` (N, C, D): like the pipeline,
  a pass reads caption `input.eval_text` of each example and no image when fields.image is
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

  return calls, dict(make_batches=make_batches, predict=lambda params, b: b)


def test_retrieval_evaluator_embeds_every_caption():
  images = np.eye(3)
  # Caption 0 of image i is closest to image i - 1; caption 1 matches image i.
  captions = np.stack([0.5 * np.roll(images, 1, axis=0), images], 1)
  calls, kw = _fake_retrieval_input(images, captions)
  cfg = {"type": "retrieval", "ks": (1,), "captions": 2,
         "input": {"fields": {"text": "captions/text"}}}
  out = ev.Evaluator("coco", cfg, head_type="contrastive", **kw).run(params=None)
  # i2t: caption 1 is top for every image. t2i: the 3 captions 1 hit, the 3 captions 0 miss.
  assert out == {"coco/i2t_recall@1": 1.0, "coco/t2i_recall@1": 0.5}
  text_only = {"text": "captions/text", "image": None, "audio": None}
  assert calls == [{"fields": {"text": "captions/text"}, "eval_text": 0},
                   {"fields": text_only, "eval_text": 1}]
  calls.clear()
  first = ev.Evaluator("coco", dict(cfg, captions=1), head_type="contrastive", **kw).run(None)
  assert first == {"coco/i2t_recall@1": 0.0, "coco/t2i_recall@1": 0.0} and len(calls) == 1


def test_retrieval_evaluator_captions_must_be_a_positive_count():
  with pytest.raises(ValueError, match=r"config\.evals\.ret\.captions='all'"):
    ev.Evaluator("ret", {"type": "retrieval", "captions": "all"}, head_type="contrastive",
                 make_batches=lambda c: [], predict=lambda p, b: b)


def test_eval_reads_text_eval_text_of_a_sequence(tiny_bert_dir):
  cfg = pipeline.input_config(dict(fields=dict(image=None, text="captions/text", label=None),
                                   text=dict(tokenizer=str(tiny_bert_dir)), eval_text=2))
  example = {"captions": {"text": np.array([b"a dog", b"a cat", b"a cow"])}}
  pre = pipeline._Preprocess(cfg, None, train=False)
  assert pre.example(pre.decode(example), np.random.default_rng(0))["text"] == "a cow"
  train = pipeline._Preprocess(cfg, None, train=True)
  assert train.decode(example)["text"] == ["a dog", "a cat", "a cow"]
  cfg.eval_text = 3
  with pytest.raises(ValueError, match="has 3 texts; config.input.eval_text=3 needs at least 4"):
    pipeline._Preprocess(cfg, None, train=False).decode(example)
