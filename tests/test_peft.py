"""Adapters (mmtl.adapters) and prompt / prefix tuning (mmtl.prompts): the math against
transformers' BertModel with the same additions written out, the trainer's presets, export
and the errors."""

import contextlib
import io
import json
from pathlib import Path
import re
import sys

import jax
import numpy as np
import pytest
import torch
import transformers
from transformers.masking_utils import create_bidirectional_mask

from mmtl import adapters, export, peft, process, rules, sharding, train, train_state
from mmtl import config as config_lib
from mmtl import optim as optim_lib
from mmtl import prompts as prompts_lib
from mmtl.models import fusion
from tests.test_train import final_params, losses, tiny_config

LAYERS = r"text_encoder/encoder/layer_\d+/(attn|mlp)"


def build(text_dir, **optim):
  """(config, model, variables) of the tiny BERT-text model with `optim` set."""
  config = tiny_config(text_dir, "unused")
  config.model.towers = dict(text=dict(name=text_dir))
  config.optim.update(optim)
  config = config_lib.with_defaults(config)
  model = fusion.build(config.model)
  layout = train_state.param_layout(model, config, sharding.make_mesh(config.mesh))
  return config, model, train_state.init_variables(model, config, layout, note=lambda _: None)


def randomized(params, pattern, seed=0):
  """`params` with every leaf matching `pattern` drawn at random (a trained addition)."""
  rng = np.random.default_rng(seed)
  flat = rules.flatten(jax.device_get(params))
  return rules.unflatten(
    {
      p: rng.normal(0, 0.3, np.shape(x)).astype(np.float32) if rules.matches(pattern, p) else x
      for p, x in flat.items()
    }
  )


