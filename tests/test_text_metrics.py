"""Caption metrics (pycocoevalcap, sacrebleu) and generative VQA accuracy on hand-made inputs."""

import math

import pytest

from mmtl import text_metrics as tm

REFS = [  # 4 images (CIDEr's IDF needs several), 2-3 references each.
  ["a man riding a horse on a beach", "a person rides a brown horse", "man on a horse by the sea"],
  ["a cat sleeping on a red couch", "a cat lying on a sofa"],
  ["two dogs playing with a ball in a park", "dogs chase a ball on the grass"],
  ["a plate of pasta with tomato sauce", "a bowl of spaghetti on a table", "pasta on a plate"],
]


def test_identical_captions_score_one():
  s = tm.caption_scores(["a man riding a horse on a beach"], [["a man riding a horse on a beach"]])
  assert s["bleu_4"] == pytest.approx(1.0) and s["bleu_1"] == pytest.approx(1.0)
  assert s["rouge_l"] == pytest.approx(1.0)
  assert s["sacrebleu"] == pytest.approx(100.0)
  assert set(s) == {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "cider", "rouge_l", "sacrebleu"}


def test_bleu_1_is_clipped_precision_times_brevity_penalty():
  # 5 candidate words, all in the 6-word reference: precision 1, brevity penalty exp(1 - 6/5).
  s = tm.caption_scores(["a cat sat on mat"], [["a cat sat on the mat"]])
  assert s["bleu_1"] == pytest.approx(math.exp(1 - 6 / 5))
  # "the" twice, once in the reference: clipped precision 4/5, no brevity penalty (5 vs 5).
  s = tm.caption_scores(["the cat the dog sat"], [["the cat and dog sat"]])
  assert s["bleu_1"] == pytest.approx(4 / 5)
  # Unigrams 4/5 (as above); bigrams "the cat", "dog sat" of 4: 2/4, so BLEU-2 = sqrt(4/5 * 1/2).
  assert s["bleu_2"] == pytest.approx(math.sqrt(0.8 * 0.5))


def test_sacrebleu_agrees_with_coco_bleu_4_when_tokenization_and_smoothing_do_not_matter():
  # Lowercase words only (13a and caption_tokens split them alike), every n-gram order has a
  # match (exp smoothing inactive), both use the closest reference length: the same BLEU-4.
  preds = ["a man riding a horse on the beach", "a cat lying on a red couch"]
  s = tm.caption_scores(preds, REFS[:2])
  assert 0.2 < s["bleu_4"] < 0.99
  assert s["sacrebleu"] / 100 == pytest.approx(s["bleu_4"], rel=1e-6)


def test_better_captions_score_higher_cider():
  good = [
    "a man riding a horse on the beach",
    "a cat sleeping on a couch",
    "two dogs playing with a ball",
    "a plate of pasta with sauce",
  ]
  bad = ["a man on a beach", "a red couch", "a park", "a table"]
  unrelated = ["a plate of pasta", "two dogs in a park", "a cat on a sofa", "a horse"]
  cider = lambda preds: tm.caption_scores(preds, REFS)["cider"]
  assert cider(good) > cider(bad) > 0.0
  assert cider(bad) > cider(unrelated)
  assert tm.caption_scores(good, REFS)["bleu_4"] > tm.caption_scores(bad, REFS)["bleu_4"]


def test_tokenization_drops_case_and_ptb_punctuation():
  assert tm.caption_tokens("A red Square.") == tm.caption_tokens("a red square") == "a red square"
  assert tm.caption_tokens('A "red", square; (big) -- no?!...') == "a red square big no"
  # Kept as PTB keeps them: word-internal hyphens, numbers; clitics split off.
  assert tm.caption_tokens("A t-shirt costs 3.50, it's 10:30") == "a t-shirt costs 3.50 it 's 10:30"
  assert tm.caption_tokens("The dog isn't here.") == "the dog is n't here"
  s = tm.caption_scores(["A red Square."], [["a red square"]])
  assert s["bleu_1"] == pytest.approx(1.0) and s["rouge_l"] == pytest.approx(1.0)


