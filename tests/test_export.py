"""mmtl.export: a tower of a finished run as a folder transformers loads; a run of 0 steps
(the pretrained model, evaluated untrained) is a run like any other."""

import json
import sys

import jax
import numpy as np
import pytest
import torch
import transformers

from mmtl import config as config_lib
from mmtl import evaluate, export, hf, lora, process, rules, sharding, train, train_state
from tests.test_train import tiny_config

TEXT_LORA = dict(targets=["text_encoder/.*/attn/(query|value)/kernel"], rank=2, alpha=4)


@pytest.fixture(scope="module")
def lora_run(tiny_bert_dir, data_dir, tmp_path_factory):
  """A 2-step run whose pretrained text tower trained LoRA adapters only."""
  workdir = tmp_path_factory.mktemp("lora") / "run"
  config = tiny_config(tiny_bert_dir, data_dir, total_steps=2)
  config.optim.update(preset="lora", lora=TEXT_LORA, lr=0.05)
  train.train(config, str(workdir))
  return str(workdir)


def bert_outputs(folder, input_ids, mask):
  model = transformers.AutoModel.from_pretrained(folder).eval()
  with torch.no_grad():
    out = model(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(mask))
  return out.last_hidden_state.numpy()


@pytest.mark.slow
def test_a_tower_exports_as_the_run_computed_it_with_lora_merged(lora_run, tiny_bert_dir, tmp_path):
  out = tmp_path / "text"
  result = process.run(
    [sys.executable, "-m", "mmtl.export", "--workdir", lora_run, "--tower=text", "--out", out],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr
  assert f"Wrote {out}" in result.stdout
  _, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]

  # transformers computes what the run's text tower computes (its LoRA adapters merged),
  # which is not what the checkpoint it started from computes.
  config = config_lib.load_json(f"{lora_run}/{config_lib.CONFIG_FILE}")
  model, variables = train_state.load_run(lora_run, sharding.make_mesh(config.mesh))
  params = jax.device_get(variables["params"])
  assert any(k.endswith("lora_b") and np.any(v) for k, v in rules.flatten(params).items())
  rng = np.random.default_rng(0)
  input_ids = rng.integers(1, 50, size=(2, 7))
  mask = np.array([[1] * 7, [1] * 4 + [0] * 3])
  ours = model.tower("text").apply(
    {"params": lora.merge(params)["text_encoder"]}, input_ids, mask, np.zeros_like(input_ids)
  )["last_hidden_state"]
  theirs = bert_outputs(out, input_ids, mask)
  np.testing.assert_allclose(ours * mask[..., None], theirs * mask[..., None], atol=1e-5)
  assert not np.allclose(theirs, bert_outputs(tiny_bert_dir, input_ids, mask), atol=1e-4)


@pytest.mark.slow
def test_bad_exports_are_one_line_and_overwrite_nothing(lora_run, tmp_path):
  with pytest.raises(config_lib.ConfigError, match=r"--tower=audio: .* its towers: image, text"):
    export.export_tower(lora_run, "audio", tmp_path / "a")
  assert not (tmp_path / "a").exists()
  taken = tmp_path / "taken"
  taken.mkdir()
  (taken / "config.json").write_text("{}")
  with pytest.raises(FileExistsError, match="is not an empty folder: give a new --out"):
    export.export_tower(lora_run, "text", taken)
  assert (taken / "config.json").read_text() == "{}"


@pytest.mark.slow
def test_a_run_of_zero_steps_is_the_pretrained_model_evaluated(tiny_bert_dir, data_dir, tmp_path):
  """`total_steps=0`: the initial model (model_init weights) evaluated and saved as step 0,
  so mmtl.evaluate and mmtl.export read it as they read a trained run."""
  workdir = str(tmp_path / "zero")
  config = tiny_config(tiny_bert_dir, data_dir, total_steps=0)
  final = train.train(config, workdir)
  assert final["step"] == 0.0 and 0.0 <= final["val/accuracy"] <= 1.0
  assert json.loads((tmp_path / "zero/final_metrics.json").read_text()) == pytest.approx(final)
  again = evaluate.evaluate(config_lib.with_defaults(config), workdir)
  assert again == pytest.approx({k: v for k, v in final.items() if k != "step"})
  exported = export.export_tower(workdir, "text", tmp_path / "text")
  jax.tree.map(  # The pretrained tower, untouched.
    np.testing.assert_array_equal,
    hf.load_pretrained(exported)[1],
    hf.load_pretrained(tiny_bert_dir)[1],
  )
