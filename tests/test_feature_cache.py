"""The feature cache (mmtl.feature_cache): a locked tower's outputs computed once per
example, read by the training step and the evaluators, exact, shared, checked."""

import json
import pathlib
import re
import threading
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from mmtl import config as config_lib
from mmtl import data, feature_cache, metrics, modalities, rules, train, train_state
from mmtl.models import fusion
from tests.test_captioning import caption_config
from tests.test_log_mel import log_mel_config
from tests.test_train import final_params, tiny_config

REPO = pathlib.Path(__file__).resolve().parent.parent


def cached_config(text_dir, data_dir, cache_dir, **overrides):
  """tiny_config with its BERT locked and the feature cache on."""
  config = tiny_config(text_dir, data_dir, **overrides)
  config.optim.frozen = (r"text_encoder/.*",)
  config.feature_cache = dict(enable=True, dir=str(cache_dir))
  return config


def entries(cache_dir):
  return sorted(p.name for p in cache_dir.iterdir() if p.is_dir())


def assert_same_run(workdir, expected_workdir, expected_final, final):
  assert final == expected_final  # bit-identical in float32 on CPU
  assert (
    metrics.read(str(workdir))["train/loss"] == metrics.read(str(expected_workdir))["train/loss"]
  )
  jax.tree.map(np.testing.assert_array_equal, final_params(workdir), final_params(expected_workdir))


@pytest.fixture(scope="module")
def plain_run(tiny_bert_dir, small_data_dir, tmp_path_factory):
  """The run without the cache: (workdir, final metrics)."""
  workdir = tmp_path_factory.mktemp("plain")
  config = cached_config(tiny_bert_dir, small_data_dir, workdir / "unused")
  config.feature_cache.enable = False
  return workdir, train.train(config, str(workdir))


@pytest.mark.slow
def test_cached_run_equals_uncached_run(tiny_bert_dir, small_data_dir, plain_run, tmp_path, capsys):
  cache = tmp_path / "cache"
  final = train.train(cached_config(tiny_bert_dir, small_data_dir, cache), str(tmp_path / "a"))
  out = capsys.readouterr().out
  assert "text tower: cached (pooled)" in out
  assert "image tower: not cached: it trains" in out
  assert out.count("computed text-") == 2  # the train split and the validation split
  assert_same_run(tmp_path / "a", plain_run[0], plain_run[1], final)
  assert len(entries(cache)) == 2

  # A second run with the same locked tower reads the entries; resumed, it still equals.
  config = cached_config(tiny_bert_dir, small_data_dir, cache, total_steps=3)
  train.train(config, str(tmp_path / "b"))
  config.total_steps = 6
  final = train.train(config, str(tmp_path / "b"), allow_config_change=True)
  out = capsys.readouterr().out
  assert "computed" not in out and out.count("read text-") == 4
  assert_same_run(tmp_path / "b", plain_run[0], plain_run[1], final)


@pytest.mark.slow
def test_cached_token_sequences_equal_the_tower_run(tiny_bert_dir, small_data_dir, tmp_path):
  """Cross-attention fusion reads the tower's tokens and mask: they are cached too, and
  the run (text padded to 24 tokens) equals the uncached one."""
  runs = {}
  for enable in (False, True):
    config = cached_config(tiny_bert_dir, small_data_dir, tmp_path / "cache", total_steps=3)
    config.model.fusion = "cross_attention"
    config.feature_cache.enable = enable
    runs[enable] = train.train(config, str(tmp_path / str(enable)))
  assert runs[True] == runs[False]
  entry = tmp_path / "cache" / entries(tmp_path / "cache")[0]
  meta = json.loads((entry / "meta.json").read_text())
  assert (
    meta["arrays"]["tokens"]["shape"][1:] == [24, 32] and meta["arrays"]["mask"]["dtype"] == "bool"
  )
  jax.tree.map(
    np.testing.assert_array_equal, final_params(tmp_path / "True"), final_params(tmp_path / "False")
  )