def test_multiple_references_take_the_best_match():
  refs = [["a dog runs in a field", "a cat sleeping on a red couch", "an animal"]]
  s = tm.caption_scores(["a cat sleeping on a red couch"], refs)
  assert s["bleu_4"] == pytest.approx(1.0) and s["rouge_l"] == pytest.approx(1.0)
  assert s["sacrebleu"] == pytest.approx(100.0)


def test_examples_may_have_different_numbers_of_references():
  # Repeating an example's only reference changes no metric (max counts, closest length, best
  # ROUGE-L, CIDEr's mean over references and per-image document frequency), so an example with
  # one reference must score as if it had it 3 times, like the others' 3 references.
  preds = ["a man on a horse", "a cat on a couch", "dogs with a ball", "pasta on a table"]
  ragged = [REFS[0], REFS[1][:1], REFS[2][:1], REFS[3]]
  padded = [REFS[0], REFS[1][:1] * 3, REFS[2][:1] * 3, REFS[3]]
  assert tm.caption_scores(preds, ragged) == pytest.approx(tm.caption_scores(preds, padded))


def test_caption_errors():
  with pytest.raises(ValueError, match="got 2 predictions but 1 reference lists"):
    tm.caption_scores(["a", "b"], [["a"]])
  with pytest.raises(ValueError, match="predictions is empty"):
    tm.caption_scores([], [])
  with pytest.raises(ValueError, match="example 1 has no reference"):
    tm.caption_scores(["a cat", "a dog"], [["a cat"], []])
  with pytest.raises(ValueError, match="example 0 has no reference"):
    tm.caption_scores(["a cat"], [["..."]])  # Nothing left after tokenization.
  with pytest.raises(TypeError, match=r"reference lists\[0\] is a string"):
    tm.caption_scores(["a cat"], ["a cat"])


@pytest.mark.parametrize(
  "raw, normalized",
  [
    ("Two", "2"),
    ("the dog.", "dog"),
    ("yes!", "yes"),
    ("Yes", "yes"),
    ("An Apple", "apple"),
    ("3.5", "3.5"),  # A period before a digit stays.
    ("1,000", "1000"),
    ("red, white", "red white"),
    ("black/white", "black white"),
    ("dont", "don't"),
    (" no\n", "no"),
  ],
)
def test_vqa_normalization(raw, normalized):
  assert tm.normalize_vqa_answer(raw) == normalized


def test_vqa_soft_accuracy_is_the_official_leave_one_out_average():
  ten = lambda k: ["2"] * k + ["3"] * (10 - k)  # k of 10 humans answered "2".
  # Leaving out one of the k matching answers leaves k-1 of 9, otherwise k: each min(1, ./3).
  for k, expected in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
    r = tm.vqa_accuracy(["Two"], [ten(k)])
    assert r["vqa_accuracy"] == pytest.approx(expected), k
    assert r["exact_match"] == float(k >= 5)  # Majority answer; a 5-5 tie: the first, "2".
  r = tm.vqa_accuracy(["the dog.", "yes!", "no"], [["dog"], ["Yes"], ["yes", "yes"]])
  assert r == pytest.approx({"exact_match": 2 / 3, "vqa_accuracy": 2 / 3})


def test_vqa_exact_match_breaks_majority_ties_by_first_answer():
  assert tm.vqa_accuracy(["cat"], [["cat", "dog"]])["exact_match"] == 1.0
  assert tm.vqa_accuracy(["dog"], [["cat", "dog"]])["exact_match"] == 0.0


def test_vqa_errors():
  with pytest.raises(ValueError, match="got 1 predictions but 2 answer lists"):
    tm.vqa_accuracy(["yes"], [["yes"], ["no"]])
  with pytest.raises(ValueError, match="predictions is empty"):
    tm.vqa_accuracy([], [])
  with pytest.raises(ValueError, match="example 0 has no answer"):
    tm.vqa_accuracy(["yes"], [[]])
  with pytest.raises(TypeError, match=r"answer lists\[0\] is a string"):
    tm.vqa_accuracy(["yes"], ["yes"])
