"""Text-generation metrics: image captioning (BLEU, CIDEr-D, ROUGE-L), generative VQA accuracy and
speech recognition error rates (WER, CER).

Which library computes which number (all returned as Python floats):

* `bleu_1`..`bleu_4`: pycocoevalcap's `Bleu(4)`, the COCO caption evaluation's BLEU (corpus
  level, "closest" reference length for the brevity penalty). Scale 0-1.
* `cider`: pycocoevalcap's `Cider`, which is CIDEr-D (clipped n-gram counts, Gaussian length
  penalty with sigma=6, times 10). Scale 0-10 (good COCO models score about 1). Its IDF comes from
  the references passed in, so it is a corpus-level number: score the whole evaluation set in one
  call (a single image gives IDF log(1) = 0, so CIDEr 0), never average per-batch values.
* `rouge_l`: pycocoevalcap's `Rouge` (ROUGE-L F-measure with beta=1.2, best over references,
  averaged over images). Scale 0-1.
* `sacrebleu`: `sacrebleu.corpus_bleu` with its defaults (13a tokenization, exp smoothing) and
  lowercase=True, on the raw strings. Scale 0-100, as sacrebleu reports it. The standard,
  reproducible BLEU; it differs from `bleu_4` (tokenization, smoothing, brevity penalty).

* `wer`, `cer`: `jiwer.wer` and `jiwer.cer` (jiwer 4) on the raw strings: corpus level, the edits
  (substitutions + deletions + insertions) of all hypotheses over the words (characters, spaces
  included) of all references. Scale 0-1; insertions can take it past 1.

Only pycocoevalcap's pure-Python scorers are used: its `PTBTokenizer`, METEOR and SPICE run Java
(and its `eval.py` needs pycocotools), so none of them is imported here. Instead of PTBTokenizer,
`caption_tokens` approximates it with regular expressions: lowercase; split off the clitics PTB
splits ('s 're 've 'll 'd 'm n't); drop the punctuation in PTBTokenizer's PUNCTUATIONS list
(quotes ' '' " ` ``, brackets -LRB- -RRB- -LCB- -RCB-, . ? ! , : ; - -- ...), keeping word-internal
hyphens (t-shirt) and . , : inside numbers (3.5, 1,000, 10:30) as PTB does; split on whitespace.
It is an approximation: scores can differ slightly from the Java pipeline's on unusual text.

`vqa_accuracy` mirrors the official VQA evaluation script (GT-Vision-Lab/VQA, vqaEval.py:
processPunctuation, processDigitArticle, the leave-one-out soft accuracy). No maintained pip
package provides that normalisation without a model framework around it, so it is written here;
its contractions map is a subset of the official one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
import re

import jiwer
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
import sacrebleu

# ---- Captioning ----

_CLITIC = re.compile(r"(?<=\w)(n't|'(?:s|re|ve|ll|d|m))\b")
# PTBTokenizer's PUNCTUATIONS, as characters in raw text: quotes, ( ) { } (PTB's -LRB- -RRB-
# -LCB- -RCB-), ? ! ;, . , : except inside a number, dashes except inside a word, and ' except
# where it starts a clitic split off by _CLITIC (n't, 's, ...).
_PTB_PUNCT = re.compile(
  r"""["`(){}?!;]"""
  r"|(?<!\d)[.,:]|[.,:](?!\d)"
  r"|(?<![^\W_])-+|-+(?![^\W_])"
  r"|(?<!\bn)'(?!(?:s|re|ve|ll|d|m)\b)|(?<=\bn)'(?!t\b)"
)


def caption_tokens(text: str) -> str:
  """`text` tokenized like the COCO caption evaluation (PTBTokenizer, approximated without Java;
  see the module docstring), as space-joined tokens: the form pycocoevalcap's scorers expect."""
  text = _CLITIC.sub(r" \1", text.lower())
  return " ".join(_PTB_PUNCT.sub(" ", text).split())


def _check_lengths(predictions: Sequence[str], references: Sequence, what: str) -> None:
  if isinstance(predictions, str):
    raise TypeError("predictions must be a sequence of strings, not one string")
  if len(predictions) != len(references):
    raise ValueError(
      f"got {len(predictions)} predictions but {len(references)} {what}: one per prediction"
    )
  if len(predictions) == 0:
    raise ValueError("predictions is empty: nothing to score")
  for i, refs in enumerate(references):
    if isinstance(refs, str):
      raise TypeError(f"{what}[{i}] is a string; give a list of strings (e.g. [{refs!r}])")


