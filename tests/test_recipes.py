"""The shipped recipes on real datasets, run end to end on mock data.

Their datasets cannot be downloaded here, so each recipe trains for a few steps and runs
its evaluators on `mock_real_datasets` (tests/conftest.py): the real TFDS builders'
feature specs with random values. Checkpoints are swapped for tiny random ones; everything
else (fields, splits, preprocessing, towers, optimizer, evaluators) is the config's own.
configs/coco_captioning.py runs the same way in tests/test_captioning.py.
"""

import contextlib
import importlib
import io
import json
from pathlib import Path
import re

import numpy as np
import pytest

from mmtl import config as config_lib
from mmtl import train
from mmtl.data import source
from tests.conftest import REAL_SPLITS
from tests.hf_fixtures import make_tiny_checkpoint

REPO = Path(__file__).resolve().parent.parent

# Each trainer config that reads a real (downloaded) dataset, and the test that runs it.
RECIPE_TESTS = {
  "configs/coco_captioning.py": (
    "test_captioning.py::test_coco_captioning_recipe_on_mock_coco_captions"
  ),
  "configs/image_transfer.py": "test_recipes.py::test_image_transfer_recipe_on_mock_data",
  "configs/lit_coco.py": "test_recipes.py::test_lit_coco_recipe_on_mock_data",
}


def _mock_ready(config):
  """A recipe's input as the tests read it: one thread, and `download` on (mock_data makes
  preparing a no-op)."""
  config.input.update(num_threads=1, prefetch=2, download=True)
  return config


def _run(config, workdir):
  with contextlib.redirect_stdout(io.StringIO()) as printed:
    final = train.train(config, str(workdir))
  return final, printed.getvalue()


def _datasets(config) -> set[str]:
  """The datasets a trainer config reads: its input's and its evaluators'."""
  names = {config.input.dataset} | {
    e.get("input", {}).get("dataset", config.input.dataset) for e in config.evals.values()
  }
  return {name.split("/")[0].split(":")[0] for name in names}


def test_every_real_dataset_config_and_recipe_runs_in_a_test():
  """A new config reading a real dataset needs a mock run here (and its dataset's splits in
  REAL_SPLITS): the shipped ones' datasets are exactly those the mock serves."""
  offline = {b.name for b in source.OFFLINE_BUILDERS}
  data_configs = {
    importlib.import_module(f"configs.data.{p.stem}").get_config().dataset.split("/")[0]
    for p in (REPO / "configs/data").glob("*.py")
  }
  assert data_configs - offline == set(REAL_SPLITS)
  reading_real = set()
  for path in sorted((REPO / "configs").rglob("*.py")):
    if "data" in path.parts or "get_config" not in path.read_text():
      continue
    if _datasets(config_lib.load_file(str(path))) - offline:
      reading_real.add(str(path.relative_to(REPO)))
  assert reading_real == set(RECIPE_TESTS)
  for test in RECIPE_TESTS.values():
    module, name = test.split("::")
    assert f"def {name}(" in (REPO / "tests" / module).read_text(), test


def test_lit_coco_is_big_visions_recipe():
  from configs import lit_coco  # pylint: disable=g-import-not-at-top

  config = lit_coco.get_config()
  assert (config.batch_size, config.total_steps) == (4096, 5000)
  assert (config.optim.lr, config.optim.wd, config.optim.grad_clip_norm) == (1e-3, 0.01, 1.0)
  assert config.optim.schedule.warmup_steps == 150 and config.optim.frozen == (r"image_encoder/.*",)
  assert config.input.text.max_length == 16 and config.model.temperature_init == 0.1
  assert config.evals.coco.captions == 5 and config.evals.coco.input.split == "test"
  imagenet = config.evals.imagenet
  assert len(imagenet.classnames) == 1000 and len(imagenet.prompts) == 80
  assert imagenet.classnames[:2] == ("tench", "goldfish") and imagenet.input.split == "validation"


