"""mmtl_spoken_digits: eSpeak NG speech, deterministic, split by voice; and the CTC recipe
(configs/speech_recognition.py) on it: trained, evaluated with WER/CER, transcribing."""

import json
import os
import signal
import sys

import numpy as np
import pytest
from scipy.io import wavfile
import torch
import transformers

from mmtl import data, espeak, export, hf, process, rules, sharding, train, train_state
from mmtl.config_keys import ConfigError
from mmtl.data import spoken_digits as sd
from mmtl.generate.__main__ import transcribe_run
from tests.test_waveform import final_params

CONFIG = sd.SpokenDigitsConfig(name="test")


def test_speech_is_deterministic_and_split_by_voice():
  with espeak.Synthesiser() as synth:
    first = [
      sd.make_example(CONFIG, split, i, synth) for split in sd.SPLIT_VARIANTS for i in range(4)
    ]
    again = sd.make_example(CONFIG, "train", 0, synth)  # after other utterances
  with espeak.Synthesiser() as synth:  # a new synthesiser process
    fresh = sd.make_example(CONFIG, "train", 0, synth)
  for other in (again, fresh):
    np.testing.assert_array_equal(first[0]["waveform"], other["waveform"])
  for ex in first:
    assert ex["waveform"].dtype == np.int16 and len(ex["waveform"]) <= sd.MAX_SECONDS * sd.RATE
    assert set(ex["transcript"]) <= set(sd.CHARACTERS + " ")
    words = ex["transcript"].split()
    assert sd.DIGITS.index(words[0]) == ex["first_digit"] and len(words) == ex["num_digits"] + 1
  variants = {split: set(v) for split, v in sd.SPLIT_VARIANTS.items()}
  assert not (variants["train"] & (variants["validation"] | variants["test"]))
  assert not variants["validation"] & variants["test"]


def test_noise_is_added_at_the_snr():
  rng = np.random.default_rng(0)
  speech = np.sin(np.linspace(0, 2000, 64000)) * np.repeat(rng.random(8) > 0.3, 8000)
  noisy = sd.with_noise(speech, 10.0, rng)
  voiced = np.abs(speech) > 0.01
  snr = 10 * np.log10(np.mean(speech[voiced] ** 2) / np.mean((noisy - speech) ** 2))
  assert abs(snr - 10.0) < 0.2


def test_a_hung_or_failing_synthesiser_fails_the_call_with_a_deadline(monkeypatch):
  monkeypatch.setattr(espeak.Synthesiser, "TIMEOUT_S", 0.5)
  with espeak.Synthesiser() as synth:
    os.kill(synth.process.pid, signal.SIGSTOP)  # a hung helper never answers
    with pytest.raises(RuntimeError, match="gave no samples in 0.5 s"):
      synth.say("one", "en+m1", 150, 50, 0)
  assert synth.process.poll() is not None  # killed on leaving
  with espeak.Synthesiser() as synth:  # a failed utterance fails that call only
    with pytest.raises(RuntimeError, match="failed to speak"):
      synth.say("one", "xx+nobody", 150, 50, 0)
    assert len(synth.say("one", "en+m1", 150, 50, 0)) > 1000


@pytest.fixture(scope="module")
def digits_data_dir(data_dir):
  """`data_dir` with `mmtl_spoken_digits/small` generated in it."""
  b = data.builder(dict(dataset="mmtl_spoken_digits/small", data_dir=data_dir))
  assert {k: v.num_examples for k, v in b.info.splits.items()} == dict(
    train=64, validation=32, test=32
  )
  return data_dir


def recipe(data_dir, arg=""):
  from configs import speech_recognition  # pylint: disable=g-import-not-at-top

  config = speech_recognition.get_config(f"steps=4,train=64{',' if arg else ''}{arg}")
  config.batch_size = 16
  config.input.update(dataset="mmtl_spoken_digits/small", data_dir=data_dir)
  for name, evaluation in config.evals.items():
    evaluation.input.split = f"{'test' if name.startswith('test') else 'validation'}[:16]"
  config.log_every = 1
  return config


