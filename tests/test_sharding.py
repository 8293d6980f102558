"""Mesh, sharding rules and sharded training on 8 simulated CPU devices, with the batch placement
(mmtl.data.device) and memory estimate (mmtl.memory) they feed."""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from mmtl import memory, rules, sharding
from mmtl.data import device
from mmtl.models import layers
from tests import sharding_toy as toy

MESHES = [  # (mesh config, rules); the reference is 1 device with no sharding.
  (dict(data=8), "fsdp_tp"),
  (dict(data=2, fsdp=4), "fsdp"),
  (dict(data=2, fsdp=2, model=2), "fsdp_tp"),
]


@pytest.fixture(scope="module")
def reference():
  return toy.reference_run((("data", 1),), "replicate", 3, num_devices=1)


def test_make_mesh_sizes_and_errors():
  mesh = sharding.make_mesh(dict(data=-1, fsdp=2, model=2))
  assert dict(mesh.shape) == dict(data=2, fsdp=2, model=2)
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert dict(sharding.make_mesh(dict(fsdp=-1)).shape) == dict(data=1, fsdp=8, model=1)
  with pytest.raises(ValueError, match="do not divide the 8 devices"):
    sharding.make_mesh(dict(data=-1, model=3))
  with pytest.raises(ValueError, match="uses 4 devices but there are 8"):
    sharding.make_mesh(dict(data=2, fsdp=2))
  with pytest.raises(ValueError, match="unknown axes.*tensor"):
    sharding.make_mesh(dict(data=-1, tensor=2))


@pytest.mark.parametrize("mesh_cfg,rule_set", MESHES, ids=lambda v: str(v))
def test_sharded_training_matches_one_device(reference, mesh_cfg, rule_set):
  ref_state, ref_losses = reference
  state, losses = toy.reference_run(tuple(mesh_cfg.items()), rule_set, 3)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert losses[-1] < losses[0]
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), state, ref_state
  )


def test_params_and_optimizer_state_really_sharded():
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, model=2))
  state = toy.init_state(mesh, "fsdp_tp")
  layer = "image_encoder/encoder/layer_0"
  params = rules.flatten(state["params"])
  expect = {  # path: (spec, per-device shard shape); WIDTH=16, hidden 32, 3 classes
    f"{layer}/attn/query/kernel": (P("fsdp", "model"), (8, 8)),
    f"{layer}/attn/query/bias": (P("model"), (8,)),
    f"{layer}/attn/out/kernel": (P("model", "fsdp"), (8, 8)),
    f"{layer}/mlp/fc1/kernel": (P("fsdp", "model"), (8, 16)),
    f"{layer}/mlp/fc2/kernel": (P("model", "fsdp"), (16, 8)),
    f"{layer}/mlp/fc2/bias": (P("fsdp"), (8,)),
    "head/kernel": (P("fsdp"), (8, 3)),
    "head/bias": (P(), (3,)),  # 3 is not divisible by fsdp=2: replicated
  }
  for path, (spec, shard_shape) in expect.items():
    assert params[path].sharding.spec == spec, path
    assert {s.data.shape for s in params[path].addressable_shards} == {shard_shape}, path
  adam = rules.flatten(state["opt_state"])
  assert adam[f"0/mu/{layer}/attn/query/kernel"].sharding.spec == P("fsdp", "model")
  assert adam[f"0/nu/{layer}/mlp/fc2/kernel"].sharding.spec == P("model", "fsdp")
  assert adam["0/count"].sharding.spec == P()
  assert state["step"].sharding.spec == P()


def test_explicit_rules_and_divisibility_fallback():
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, model=2))
  params = {"a": {"kernel": jnp.zeros((6, 4))}, "b": {"kernel": jnp.zeros((3, 5))}}
  rule_list = [("a/.*", (("data", "fsdp"), "model")), ("b/.*", ("model", "fsdp"))]
  specs = jax.tree.map(lambda s: s.spec, sharding.param_shardings(mesh, params, rule_list))
  assert specs == {
    "a": {"kernel": P(None, "model")},  # 6 % (2*2) != 0 -> that dim replicated
    "b": {"kernel": P()},
  }
  with pytest.raises(rules.RuleError, match="c/.*"):
    sharding.param_shardings(mesh, params, rule_list + [("c/.*", "fsdp")])
  with pytest.raises(ValueError, match="unknown mesh axes"):
    sharding.param_shardings(mesh, params, [(".*", ("tensor",))])
  with pytest.raises(ValueError, match="has 3 entries"):
    sharding.param_shardings(mesh, params, [(".*", (None, None, "model"))])
  with pytest.raises(ValueError, match="not a preset"):
    sharding.param_shardings(mesh, params, "zero3")


