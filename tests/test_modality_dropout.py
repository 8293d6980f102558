"""Modality dropout blanks each modality at exactly its configured rate, never all at once."""

import numpy as np
import pytest

from mmtl import config as config_lib
from mmtl.data import options, transforms

N = 20_000


def blank_patterns(rates, n=N, seed=0):
  """(n, M) bool, True = blanked, from `n` draws of `_ModalityDropout(rates)`."""
  dropout, rng = transforms._ModalityDropout(rates), np.random.default_rng(seed)
  return np.array([[not kept for kept in dropout(rng).values()] for _ in range(n)])


def assert_rates(blanked, rates):
  """Empirical blank rates within 4 standard errors of `rates`; never all blanked."""
  p = np.array(list(rates.values()))
  np.testing.assert_array_less(
    np.abs(blanked.mean(0) - p), 4 * np.sqrt(p * (1 - p) / len(blanked)) + 1e-12
  )
  assert not blanked.all(1).any()


def test_two_modalities_get_their_rates():
  rates = dict(image=0.3, text=0.5)
  blanked = blank_patterns(rates)
  assert_rates(blanked, rates)  # Never both, so image-only 0.3 and text-only 0.5 of the time.


def test_restoring_one_at_random_fails_the_same_check():
  """The old rule (independent draws, one restored at random when all blank) gives 0.225 / 0.421."""
  rng = np.random.default_rng(0)
  blanked = rng.random((N, 2)) < [0.3, 0.5]
  both = np.flatnonzero(blanked.all(1))
  blanked[both, rng.integers(2, size=len(both))] = False
  with pytest.raises(AssertionError):
    assert_rates(blanked, dict(image=0.3, text=0.5))


def test_three_modalities_get_their_rates_with_every_pattern_but_all_blank():
  rates = dict(image=0.3, text=0.4, audio=0.5)
  dropout = transforms._ModalityDropout(rates)
  np.testing.assert_allclose(1 - dropout.probs @ dropout.patterns, list(rates.values()), atol=1e-12)
  blanked = blank_patterns(rates)
  assert_rates(blanked, rates)
  assert len({row.tobytes() for row in blanked}) == 7  # E.g. audio alone is trained on too.


@pytest.mark.parametrize("rates", [dict(image=0.5, text=0.5), dict(image=0.4, text=0.6, audio=1.0)])
def test_rates_summing_to_one_less_than_the_count_keep_exactly_one(rates):
  blanked = blank_patterns(rates, n=2000)
  assert_rates(blanked, rates)
  assert (blanked.sum(1) == len(rates) - 1).all()


def test_a_rate_of_zero_leaves_the_others_independent():
  blanked = blank_patterns(dict(image=0.9, text=0.0, audio=0.8))
  assert not blanked[:, 1].any()
  assert_rates(blanked, dict(image=0.9, text=0.0, audio=0.8))
  both = blanked[:, 0] & blanked[:, 2]
  assert abs(both.mean() - 0.72) < 4 * np.sqrt(0.72 * 0.28 / N)


def test_same_element_rng_same_draw():
  """Draws depend only on the element's RNG: resumption and the process count do not change them."""
  dropout = transforms._ModalityDropout(dict(image=0.3, text=0.4, audio=0.5))
  draws = lambda seed: [dropout(np.random.default_rng([seed, i])) for i in range(50)]
  assert draws(7) == draws(7) != draws(8)


@pytest.mark.parametrize(
  "rates, match",
  [
    (
      dict(image=0.7, text=0.6),
      r"config\.input\.modality_dropout rates image=0\.7, text=0\.6 sum to 1\.3.*"
      r"at most 1: lower them, e\.g\. to image=0\.53, text=0\.46",
    ),
    (dict(image=0.9, text=0.8, audio=0.7), r"at most 2"),
    (
      dict(image=0.3),
      r"config\.input\.modality_dropout\.image=0\.3.*only used modality.*set it to 0",
    ),
    (
      dict(image=1.5, text=0.0),
      r"config\.input\.modality_dropout\.image=1\.5 is not a probability",
    ),
  ],
)
def test_infeasible_rates_name_the_key_and_the_fix(rates, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    transforms._ModalityDropout(rates)


def preprocess(**cfg):
  """Training `Preprocess` of 8x8 images and audio (no dataset or tokenizer needed)."""
  cfg = options.input_config(
    dict(
      fields=dict(image="image", text=None, audio="audio", label=None), image=dict(size=8), **cfg
    )
  )
  return transforms.Preprocess(cfg, None, train=True)


def present(pre, n):
  ex = dict(image=np.ones((8, 8, 3), np.uint8), audio=np.ones((4, 4, 1), np.float32))
  outs = [pre.example(ex, np.random.default_rng([0, i])) for i in range(n)]
  return np.array([[o["image_present"], o["audio_present"]] for o in outs])


def test_example_blanks_at_the_rates_and_keeps_config_blank():
  assert_rates(
    present(preprocess(modality_dropout=dict(image=0.3, audio=0.5)), 4000) == 0,
    dict(image=0.3, audio=0.5),
  )
  image_only = present(preprocess(blank=("audio",), modality_dropout=dict(audio=0.5)), 100)
  assert image_only[:, 0].all() and not image_only[:, 1].any()  # A blanked modality's rate is moot.
  with pytest.raises(
    config_lib.ConfigError, match=r"modality_dropout\.image=0\.3.*only used modality"
  ):
    preprocess(blank=("audio",), modality_dropout=dict(image=0.3))