@pytest.mark.slow
def test_frozen_encoder_captioning_with_cached_tokens(tiny_bert_dir, small_data_dir, tmp_path):
  """A decoder cross-attending to a locked image tower's cached tokens trains, and generates
  the evaluation's captions, as with the tower running."""
  runs = {}
  for enable in (False, True):
    config = caption_config(tiny_bert_dir, small_data_dir, total_steps=4)
    config.optim.frozen = (r"image_encoder/.*",)
    config.feature_cache = dict(enable=enable, dir=str(tmp_path / "cache"))
    runs[enable] = train.train(config, str(tmp_path / str(enable)))
  assert (
    metrics.read(str(tmp_path / "True"))["train/loss"]
    == metrics.read(str(tmp_path / "False"))["train/loss"]
  )
  # Here the programs that run the tower inside the step and the evaluation round
  # differently from the one that filled the cache (XLA fuses differently): the params
  # differ by < 1e-5 (Adam), but for the attention key biases, whose gradient is rounding noise
  # (softmax ignores them), which Adam scales up; the evaluation's teacher-forced loss
  # differs by 4e-8 relative (measured).
  cached, plain = (rules.flatten(final_params(tmp_path / str(e))) for e in (True, False))
  for path, value in plain.items():
    if not path.endswith("key/bias"):
      np.testing.assert_allclose(cached[path], value, atol=1e-5, err_msg=path)
  captions = [(tmp_path / str(e) / "captions_step4-val.jsonl").read_text() for e in (True, False)]
  assert captions[0] == captions[1] and "val/cider" in runs[True]
  assert runs[True].keys() == runs[False].keys()
  for key, value in runs[False].items():
    np.testing.assert_allclose(runs[True][key], value, rtol=1e-6, err_msg=key)


@pytest.mark.slow
def test_a_cached_log_mel_tower_equals_the_tower_run(tiny_whisper_dir, small_data_dir, tmp_path):
  """A locked Whisper tower on mmtl_shapes' clips, with modality dropout of the clips,
  sharded over (data, fsdp, model): the cached run equals the uncached one."""
  runs = {}
  for enable in (False, True):
    config = log_mel_config(tiny_whisper_dir, small_data_dir)
    config.optim.frozen = (r"log_mel_encoder/.*",)
    config.feature_cache = dict(enable=enable, dir=str(tmp_path / "cache"))
    runs[enable] = train.train(config, str(tmp_path / str(enable)))
  assert_same_run(tmp_path / "True", tmp_path / "False", runs[False], runs[True])


def test_batches_of_a_cached_clip_modality_compute_no_spectrogram(
  tiny_whisper_dir, small_data_dir, monkeypatch
):
  """A clip modality's example step draws nothing once its input is deterministic: cached,
  its clips are neither decoded nor turned into log-mel features."""
  calls = []
  spectrogram = modalities.log_mel.log_mel
  monkeypatch.setattr(modalities.log_mel, "log_mel", lambda *a: calls.append(1) or spectrogram(*a))
  input_cfg = log_mel_config(tiny_whisper_dir, small_data_dir).input
  rows = {"log_mel": {"cached_log_mel_pooled": np.arange(32, dtype=np.float32)[:, None]}}
  batches = data.make_train_iterator(input_cfg, batch_size=16, seed=0, features=rows)
  cached = [next(batches) for _ in range(3)]
  assert len(calls) == 1  # once, for silence (what blanking gives), when the pipeline is made
  plain = data.make_train_iterator(input_cfg, batch_size=16, seed=0)
  for got, want in zip(cached, (next(plain) for _ in range(3))):
    assert "log_mel" not in got and "log_mel" in want and len(calls) > 2
    assert got.keys() - want.keys() == {"cached_log_mel_pooled"}
    for key in want.keys() - {"log_mel"}:  # labels, images, presence: the uncached rows
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.mark.slow
def test_batches_carry_the_cached_features(tiny_bert_dir, small_data_dir, plain_run, tmp_path):
  """The step reads the stored rows, not the tower: stored features scaled (with checksums
  to match) change the run."""
  cache = tmp_path / "cache"
  train.train(
    cached_config(tiny_bert_dir, small_data_dir, cache, total_steps=0), str(tmp_path / "a")
  )
  for name in entries(cache):
    meta = json.loads((cache / name / "meta.json").read_text())
    spec = meta["arrays"]["pooled"]
    rows = np.memmap(cache / name / "pooled.bin", np.float32, "r+", shape=tuple(spec["shape"]))
    rows *= 3.0
    rows.flush()
    spec["sha256"] = feature_cache._sha256(cache / name / "pooled.bin")
    (cache / name / "meta.json").write_text(json.dumps(meta))
  train.train(cached_config(tiny_bert_dir, small_data_dir, cache), str(tmp_path / "b"))
  assert (
    metrics.read(str(tmp_path / "b"))["train/loss"] != metrics.read(str(plain_run[0]))["train/loss"]
  )


