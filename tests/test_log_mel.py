"""Log-mel features computed as Whisper's and AST's feature extractors compute them, the
`log_mel` modality that feeds them to a tower, and Whisper / AST towers fused with an
image tower in training."""

import json
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
import torch
import transformers

from mmtl import data, export, hf, log_mel, modalities, preprocess, rules, train
from mmtl.config_keys import ConfigError
from tests.test_waveform import assert_lora_trained, final_params, prepare, speech_config

ATOL = 1e-4
CLIP = tfds.features.Tensor(shape=(8000,), dtype=np.float32)  # mmtl_shapes: 0.5 s at 16 kHz


def clips(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in lengths]


@pytest.mark.parametrize(
  "extractor,spec",
  [
    (transformers.WhisperFeatureExtractor(), log_mel.LogMelSpec("whisper", 80)),
    (
      transformers.WhisperFeatureExtractor(feature_size=128),  # large-v3
      log_mel.LogMelSpec("whisper", 128),
    ),
    (transformers.ASTFeatureExtractor(), log_mel.LogMelSpec("kaldi", 128)),
    (
      transformers.ASTFeatureExtractor(num_mel_bins=23, max_length=50, mean=-3.0, std=2.0),
      log_mel.LogMelSpec("kaldi", 23, max_length=50, mean=-3.0, std=2.0),
    ),
  ],
  ids=["whisper_80", "whisper_128", "kaldi_128", "kaldi_23_bins_50_frames"],
)
def test_front_ends_equal_the_transformers_feature_extractors(extractor, spec):
  """Short clips (padded), a clip shorter than one Kaldi frame, and one longer than the
  extractor keeps (cut): within 1e-4 of transformers' features."""
  for clip in clips((1234, 7777, 399, 500_000)):
    ref = extractor(clip, sampling_rate=16_000, return_tensors="np")
    ref = ref["input_features"][0].T if spec.front_end == "whisper" else ref["input_values"][0]
    ours = log_mel.log_mel(clip, spec)
    assert ours.shape == ref.shape == (spec.frames, spec.num_mel_bins)
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0, err_msg=f"{len(clip)} samples")


def log_mel_modality(cfg: dict, train_mode=False, feature=CLIP) -> modalities.LogMel:
  """The modality as a pipeline makes it, for `config.input.log_mel = cfg`."""
  input_cfg = data.input_config(dict(dataset="clips", fields=dict(log_mel="w"), log_mel=cfg))
  return modalities.LogMel(input_cfg, feature, train=train_mode)


@pytest.mark.parametrize("family", ["whisper", "ast"])
def test_the_modality_equals_the_checkpoint_feature_extractor(family, request):
  """`stats_from` picks the checkpoint's front end and settings: the batch equals its own
  feature extractor (AutoFeatureExtractor of the same folder) on the same clips, and a
  blanked clip is the features of silence."""
  folder = request.getfixturevalue(f"tiny_{family}_dir")
  modality = log_mel_modality(dict(rate=16000, stats_from=folder))
  batch = prepare(modality, clips((8000, 5000, 1234), seed=1), present=[1, 1, 0])
  extractor = transformers.AutoFeatureExtractor.from_pretrained(folder)
  ref = extractor(clips((8000, 5000, 1234), seed=1), sampling_rate=16000, return_tensors="np")
  ref = ref["input_features"].swapaxes(1, 2) if family == "whisper" else ref["input_values"]
  silence = np.zeros(modality.length, np.float32)  # a silent clip as long as any clip
  silence = extractor(silence, sampling_rate=16000, return_tensors="np")
  silence = silence["input_features"][0].T if family == "whisper" else silence["input_values"][0]
  shape = (100, 13) if family == "whisper" else (64, 16)  # 1 s chunk / 64 frames, its mel bins
  assert batch["log_mel"].shape == (3, *shape)
  np.testing.assert_allclose(batch["log_mel"][:2], ref[:2], atol=ATOL, rtol=0)
  np.testing.assert_allclose(batch["log_mel"][2], silence, atol=ATOL, rtol=0)


