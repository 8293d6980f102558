"""The one train-state builder: params created sharded, pretrained towers placed shard by shard."""

import jax
import ml_collections as mlc
import numpy as np
import pytest

from mmtl import config as config_lib
from mmtl import hf, optim, rules, sharding, train_state
from mmtl.models import fusion


def fsdp_config(vit_dir, bert_dir, **optim_overrides):
  return config_lib.with_defaults(
    mlc.ConfigDict(
      dict(
        mesh=dict(data=1, fsdp=8, model=1),
        sharding_rules="fsdp",
        model=dict(
          towers=dict(image=dict(name=vit_dir), text=dict(name=bert_dir)),
          fusion="concat",
          num_classes=3,
          width=16,
        ),
        model_init=dict(image_encoder=vit_dir, text_encoder=bert_dir),
        optim=dict(name="adam", lr=1e-3, **optim_overrides),
      )
    )
  )


def whole_on_one_device(arrays, sharded_shapes, before=()):
  """Live device arrays, other than `before`'s, that hold a whole sharded param on a
  single device (`before`: the arrays other tests left alive)."""
  old = {id(x) for x in before}
  return [
    x.shape
    for x in arrays
    if id(x) not in old and tuple(x.shape) in sharded_shapes and len(x.sharding.device_set) == 1
  ]


@pytest.fixture
def setup(tiny_vit_dir, tiny_bert_dir):
  config = fsdp_config(tiny_vit_dir, tiny_bert_dir)
  mesh = sharding.make_mesh(config.mesh)
  model = fusion.build(config.model)
  layout = train_state.param_layout(model, config, mesh)
  flat = rules.flatten(layout.shardings)
  sharded = {
    tuple(s.shape)
    for p, s in rules.flatten(layout.shapes).items()
    if flat[p].spec != jax.sharding.PartitionSpec() and len(s.shape) >= 2
  }
  assert len(sharded) >= 4  # kernels and embeddings of both towers are split over fsdp
  return config, mesh, model, layout, sharded


def test_no_param_ever_exists_whole_on_one_device(setup, monkeypatch):
  config, mesh, model, layout, sharded = setup
  seen = []
  load = hf.load_into
  before = jax.live_arrays()  # Held, so that no new array can take one of their ids.

  def watching_load(*args, **kwargs):  # Read and checked on the host, before the init.
    seen.extend(whole_on_one_device(jax.live_arrays(), sharded, before))
    out = load(*args, **kwargs)
    seen.extend(whole_on_one_device(jax.live_arrays(), sharded, before))
    return out

  monkeypatch.setattr(hf, "load_into", watching_load)
  variables = train_state.init_variables(model, config, layout, note=lambda _: None)
  assert set(variables) == {"params"}  # no BatchNorm in these towers
  params = variables["params"]
  seen.extend(whole_on_one_device(jax.live_arrays(), sharded, before))
  assert seen == []
  assert jax.tree.map(lambda x: x.sharding, params) == layout.shardings
  for path, x in rules.flatten(params).items():
    if tuple(x.shape) in sharded:
      assert {s.data.shape for s in x.addressable_shards} != {x.shape}, path

  # The check sees the old way (an unsharded init moved afterwards) as a violation.
  unsharded = jax.jit(lambda rng: model.init(rng, model.dummy_batch())["params"])(
    jax.random.PRNGKey(0)
  )
  assert whole_on_one_device(jax.live_arrays(), sharded, before)
  del unsharded


def test_loaded_values_and_random_init_are_the_unsharded_ones(setup, tiny_vit_dir, tiny_bert_dir):
  config, mesh, model, layout, _ = setup
  variables = train_state.init_variables(model, config, layout, note=lambda _: None)
  params = jax.device_get(variables["params"])
  for subtree, folder in (("image_encoder", tiny_vit_dir), ("text_encoder", tiny_bert_dir)):
    _, loaded, _ = hf.load_pretrained(folder)
    for path, value in rules.flatten(loaded["params"]).items():
      np.testing.assert_array_equal(rules.flatten(params[subtree])[path], value, err_msg=path)
  # The new layers: the same values as one unsharded init of the same seed.
  rng_init, _ = jax.random.split(jax.random.PRNGKey(config.seed))
  reference = jax.device_get(jax.jit(model.init)(rng_init, model.dummy_batch())["params"])
  for part in ("fusion", "head"):
    jax.tree.map(np.testing.assert_array_equal, params[part], reference[part])