@pytest.mark.slow
def test_a_truncated_entry_is_recomputed_and_a_changed_key_named(
  tiny_bert_dir, small_data_dir, plain_run, tmp_path, capsys
):
  cache = tmp_path / "cache"
  config = cached_config(tiny_bert_dir, small_data_dir, cache)
  train.train(config, str(tmp_path / "a"))
  for name in entries(cache):
    with open(cache / name / "pooled.bin", "r+b") as f:
      f.truncate(100)
  capsys.readouterr()
  final = train.train(config, str(tmp_path / "b"))
  out = capsys.readouterr().out
  assert out.count("pooled.bin is truncated (100 of") == 2 and out.count("computed text-") == 2
  assert_same_run(tmp_path / "b", plain_run[0], plain_run[1], final)

  config.input.text.max_length = 20  # other preprocessing: another key, and the run says so
  config.total_steps = 1
  train.train(config, str(tmp_path / "c"))
  out = capsys.readouterr().out
  assert out.count("whose key differs in preprocessing") == 2


def test_towers_that_cannot_be_cached_say_why(tiny_bert_dir, small_data_dir, tmp_path):
  mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "model"), devices=jax.devices()[:1])

  def reasons(**changes):
    config = cached_config(tiny_bert_dir, small_data_dir, tmp_path)
    config.optim.frozen = (r"(image|text)_encoder/.*",)
    for key, value in changes.items():
      section, name = key.split(".")
      config[section][name] = value
    config = config_lib.with_defaults(config)
    model = fusion.build(config.model)
    return feature_cache.plan(config, model, train_state.param_layout(model, config, mesh))

  assert reasons() == (("image", "text"), {})
  cached, why = reasons(**{"input.augment": dict(flip=True)})
  assert cached == ("text",) and why == {
    "image": "config.input.augment (flip=True) changes the images"
  }
  cached, why = reasons(**{"input.corruptions": [dict(name="typos", p=0.5)]})
  assert cached == ("image",) and why == {
    "text": "config.input.corruptions (typos) change its inputs in training"
  }
  cached, why = reasons(**{"optim.frozen": (r"text_encoder/.*",)})
  assert why == {"image": "it trains"}
  cached, why = reasons(**{"optim.unfreeze": ((3, [r"text_encoder/encoder/layer_1/.*"]),)})
  assert why == {"text": "gradual unfreezing trains it from step 3"}
  cached, why = reasons(**{"model.fusion": "bottleneck", "model.fusion_layer": -1})
  assert cached == () and set(why.values()) == {
    "bottleneck fusion runs the towers' top layers together with the other towers"
  }
  cached, why = reasons(**{"model.frozen_tower_mode": "train"})
  assert cached == () and "dropout" in why["text"]
  lora = dict(targets=[r"text_encoder/.*/attn/(query|value)/kernel"], rank=2, alpha=4)
  cached, why = reasons(
    **{"optim.lora": lora, "optim.preset": "lora", "optim.frozen": (r"image_encoder/.*",)}
  )
  assert cached == ("image",) and why == {"text": "it trains"}  # its adapters train


