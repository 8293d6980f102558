"""BatchNorm statistics in the train state: loaded with a ResNet tower, frozen with its
layers (bit-identical after training), updated from the global batch where they train,
checkpointed, evaluated and exported; a frozen CNN costs no backward pass."""

import functools

import jax
import numpy as np
import pytest
import torch
import transformers

from mmtl import (
  bench,
  checkpoint,
  data,
  evaluate,
  export,
  hf,
  optim,
  rules,
  sharding,
  train,
  train_state,
  train_step,
)
from mmtl import config as config_lib
from mmtl.data import device as data_device
from mmtl.models import fusion
from tests.test_train import tiny_config

FROZEN = "image_encoder/(embeddings|encoder/stage_0)/.*"  # the stem and the first stage


@pytest.fixture(scope="module")
def resnet_dir(tmp_path_factory):
  """A tiny ResNet whose running statistics are not BatchNorm's init (0 mean, 1 var)."""
  torch.manual_seed(0)
  config = transformers.ResNetConfig(
    embedding_size=8, hidden_sizes=[8, 12, 16], depths=[1, 1, 1], layer_type="basic"
  )
  model = transformers.ResNetModel(config).eval()
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.running_mean.normal_(0.0, 0.3)
        module.running_var.uniform_(0.5, 1.5)
  out = tmp_path_factory.mktemp("tiny_resnet")
  model.save_pretrained(out)
  return str(out)


def resnet_config(resnet_dir, text_dir, data_dir, *, frozen=(FROZEN,), **model_overrides):
  config = tiny_config(text_dir, data_dir, total_steps=2, ckpt_every=2)
  config.model.towers.image = dict(name=resnet_dir, pool="pooler")
  config.model.modalities = "image"  # the ResNet alone: a text tower would add nothing here
  config.model.update(model_overrides)
  config.model_init.image_encoder = resnet_dir
  config.optim.frozen = list(frozen)
  return config


def flat_stats(variables, subtree="image_encoder"):
  return rules.flatten(jax.device_get(variables["batch_stats"][subtree]))


@pytest.mark.slow
def test_frozen_layers_keep_their_statistics_through_training(
  resnet_dir, tiny_bert_dir, data_dir, tmp_path
):
  workdir = str(tmp_path / "run")
  config = resnet_config(resnet_dir, tiny_bert_dir, data_dir)
  final = train.train(config, workdir)
  assert np.isfinite(final["val/accuracy"])
  pretrained = hf.load_pretrained(resnet_dir)[1]
  saved = checkpoint.restore_variables(f"{workdir}/checkpoints", step=2)
  assert set(saved) == {"params", "batch_stats"}
  params = rules.flatten(jax.device_get(saved["params"]["image_encoder"]))
  stats = flat_stats(saved)
  frozen = rules.assign(stats, [FROZEN.removeprefix("image_encoder/")], default=False)
  assert any(frozen.values()) and not all(frozen.values())
  for path, value in rules.flatten(pretrained["batch_stats"]).items():
    if frozen[path]:
      np.testing.assert_array_equal(stats[path], value, err_msg=path)  # bit-identical
    else:
      assert not np.array_equal(stats[path], value), path  # trained from the batches
  for path, value in rules.flatten(pretrained["params"]).items():
    if path.startswith(("embeddings/", "encoder/stage_0/")):
      np.testing.assert_array_equal(params[path], value, err_msg=path)

  # Evaluation of the run uses the saved statistics (mmtl.evaluate restores them).
  again = evaluate.evaluate(config_lib.with_defaults(config), workdir)
  assert again["val/accuracy"] == pytest.approx(final["val/accuracy"])

  # The trained tower exports with its statistics (mmtl.export); transformers computes what
  # mmtl does.
  module = hf.build_module(resnet_dir)
  tower = {
    "params": saved["params"]["image_encoder"],
    "batch_stats": saved["batch_stats"]["image_encoder"],
  }
  out = export.export_tower(workdir, "image", tmp_path / "export")
  torch_model = transformers.ResNetModel.from_pretrained(out).eval()
  pixels = np.random.default_rng(0).standard_normal((2, 3, 20, 24)).astype(np.float32)
  ours = module.apply(jax.device_get(tower), pixels.transpose(0, 2, 3, 1))["pooler_output"]
  with torch.no_grad():
    ref = torch_model(pixel_values=torch.tensor(pixels)).pooler_output.flatten(1).numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


def one_step(config, mesh, batch):
  """(variables before, train state after) of one trainer step of `config` on `mesh`."""
  model = fusion.build(config.model)
  layout = train_state.param_layout(model, config, mesh)
  objective_for = functools.partial(
    train_step.make_objective, model, config, None, batch_stats_shape=layout.batch_stats
  )
  phase = train_step.make_phase(config, objective_for, layout, mesh, 0)
  variables = jax.device_get(train_state.init_variables(model, config, layout, note=lambda _: None))
  state = train_state.init_state(
    train_state.place(variables, layout.variables("shardings")), phase.tx, phase.state_shardings
  )
  state, _ = phase.step_fn(state, data_device.put_batch(batch, mesh), None)
  return variables, jax.device_get(state)


