"""ResNet computes what transformers' PyTorch ResNetModel computes, in eval and training mode,
and round-trips (safetensors both ways, HF Flax msgpack in).

Tiny odd-shaped random transformers models, basic and bottleneck blocks, both downsampling
switches and a non-relu `hidden_act` (a block's inner convs stay relu in transformers). Every
weight is perturbed and the BatchNorm running statistics are set per channel away from 0/1:
calibrated on a batch, then perturbed, with BatchNorm weights around 0.5, so activations stay
O(1). XLA compiles conv nets (random inits, dropout and gradients above all) slowly on CPU: each
test compiles as few programs as it can, and shared input shapes hit the jit caches.
"""

import copy
import functools
import json
from pathlib import Path
import re

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mmtl import hf, optim, rules, train_step
from mmtl.models import encoder, fusion, layers
from tests import xla_settings
from tests.hf_fixtures import export_and_reload, perturb_weights

# 1e-5, relative for the larger values: 13 convs deep, float32 noise reaches ~1e-5 at outputs of
# magnitude ~3 (torch's own float32 output is ~8e-6 off its float64 one); mix-ups are ~1e-1.
TOL = dict(atol=1e-5, rtol=1e-5)
TINY = dict(embedding_size=12, hidden_sizes=[12, 20, 28], depths=[1, 2, 1])
CONFIGS = {
  "basic": dict(layer_type="basic", hidden_act="gelu", downsample_in_first_stage=True),
  # Stage 0 maps 8 -> 12 channels at stride 1: a projection shortcut without downsampling.
  "bottleneck": dict(layer_type="bottleneck", embedding_size=8, downsample_in_bottleneck=True),
}
NUM_BLOCKS = sum(TINY["depths"])


def _perturb(model: torch.nn.Module, seed: int) -> None:
  """Random weights and per-channel running statistics of the size of real activations."""
  torch.manual_seed(seed)
  norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  perturb_weights(model)
  with torch.no_grad():
    for m in norms:
      m.weight.mul_(0.5)
      m.momentum = 1.0  # running statistics := this batch's
    model.train()(torch.randn(4, 3, 40, 40))
    for m in norms:
      m.momentum = 0.1
      m.running_var.mul_(0.7 + 0.7 * torch.rand_like(m.running_var))
      m.running_mean.add_(0.2 * m.running_var.sqrt() * torch.randn_like(m.running_mean))
  model.eval()


def _save_tiny(folder: Path, seed: int, **config) -> transformers.ResNetModel:
  model = transformers.ResNetModel(transformers.ResNetConfig(**config))
  _perturb(model, seed)
  model.save_pretrained(folder)
  return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[str, transformers.ResNetModel]]:
  """{name: (folder, the torch ResNetModel saved there, in eval mode)}."""
  out = {}
  for i, (name, extra) in enumerate(CONFIGS.items()):
    folder = tmp_path_factory.mktemp(name)
    out[name] = (str(folder), _save_tiny(folder, i, **{**TINY, **extra}))
  return out


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> str:
  """One block (projection shortcut): for tests whose programs would take long to compile."""
  folder = tmp_path_factory.mktemp("small")
  _save_tiny(folder, 7, embedding_size=8, hidden_sizes=[12], depths=[1], layer_type="basic")
  return str(folder)


@functools.partial(xla_settings.production_jit, static_argnums=0)
def _eval(module, variables, pixels):
  return module.apply(variables, pixels)


@functools.partial(xla_settings.production_jit, static_argnums=0)
def _train(module, variables, pixels):
  return module.apply(variables, pixels, deterministic=False, mutable=["batch_stats"])


def _pixels(height=45, width=38, batch=2, seed=0):
  return np.random.default_rng(seed).standard_normal((batch, 3, height, width)).astype(np.float32)


def _nhwc(pixels):
  return jnp.asarray(pixels.transpose(0, 2, 3, 1))


def _torch_outputs(model, pixels):
  with torch.no_grad():
    ref = model(pixel_values=torch.tensor(pixels))
  return ref.last_hidden_state.numpy().transpose(0, 2, 3, 1), ref.pooler_output.numpy()[:, :, 0, 0]