def text_batch(seed=0):
  rng = np.random.default_rng(seed)
  input_ids = rng.integers(1, 50, size=(3, 7))
  mask = np.array([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
  return dict(input_ids=input_ids, attention_mask=mask, token_type_ids=np.zeros_like(input_ids))


def text_tokens(model, params, batch):
  out = model.apply({"params": params}, batch, "text", method=fusion.FusionModel.tower_outputs)
  return np.asarray(out["tokens"]) * batch["attention_mask"][..., None]


def hf_bert(text_dir):
  return transformers.BertModel.from_pretrained(text_dir, attn_implementation="eager").eval()


def _adapter(p, h):
  t = lambda a: torch.tensor(np.asarray(a))  # noqa: E731
  down = torch.relu(h @ t(p["down"]["kernel"]) + t(p["down"]["bias"]))
  return down @ t(p["up"]["kernel"]) + t(p["up"]["bias"])


def hf_with_adapters(text_dir, params, kind, batch):
  """transformers' BertModel with mmtl's adapters added by forward hooks: sequential on the
  outputs of each layer's attention output projection and MLP output projection (before
  dropout and the residual add), parallel from the block's input to the same place."""
  hf = hf_bert(text_dir)
  name = "adapter" if kind == "sequential" else "parallel_adapter"
  for i, layer in enumerate(hf.encoder.layer):
    ours = params["text_encoder"]["encoder"][f"layer_{i}"]
    inputs = {}
    layer.attention.register_forward_pre_hook(lambda m, a, inputs=inputs: inputs.update(attn=a[0]))
    layer.intermediate.register_forward_pre_hook(
      lambda m, a, inputs=inputs: inputs.update(mlp=a[0])
    )
    for block, dense in (("attn", layer.attention.output.dense), ("mlp", layer.output.dense)):
      p = ours[block][name]

      def hook(m, a, out, p=p, block=block, inputs=inputs):
        if kind == "sequential":
          return out + _adapter(p, out)
        return out + float(p["scale"]) * _adapter(p, inputs[block])

      dense.register_forward_hook(hook)
  with torch.no_grad():
    out = hf(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state.numpy()
  return out * batch["attention_mask"][..., None]


@pytest.mark.parametrize("kind", ["sequential", "parallel"])
def test_adapters_compute_transformers_bert_with_the_adapters_added(tiny_bert_dir, kind):
  adapters = dict(targets=[LAYERS], size=3, kind=kind, scale=2.0)
  _, model, variables = build(tiny_bert_dir, preset="adapters", adapters=adapters)
  base = build(tiny_bert_dir)[2]["params"]
  flat = rules.flatten(variables["params"])
  added = sorted(set(flat) - set(rules.flatten(base)))
  name = "adapter" if kind == "sequential" else "parallel_adapter"
  per_block = [f"{name}/down/bias", f"{name}/down/kernel", f"{name}/up/bias", f"{name}/up/kernel"]
  per_block += [f"{name}/scale"] if kind == "parallel" else []
  assert added == sorted(
    f"text_encoder/encoder/layer_{i}/{b}/{leaf}"
    for i in range(2)
    for b in ("attn", "mlp")
    for leaf in per_block
  )
  assert flat["text_encoder/encoder/layer_0/attn/" + per_block[1]].shape == (32, 3)
  batch = text_batch()
  # `up` starts at zero: the adapted model starts exactly at the pretrained one.
  np.testing.assert_array_equal(
    text_tokens(model, variables["params"], batch), text_tokens(model, base, batch)
  )
  params = randomized(variables["params"], r".*adapter/(down|up)/.*")
  ours = text_tokens(model, params, batch)
  np.testing.assert_allclose(ours, hf_with_adapters(tiny_bert_dir, params, kind, batch), atol=1e-5)
  assert not np.allclose(ours, text_tokens(model, base, batch), atol=1e-3)


def hf_with_prompts(text_dir, prompts, batch):
  """transformers' BertModel run layer by layer on its embedding output with `prompts`
  ((n, D): inserted after [CLS]; (layers, n, D): each layer's put in place at its input),
  real to the attention mask, dropped after the last layer."""
  hf = hf_bert(text_dir)
  t = lambda a: torch.tensor(np.asarray(a))  # noqa: E731
  with torch.no_grad():
    x = hf.embeddings(input_ids=t(batch["input_ids"]), token_type_ids=t(batch["token_type_ids"]))
    deep = prompts.ndim == 3
    n = prompts.shape[-2]
    first = t(prompts[0] if deep else prompts).expand(x.shape[0], n, x.shape[-1])
    x = torch.cat([x[:, :1], first, x[:, 1:]], 1)
    mask = t(batch["attention_mask"])
    mask = torch.cat([mask[:, :1], torch.ones(mask.shape[0], n, dtype=mask.dtype), mask[:, 1:]], 1)
    mask4d = create_bidirectional_mask(config=hf.config, inputs_embeds=x, attention_mask=mask)
    for i, layer in enumerate(hf.encoder.layer):
      if deep:
        x = torch.cat(
          [x[:, :1], t(prompts[i]).expand(x.shape[0], n, x.shape[-1]), x[:, 1 + n :]], 1
        )
      x = layer(x, mask4d)
    out = torch.cat([x[:, :1], x[:, 1 + n :]], 1).numpy()
  return out * batch["attention_mask"][..., None]


@pytest.mark.parametrize("deep", [False, True])
def test_prompts_compute_transformers_bert_with_the_prompts_inserted(tiny_bert_dir, deep):
  prompts = dict(towers=["text_encoder"], length=4, deep=deep)
  _, model, variables = build(tiny_bert_dir, preset="prompts", prompts=prompts)
  leaf = variables["params"]["text_encoder"]["prompts"]
  assert leaf.shape == ((2, 4, 32) if deep else (4, 32))
  assert -0.5 <= float(leaf.min()) and float(leaf.max()) <= 0.5
  batch = text_batch()
  ours = text_tokens(model, variables["params"], batch)
  assert ours.shape == (3, 7, 32)  # the tower's own positions: prompts are dropped
  np.testing.assert_allclose(ours, hf_with_prompts(tiny_bert_dir, leaf, batch), atol=1e-5)
  base = build(tiny_bert_dir)[2]["params"]
  assert not np.allclose(ours, text_tokens(model, base, batch), atol=1e-3)


ADAPTERS = dict(targets=[LAYERS], size=4, kind="parallel", scale=2.0)


@pytest.fixture(scope="module")
def adapter_run(tiny_bert_dir, data_dir, tmp_path_factory):
  """A 3-step run of the adapters preset on the pretrained text tower: (workdir, printed)."""
  workdir = tmp_path_factory.mktemp("adapters") / "run"
  config = tiny_config(tiny_bert_dir, data_dir, total_steps=3)
  config.optim.update(preset="adapters", adapters=ADAPTERS, lr=0.05)
  with contextlib.redirect_stdout(io.StringIO()) as printed:
    train.train(config, str(workdir))
  return str(workdir), printed.getvalue()


@pytest.mark.slow
def test_adapter_preset_trains_adapters_and_new_layers_only(adapter_run, tiny_bert_dir, data_dir):
  workdir, printed = adapter_run
  config = tiny_config(tiny_bert_dir, data_dir)
  config.optim.update(preset="adapters", adapters=ADAPTERS)
  config = config_lib.with_defaults(config)
  model = fusion.build(config.model)
  layout = train_state.param_layout(model, config, sharding.make_mesh(config.mesh))
  init = rules.flatten(jax.device_get(train_state.init_variables(model, config, layout)["params"]))
  after = final_params(workdir)
  assert set(rules.flatten(after)) == set(init)
  for p, x in rules.flatten(after).items():
    trains = re.fullmatch(r".*/parallel_adapter/(down|up)/.*|fusion/.*|head/.*|image_encoder/.*", p)
    if trains and "/pooler/" not in p:
      assert not np.array_equal(x, init[p]), p
    else:  # the checkpoint's weights and the adapters' constant scale
      np.testing.assert_array_equal(x, init[p], err_msg=p)
  lines = printed.splitlines()
  assert any("preset=adapters" in line for line in lines)
  text = next(line for line in lines if line.startswith("text_encoder "))
  assert text.split()[1] == f"{2 * 2 * (32 * 4 + 4 + 4 * 32 + 32):,}"  # trainable: adapters
  assert any(
    re.fullmatch(r"trainable: [\d,]+ of [\d,]+ params \([\d.]+%\)", line) for line in lines
  )


@pytest.mark.slow
def test_peft_export_loads_back_into_a_run_that_computes_the_same(
  adapter_run, tiny_bert_dir, data_dir, tmp_path
):
  """`mmtl.export --peft` writes the adapters and new layers; a run started from them with
  config.peft_init (0 steps: evaluated as built) has the exported run's params and val
  metrics. Exporting the adapted tower to transformers is refused with the way out."""
  workdir, _ = adapter_run
  out = tmp_path / "peft"
  result = process.run(
    [sys.executable, "-m", "mmtl.export", "--workdir", workdir, "--peft", "--out", out],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr
  assert f"--config.peft_init={out}" in result.stdout
  meta = json.loads((out / peft.META).read_text())
  assert meta["optim"] == {"adapters": ADAPTERS}
  saved = set(meta["shapes"])
  assert any("parallel_adapter" in p for p in saved) and "head/kernel" in "".join(saved)
  assert not any(p.startswith("text_encoder/") and "adapter" not in p for p in saved)

  config = tiny_config(tiny_bert_dir, data_dir, total_steps=0, peft_init=str(out))
  config.optim.update(preset="adapters", adapters=ADAPTERS)
  train.train(config, str(tmp_path / "again"))
  ours, theirs = final_params(tmp_path / "again"), final_params(workdir)
  jax.tree.map(np.testing.assert_array_equal, ours, theirs)
  final = lambda w: json.loads((Path(w) / "final_metrics.json").read_text())  # noqa: E731
  assert {k: v for k, v in final(tmp_path / "again").items() if k != "step"} == {
    k: v for k, v in final(workdir).items() if k != "step"
  }

  with pytest.raises(
    config_lib.ConfigError, match=r"--tower=text: .* adapters or prompts .* --peft"
  ):
    export.export_tower(workdir, "text", tmp_path / "text")
  with pytest.raises(config_lib.ConfigError, match=r"config.peft_init=.* missing .*lora_a"):
    config = tiny_config(tiny_bert_dir, data_dir, total_steps=0, peft_init=str(out))
    config.optim.update(preset="lora", lora=dict(targets=[".*/query/kernel"], rank=2))
    train.train(config, str(tmp_path / "wrong"))
  assert not (tmp_path / "wrong" / "checkpoints").exists()


@pytest.mark.slow
def test_prompt_preset_trains_the_prompts(tiny_bert_dir, data_dir, tmp_path):
  config = tiny_config(tiny_bert_dir, data_dir, total_steps=2, evals={})
  prompts = dict(towers=["text_encoder"], length=3, deep=True)
  config.optim.update(preset="prompts", prompts=prompts, lr=0.05)
  train.train(config, str(tmp_path / "run"))
  after = rules.flatten(final_params(tmp_path / "run"))
  start = rules.flatten(jax.device_get(build(tiny_bert_dir, preset="prompts", prompts=prompts)[2]))
  assert after["text_encoder/prompts"].shape == (2, 3, 32)
  assert not np.array_equal(after["text_encoder/prompts"], start["params/text_encoder/prompts"])
  for p, x in after.items():
    if p.startswith("text_encoder/") and p != "text_encoder/prompts":
      np.testing.assert_array_equal(x, start[f"params/{p}"], err_msg=p)


def test_bad_peft_configs_name_the_problem(tiny_bert_dir):
  cases = [
    (dict(adapters=dict(targets=[LAYERS], sise=4)), r"config.optim.adapters.sise.*Did you mean"),
    (dict(adapters=dict(targets=[])), r"adapters.targets is empty"),
    (dict(adapters=dict(targets=[LAYERS], kind="serial")), r"kind='serial': use one of"),
    (dict(adapters=dict(targets=[r".*/attn/query/kernel"])), r"adapters.targets: rule.*match no"),
    (dict(prompts=dict(towers=["image_encoder"])), r"prompts.towers: rule.*match no"),
    (dict(adapters=dict(targets=["fusion/.*"])), r"'fusion/.\*' matches fusion/.*outside the"),
    (dict(prompts=dict(towers=["text_encoder"], length=0)), r"prompts.length=0 must be >= 1"),
    (dict(preset="adapters"), r"preset='adapters' needs config.optim.adapters = dict"),
    (dict(preset="prompts"), r"preset='prompts' needs config.optim.prompts = dict"),
  ]
  for optim, match in cases:
    with pytest.raises((config_lib.ConfigError, rules.RuleError, ValueError), match=match):
      _, model, variables = build(tiny_bert_dir, **optim)
      optim_lib.freeze_mask(variables["params"], {"lr": 1.0, **optim})


def test_prompts_refuse_cnn_towers_and_bottleneck_fusion(tiny_bert_dir):
  config = tiny_config(tiny_bert_dir, "unused")
  config.model.update(fusion="bottleneck", fusion_layer=-1)
  config.optim.prompts = dict(towers=["text_encoder"])
  config = config_lib.with_defaults(config)
  model = fusion.build(config.model)
  with pytest.raises(config_lib.ConfigError, match="prompts cannot go with .*bottleneck"):
    train_state.param_layout(model, config, sharding.make_mesh(config.mesh))
  with pytest.raises(config_lib.ConfigError, match="image_encoder, a tower without token layers"):
    prompts_lib.init(
      {"image_encoder": {}},
      dict(towers=["image_encoder"]),
      jax.random.key(0),
      {"image_encoder": (0, 8)},
    )


def test_without_adapters_or_prompts_the_compiled_forward_is_unchanged(tiny_bert_dir, monkeypatch):
  """The interceptor FusionModel runs its towers in adds nothing to a model without
  adapters: the lowered program is the same with it replaced by a no-op."""
  _, model, variables = build(tiny_bert_dir)
  batch = {**text_batch(), "pixel_values": np.zeros((3, 16, 16, 3), np.float32)}
  lowered = lambda: jax.jit(model.apply).lower(variables, batch).as_text()  # noqa: E731
  with_interceptor = lowered()
  monkeypatch.setattr(adapters, "applied", contextlib.nullcontext)
  assert lowered() == with_interceptor


@pytest.mark.slow
def test_adapters_and_prompts_together_train_the_same_sharded(tiny_bert_dir, data_dir, tmp_path):
  """Sequential adapters and deep prompts in one run (`trainable` names both), on a
  (data 2, fsdp 2, model 2) mesh with tensor-parallel rules, train as on a data-only mesh."""
  runs = {}
  for name, mesh, rules_name in (
    ("dp", dict(data=8), "replicate"),
    ("tp", dict(data=2, fsdp=2, model=2), "fsdp_tp"),
  ):
    config = tiny_config(
      tiny_bert_dir, data_dir, total_steps=3, evals={}, mesh=mesh, sharding_rules=rules_name
    )
    config.optim.update(
      lr=0.05,
      adapters=dict(targets=[LAYERS], size=4),
      prompts=dict(towers=["text_encoder"], length=2, deep=True),
      trainable=[
        adapters.TRAINABLE,
        prompts_lib.TRAINABLE,
        "fusion/.*",
        "head/.*",
        "image_encoder/.*",
      ],
    )
    train.train(config, str(tmp_path / name))
    runs[name] = final_params(tmp_path / name), losses(tmp_path / name)
  (dp, dp_losses), (tp, tp_losses) = runs["dp"], runs["tp"]
  np.testing.assert_allclose(list(tp_losses.values()), list(dp_losses.values()), rtol=1e-5)
  flat = rules.flatten(dp)
  for p, x in rules.flatten(tp).items():
    if not p.endswith("/attn/key/bias"):  # softmax ignores it: its gradient is rounding noise
      np.testing.assert_allclose(x, flat[p], rtol=1e-4, atol=1e-5, err_msg=p)
  assert np.any(flat["text_encoder/encoder/layer_1/mlp/adapter/up/kernel"])
  assert flat["text_encoder/prompts"].shape == (2, 2, 32)
