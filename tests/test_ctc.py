"""mmtl.ctc: CTC vocabularies and decoding, against transformers' tokenizer and exact sums."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmtl import ctc
from mmtl.config_keys import ConfigError

CHARS = "abcdefghijklmnopqrstuvwxyz'"


@pytest.fixture(scope="module")
def vocab():
  return ctc.CTCVocab.of_characters(CHARS)


def test_character_vocab_has_wav2vec2s_layout(vocab, tmp_path):
  tok = vocab.tokenizer
  assert [tok.convert_ids_to_tokens(i) for i in range(6)] == [*ctc.SPECIAL_TOKENS, "a"]
  assert vocab.blank == 0 and vocab.size == len(ctc.SPECIAL_TOKENS) + len(CHARS)
  # A saved vocabulary loads back as the same one (a checkpoint's vocab.json).
  tok.save_pretrained(tmp_path)
  loaded = ctc.CTCVocab.load(str(tmp_path))
  assert loaded.tokenizer.get_vocab() == tok.get_vocab() and loaded.blank == 0


def test_labels_and_texts_round_trip(vocab):
  labels = vocab.labels(["one  two", "nine"], max_length=10)
  assert labels.shape == (2, 10) and labels.dtype == np.int32
  assert list(labels[1]) == [*vocab.tokenizer.convert_tokens_to_ids(list("nine")), *[-1] * 6]
  assert labels[0, 3] == vocab.tokenizer.convert_tokens_to_ids("|")  # one delimiter
  assert vocab.texts(labels) == ["one two", "nine"]


def test_bad_transcripts_and_vocabularies_are_named(vocab):
  with pytest.raises(ConfigError, match=r"outside the CTC vocabulary.*\['7', 'É'\]"):
    vocab.labels(["Éight 7"], max_length=20)
  with pytest.raises(ConfigError, match="12 labels long.*max_length=5"):
    vocab.labels(["twelve chars"], max_length=5)
  with pytest.raises(ConfigError, match="has 32 tokens but the CTC head scores 30"):
    vocab.check_head(30, 0)
  with pytest.raises(ConfigError, match="special tokens"):
    ctc.CTCVocab.of_characters("ab|")


def test_greedy_collapses_repeats_and_drops_blanks_as_transformers_decodes(vocab):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 17, vocab.size)).astype(np.float32)
  logits[..., 0] += 1.0  # blanks common, as in a trained model
  mask = np.arange(17)[None] < np.array([[17], [11], [4]])
  ids = jax.jit(ctc.greedy, static_argnums=2)(logits, mask, vocab.blank)
  best = logits.argmax(-1)
  want = [vocab.tokenizer.decode(best[i, : mask[i].sum()].tolist()).strip() for i in range(3)]
  assert vocab.texts(np.asarray(ids)) == want
  assert (np.asarray(ids)[2, 4:] == ctc.PAD_LABEL).all()


def exact_labeling_log_probs(log_probs, blank):
  """{labeling: log sum over its alignments} by enumerating every alignment (tiny T, V)."""
  t, v = log_probs.shape
  out = {}
  for path in itertools.product(range(v), repeat=t):
    labeling = tuple(c for c, _ in itertools.groupby(path) if c != blank)
    lp = sum(log_probs[i, c] for i, c in enumerate(path))
    out[labeling] = np.logaddexp(out.get(labeling, -np.inf), lp)
  return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prefix_beam_search_is_exact_with_a_beam_holding_every_prefix(seed):
  rng = np.random.default_rng(seed)
  t, v, length = 6, 3, 5  # the last frame is padding
  logits = rng.normal(size=(1, t, v)).astype(np.float32) * 2
  mask = np.arange(t)[None] < length
  log_probs = np.asarray(jax.nn.log_softmax(jnp.asarray(logits[0, :length]), -1), np.float64)
  exact = exact_labeling_log_probs(log_probs, blank=0)
  best = max(exact, key=exact.get)
  ids, score = ctc.prefix_beam_search(logits, mask, blank=0, beam_size=64)
  got = tuple(int(i) for i in np.asarray(ids)[0] if i >= 0)
  assert got == best
  np.testing.assert_allclose(float(score[0]), exact[best], rtol=1e-5)


def test_prefix_beam_search_ignores_padding_and_bounds_the_probability():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(4, 12, 5)).astype(np.float32)
  mask = np.arange(12)[None] < np.array([[7], [6], [5], [3]])
  search = jax.jit(ctc.prefix_beam_search, static_argnums=(2, 3))
  ids, score = search(logits, mask, 0, 4)
  # Frames past a row's length change nothing.
  noisy = np.where(mask[..., None], logits, rng.normal(size=logits.shape) * 10)
  ids2, score2 = search(noisy.astype(np.float32), mask, 0, 4)
  np.testing.assert_array_equal(ids, ids2)
  np.testing.assert_allclose(score, score2, rtol=1e-6)
  # A small beam prunes alignments: its score is a lower bound of its labeling's probability.
  for i in range(4):
    lp = np.asarray(jax.nn.log_softmax(logits[i, : mask[i].sum()], -1), np.float64)
    b = tuple(int(c) for c in np.asarray(ids)[i] if c >= 0)
    exact = exact_labeling_log_probs(lp, 0)
    assert float(score[i]) <= exact[b] + 1e-5