def _check_outputs(out, ref):
  np.testing.assert_allclose(out["last_hidden_state"], ref[0], **TOL)
  np.testing.assert_allclose(out["pooler_output"], ref[1], **TOL)


@pytest.mark.parametrize(
  "name, size",
  # Non-square and not a multiple of 32 (a 2x2 map with basic's extra downsampling); square,
  # down to a 1x1 map.
  [("basic", (45, 38)), ("bottleneck", (45, 38)), ("basic", (32, 32))],
)
def test_parity_eval(name, size, checkpoints):
  path, torch_model = checkpoints[name]
  module, variables, _ = hf.load_pretrained(path)
  assert isinstance(module, encoder.Encoder) and module.inputs == ("pixel_values",)
  assert (module.num_layers, module.hidden_size) == (0, 28)
  assert set(variables) == {"params", "batch_stats"}
  pixels = _pixels(*size)
  _check_outputs(_eval(module, variables, _nhwc(pixels)), _torch_outputs(torch_model, pixels))


def _torch_train_step(torch_model, pixels):
  """Outputs and state dict after one training-mode forward of a copy of `torch_model`."""
  model = copy.deepcopy(torch_model).train()
  ref = _torch_outputs(model, pixels)
  return ref, {k: v.numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_training(name, checkpoints):
  """Batch statistics normalize, and the running ones move as torch's do (momentum 0.1,
  unbiased variance)."""
  path, torch_model = checkpoints[name]
  module, variables, _ = hf.load_pretrained(path)
  pixels = _pixels()
  ref, state = _torch_train_step(torch_model, pixels)
  out, updates = _train(module, variables, _nhwc(pixels))
  _check_outputs(out, ref)
  names = module.hf_batch_stats_names()
  updated = rules.flatten(updates["batch_stats"])
  assert set(updated) == set(names)
  for p, x in updated.items():
    np.testing.assert_allclose(x, state[names[p].key], **TOL, err_msg=p)
    assert not np.allclose(x, rules.flatten(variables["batch_stats"])[p])


def test_remat(small_checkpoint):
  """remat wraps each block in jax.checkpoint (seen in the gradient's jaxpr: compiling
  gradients of conv nets takes XLA long on CPU) and changes no value, statistics included."""
  pixels = _nhwc(_pixels(16, 16))
  results, jaxprs = [], []
  for remat in ("none", "full"):
    module, variables, _ = hf.load_pretrained(small_checkpoint, remat=remat)
    results.append(_train(module, variables, pixels))

    def loss(params, module=module, variables=variables):
      out, _ = module.apply(
        {**variables, "params": params}, pixels, deterministic=False, mutable=["batch_stats"]
      )
      return jnp.sum(out["pooler_output"] ** 2)

    jaxprs.append(str(jax.make_jaxpr(jax.grad(loss))(variables["params"])))
  jax.tree.map(np.testing.assert_array_equal, *results)
  assert "remat2[" not in jaxprs[0] and "remat2[" in jaxprs[1]  # jax.checkpoint's primitive
  with pytest.raises(ValueError, match="remat='every'"):
    hf.load_pretrained(small_checkpoint, remat="every")


def test_frozen_statistics(checkpoints):
  """Statistics passed as FROZEN_BATCH_STATS in training mode: used as in eval mode, and
  nothing comes back to update."""
  path, _ = checkpoints["basic"]
  module, variables, _ = hf.load_pretrained(path)
  pixels = _nhwc(_pixels())
  frozen = {"params": variables["params"], layers.FROZEN_BATCH_STATS: variables["batch_stats"]}
  out, updates = _train(module, frozen, pixels)
  for key, ref in _eval(module, variables, pixels).items():
    np.testing.assert_array_equal(out[key], ref)
  assert not jax.tree.leaves(updates)


def test_param_names(checkpoints):
  """Uniform names: stem `embeddings/{conv,norm}`, blocks `encoder/stage_s/layer_k` with k over
  all stages, `conv_i`/`norm_i` and `shortcut/{conv,norm}`."""
  module, variables, _ = hf.load_pretrained(checkpoints["basic"][0])
  params = rules.flatten(variables["params"])
  assert {
    "embeddings/conv/kernel",
    "embeddings/norm/scale",
    "encoder/stage_0/layer_0/conv_1/kernel",
    "encoder/stage_0/layer_0/shortcut/conv/kernel",  # downsample_in_first_stage
    "encoder/stage_1/layer_2/norm_1/bias",
    "encoder/stage_1/layer_1/shortcut/conv/kernel",
    "encoder/stage_2/layer_3/shortcut/norm/scale",
  } <= set(params)
  assert not any("layer_2/shortcut" in p for p in params)  # identity shortcut
  blocks = {re.search(r"/(stage_\d+/layer_\d+)/", p).group(1) for p in params if "/layer_" in p}
  assert blocks == {"stage_0/layer_0", "stage_1/layer_1", "stage_1/layer_2", "stage_2/layer_3"}
  norms = {p.removesuffix("/scale") for p in params if p.endswith("/scale")}
  stats = rules.flatten(variables["batch_stats"])
  assert set(stats) == {f"{norm}/{s}" for norm in norms for s in ("mean", "var")}
  assert params["embeddings/conv/kernel"].shape == (7, 7, 3, 12)  # HWIO


def _export_checks(module, variables, out_dir, torch_cls):
  """export_and_reload's checks for any `torch_cls` (a classifier misses its new head): the
  transformers model and its missing keys (torch's `num_batches_tracked` counters included
  in what is written)."""
  out = hf.save_pretrained(module, variables, out_dir)
  jax.tree.map(np.testing.assert_array_equal, hf.load_pretrained(out)[1], variables)
  torch_model, info = torch_cls.from_pretrained(out, output_loading_info=True)
  assert not info["unexpected_keys"] and not info["mismatched_keys"]
  return torch_model.eval(), set(info["missing_keys"])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_reloads_in_transformers(name, checkpoints, tmp_path):
  path, torch_model = checkpoints[name]
  module, variables, _ = hf.load_pretrained(path)
  reloaded, missing = _export_checks(module, variables, tmp_path, transformers.AutoModel)
  assert type(reloaded) is transformers.ResNetModel and not missing
  pixels = _pixels()
  ref = _torch_outputs(torch_model, pixels)
  for ours, theirs in zip(_torch_outputs(reloaded, pixels), ref):
    np.testing.assert_array_equal(ours, theirs)
  # Into the classifier: the encoder under `resnet.`, only the new head missing.
  classifier, missing = _export_checks(
    module, variables, tmp_path, transformers.ResNetForImageClassification
  )
  assert missing == {"classifier.1.weight", "classifier.1.bias"}
  for ours, theirs in zip(_torch_outputs(classifier.resnet, pixels), ref):
    np.testing.assert_array_equal(ours, theirs)


def test_export_has_no_missing_keys(checkpoints, tmp_path):
  module, variables, _ = hf.load_pretrained(checkpoints["bottleneck"][0])
  export_and_reload(module, variables, tmp_path)


def test_loads_image_classification_checkpoint(checkpoints, tmp_path):
  """A ResNetForImageClassification checkpoint: the encoder under `resnet.`, the head skipped."""
  path, torch_model = checkpoints["bottleneck"]
  classifier = transformers.ResNetForImageClassification(
    transformers.ResNetConfig(**{**TINY, **CONFIGS["bottleneck"]}, num_labels=3)
  )
  classifier.resnet.load_state_dict(torch_model.state_dict())
  classifier.save_pretrained(tmp_path)
  assert any(k.startswith("resnet.") for k in hf.read_weights(tmp_path))
  jax.tree.map(
    np.testing.assert_array_equal, hf.load_pretrained(tmp_path)[1], hf.load_pretrained(path)[1]
  )


def _hf_flax_msgpack(torch_model, layer_type: str) -> bytes:
  """flax_model.msgpack as transformers 4.x's FlaxResNetModel wrote it: {"params",
  "batch_stats"} under torch's module names, except that FlaxResNetBasicLayerCollection
  holds its convs in a list (`layer.layer_0`, where torch has `layer.0`); HWIO kernels,
  BatchNorm `scale` and `mean`/`var`, no `num_batches_tracked`."""
  flat = {}
  for key, x in torch_model.state_dict().items():
    if key.endswith("num_batches_tracked"):
      continue
    if layer_type == "basic":
      key = re.sub(r"\.layer\.(\d+)\.", r".layer.layer_\1.", key)
    *parents, leaf = key.split(".")
    x = x.numpy()
    collection = "batch_stats" if leaf.startswith("running_") else "params"
    if leaf == "weight":
      leaf, x = ("kernel", x.transpose(2, 3, 1, 0)) if x.ndim == 4 else ("scale", x)
    leaf = {"running_mean": "mean", "running_var": "var"}.get(leaf, leaf)
    flat["/".join([collection, *parents, leaf])] = x
  return flax.serialization.msgpack_serialize(rules.unflatten(flat))


def _check_reads_flax(name, checkpoints, folder: Path):
  path, torch_model = checkpoints[name]
  (folder / "flax_model.msgpack").write_bytes(
    _hf_flax_msgpack(torch_model, CONFIGS[name]["layer_type"])
  )
  (folder / "config.json").write_text(json.dumps(hf.read_config(path)))
  jax.tree.map(
    np.testing.assert_array_equal, hf.load_pretrained(folder)[1], hf.load_pretrained(path)[1]
  )


def test_reads_hf_flax_msgpack(checkpoints, tmp_path):
  _check_reads_flax("bottleneck", checkpoints, tmp_path)


def test_reads_hf_flax_msgpack_basic(checkpoints, tmp_path):
  _check_reads_flax("basic", checkpoints, tmp_path)


def _tower(name: str, **overrides) -> layers.ConvTower:
  return hf.build_module(dict(model_type="resnet", **{**TINY, **CONFIGS[name], **overrides}))


def test_shape_mismatch_names_the_path_and_the_fix(checkpoints):
  module = _tower("basic", hidden_sizes=[12, 20, 32])
  variables = {c: {"image_encoder": tree} for c, tree in hf.variable_shapes(module).items()}
  with pytest.raises(hf.CheckpointError) as e:
    hf.load_into(variables, "image_encoder", checkpoints["basic"][0])
  assert (
    "image_encoder/encoder/stage_2/layer_3/conv_0/kernel: checkpoint (3, 3, 20, 28) vs model "
    "(3, 3, 20, 32)" in str(e.value)
  )
  assert "mmtl.hf.build_module" in str(e.value)


def test_wrong_family_fails_clearly(tiny_vit_dir):
  variables = {c: {"image_encoder": t} for c, t in hf.variable_shapes(_tower("basic")).items()}
  with pytest.raises(hf.CheckpointError) as e:
    hf.load_into(variables, "image_encoder", tiny_vit_dir)
  msg = str(e.value)
  assert "missing from the checkpoint: image_encoder/embeddings/conv/kernel" in msg
  assert "the model does not have: image_encoder/embeddings/cls_token" in msg


def test_bad_inputs_and_config():
  module = _tower("basic")
  with pytest.raises(ValueError, match=r"expects NHWC \(B, H, W, 3\).*transpose"):
    jax.eval_shape(module.apply, hf.variable_shapes(module), jnp.zeros((1, 3, 32, 32)))
  with pytest.raises(ValueError, match="layer_type='wide'"):
    _tower("basic", layer_type="wide")


def _random_variables(shapes, seed=0):
  """Random values for variable `shapes` (e.g. `hf.variable_shapes(module)`) with positive
  running variances: XLA takes long on CPU to compile random inits of conv nets."""
  rng = np.random.default_rng(seed)
  draw = {
    "params": lambda shape: 0.3 * rng.standard_normal(shape),
    "batch_stats": lambda shape: 0.5 + rng.random(shape),
  }
  return {
    c: jax.tree.map(lambda x, c=c: jnp.asarray(draw[c](x.shape), x.dtype), tree)
    for c, tree in shapes.items()
  }


@pytest.mark.parametrize("fusion_type", ["cross_attention", "concat"])
def test_fusion_tower(fusion_type, small_checkpoint, tiny_bert_dir):
  """In a FusionModel: init, eval, training (statistics move), and load_into fills the
  tower's params and batch_stats."""
  path = small_checkpoint
  resnet, resnet_variables, _ = hf.load_pretrained(path)
  model = fusion.FusionModel(
    towers=dict(
      image=resnet,
      # One layer, no dropout (random masks take XLA long to compile on CPU); random params.
      text=hf.build_module(
        {
          **hf.read_config(tiny_bert_dir),
          "num_hidden_layers": 1,
          "hidden_dropout_prob": 0,
          "attention_probs_dropout_prob": 0,
        }
      ),
    ),
    fusion_type=fusion_type,
    head_config=dict(num_classes=3),
    width=8,
    num_heads=2,
    pools=dict(image="pooler"),
  )
  rng = np.random.default_rng(0)
  batch = {
    "pixel_values": rng.standard_normal((2, 45, 38, 3)).astype(np.float32),
    "input_ids": rng.integers(5, 40, (2, 6)).astype(np.int32),
    "attention_mask": np.ones((2, 6), np.int32),
    "token_type_ids": np.zeros((2, 6), np.int32),
  }
  # Initialized as shapes, then values: a compiled random init takes XLA minutes on CPU.
  variables = _random_variables(jax.eval_shape(model.init, jax.random.key(0), model.dummy_batch()))
  assert set(variables) == {"params", "batch_stats"}
  assert set(variables["batch_stats"]) == {"image_encoder"}
  loaded = hf.load_into(variables, "image_encoder", path)
  for c in ("params", "batch_stats"):
    jax.tree.map(np.testing.assert_array_equal, loaded[c]["image_encoder"], resnet_variables[c])
  logits, train_logits, updates = _fusion_run(model, loaded, batch)
  assert logits.shape == train_logits.shape == (2, 3)
  moved = jax.tree.map(
    lambda a, b: not np.allclose(a, b), updates["batch_stats"], loaded["batch_stats"]
  )
  assert all(jax.tree.leaves(moved))


@functools.partial(jax.jit, static_argnums=0)
def _fusion_run(model, variables, batch):
  """Eval logits, and training logits with the updated statistics."""
  logits = model.apply(variables, batch)["logits"]
  out, updates = model.apply(
    variables, batch, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)}
  )
  return logits, out["logits"], updates