@pytest.fixture
def validated(tiny_bert_dir, small_data_dir, tmp_path):
  """(config, the run's validated parts) of a cached tiny run, its params initialized."""
  config = config_lib.with_defaults(cached_config(tiny_bert_dir, small_data_dir, tmp_path / "c"))
  return config, train.validate(config, fresh=True, workdir=str(tmp_path))


def fill(config, v, root, notes):
  cache = feature_cache.FeatureCache(config, v.model, v.layout, root, note=notes.append)
  cache.fill(v.initial_variables, [config.input], v.mesh, batch_size=16)
  return cache.features(config.input)["text"]


def test_a_killed_fill_continues_where_it_stopped(validated, tmp_path, monkeypatch):
  config, v = validated
  expected = fill(config, v, tmp_path / "fresh", [])
  monkeypatch.setattr(feature_cache, "SAVE_EVERY_S", 0.0)  # progress saved after every batch
  make_eval_iterator = feature_cache.loader.make_eval_iterator

  def killed_after_one_batch(*args, **kwargs):
    yield next(iter(make_eval_iterator(*args, **kwargs)))
    raise KeyboardInterrupt  # the fill's process stopped here

  monkeypatch.setattr(feature_cache.loader, "make_eval_iterator", killed_after_one_batch)
  notes = []
  with pytest.raises(KeyboardInterrupt):
    fill(config, v, tmp_path / "killed", notes)
  assert re.fullmatch(r"  text-\w+: batch 1/2, \d+ examples/s, ETA .+", notes[-1])  # progress
  monkeypatch.setattr(feature_cache.loader, "make_eval_iterator", make_eval_iterator)
  notes = []
  got = fill(config, v, tmp_path / "killed", notes)
  assert "computed (from batch 1 of 2)" in notes[-1]
  assert got.keys() == expected.keys() == {"cached_text_pooled"}
  np.testing.assert_array_equal(got["cached_text_pooled"], expected["cached_text_pooled"])