@pytest.fixture(scope="module")
def batch(resnet_dir, tiny_bert_dir, data_dir):
  config = config_lib.with_defaults(resnet_config(resnet_dir, tiny_bert_dir, data_dir))
  return next(data.make_train_iterator(config.input, batch_size=16, seed=0))


@pytest.mark.parametrize(
  "mode, stem_changes, stage_1_changes",
  [("trainable", False, True), ("none", False, False), ("all", True, True)],
)
def test_batch_stats_modes(
  mode, stem_changes, stage_1_changes, resnet_dir, tiny_bert_dir, data_dir, batch
):
  config = config_lib.with_defaults(
    resnet_config(resnet_dir, tiny_bert_dir, data_dir, batch_stats=mode)
  )
  before, after = one_step(config, sharding.make_mesh(dict(data=8)), batch)
  old, new = flat_stats(before), flat_stats(after)
  changed = {p: not np.array_equal(old[p], new[p]) for p in old}
  assert changed["embeddings/norm/mean"] is stem_changes
  stage_1 = [p for p in old if p.startswith("encoder/stage_1/")]
  assert stage_1 and all(changed[p] is stage_1_changes for p in stage_1)
  if not stem_changes:  # kept statistics come back bit-identical
    np.testing.assert_array_equal(new["embeddings/norm/var"], old["embeddings/norm/var"])


def test_statistics_are_of_the_global_batch(resnet_dir, tiny_bert_dir, data_dir, batch):
  """Synchronised BatchNorm: 8 devices update the statistics one device does (the mean
  over the whole batch, not per device shard)."""
  config = config_lib.with_defaults(resnet_config(resnet_dir, tiny_bert_dir, data_dir))
  on_8 = one_step(config, sharding.make_mesh(dict(data=8)), batch)[1]["batch_stats"]
  on_1 = one_step(config, sharding.make_mesh(dict(data=1), jax.devices()[:1]), batch)[1]
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), on_8, on_1["batch_stats"]
  )


def test_unknown_batch_stats_mode_is_a_config_error(resnet_dir, tiny_bert_dir, data_dir):
  config = config_lib.with_defaults(
    resnet_config(resnet_dir, tiny_bert_dir, data_dir, batch_stats="frozen")
  )
  with pytest.raises(config_lib.ConfigError, match="batch_stats='frozen'.*'trainable'"):
    one_step(config, sharding.make_mesh(dict(data=8)), {})


def test_a_frozen_cnn_costs_no_backward_pass(resnet_dir, tiny_bert_dir, data_dir, batch):
  """Locking the ResNet tower drops its activations from backward and its weight
  gradients from the step's FLOPs."""
  shapes = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in batch.items()}
  mesh = sharding.make_mesh(dict(data=1), jax.devices()[:1])
  measured = {}
  for name, frozen in (("trained", ()), ("locked", ("image_encoder/.*",))):
    config = config_lib.with_defaults(
      resnet_config(resnet_dir, tiny_bert_dir, data_dir, frozen=frozen)
    )
    model = fusion.build(config.model)
    layout = train_state.param_layout(model, config, mesh)
    mask = optim.freeze_mask(layout.shapes, config.optim)
    objective_for = functools.partial(
      train_step.make_objective, model, config, None, batch_stats_shape=layout.batch_stats
    )
    phase = train_step.make_phase(config, objective_for, layout, mesh, 0)
    state = checkpoint.abstract(phase.state_shapes, phase.state_shardings)
    batch_in = checkpoint.abstract(
      shapes, jax.tree.map(lambda _: sharding.batch_sharding(mesh), shapes)
    )
    measured[name] = (
      train_step.activation_bytes(objective_for(mask), mask, layout, shapes, accum_steps=1),
      bench.lowered_flops(phase.step_fn.lower(state, batch_in, None)),
    )
  (acts_trained, flops_trained), (acts_locked, flops_locked) = (
    measured["trained"],
    measured["locked"],
  )
  # The ResNet's feature maps (16 x 8 x 8 x 8 floats after the stem alone) are not kept.
  assert acts_trained - acts_locked >= 16 * 8 * 8 * 8 * 4
  # Its weight gradients (as many FLOPs as its forward pass) are not computed.
  tower = hf.build_module(resnet_dir)
  pixels = jax.ShapeDtypeStruct(shapes["pixel_values"].shape, np.float32)
  forward = jax.jit(lambda v, x: tower.apply(v, x)["pooler_output"])
  tower_flops = bench.lowered_flops(forward.lower(hf.variable_shapes(tower), pixels))
  assert flops_trained - flops_locked >= tower_flops > 0