def test_freezing_and_layer_decay(checkpoints):
  """One regex freezes the stem and stages 0-1 (their statistics with them); layer-wise decay
  counts blocks as layers and the stem as the embedding."""
  _, variables, _ = hf.load_pretrained(checkpoints["bottleneck"][0])
  params = {"image_encoder": variables["params"]}
  mask = rules.flatten(
    optim.freeze_mask(params, {"frozen": [r"image_encoder/(embeddings|encoder/stage_[01])/.*"]})
  )
  assert all(
    frozen == (not p.startswith("image_encoder/encoder/stage_2/")) for p, frozen in mask.items()
  )
  stats_frozen = train_step.frozen_batch_stats(
    {"image_encoder": variables["batch_stats"]}, rules.unflatten(mask), "trainable"
  )
  assert all(
    frozen == (not p.startswith("image_encoder/encoder/stage_2/"))
    for p, frozen in stats_frozen.items()
  )

  rate = 0.5
  mults = rules.flatten(optim.lr_mults(params, {"layer_decay": {"rate": rate}}))
  for p, m in mults.items():
    found = re.search(r"/layer_(\d+)/", p)
    expected = rate ** (NUM_BLOCKS - int(found.group(1))) if found else rate ** (NUM_BLOCKS + 1)
    assert m == pytest.approx(expected), p
  assert min(mults.values()) == mults["image_encoder/embeddings/conv/kernel"]