@pytest.mark.slow
def test_lit_coco_recipe_on_mock_data(mock_real_datasets, tiny_vit_dir, tiny_bert_dir, tmp_path):
  """configs/lit_coco.py: 2 steps on mock `coco_captions`, then retrieval on its val and
  test splits (5 captions per image) and zero-shot on mock `imagenet2012` validation with
  its 1000 class names (one prompt here, of the 80)."""
  from configs import lit_coco  # pylint: disable=g-import-not-at-top

  config = lit_coco.get_config(
    f"image={tiny_vit_dir},text={tiny_bert_dir},batch=8,steps=2,every=2,eval_examples=12"
  )
  config.model.width = 16
  config.evals.imagenet.prompts = ("a photo of a {}.",)
  final, printed = _run(_mock_ready(config), tmp_path / "run")
  recalls = {f"{d}_recall@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
  expected = {f"{e}/{m}" for e in ("val", "coco") for m in recalls} | {"imagenet/accuracy"}
  assert set(final) == expected | {"step"} and final["step"] == 2
  assert all(0.0 <= final[k] <= 1.0 for k in expected)
  assert re.search(r"image_encoder +0 \(0 B\) +[\d,]+ ", printed)  # locked


@pytest.fixture(scope="module")
def tiny_resnet_dir(tmp_path_factory) -> str:
  return make_tiny_checkpoint("resnet", tmp_path_factory.mktemp("tiny_resnet"))


@pytest.mark.slow
@pytest.mark.parametrize(
  "backbone,mode,dataset", [("vit", "probe", "cifar10"), ("resnet", "finetune", "imagenette")]
)
def test_image_transfer_recipe_on_mock_data(
  backbone, mode, dataset, mock_real_datasets, tiny_vit_dir, tiny_resnet_dir, tmp_path
):
  """configs/image_transfer.py: 3 steps and the held-out evaluation on mock `cifar10` /
  `imagenette` (images of any size), a probe from a tiny ViT and fine-tuning of a tiny
  ResNet."""
  from configs import image_transfer  # pylint: disable=g-import-not-at-top

  checkpoint = tiny_vit_dir if backbone == "vit" else tiny_resnet_dir
  config = image_transfer.get_config(
    f"backbone={backbone},checkpoint={checkpoint},mode={mode},dataset={dataset},"
    "batch=8,steps=3,eval_examples=12"
  )
  config.input.image.size = 16  # the tiny checkpoints'
  final, printed = _run(_mock_ready(config), tmp_path / "run")
  assert final["step"] == 3 and 0.0 <= final["val/accuracy"] <= 1.0
  assert np.isfinite(final["val/loss"])
  locked = re.search(r"image_encoder +0 \(0 B\) +[\d,]+ ", printed)
  assert bool(locked) == (mode == "probe")
  report = json.loads((tmp_path / "run" / "classification_step3-val.json").read_text())
  assert len(report["classes"]) == 10 and np.sum(report["confusion_matrix"]) == 12


def test_image_transfer_modes_and_backbones():
  from configs import image_transfer  # pylint: disable=g-import-not-at-top

  finetune = image_transfer.get_config()
  assert finetune.optim.name == "momentum" and finetune.optim.lr == 0.03
  assert (finetune.batch_size, finetune.total_steps, finetune.optim.schedule.warmup_steps) == (
    512,
    1000,
    100,
  )
  assert finetune.model.fusion == "pooled" and not finetune.feature_cache.enable
  probe = image_transfer.get_config("backbone=resnet,mode=probe,dataset=imagenette")
  assert probe.optim.preset == "linear_probe" and probe.feature_cache.enable
  assert probe.model.towers.image.name == "microsoft/resnet-50"
  assert probe.evals.val.input.split == "validation"
  with pytest.raises(ValueError, match="backbone='bit'"):
    image_transfer.get_config("backbone=bit")


@pytest.mark.parametrize(
  "fields,message",
  [
    (
      dict(image="label"),
      r"fields\.image='label': that feature of cifar10 holds int64 values of shape \(\), where "
      r"it needs images \(height, width, channels\)\. Point it at a feature that does \(here: "
      r"\['image'\]\)",
    ),
    (dict(label="image"), r"fields\.label='image': .* holds uint8 values of shape \(32, 32, 3\)"),
    (dict(label="id"), r"fields\.label='id': .* holds text of shape \(\), where it needs class"),
    (dict(text="label"), r"fields\.text='label': .* needs a text or a list of texts.*\['id'\]"),
  ],
)
def test_a_field_on_a_feature_it_cannot_read_is_named(
  mock_real_datasets, fields, message, tmp_path
):
  """cifar10 as configs/data/cifar10.py reads it, with one field pointed at a feature of the
  wrong kind: refused before anything trains, naming the field, the feature and the fix."""
  from configs import image_transfer  # pylint: disable=g-import-not-at-top

  config = _mock_ready(image_transfer.get_config("batch=8,steps=2"))
  config.input.fields.update(fields)
  config.input.text = dict(tokenizer="unused")  # the check comes first
  with pytest.raises(config_lib.ConfigError, match=message):
    train.train(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "config.json").exists()