def test_a_vocabulary_the_head_does_not_score_fails_before_training(digits_data_dir, tmp_path):
  config = recipe(digits_data_dir)
  config.model.vocab_size = 19
  with pytest.raises(ConfigError, match="has 20 tokens but the CTC head scores 19"):
    train.train(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_recipe_pretrains_exports_fine_tunes_and_transcribes(digits_data_dir, tmp_path):
  """The recipe's commands, short: first-digit pretraining, the tower exported, CTC
  fine-tuning from it with the feature encoder frozen (its weights unchanged), WER/CER and
  transcripts, `mmtl.generate` on the test split and on a WAV file, and the export as
  transformers' Wav2Vec2ForCTC."""
  pre = tmp_path / "pretrain"
  assert "val/accuracy" in train.train(recipe(digits_data_dir, "stage=pretrain"), str(pre))
  tower = export.export_tower(str(pre), "waveform", tmp_path / "tower")
  run = tmp_path / "ctc"
  final = train.train(recipe(digits_data_dir, f"init={tower}"), str(run))
  metrics = ("wer", "cer", "loss", "infeasible")
  assert set(final) == {f"{e}/{m}" for e in ("val", "test", "test_beam") for m in metrics} | {
    "step"
  }
  assert final["val/infeasible"] == 0 and np.isfinite(final["val/loss"])
  lines = (run / "transcripts_step4-val.jsonl").read_text().splitlines()
  rows = [json.loads(line) for line in lines]
  assert len(rows) == 16 and all(set(r) == {"id", "hypothesis", "reference"} for r in rows)
  assert all(r["reference"].split()[0] in sd.DIGITS for r in rows)
  after = final_params(run)
  for p, x in rules.flatten(hf.load_pretrained(str(tower))[1]["params"]).items():
    if p.startswith("feature_extractor/"):
      np.testing.assert_array_equal(after[f"waveform_encoder/{p}"], x, err_msg=p)
  # Transcribing a split (scored) and a WAV file at another rate (resampled).
  with espeak.Synthesiser() as synth:
    clip = sd.make_example(CONFIG, "test", 0, synth)["waveform"]
  wav = tmp_path / "clip.wav"
  wavfile.write(wav, 8000, clip[::2])
  # Exported with its head, the run is transformers' Wav2Vec2ForCTC, processor included:
  # the same transcript of the same clip.
  asr = export.export_tower(str(run), "waveform", tmp_path / "asr", head=True)
  model, info = transformers.Wav2Vec2ForCTC.from_pretrained(asr, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  processor = transformers.Wav2Vec2Processor.from_pretrained(asr)
  inputs = processor(clip / 32768, sampling_rate=16000, return_tensors="pt")
  with torch.no_grad():
    logits = model.eval()(**inputs).logits
  ours, variables = train_state.load_run(str(run), sharding.make_mesh())
  values = inputs["input_values"].numpy()
  batch = {"waveform": values, "waveform_mask": np.ones(values.shape, np.int32)}
  np.testing.assert_allclose(ours.apply(variables, batch)["logits"], logits.numpy(), atol=1e-4)
  wav16 = tmp_path / "clip16.wav"
  wavfile.write(wav16, 16000, clip)
  rows, _ = transcribe_run(str(run), audio=(str(wav16),))
  assert rows[0]["hypothesis"] == processor.batch_decode(logits.argmax(-1))[0]
  for args, out, printed in (
    (["--split=test[:8]", "--num_beams=3"], "transcripts_step4-test_8_-beams3.jsonl", "| wer"),
    ([f"--audio={wav}"], "transcripts_step4-audio-beams1.jsonl", '"audio"'),
  ):
    proc = process.run(
      [sys.executable, "-m", "mmtl.generate", f"--workdir={run}", *args],
      capture_output=True,
      text=True,
      timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (run / out).exists() and printed in proc.stdout, proc.stdout
