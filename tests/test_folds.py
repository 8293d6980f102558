"""Cross-validation folds: stratified and deterministic, read by the loader, set by the trainer."""

import json

import ml_collections as mlc
import numpy as np
import pytest

from mmtl import config as config_lib
from mmtl import data, train
from mmtl import evaluators as ev
from mmtl.data import folds, source
from test_train import tiny_config

LABELS = np.array([0] * 12 + [1] * 6 + [2] * 3)


def _fold(index, held_out, n=3, seed=0):
  return dict(folds=n, index=index, seed=seed, held_out=held_out)


def test_folds_partition_the_split_and_keep_class_shares():
  held_out = [folds.indices(LABELS, _fold(i, True), "x") for i in range(3)]
  assert sorted(np.concatenate(held_out).tolist()) == list(range(len(LABELS)))
  for i, fold in enumerate(held_out):
    assert np.bincount(LABELS[fold]).tolist() == [4, 2, 1]  # a third of each class
    rest = folds.indices(LABELS, _fold(i, False), "x")
    assert sorted([*rest, *fold]) == list(range(len(LABELS))) and not set(rest) & set(fold)
  # The same folds every time; another seed deals them differently.
  again = folds.indices(LABELS.copy(), _fold(1, True), "x")
  assert again.tolist() == held_out[1].tolist()
  other = [folds.indices(LABELS, _fold(i, True, seed=1), "x").tolist() for i in range(3)]
  assert other != [f.tolist() for f in held_out]


def test_more_folds_than_the_smallest_class_is_refused_with_the_counts():
  with pytest.raises(
    config_lib.ConfigError,
    match=r"on d: 4 folds, but the smallest class of the split has 3 example\(s\) "
    r"\(class 0: 12, class 1: 6, class 2: 3\).*use at most 3 folds",
  ):
    folds.indices(LABELS, _fold(0, True, n=4), "on d")


def _config(**cv):
  return mlc.ConfigDict(
    dict(
      input=dict(split="train[:40]"),
      evals=dict(
        val=dict(type="classification", input=dict(split="validation", cache=True)),
        test=dict(type="classification", input=dict(split="test")),
      ),
      cross_validation=cv,
    )
  )


def test_apply_sets_the_training_folds_and_the_held_out_evaluator():
  config = _config(folds=5, fold=2)
  folds.apply(config)
  assert config.input.fold.to_dict() == dict(folds=5, index=2, seed=0, held_out=False)
  val = config.evals.val.input
  assert val.split == "train[:40]" and val.cache and val.fold.held_out
  assert config.evals.test.input.to_dict() == dict(split="test")  # other evaluators unchanged
  before = config.to_dict()
  folds.apply(config)
  assert config.to_dict() == before
  unchanged = _config()
  folds.apply(unchanged)
  assert "fold" not in unchanged.input


def test_only_the_held_out_evaluator_reads_a_fold():
  config = _config(folds=5, fold=2)
  folds.apply(config)
  assert ev.eval_input_config(config, config.evals.test).fold is None
  assert ev.eval_input_config(config, config.evals.val).fold.held_out


@pytest.mark.parametrize(
  "cv, error",
  [
    (dict(folds=1), r"folds=1, fold=0; use folds >= 2"),
    (dict(folds=3, fold=3), r"folds=3, fold=3; use folds >= 2 and a fold in 0..folds-1"),
    (dict(folds=3, evaluator="dev"), r"evaluator='dev' names no evaluator .*\['test', 'val'\]"),
    (dict(fold=1, folds=3, k=2), r"config.cross_validation"),
  ],
)
def test_bad_cross_validation_settings_fail_in_one_line(cv, error):
  with pytest.raises(config_lib.ConfigError, match=error):
    folds.apply(_config(**cv))


def test_the_loader_reads_the_fold_or_the_rest(small_data_dir):
  base = dict(
    dataset="mmtl_shapes/small",
    data_dir=small_data_dir,
    split="train[:30]",
    fields=dict(text=None, image="image", label="label"),
  )
  all_labels = source.labels(data.input_config(base), data.builder(base))
  parts = {}
  for held_out in (True, False):
    cfg = data.input_config(dict(base, fold=_fold(1, held_out, n=2)))
    src, b = data.data_source(cfg)
    positions = folds.indices(all_labels, cfg.fold, "x")
    assert len(src) == data.num_examples(cfg) == len(positions)
    assert source.labels(cfg, b).tolist() == all_labels[positions].tolist()
    batches = list(data.make_eval_iterator(cfg, batch_size=8))
    real = np.concatenate([b["example_weight"] for b in batches]) > 0
    parts[held_out] = np.concatenate([b["labels"] for b in batches])[real]
    assert parts[held_out].tolist() == all_labels[positions].tolist()
  assert len(parts[True]) + len(parts[False]) == 30
  with pytest.raises(config_lib.ConfigError, match=r"\(class no: \d+, class yes: \d+\)"):
    data.data_source(dict(base, fold=_fold(0, True, n=30)))


def test_a_splits_labels_are_read_once(small_data_dir, monkeypatch):
  cfg = dict(
    dataset="mmtl_shapes/small",
    data_dir=small_data_dir,
    split="train[:20]",
    fields=dict(text=None, image="image", label="label"),
    fold=_fold(0, True, n=2),
  )
  first = len(data.data_source(cfg)[0])
  # Every later reader of the split's folds (each evaluation of the held-out fold) reuses them.
  monkeypatch.setattr(source, "value_at", lambda *a: pytest.fail("labels read again"))
  assert len(data.data_source(cfg)[0]) == first
  assert data.num_examples(dict(cfg, fold=_fold(0, False, n=2))) == 20 - first


def test_tf_loader_refuses_folds(small_data_dir):
  cfg = data.input_config(
    dict(
      dataset="mmtl_shapes/small",
      data_dir=small_data_dir,
      loader="tf",
      fold=_fold(0, True),
      fields=dict(text=None),
    )
  )
  with pytest.raises(config_lib.ConfigError, match="needs config.input.loader='grain'"):
    next(iter(data.make_eval_iterator(cfg, batch_size=8)))


@pytest.mark.slow
def test_a_cross_validated_run_scores_its_held_out_fold(tiny_bert_dir, small_data_dir, tmp_path):
  config = tiny_config(
    tiny_bert_dir, small_data_dir, total_steps=2, cross_validation=dict(folds=4, fold=3)
  )
  config.evals.other = dict(type="classification", input=dict(split="validation[:24]"))
  train.train(config, str(tmp_path))
  # Other evaluators read their whole split: the training fold is not inherited.
  other = json.loads((tmp_path / "classification_step2-other.json").read_text())
  assert np.sum(other["confusion_matrix"]) == 24
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["input"]["fold"]["index"] == 3 and saved["evals"]["val"]["input"]["fold"]["held_out"]
  report = json.loads((tmp_path / "classification_step2-val.json").read_text())
  assert np.sum(report["confusion_matrix"]) == 8  # a quarter of train[:32]
