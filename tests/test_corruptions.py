"""mmtl.data.corruptions: each corruption at its severities, in the training input, and in
evaluators' corrupted passes."""

import ml_collections as mlc
import numpy as np
import pytest

from mmtl import config as config_lib
from mmtl import data, metrics, train
from mmtl import evaluators as ev
from mmtl.data import corruptions
from tests.test_data import TOKENIZER
from tests.test_train import tiny_config

C = corruptions.CORRUPTIONS


def rng(seed=0):
  return np.random.default_rng(seed)


def test_image_noise_has_its_standard_deviation():
  grey = np.full((64, 64, 3), 128, np.uint8)
  for level in C["gaussian_noise"].levels[:3]:  # little clipping around mid-grey
    noisy = corruptions.gaussian_noise(grey, level, rng())
    assert np.std(noisy / 255.0 - 128 / 255.0) == pytest.approx(level, rel=0.05)


def test_blur_grows_with_severity_and_scales_with_the_image():
  def roughness(side, level):
    board = (
      (np.indices((side, side)).sum(0) // 4 % 2 * 255).astype(np.uint8)[..., None].repeat(3, -1)
    )
    return np.abs(
      np.diff(corruptions.gaussian_blur(board, level, rng()).astype(float), axis=0)
    ).mean()

  levels = C["gaussian_blur"].levels
  assert roughness(32, levels[0]) > roughness(32, levels[2]) > roughness(32, levels[4])
  # The same fraction of the side: the same blur, whatever the resolution.
  big = (np.indices((64, 64)).sum(0) // 2 % 2 * 255).astype(np.uint8)[..., None].repeat(3, -1)
  small = big[::2, ::2]
  blurred_big = corruptions.gaussian_blur(big, levels[3], rng())[::2, ::2].astype(float)
  blurred_small = corruptions.gaussian_blur(small, levels[3], rng()).astype(float)
  assert np.abs(blurred_big - blurred_small).mean() < 12


def test_occlusion_covers_its_fraction():
  image = np.zeros((40, 40, 3), np.uint8)
  for area in C["occlusion"].levels:
    out = corruptions.occlusion(image, area, rng(1))
    assert (out == 128).all(-1).mean() == pytest.approx(area, abs=0.03)
  assert image.max() == 0  # the input is not changed in place


def test_text_corruptions_at_their_rates():
  text = [" ".join(f"word{i}" for i in range(2000))]
  kept = corruptions.token_dropout(text, 0.3, rng())[0].split()
  assert len(kept) / 2000 == pytest.approx(0.7, abs=0.03)
  assert corruptions.token_dropout(["one"], 1.0, rng()) == ["one"]  # never empty
  typo = corruptions.typos(text, 0.2, rng())[0].split()
  changed = np.mean([a != b for a, b in zip(text[0].split(), typo)])
  assert changed == pytest.approx(0.2, abs=0.03)
  assert corruptions.typos(text, 0.0, rng()) == text


def test_audio_noise_at_its_snr():
  tone = np.sin(np.arange(16000) * 0.05).astype(np.float32)
  for snr in C["audio_noise"].levels:
    noise = corruptions.audio_noise(tone, snr, rng()) - tone
    measured = 10 * np.log10(np.mean(tone**2) / np.mean(noise**2))
    assert measured == pytest.approx(snr, abs=0.2)


@pytest.fixture
def cfg(data_dir):
  return dict(
    dataset="mmtl_shapes/small",
    data_dir=data_dir,
    fields=dict(image="image", text="question", label="label"),
    text=dict(tokenizer=TOKENIZER, max_length=24),
    num_threads=1,
  )


def test_training_corruptions_change_what_they_corrupt_only(cfg):
  first = lambda **kw: next(data.make_train_iterator(dict(cfg, **kw), batch_size=8, seed=0))  # noqa: E731
  clean = first()
  noisy = first(corruptions=[dict(name="gaussian_noise", severity=5)])
  assert np.abs(noisy["pixel_values"] - clean["pixel_values"]).mean() > 0.3
  np.testing.assert_array_equal(noisy["input_ids"], clean["input_ids"])
  typos = first(corruptions=[dict(name="typos", severity=(4, 5), p=1.0)])
  assert not np.array_equal(typos["input_ids"], clean["input_ids"])
  never = first(corruptions=[dict(name="occlusion", severity=5, p=0.0)])
  np.testing.assert_array_equal(never["pixel_values"], clean["pixel_values"])


@pytest.mark.parametrize(
  "spec, match",
  [
    (dict(name="snow"), "no corruption is named 'snow'"),
    (dict(name="audio_noise"), "corrupts waveform or log_mel, which this input does not read"),
    (dict(name="typos", severity=7), "severity=7: use a severity in 1-5"),
    (dict(name="typos", severity=(3, 1)), r"severity=\(3, 1\)"),
    (dict(name="typos", p=1.5), "p=1.5 is not a probability"),
    (dict(name="typos", level=2), "Unknown config key config.input.corruptions\\[0\\].level"),
  ],
)
def test_bad_corruptions_are_one_line_errors(cfg, spec, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    next(data.make_train_iterator(dict(cfg, corruptions=[spec]), batch_size=4, seed=0))


def test_an_evaluator_adds_a_pass_per_corruption_and_severity():
  seen = []

  def make_batches(cfg):
    corrupt = cfg.get("input", {}).get("corruptions", ())
    seen.append(tuple((c["name"], c["severity"]) for c in corrupt))
    hit = 1.0 if not corrupt else 0.5 ** corrupt[0]["severity"]  # accuracy falls with severity
    labels = np.array([0, 1] * 8)
    logits = np.where(np.arange(16)[:, None] < 16 * hit, np.eye(2)[labels], np.eye(2)[1 - labels])
    return [{"logits": logits, "labels": labels, "example_weight": np.ones(16)}]

  context = ev.EvalContext(
    head_type="classification",
    make_batches=make_batches,
    predict_fns={"predict": lambda params, b: b},
  )
  cfg = {"type": "classification", "corruptions": ["occlusion", "typos"], "severities": (1, 3)}
  evaluator = ev.make("val", cfg, context)
  out = evaluator.run(None)
  assert seen == [(), (("occlusion", 1),), (("occlusion", 3),), (("typos", 1),), (("typos", 3),)]
  assert list(out) == evaluator.metric_names()
  assert out["val/accuracy"] == 1.0 and out["val/typos_1/accuracy"] == 0.5
  assert out["val/occlusion_3/accuracy"] == 0.125
  assert out["val/corrupted/accuracy"] == pytest.approx((0.5 + 0.125) / 2)
  assert len(evaluator.all_inputs()) == 5
  with pytest.raises(config_lib.ConfigError, match="config.evals.val.corruptions: no corruption"):
    ev.make("val", dict(cfg, corruptions=["fog"]), context)
  with pytest.raises(config_lib.ConfigError, match="severity=0"):
    ev.make("val", dict(cfg, severities=(0,)), context)


def test_evaluation_inputs_do_not_inherit_training_corruptions():
  config = mlc.ConfigDict(dict(input=dict(corruptions=[dict(name="typos")])))
  assert list(ev.eval_input_config(config, {}).corruptions) == []
  own = {"input": {"corruptions": [dict(name="occlusion", severity=2)]}}
  assert ev.eval_input_config(config, own).corruptions == [dict(name="occlusion", severity=2)]


@pytest.mark.slow
def test_a_run_trains_on_corrupted_inputs_and_reports_robustness(tiny_bert_dir, data_dir, tmp_path):
  config = tiny_config(
    tiny_bert_dir,
    data_dir,
    total_steps=4,
    evals=dict(
      val=dict(
        type="classification",
        input=dict(split="validation[:32]"),
        corruptions=["gaussian_noise", "token_dropout"],
        severities=[5],
      )
    ),
    best_metric="val/corrupted/accuracy",
  )
  config.input.corruptions = [dict(name="occlusion", severity=(1, 5), p=0.5)]
  final = train.train(config, str(tmp_path / "run"))
  names = {"val/accuracy", "val/gaussian_noise_5/accuracy", "val/token_dropout_5/accuracy"}
  assert names <= set(final)
  assert final["val/corrupted/accuracy"] == pytest.approx(
    (final["val/gaussian_noise_5/accuracy"] + final["val/token_dropout_5/accuracy"]) / 2
  )
  assert final["val/gaussian_noise_5/loss"] != final["val/loss"]
  assert "val/corrupted/macro_f1" in metrics.read(str(tmp_path / "run"))


def test_audio_noise_reaches_the_waveform_batch(data_dir):
  cfg = dict(
    dataset="mmtl_shapes/small",
    data_dir=data_dir,
    fields=dict(image=None, text=None, label="label", waveform="waveform"),
    waveform=dict(rate=16000, normalize=False),
    num_threads=1,
  )
  first = lambda **kw: next(data.make_train_iterator(dict(cfg, **kw), batch_size=4, seed=0))  # noqa: E731
  clean, noisy = first(), first(corruptions=[dict(name="audio_noise", severity=5)])
  noise = noisy["waveform"] - clean["waveform"]
  snr = 10 * np.log10((clean["waveform"] ** 2).mean(1) / (noise**2).mean(1))
  np.testing.assert_allclose(snr, 0.0, atol=0.5)  # severity 5: 0 dB