def caption_scores(
  predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> dict[str, float]:
  """Corpus-level caption metrics of `predictions[i]` against its references `references[i]`
  (any number >= 1 per example, e.g. COCO's 5; counts may differ between examples).

  Returns `bleu_1`..`bleu_4`, `cider`, `rouge_l` (pycocoevalcap, on `caption_tokens`) and
  `sacrebleu` (0-100); see the module docstring for scales. Raises ValueError when the lengths
  differ, `predictions` is empty, or an example has no (non-empty) reference.
  """
  _check_lengths(predictions, references, "reference lists")
  res = {i: [caption_tokens(p)] for i, p in enumerate(predictions)}
  gts = {}
  for i, refs in enumerate(references):
    tokenized = [caption_tokens(r) for r in refs]
    if not any(tokenized):
      raise ValueError(f"example {i} has no reference (every caption needs at least one)")
    gts[i] = tokenized
  bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
  cider, _ = Cider().compute_score(gts, res)
  rouge_l, _ = Rouge().compute_score(gts, res)
  # sacrebleu takes reference *streams* (the k-th reference of every example); an example with
  # fewer references fills its missing ones with None, which sacrebleu skips (its documented way
  # to score a variable number of references; an empty string would count as a reference).
  streams = max(len(refs) for refs in references)
  ref_streams = [
    [refs[k] if k < len(refs) else None for refs in references] for k in range(streams)
  ]
  sacre = sacrebleu.corpus_bleu(list(predictions), ref_streams, lowercase=True)
  scores = {f"bleu_{n + 1}": float(b) for n, b in enumerate(bleu)}
  scores.update(cider=float(cider), rouge_l=float(rouge_l), sacrebleu=float(sacre.score))
  return scores


# ---- VQA ----

# The official vqaEval.py's tables (its punctuation list of the Python 3 version; a subset of its
# contractions, those reachable after lowercasing).
_VQA_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<"]
_VQA_PUNCT += ["@", "`", ",", "?", "!"]
_NUMBERS = {
  "none": "0",
  "zero": "0",
  "one": "1",
  "two": "2",
  "three": "3",
  "four": "4",
  "five": "5",
  "six": "6",
  "seven": "7",
  "eight": "8",
  "nine": "9",
  "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = dict(
  pair.split(":")
  for pair in (
    "aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't didnt:didn't "
    "doesnt:doesn't dont:don't hadnt:hadn't hasnt:hasn't havent:haven't hed:he'd hes:he's "
    "howd:how'd howll:how'll hows:how's isnt:isn't itd:it'd itll:it'll maam:ma'am "
    "mightnt:mightn't mightve:might've mustnt:mustn't mustve:must've neednt:needn't "
    "oclock:o'clock shouldve:should've shouldnt:shouldn't thats:that's theres:there's "
    "theyd:they'd theyll:they'll theyre:they're theyve:they've wasnt:wasn't weve:we've "
    "werent:weren't whats:what's wheres:where's whos:who's wont:won't wouldve:would've "
    "wouldnt:wouldn't yall:y'all youd:you'd youll:you'll youre:you're youve:you've"
  ).split()
)
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
# The official periodStrip is "(?!<=\d)(\.)(?!\d)"; its "(?!<=\d)" (a typo for a lookbehind)
# always holds before a ".", so it removes every period not followed by a digit.
_PERIOD = re.compile(r"\.(?!\d)")


def _process_punctuation(text: str) -> str:
  """vqaEval.py's processPunctuation: a mark next to a space (or any mark, when the text has a
  comma inside a number) is deleted, otherwise it becomes a space; then periods not before a
  digit go."""
  out = text
  delete_all = _COMMA_IN_NUMBER.search(text) is not None
  for p in _VQA_PUNCT:
    if delete_all or p + " " in text or " " + p in text:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD.sub("", out)


def _process_digit_article(text: str) -> str:
  """vqaEval.py's processDigitArticle: lowercase, number words to digits, drop articles,
  restore apostrophes of contractions."""
  words = [_NUMBERS.get(w, w) for w in text.lower().split()]
  return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_vqa_answer(text: str) -> str:
  """An answer as the official VQA evaluation compares it ("The Two dogs!" -> "2 dogs")."""
  text = text.replace("\n", " ").replace("\t", " ").strip()
  return _process_digit_article(_process_punctuation(text))


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
  """Generative VQA scores of `predictions[i]` against the human answers `answers[i]`, both
  normalised by `normalize_vqa_answer`. Returns, averaged over examples, on a 0-1 scale (the
  official script prints 100x):

  * `vqa_accuracy`: the official soft accuracy, not the simplified min(1, n/3): for each human
    answer, min(1, matches among the *other* answers / 3), averaged over the answers (for VQA-v2's
    10 answers, the average over the 10 subsets of 9). An example with a single answer has no
    leave-one-out subsets, so it scores exact match instead (the official formula would give 0).
  * `exact_match`: the prediction equals the majority answer (ties: the first one given).

  Unlike the official script, which expects the dataset's pre-normalised answers and only
  re-applies processPunctuation to them, the answers get the full normalisation here, so raw
  answers ("Two") match normalised predictions ("2"). Raises ValueError when the lengths differ,
  `predictions` is empty, or an example has no answer.
  """
  _check_lengths(predictions, answers, "answer lists")
  exact, soft = 0.0, 0.0
  for i, (prediction, human) in enumerate(zip(predictions, answers)):
    if len(human) == 0:
      raise ValueError(f"example {i} has no answer (every question needs at least one)")
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in human]
    majority = Counter(gts).most_common(1)[0][0]
    exact += float(pred == majority)
    if len(gts) == 1:
      soft += float(pred == gts[0])
    else:
      matches = sum(g == pred for g in gts)
      # Leaving out answer j leaves `matches - (gts[j] == pred)` matching answers.
      soft += sum(min(1.0, (matches - (g == pred)) / 3) for g in gts) / len(gts)
  n = len(predictions)
  return {"exact_match": exact / n, "vqa_accuracy": soft / n}


def error_rates(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
  """`wer` and `cer` of `hypotheses` against one reference each (jiwer; module docstring).
  An empty reference has no words to count errors over: it is an error."""
  if len(hypotheses) != len(references) or not references:
    raise ValueError(
      f"got {len(hypotheses)} hypotheses and {len(references)} references: one each, not none"
    )
  if empty := [i for i, r in enumerate(references) if not r.strip()]:
    raise ValueError(
      f"{len(empty)} reference transcript(s) are empty (first: example {empty[0]}): WER and "
      "CER count errors per reference word; drop such examples from the evaluation split."
    )
  return {
    "wer": float(jiwer.wer(list(references), list(hypotheses))),
    "cer": float(jiwer.cer(list(references), list(hypotheses))),
  }
