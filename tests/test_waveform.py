"""The waveform modality: raw samples for speech towers, prepared as transformers' feature
extractor prepares them, and a wav2vec2 tower fused with an image tower in training."""

import jax
import ml_collections as mlc
import numpy as np
import pytest
from scipy import signal
import tensorflow_datasets as tfds
import transformers

from mmtl import checkpoint, data, hf, metrics, modalities, rules, train
from mmtl.config_keys import ConfigError
from tests.test_train import TINY_VIT

WAVEFORM = tfds.features.Tensor(shape=(8000,), dtype=np.float32)


def waveform(cfg: dict, train_mode=False, feature=WAVEFORM) -> modalities.Waveform:
  """The modality as a pipeline makes it, for `config.input.waveform = cfg`."""
  input_cfg = data.input_config(dict(dataset="clips", fields=dict(waveform="w"), waveform=cfg))
  return modalities.Waveform(input_cfg, feature, train=train_mode)


def prepare(modality, clips, present=None):
  rng = np.random.default_rng(0)
  examples = [modality.example(modality.decode(c), rng) for c in clips]
  batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
  present = np.ones(len(clips)) if present is None else np.asarray(present, np.float32)
  return modality.batch(batch, present)


def test_clips_are_normalized_as_the_checkpoint_feature_extractor_does(tiny_wav2vec2_dir):
  """Zero mean, unit variance per clip over its real samples, zero padding, and the mask:
  transformers' Wav2Vec2FeatureExtractor on the same clips, within 1e-5."""
  rng = np.random.default_rng(1)
  clips = [3.0 + 2.0 * rng.standard_normal(n).astype(np.float32) for n in (8000, 5000, 1234)]
  modality = waveform(dict(rate=16000, stats_from=tiny_wav2vec2_dir))
  assert (modality.sampling_rate, modality.normalize, modality.length) == (16000, True, 8000)
  ours = prepare(modality, clips)
  extractor = transformers.Wav2Vec2FeatureExtractor.from_pretrained(tiny_wav2vec2_dir)
  ref = extractor(
    clips, sampling_rate=16000, padding="max_length", max_length=8000, return_tensors="np"
  )
  np.testing.assert_allclose(ours["waveform"], ref["input_values"], atol=1e-5)
  np.testing.assert_array_equal(ours["waveform_mask"], ref["attention_mask"])
  # Blanked (modality dropout, missing-modality evaluation): silence of the full length.
  blanked = prepare(modality, clips, present=[1, 0, 1])
  assert not blanked["waveform"][1].any() and blanked["waveform_mask"][1].all()


def test_rates_channels_and_lengths():
  with pytest.raises(
    ConfigError, match=r"at 8000 Hz, the tower takes 16000 Hz: set .*resample=True"
  ):
    waveform(dict(rate=8000, sampling_rate=16000))
  with pytest.raises(
    ConfigError, match=r"does not say its sampling rate: set config.input.waveform.rate"
  ):
    waveform({})
  up = waveform(dict(rate=8000, sampling_rate=16000, resample=True, normalize=False))
  clip = np.sin(np.arange(8000) / 7.0).astype(np.float32)
  np.testing.assert_allclose(up.decode(clip), signal.resample_poly(clip, 2, 1), atol=1e-6)
  assert up.length == 16000 and prepare(up, [clip])["waveform"].shape == (1, 16000)
  mono = waveform(dict(rate=16000))
  stereo = np.stack([clip, -clip], 1)
  with pytest.raises(ConfigError, match=r"shape \(8000, 2\).*downmix=True"):
    mono.decode(stereo)
  np.testing.assert_array_equal(waveform(dict(rate=16000, downmix=True)).decode(stereo), 0 * clip)
  # max_seconds crops: a random window in training, the start at evaluation.
  crop = dict(rate=16000, max_seconds=0.25, normalize=False)
  assert waveform(crop).example(clip, np.random.default_rng(0))["waveform"].tolist() == (
    clip[:4000].tolist()
  )
  windows = {
    float(waveform(crop, True).example(clip, np.random.default_rng(s))["waveform"][0])
    for s in range(5)
  }
  assert len(windows) > 1
  with pytest.raises(ConfigError, match="vary in length: set config.input.waveform.max_seconds"):
    waveform(dict(rate=16000), feature=tfds.features.Tensor(shape=(None,), dtype=np.float32))
  # Integer samples (int16, as speech datasets store them) are read in [-1, 1).
  pcm = np.array([-32768, -16384, 0, 16384, 32767], np.int16)
  np.testing.assert_array_equal(mono.decode(pcm), pcm.astype(np.float32) / 32768)


def test_a_clip_shorter_than_the_receptive_field_names_the_fix(tiny_wav2vec2_dir):
  """The tiny tower needs 325 samples for one frame (the base models: 400)."""
  modality = waveform(dict(rate=16000, stats_from=tiny_wav2vec2_dir))
  assert modality.min_samples == 325
  short = np.ones(300, np.float32)
  with pytest.raises(
    ConfigError, match=r"has 300 samples, fewer than .* \(325 samples at 16000 Hz\).*min_seconds"
  ):
    modality.example(short, np.random.default_rng(0))
  padded = waveform(dict(rate=16000, stats_from=tiny_wav2vec2_dir, min_seconds=325 / 16000))
  out = padded.example(short, np.random.default_rng(0))
  assert out["waveform_length"] == 325 and not out["waveform"][300:].any()


