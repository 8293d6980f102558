"""Config loading: unknown keys fail naming the key; workdir config pinning; args."""

import json
import sys
import textwrap

import ml_collections as mlc
import pytest

from mmtl import config as config_lib
from mmtl import process


def test_unknown_top_level_key_names_it_and_suggests():
  cfg = mlc.ConfigDict(dict(total_stpes=10))
  with pytest.raises(
    config_lib.ConfigError, match=r"config\.total_stpes.*Did you mean config\.total_steps"
  ):
    config_lib.with_defaults(cfg)


def test_unknown_nested_keys_name_them():
  with pytest.raises(config_lib.ConfigError, match=r"config\.model\.fusoin"):
    config_lib.with_defaults(mlc.ConfigDict(dict(model=dict(fusoin="gated"))))
  with pytest.raises(config_lib.ConfigError, match=r"config\.early_stopping\.patients"):
    config_lib.with_defaults(mlc.ConfigDict(dict(early_stopping=dict(patients=3))))
  with pytest.raises(config_lib.ConfigError, match=r"config\.model\.towers\.text\.pooling"):
    config_lib.with_defaults(
      mlc.ConfigDict(dict(model=dict(towers=dict(text=dict(name="x", pooling="mean")))))
    )


def test_defaults_fill_partial_sections():
  cfg = config_lib.with_defaults(
    mlc.ConfigDict(dict(early_stopping=dict(patience=3), model=dict(width=8)))
  )
  assert cfg.early_stopping.patience == 3 and cfg.early_stopping.min_delta == 0.0
  assert cfg.model.width == 8 and cfg.model.fusion == "concat"
  assert cfg.mesh.data == -1


def test_unknown_override_flag_fails_with_its_name(tmp_path):
  (tmp_path / "c.py").write_text(
    textwrap.dedent("""\
      import ml_collections as mlc
      def get_config(arg=None):
        return mlc.ConfigDict(dict(total_steps=3, optim=dict(lr=0.1)))
      """)
  )
  cmd = [
    sys.executable,
    "-m",
    "mmtl.train",
    "--workdir",
    str(tmp_path / "w"),
    "--config",
    str(tmp_path / "c.py"),
    "--config.optim.lrr=0.2",
  ]
  repo = str(__import__("pathlib").Path(__file__).resolve().parent.parent)
  result = process.run(cmd, capture_output=True, text=True, timeout=120, cwd=repo)
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  assert (
    result.stderr.strip()
    .splitlines()[-1]
    .startswith(
      "ConfigError: --config.optim.lrr=0.2: Unknown config key config.optim.lrr. Did you mean "
      "config.optim.lr?"
    )
  )
  assert not (tmp_path / "w").exists()


def test_pinning_a_changed_config_keeps_the_previous_one(tmp_path):
  a = config_lib.with_defaults(mlc.ConfigDict(dict(total_steps=10)))
  assert config_lib.saved_changes(a, str(tmp_path)) is None  # No config.json yet.
  config_lib.pin(a, str(tmp_path))
  assert config_lib.saved_changes(a, str(tmp_path)) == []  # Same run: resume.
  b = config_lib.with_defaults(mlc.ConfigDict(dict(total_steps=20)))
  changes = config_lib.saved_changes(b, str(tmp_path))
  assert changes == [("total_steps", 10, 20)]
  with pytest.raises(
    config_lib.ConfigError, match=r"config\.total_steps: 10 -> 20\. .*--allow_config_change"
  ):
    raise config_lib.refuse_change(str(tmp_path), changes)
  config_lib.pin(b, str(tmp_path), step=4)
  assert config_lib.load_json(str(tmp_path / "config.json")).total_steps == 20
  assert config_lib.load_json(str(tmp_path / "config.4.json")).total_steps == 10
  config_lib.pin(a, str(tmp_path), step=4)  # Never overwrites an earlier one.
  assert config_lib.load_json(str(tmp_path / "config.4.json")).total_steps == 10
  assert config_lib.load_json(str(tmp_path / "config.4.1.json")).total_steps == 20