def test_whisper_clips_cropped_and_padded_to_max_seconds(tiny_whisper_dir):
  """`max_seconds` sets the padded length (instead of the extractor's chunk): 0.5 s gives 50
  frames, which are the first 50 of the 1 s chunk's features (the clip's maximum is the
  same); a longer clip is cropped at random in training, at its start in evaluation."""
  (clip,) = clips((8000,), seed=2)
  short = log_mel_modality(dict(rate=16000, stats_from=tiny_whisper_dir, max_seconds=0.5))
  full = log_mel_modality(dict(rate=16000, stats_from=tiny_whisper_dir))
  rng = np.random.default_rng(0)
  a, b = short.example(clip[:6000], rng)["log_mel"], full.example(clip[:6000], rng)["log_mel"]
  assert a.shape == (50, 13)
  np.testing.assert_allclose(a, b[:50], atol=ATOL)
  crop = dict(rate=16000, stats_from=tiny_whisper_dir, max_seconds=0.25)
  first = log_mel_modality(crop).example(clip, rng)["log_mel"]
  quarter = log_mel.LogMelSpec("whisper", 13, chunk_length=0.25)
  np.testing.assert_array_equal(first, log_mel.log_mel(clip[:4000], quarter))
  starts = {
    float(log_mel_modality(crop, True).example(clip, np.random.default_rng(s))["log_mel"][0, 0])
    for s in range(4)
  }
  assert len(starts) > 1


def test_a_checkpoint_without_preprocessor_config_falls_back_with_a_note(
  tiny_whisper_dir, tiny_ast_dir, tmp_path, caplog
):
  for folder, front_end, bins, frames in (
    (tiny_whisper_dir, "whisper", 13, 3000),
    (tiny_ast_dir, "kaldi", 16, 64),
  ):
    bare = tmp_path / front_end
    shutil.copytree(folder, bare, ignore=shutil.ignore_patterns("preprocessor_config.json"))
    with caplog.at_level("WARNING"):
      spec = preprocess.log_mel_spec(bare)
    assert (spec.front_end, spec.num_mel_bins, spec.frames) == (front_end, bins, frames)
    assert f"{bare} has no preprocessor_config.json" in caplog.text


def test_bad_checkpoints_and_settings_name_the_fix(
  tiny_whisper_dir, tiny_wav2vec2_dir, tiny_bert_dir, tmp_path
):
  with pytest.raises(
    hf.CheckpointError,
    match="preprocessor_config.json: feature_extractor_type 'Wav2Vec2FeatureExtractor' computes",
  ):
    preprocess.log_mel_spec(tiny_wav2vec2_dir)
  with pytest.raises(
    hf.CheckpointError, match="no preprocessor_config.json and its config.json is a 'bert' model"
  ):
    preprocess.log_mel_spec(tiny_bert_dir)
  with pytest.raises(
    ConfigError,
    match="gives 80 mel bins, the tower .* takes 13: drop config.input.log_mel.num_mel_bins",
  ):
    log_mel_modality(dict(rate=16000, stats_from=tiny_whisper_dir, num_mel_bins=80))
  with pytest.raises(
    ConfigError,
    match=r"200 frames per clip \(2 s\), more than the tower's positions cover \(100 frames\)",
  ):
    log_mel_modality(dict(rate=16000, stats_from=tiny_whisper_dir, max_seconds=2))
  with pytest.raises(ConfigError, match="front_end=None: set it to one of"):
    log_mel_modality(dict(rate=16000))
  dithered = tmp_path / "dithered"
  shutil.copytree(tiny_whisper_dir, dithered)
  file = dithered / "preprocessor_config.json"
  file.write_text(json.dumps({**json.loads(file.read_text()), "dither": 1e-4}))
  with pytest.raises(hf.CheckpointError, match="dither=0.0001 .* set dither to 0.0"):
    preprocess.log_mel_spec(dithered)
  # A Whisper config.json's `max_length` (Hub checkpoints carry 448) is the decoder's: the
  # encoder's limit is 2 * max_source_positions.
  decoder_length = tmp_path / "decoder_length"
  shutil.copytree(tiny_whisper_dir, decoder_length)
  file = decoder_length / "config.json"
  file.write_text(json.dumps({**json.loads(file.read_text()), "max_length": 20}))
  assert log_mel_modality(dict(rate=16000, stats_from=str(decoder_length))).spec.frames == 100
  without = log_mel_modality(dict(rate=16000, front_end="kaldi", num_mel_bins=20, frames=30))
  assert prepare(without, clips((8000,)))["log_mel"].shape == (1, 30, 20)