def speech_config(tower_dir, data_dir, modality="waveform", section=None, **overrides):
  """A tiny ViT from scratch + an audio tower fixture (`modality`'s, from `tower_dir`) over
  mmtl_shapes' 16 kHz waveforms, sharded over data, fsdp and model axes, with modality
  dropout of the audio; `section` is config.input.<modality> (default: the tower's rate
  and settings)."""
  config = mlc.ConfigDict(
    dict(
      seed=0,
      total_steps=4,
      batch_size=16,
      log_every=1,
      ckpt_every=100,
      mesh=dict(data=2, fsdp=2, model=2),
      sharding_rules="fsdp_tp",
      input={
        "dataset": "mmtl_shapes/small",
        "data_dir": data_dir,
        "split": "train[:32]",
        "fields": dict(image="image", text=None, label="label", **{modality: "waveform"}),
        "image": dict(size=16),
        modality: section or dict(rate=16000, stats_from=tower_dir),
        "modality_dropout": {modality: 0.5},
      },
      model=dict(
        towers={"image": dict(name=TINY_VIT, pool="cls"), modality: dict(name=tower_dir)},
        fusion="concat",
        num_classes=2,
        width=16,
      ),
      model_init={f"{modality}_encoder": tower_dir},
      optim=dict(name="adam", lr=3e-3, schedule=dict(decay="constant")),
      evals=dict(val=dict(type="classification", input=dict(split="validation[:32]"))),
    )
  )
  for key, value in overrides.items():
    config[key] = value
  return config


def final_params(workdir):
  ckpts = str(workdir / "checkpoints")
  return rules.flatten(jax.device_get(checkpoint.restore_variables(ckpts)["params"]))


def assert_lora_trained(workdir, tower_dir, subtree):
  """The LoRA run in `workdir` kept `subtree`'s checkpoint weights (from `tower_dir`) bit
  for bit and trained its 2 layers x (query, value) adapters."""
  after = final_params(workdir)
  loaded = rules.flatten(hf.load_pretrained(tower_dir)[1]["params"])
  for p, x in loaded.items():
    np.testing.assert_array_equal(after[f"{subtree}/{p}"], x, err_msg=p)
  adapters = [p for p in after if p.startswith(f"{subtree}/") and p.endswith("lora_b")]
  assert len(adapters) == 2 * 2 and all(np.abs(after[p]).max() > 0 for p in adapters)


@pytest.mark.slow
def test_a_wav2vec2_tower_trains_fused_with_an_image_tower(tiny_wav2vec2_dir, data_dir, tmp_path):
  """Sharded over data=2, fsdp=2, model=2 with SpecAugment, LayerDrop and modality dropout
  of the waveform: the frozen feature encoder keeps the checkpoint's weights bit for bit,
  the rest of the tower trains, and the run evaluates."""
  optim = dict(
    name="adam",
    lr=3e-3,
    schedule=dict(decay="constant"),
    frozen=["waveform_encoder/feature_extractor/.*"],
  )
  config = speech_config(tiny_wav2vec2_dir, data_dir, optim=optim)
  final = train.train(config, str(tmp_path / "run"))
  assert np.isfinite(final["val/loss"]) and 0 <= final["val/accuracy"] <= 1
  assert sorted(metrics.read(str(tmp_path / "run"))["train/loss"]) == [1, 2, 3, 4]
  after = final_params(tmp_path / "run")
  loaded = rules.flatten(hf.load_pretrained(tiny_wav2vec2_dir)[1]["params"])
  tower = {p.split("/", 1)[1]: x for p, x in after.items() if p.startswith("waveform_encoder/")}
  assert set(tower) == set(loaded)
  for p, x in loaded.items():
    if p.startswith("feature_extractor/"):
      np.testing.assert_array_equal(tower[p], x, err_msg=p)
    elif p.startswith("encoder/") and p.endswith("kernel"):
      assert not np.allclose(tower[p], x), p


@pytest.mark.slow
def test_lora_on_the_wav2vec2_tower(tiny_wav2vec2_dir, data_dir, tmp_path):
  lora = dict(targets=[r"waveform_encoder/.*/attn/(query|value)/kernel"], rank=2, alpha=4)
  optim = dict(name="adam", lr=3e-3, schedule=dict(decay="constant"), preset="lora", lora=lora)
  config = speech_config(tiny_wav2vec2_dir, data_dir, total_steps=2, evals={}, optim=optim)
  train.train(config, str(tmp_path / "run"))
  assert_lora_trained(tmp_path / "run", tiny_wav2vec2_dir, "waveform_encoder")


@pytest.mark.slow
@pytest.mark.parametrize("source", ["waveform", "whisper", "ast", "spectrogram"])
def test_recipe_config_runs_short(source, data_dir, tmp_path):
  """configs/speech.py as its table runs it, on the small dataset: 3 steps, evaluated."""
  from configs import speech  # pylint: disable=g-import-not-at-top

  config = speech.get_config(f"input={source},steps=3,train=48")
  config.batch_size = 16
  config.input.update(dataset="mmtl_shapes/small", data_dir=data_dir)
  config.evals.val.input.split = "validation[:32]"
  final = train.train(config, str(tmp_path / "run"))
  assert set(final) >= {"val/accuracy", "val/macro_f1", "val/loss", "val/ece", "step"}
  tower = dict(waveform="waveform", whisper="log_mel", ast="log_mel").get(source, "audio")
  tower = f"{tower}_encoder"
  assert any(p.startswith(tower) for p in final_params(tmp_path / "run"))