def test_concurrent_runs_fill_an_entry_once(validated, tmp_path):
  """Two runs (threads here; processes take the same flock) start on one missing entry:
  one computes it, the other waits and reads it."""
  config, v = validated
  notes, results = [], []
  start = threading.Barrier(2)

  def run():
    start.wait()
    results.append(fill(config, v, tmp_path / "shared", notes))

  threads = [threading.Thread(target=run) for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  assert len(results) == 2
  done = [n for n in notes if " text features of " in n]
  assert sum(" computed " in n for n in done) == 1 and sum(" read " in n for n in done) == 1
  assert any("another run is filling it" in n for n in notes)
  np.testing.assert_array_equal(results[0]["cached_text_pooled"], results[1]["cached_text_pooled"])


def test_sweeps_give_their_runs_one_cache(monkeypatch, tmp_path):
  # As the launch scripts import each other (and tests/test_sweep.py imports them): from
  # launch/ on sys.path, whichever test imported them first.
  monkeypatch.syspath_prepend(str(REPO / "launch"))
  import sweep  # pylint: disable=g-import-not-at-top

  monkeypatch.delenv(feature_cache.ENV_DIR, raising=False)
  assert sweep.FEATURE_CACHE_ENV == feature_cache.ENV_DIR
  env = sweep.trainer_env(tmp_path / "sweep")
  assert env[feature_cache.ENV_DIR] == str(tmp_path / "sweep" / "feature_cache")
  config = config_lib.with_defaults(cached_config("bert", "data", ""))
  monkeypatch.setenv(feature_cache.ENV_DIR, env[feature_cache.ENV_DIR])
  assert (
    feature_cache.directory(config, str(tmp_path / "run")) == tmp_path / "sweep" / "feature_cache"
  )
  monkeypatch.delenv(feature_cache.ENV_DIR)
  assert (
    feature_cache.directory(config, str(tmp_path / "run")) == tmp_path / "run" / "feature_cache"
  )


def test_bad_cache_settings_are_one_line_errors(tiny_bert_dir, small_data_dir, tmp_path):
  config = cached_config(tiny_bert_dir, small_data_dir, tmp_path)
  config.feature_cache.enabel = True
  with pytest.raises(config_lib.ConfigError, match="config.feature_cache.enabel"):
    config_lib.with_defaults(config)

  config = config_lib.with_defaults(cached_config(tiny_bert_dir, small_data_dir, ""))
  with pytest.raises(config_lib.ConfigError, match="set config.feature_cache.dir to a local"):
    feature_cache.directory(config, "gs://bucket/run")
  config.feature_cache.dir = "gs://bucket/cache"
  with pytest.raises(config_lib.ConfigError, match="are memory-mapped files"):
    feature_cache.directory(config, str(tmp_path))

  (tmp_path / "file").write_text("")
  config = cached_config(tiny_bert_dir, small_data_dir, tmp_path / "file" / "cache")
  with pytest.raises(config_lib.ConfigError, match="Cannot create the feature cache directory"):
    train.train(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "config.json").exists()  # refused before anything is written


def test_a_cache_that_would_not_fit_on_its_disk_is_refused(validated, tmp_path, monkeypatch):
  config, v = validated
  usage = feature_cache.shutil.disk_usage(tmp_path)
  monkeypatch.setattr(
    feature_cache.shutil, "disk_usage", lambda _: usage._replace(free=1000)
  )  # 32 pooled rows of 32 float32: 4 KiB
  with pytest.raises(config_lib.ConfigError, match=r"needs 4\.0 KiB, .* has 1000 B free"):
    fill(config, v, tmp_path / "cache", [])


@pytest.mark.parametrize(
  "modality, overrides, shape, why",
  [
    ("text", {}, (), None),
    ("text", {}, (None,), "holds several texts per example, one drawn at random"),
    ("video", {}, (8, 32, 32, 3), None),
    ("video", {}, (16, 32, 32, 3), "a random window of 8 frames from clips of 16"),
    ("video", {"augment": {"flip": True}}, (8, 32, 32, 3), "augment.flip flips the clips"),
    ("waveform", {}, (16000,), None),
    ("waveform", {"waveform": {"max_seconds": 0.5}}, (16000,), "random 8000-sample window"),
    ("waveform", {"waveform": {"max_seconds": 2.0}}, (None,), "clips of varying length"),
  ],
)
def test_training_randomness_of_each_modality(modality, overrides, shape, why, tiny_bert_dir):
  """What makes a locked tower's input vary between epochs (so it is not cached)."""
  cfg = data.input_config(
    {
      "fields": {modality: "x"},
      "text": {"tokenizer": tiny_bert_dir},
      "video": {"size": 32},
      "waveform": {"rate": 16000},
      **overrides,
    }
  )
  feature = SimpleNamespace(shape=shape, sample_rate=16000)
  got = modalities.MODALITIES[modality](cfg, feature, train=True).training_randomness()
  assert (got is None) if why is None else (why in got)


@pytest.mark.slow
def test_linear_probe_config_runs_short(small_data_dir, tmp_path, capsys):
  """configs/linear_probe.py for 3 steps on the small dataset (a narrower tower)."""
  config = config_lib.load_file(str(REPO / "configs/linear_probe.py") + ":steps=3,train=64")
  config.input.dataset, config.input.data_dir = "mmtl_shapes/small", small_data_dir
  config.batch_size = 16
  config.evals.val.input.split = "validation[:32]"
  config.model.towers.image.name.update(
    hidden_size=48, num_hidden_layers=1, num_attention_heads=6, intermediate_size=64
  )
  config.feature_cache.dir = str(tmp_path / "cache")
  final = train.train(config, str(tmp_path / "run"))
  out = capsys.readouterr().out
  assert "image tower: cached (pooled)" in out and out.count(": computed image-") == 2
  assert set(final) >= {"val/accuracy", "val/macro_f1", "val/loss", "val/ece", "step"}