def test_presets_address_the_real_encoder_names():
  """The preset regexes must match the param names of mmtl's encoder layers."""
  spec = layers.LayerSpec(
    hidden_size=16, num_heads=2, mlp_dim=32, activation="gelu", layer_norm_eps=1e-6, pre_norm=True
  )
  encoder = layers.Encoder(spec, num_layers=1)
  shapes = jax.eval_shape(
    lambda: encoder.init(jax.random.key(0), jnp.zeros((1, 4, 16)), jnp.ones((1, 4), bool), 0, 1)
  )["params"]
  mesh = sharding.make_mesh(dict(data=4, model=2))
  shardings = sharding.param_shardings(mesh, shapes, "tp")
  specs = {path: s.spec for path, s in rules.flatten(shardings).items()}
  column = [
    k for k in specs if k.endswith(("query/kernel", "key/kernel", "value/kernel", "fc1/kernel"))
  ]
  row = [k for k in specs if k.endswith(("out/kernel", "fc2/kernel"))]
  assert len(column) == 4 and len(row) == 2, sorted(specs)
  assert all(specs[k] == P(None, "model") for k in column)
  assert all(specs[k] == P("model") for k in row)


def test_lora_factors_follow_their_kernel_split():
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, model=2))
  params = {
    "layer_0": {
      "attn": {
        "query": {"lora_a": np.zeros((16, 4)), "lora_b": np.zeros((4, 16))},
        "out": {"lora_a": np.zeros((16, 4)), "lora_b": np.zeros((4, 16))},
      }
    }
  }
  specs = {
    k: v.spec for k, v in rules.flatten(sharding.param_shardings(mesh, params, "fsdp_tp")).items()
  }
  assert specs["layer_0/attn/query/lora_b"] == P(None, "model")  # columns, like the kernel
  assert specs["layer_0/attn/out/lora_a"] == P("model")  # rows, like the kernel
  assert specs["layer_0/attn/query/lora_a"] == P("fsdp")  # the rest: fsdp


def test_batch_placement_and_data_shard():
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, model=2))
  assert sharding.process_data_shard(mesh) == (0, 1)
  batch = device.put_batch(toy.global_batch(0), mesh)
  assert batch["x"].shape == (16, 4, 8)
  assert batch["x"].sharding.spec == P(("data", "fsdp"))
  assert {s.data.shape for s in batch["x"].addressable_shards} == {(4, 4, 8)}
  with pytest.raises(ValueError, match="multiple of data\\*fsdp=4"):
    device.put_batch({"x": np.zeros((6, 2))}, mesh)


def test_memory_estimate_counts_shards_and_remat():
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, model=2))
  shapes, shardings = toy.state_shardings(mesh, "fsdp_tp")
  one = sharding.make_mesh(dict(data=1), devices=jax.devices()[:1])
  _, one_shardings = toy.state_shardings(one, "fsdp_tp")
  params_total = sum(x.size * 4 for x in jax.tree.leaves(shapes["params"]))
  assert memory.bytes_per_device(shapes["params"], one_shardings["params"]) == params_total
  sharded = memory.bytes_per_device(shapes["params"], shardings["params"])
  assert params_total / 8 < sharded < params_total / 2

  batch = jax.eval_shape(lambda: toy.global_batch(0))
  plain = memory.activation_bytes(toy.loss_fn, shapes["params"], batch)
  remat = memory.activation_bytes(
    lambda p, b: toy.loss_fn(p, b, toy.ToyModel(remat=True)), shapes["params"], batch
  )
  assert 0 < remat < plain
  # At least the MLP hidden activation (B, T, 2*WIDTH) float32 is kept.
  assert plain >= 16 * 4 * 32 * 4
  estimate = memory.memory_estimate(mesh, shapes, shardings, activations=plain)
  assert estimate["params"] == sharded
  assert estimate["activations"] == plain // 4
  assert estimate["total"] == sum(v for k, v in estimate.items() if k != "total")
  assert memory.format_memory(estimate).startswith("Estimated memory per device:")


class _CountingSource:
  """Iterator with grain's get_state protocol: the state is the next index."""

  def __init__(self, n):
    self.next_index, self.n = 0, n

  def __next__(self):
    if self.next_index == self.n:
      raise StopIteration
    self.next_index += 1
    return self.next_index - 1

  def get_state(self):
    return {"next_index": self.next_index}


def test_device_prefetch_depth_order_and_state():
  put_calls = []

  def put(x):
    put_calls.append(x)
    return x * 10

  source = _CountingSource(5)
  stream = device.DevicePrefetch(source, put, size=2)
  assert stream.get_state() == {"next_index": 0}
  assert next(stream) == 0 and put_calls == [0, 1, 2]  # two more in flight
  # The source has been read up to 3, but a resume must start at the first unseen batch.
  assert source.get_state() == {"next_index": 3} and stream.get_state() == {"next_index": 1}
  assert next(stream) == 10 and stream.get_state() == {"next_index": 2}
  assert list(stream) == [20, 30, 40] and stream.get_state() == {"next_index": 5}