def test_workdir_of_an_older_mmtl_resumes(tmp_path):
  """A config.json written before a trainer key existed resumes while the run uses that
  key's default; a non-default value is a change."""
  config = config_lib.with_defaults(mlc.ConfigDict(dict(total_steps=10)))
  saved = config_lib.to_dict(config)
  del saved["prefetch_to_device"], saved["model"]["remat"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  assert config_lib.saved_changes(config, str(tmp_path)) == []
  config.prefetch_to_device = 0
  assert config_lib.saved_changes(config, str(tmp_path)) == [("prefetch_to_device", 2, 0)]


def test_parse_arg_types_and_list_values():
  arg = config_lib.parse_arg(
    "modalities=image,text,steps=5,pretrained=false",
    modalities="image,text",
    steps=100,
    pretrained=True,
  )
  assert arg.modalities == "image,text" and arg.steps == 5 and arg.pretrained is False
  with pytest.raises(config_lib.ConfigError, match="config argument.stesp"):
    config_lib.parse_arg("stesp=3", steps=1)


def test_shipped_configs_and_sweep_cells_are_valid():
  """Every ablation cell builds a config the trainer accepts (no training)."""
  import importlib.util
  import pathlib

  from mmtl.models import fusion

  path = pathlib.Path(__file__).parent.parent / "configs" / "ablations" / "shapes_grid.py"
  spec = importlib.util.spec_from_file_location("shapes_grid", path)
  grid = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(grid)
  cells = grid.get_sweep() + grid.get_sweep("small")
  assert len(cells) == 37 + 4
  for cell in cells:
    arg = ",".join(f"{k.removeprefix('arg.')}={v}" for k, v in cell.items())
    config = config_lib.with_defaults(grid.get_config(arg))
    towers = fusion.selected_towers(config.model)
    assert set(towers) == set(cell.get("arg.modalities", "image,text").split(","))
    if "text" not in towers:
      assert not config.optim.frozen and not config.optim.lr_mults  # rules would match nothing


def test_a_tower_key_that_is_no_modality_is_a_typo():
  from mmtl.models import fusion

  model = config_lib.with_defaults(
    mlc.ConfigDict(dict(model=dict(towers=dict(image=dict(name="vit"), text=dict(name="bert")))))
  ).model
  model.modalities = "image,text"
  model.towers.imgae = dict(name="convnext")
  with pytest.raises(
    config_lib.ConfigError,
    match=r"config\.model\.towers\.imgae: no modality is named 'imgae'; did you mean "
    r"config\.model\.towers\.image\? .* listed in config\.model\.unused_towers",
  ):
    fusion.selected_towers(model)
  model.unused_towers = ("imgae",)  # Kept on purpose: left out, as `modalities` leaves text out.
  model.modalities = "image"
  assert list(fusion.selected_towers(model)) == ["image"]
  model.unused_towers = ("imgae", "vidoe")
  with pytest.raises(config_lib.ConfigError, match=r"unused_towers lists \['vidoe'\]"):
    fusion.selected_towers(model)


REPO = __import__("pathlib").Path(__file__).resolve().parent.parent
# Keys every config takes whether its file sets them or not (each has a default).
OVERRIDES = [
  ("evals.val.every", "100", 100),
  ("model.dtype", "bfloat16", "bfloat16"),
  ("keep_ckpts", "3", 3),
  ("model.dropout", "0.1", 0.1),
  ("grad_accum_steps", "2", 2),
  ("best_metric", "val/accuracy", "val/accuracy"),
  ("input.class_weights", "balanced", "balanced"),
  ("input.class_weights", "[1.0, 2.0]", [1.0, 2.0]),
  ("input.modality_dropout.image", "0.2", 0.2),
  ("evals.val.input.blank", "text", ("text",)),
  ("input.blank", "image,text", ("image", "text")),
  ("optim.lr", "3e-4", 3e-4),
  ("optim.frozen", "text_encoder/.*", "text_encoder/.*"),
  ("model_init.text_encoder", "", ""),
  ("optim.schedule.warmup_steps", "7", 7),
  ("optim.lora.rank", "4", 4),
  ("optim.layer_decay.rate", "0.75", 0.75),
  ("distill.temperature", "3", 3.0),
  ("early_stopping.patience", "2", 2),
  ("mesh.fsdp", "2", 2),
  ("model.remat", "full", "full"),
  ("evals.test.type", "classification", "classification"),
  ("input.augment.flip", "true", True),
  ("model.towers.text.kwargs.attention_impl", "xla", "xla"),
]


def shipped_trainer_configs():
  """Every trainer config under configs/ (configs/data/ holds input sections)."""
  return sorted(
    str(p.relative_to(REPO))
    for p in (REPO / "configs").rglob("*.py")
    if "data" not in p.parts and "get_config" in p.read_text()
  )


@pytest.mark.parametrize("path", shipped_trainer_configs())
def test_every_defaulted_key_is_settable_on_every_shipped_config(path):
  config = config_lib.load_file(str(REPO / path))
  out = config_lib.with_defaults(
    config_lib.apply_overrides(config, [(k, v) for k, v, _ in OVERRIDES])
  )
  for key, _, expected in OVERRIDES:
    if key == "input.class_weights" and expected == "balanced":
      continue  # Set again below it.
    node = out
    for part in key.split("."):
      node = node[part]
    assert node == expected, key
  assert out.evals.val.input.get("split") == config.evals.val.input.get("split")  # Kept.


@pytest.mark.parametrize(
  "key,value,message",
  [
    ("total_steps", "abc", r"--config\.total_steps=abc: config\.total_steps expects an integer"),
    ("model.num_classes", "2.5", r"config\.model\.num_classes expects an integer"),
    ("optim.lrr", "1", r"Unknown config key config\.optim\.lrr\. Did you mean config\.optim\.lr\?"),
    (
      "input.modality_dropout.imag",
      "0.2",
      r"Did you mean config\.input\.modality_dropout\.image\?",
    ),
    ("evals.val.evry", "3", r"Did you mean config\.evals\.val\.every\?"),
    ("model.fusion.depth", "2", r"config\.model\.fusion is 'bilinear', not a section"),
    ("early_stopping.patience", "often", r"expects an integer \(default 0\)"),
  ],
)
def test_bad_overrides_name_the_flag_and_the_fix(key, value, message):
  config = config_lib.load_file(str(REPO / "configs/quickstart.py"))
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.apply_overrides(config, [(key, value)])


@pytest.mark.parametrize(
  "section,message",
  [
    (
      dict(optim=dict(lr="3e-3")),
      r"config\.optim\.lr='3e-3' is a string; expected a number "
      r"\(a number in quotes is a string: write it without quotes\)",
    ),
    (
      dict(model=dict(num_classes="2")),
      r"config\.model\.num_classes='2' is a string; expected an integer",
    ),
    (dict(total_steps=True), r"config\.total_steps=True is a bool; expected an integer"),
    (dict(batch_size=8.0), r"config\.batch_size=8\.0 is a number; expected an integer"),
    (
      dict(input=dict(split=["train"])),
      r"config\.input\.split=\['train'\] is a list; expected a string",
    ),
    (
      dict(input=dict(modality_dropout=0.3)),
      r"config\.input\.modality_dropout=0\.3 is a number; "
      r"expected a dict",
    ),
    (dict(evals=dict(val=dict(every="10"))), r"config\.evals\.val\.every='10' is a string"),
  ],
)
def test_wrongly_typed_values_name_the_expected_type(section, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.with_defaults(mlc.ConfigDict(section))