def test_only_what_no_checkpoint_gives_is_initialized(setup, monkeypatch):
  """The jitted init returns (so XLA computes) only the fusion and head params: the towers
  come from their checkpoints."""
  config, mesh, model, layout, _ = setup
  computed = []
  jit = jax.jit

  def counting_jit(fun, **kw):
    compiled = jit(fun, **kw)

    def call(*args):
      out = compiled(*args)
      computed.append(len(jax.tree.leaves(out)))
      return out

    return call

  monkeypatch.setattr(jax, "jit", counting_jit)
  params = train_state.init_variables(model, config, layout, note=lambda _: None)["params"]
  new = [p for p in rules.flatten(params) if not p.startswith(("image_encoder/", "text_encoder/"))]
  assert len(new) < len(rules.flatten(params)) // 4
  assert computed == [len(new)]


def test_a_checkpoint_that_does_not_fit_fails_before_anything_is_computed(
  setup, tiny_bert_dir, monkeypatch
):
  config, mesh, model, layout, _ = setup
  config.model_init.image_encoder = tiny_bert_dir
  monkeypatch.setattr(jax, "jit", lambda *a, **k: pytest.fail("jitted before the check"))
  with pytest.raises(hf.CheckpointError, match="image_encoder"):
    train_state.init_variables(model, config, layout, note=lambda _: None)


def test_lora_leaves_and_optimizer_state_are_sharded(tiny_vit_dir, tiny_bert_dir):
  config = fsdp_config(
    tiny_vit_dir,
    tiny_bert_dir,
    preset="lora",
    lora=dict(targets=[".*/attn/(query|value)/kernel"], rank=2),
  )
  mesh = sharding.make_mesh(config.mesh)
  model = fusion.build(config.model)
  layout = train_state.param_layout(model, config, mesh)
  variables = train_state.init_variables(model, config, layout, note=lambda _: None)
  params = variables["params"]
  flat = rules.flatten(params)
  assert any(p.endswith("/lora_a") for p in flat)
  assert jax.tree.map(lambda x: x.sharding, params) == layout.shardings
  tx, _ = optim.make(config.optim, layout.shapes, total_steps=10)
  state_shapes = {
    "step": jax.ShapeDtypeStruct((), np.int32),
    "params": layout.shapes,
    "opt_state": jax.eval_shape(tx.init, layout.shapes),
  }
  shardings = sharding.state_shardings(mesh, state_shapes, layout.shardings)
  state = train_state.init_state(variables, tx, shardings)
  assert int(state["step"]) == 0
  assert jax.tree.map(lambda x: x.sharding, state["opt_state"]) == shardings["opt_state"]


def test_new_layers_are_what_no_checkpoint_gives(setup, tiny_bert_dir):
  """The layout's new layers (trained in full by the bitfit and lora presets): the fusion
  and head, a tower without a checkpoint, and a checkpoint's dont_load."""
  _, _, model, layout, _ = setup
  assert layout.new_layers == ("fusion/.*", "head/.*")
  model_init = dict(
    image_encoder="", text_encoder=dict(name=tiny_bert_dir, dont_load=["pooler/.*"])
  )
  assert train_state.new_layers(model, model_init) == (
    "fusion/.*",
    "head/.*",
    "image_encoder/.*",
    "text_encoder/pooler/.*",
  )
  assert train_state.new_layers(model, {}) == (
    "fusion/.*",
    "head/.*",
    "image_encoder/.*",
    "text_encoder/.*",
  )
