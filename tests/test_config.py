"""Config loading: unknown keys fail naming the key; workdir config pinning; args."""
import json
import subprocess
import sys
import textwrap

import ml_collections as mlc
import pytest

from mmtl import config as config_lib


def test_unknown_top_level_key_names_it_and_suggests():
  cfg = mlc.ConfigDict(dict(total_stpes=10))
  with pytest.raises(config_lib.ConfigError, match=r"config\.total_stpes.*Did you mean config\.total_steps"):
    config_lib.with_defaults(cfg)


def test_unknown_nested_keys_name_them():
  with pytest.raises(config_lib.ConfigError, match=r"config\.model\.fusoin"):
    config_lib.with_defaults(mlc.ConfigDict(dict(model=dict(fusoin="gated"))))
  with pytest.raises(config_lib.ConfigError, match=r"config\.early_stopping\.patients"):
    config_lib.with_defaults(mlc.ConfigDict(dict(early_stopping=dict(patients=3))))
  with pytest.raises(config_lib.ConfigError, match=r"config\.model\.towers\.text\.pooling"):
    config_lib.with_defaults(mlc.ConfigDict(dict(model=dict(towers=dict(text=dict(name="x", pooling="mean"))))))


def test_defaults_fill_partial_sections():
  cfg = config_lib.with_defaults(mlc.ConfigDict(dict(early_stopping=dict(patience=3), model=dict(width=8))))
  assert cfg.early_stopping.patience == 3 and cfg.early_stopping.min_delta == 0.0
  assert cfg.model.width == 8 and cfg.model.fusion == "concat"
  assert cfg.mesh.data == -1


def test_unknown_override_flag_fails_with_its_name(tmp_path):
  (tmp_path / "c.py").write_text(textwrap.dedent("""\
      import ml_collections as mlc
      def get_config(arg=None):
        return mlc.ConfigDict(dict(total_steps=3, optim=dict(lr=0.1)))
      """))
  cmd = [sys.executable, "-m", "mmtl.train", "--workdir", str(tmp_path / "w"),
         "--config", str(tmp_path / "c.py"), "--config.optim.lrr=0.2"]
  repo = str(__import__("pathlib").Path(__file__).resolve().parent.parent)
  result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=repo)
  assert result.returncode != 0
  assert "--config.optim.lrr" in result.stderr and "'lrr'" in result.stderr
  assert not (tmp_path / "w").exists()


def test_workdir_with_another_config_is_refused(tmp_path):
  a = config_lib.with_defaults(mlc.ConfigDict(dict(total_steps=10)))
  config_lib.save_or_check(a, str(tmp_path))
  config_lib.save_or_check(a, str(tmp_path))  # Same run: fine (resume).
  b = config_lib.with_defaults(mlc.ConfigDict(dict(total_steps=20)))
  with pytest.raises(config_lib.ConfigError, match=r"(?s)config\.total_steps: 10 -> 20.*--allow_config_change"):
    config_lib.save_or_check(b, str(tmp_path))
  config_lib.save_or_check(b, str(tmp_path), allow_change=True)
  assert config_lib.load_json(str(tmp_path / "config.json")).total_steps == 20


def test_workdir_of_an_older_mmtl_resumes(tmp_path):
  """A config.json written before a trainer key existed resumes while the run uses that
  key's default; a non-default value is a change."""
  config = config_lib.with_defaults(mlc.ConfigDict(dict(total_steps=10)))
  saved = config_lib.to_dict(config)
  del saved["prefetch_to_device"], saved["model"]["remat"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  config_lib.save_or_check(config, str(tmp_path))
  assert "prefetch_to_device" in json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(saved))
  config.prefetch_to_device = 0
  with pytest.raises(config_lib.ConfigError, match=r"prefetch_to_device: 2 -> 0"):
    config_lib.save_or_check(config, str(tmp_path))


def test_parse_arg_types_and_list_values():
  arg = config_lib.parse_arg("modalities=image,text,steps=5,pretrained=false",
                             modalities="image,text", steps=100, pretrained=True)
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