def log_mel_config(tower_dir, data_dir, **overrides):
  """The fused training config of tests/test_waveform.py with a log-mel tower."""
  section = dict(rate=16000, stats_from=tower_dir, max_seconds=0.5)
  return speech_config(tower_dir, data_dir, "log_mel", section, **overrides)


@pytest.mark.slow
def test_a_whisper_tower_trains_with_its_stem_frozen(tiny_whisper_dir, data_dir, tmp_path):
  """The conv stem frozen by rule, the sinusoidal positions frozen by the family: both keep
  the checkpoint's values bit for bit while the layers train; the run evaluates."""
  optim = dict(
    name="adam", lr=3e-3, schedule=dict(decay="constant"), frozen=["log_mel_encoder/conv.*"]
  )
  config = log_mel_config(tiny_whisper_dir, data_dir, optim=optim)
  final = train.train(config, str(tmp_path / "run"))
  assert np.isfinite(final["val/loss"]) and 0 <= final["val/accuracy"] <= 1
  after = final_params(tmp_path / "run")
  loaded = rules.flatten(hf.load_pretrained(tiny_whisper_dir)[1]["params"])
  for p, x in loaded.items():
    if p.startswith("conv") or p == "position_sinusoids":
      np.testing.assert_array_equal(after[f"log_mel_encoder/{p}"], x, err_msg=p)
    elif p.startswith("encoder/") and p.endswith("kernel"):
      assert not np.allclose(after[f"log_mel_encoder/{p}"], x), p
  # The trained tower exports as a WhisperModel folder whose encoder computes what it did.
  out = export.export_tower(str(tmp_path / "run"), "log_mel", tmp_path / "exported")
  reloaded = transformers.WhisperModel.from_pretrained(out).eval()
  module = hf.build_module(out)
  tower = {p.split("/", 1)[1]: x for p, x in after.items() if p.startswith("log_mel_encoder/")}
  x = np.random.default_rng(0).standard_normal((2, 100, 13)).astype(np.float32)
  ours = module.apply({"params": rules.unflatten(tower)}, x)["last_hidden_state"]
  with torch.no_grad():
    theirs = reloaded.encoder(torch.tensor(x).transpose(1, 2)).last_hidden_state.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-5)


@pytest.mark.slow
def test_lora_on_an_ast_tower(tiny_ast_dir, data_dir, tmp_path):
  lora = dict(targets=[r"log_mel_encoder/.*/attn/(query|value)/kernel"], rank=2, alpha=4)
  optim = dict(name="adam", lr=3e-3, schedule=dict(decay="constant"), preset="lora", lora=lora)
  config = log_mel_config(tiny_ast_dir, data_dir, total_steps=2, evals={}, optim=optim)
  config.input.log_mel.max_seconds = None  # AST: the clip's frames, padded to 64
  train.train(config, str(tmp_path / "run"))
  assert_lora_trained(tmp_path / "run", tiny_ast_dir, "log_mel_encoder")
