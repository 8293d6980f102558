"""ConvNeXt and ConvNeXt V2 compute what transformers' PyTorch models compute, and round-trip.

Tiny odd-shaped random transformers models (3 stages of widths 12, 20, 28) with every
weight perturbed: transformers initializes layer scales to a constant and GRN to zeros,
which would hide mix-ups. "convnext" has a final-LayerNorm eps of 1e-2 (the others are
fixed at 1e-6), "convnext_p2" patch size 2, no layer scale and ReLU.
"""

import collections
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mmtl import hf, optim, rules
from mmtl.models import encoder, fusion
from tests import xla_settings
from tests.hf_fixtures import export_and_reload, perturb_weights

ATOL = 1e-5
TINY = dict(num_stages=3, hidden_sizes=[12, 20, 28])
CONFIGS = {
  "convnext": (
    transformers.ConvNextConfig,
    dict(depths=[1, 2, 1], patch_size=4, layer_scale_init_value=0.5, layer_norm_eps=1e-2),
  ),
  "convnext_p2": (
    transformers.ConvNextConfig,
    dict(depths=[2, 1, 1], patch_size=2, layer_scale_init_value=0.0, hidden_act="relu"),
  ),
  "convnextv2": (transformers.ConvNextV2Config, dict(depths=[1, 2, 1], patch_size=4)),
}
HEADS = {
  "convnext": transformers.ConvNextForImageClassification,
  "convnextv2": transformers.ConvNextV2ForImageClassification,
}


def _save_tiny(family: str, out: Path, head: bool = False) -> transformers.PreTrainedModel:
  config_cls, extra = CONFIGS[family]
  config = config_cls(**TINY, **extra, num_labels=3)
  torch.manual_seed(0)
  model = perturb_weights(
    HEADS[family](config) if head else transformers.AutoModel.from_config(config)
  )
  model.save_pretrained(out)
  return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[str, transformers.PreTrainedModel]]:
  """{family: (folder, the torch model saved there)}."""
  out = {}
  for family in CONFIGS:
    folder = tmp_path_factory.mktemp(family)
    out[family] = (str(folder), _save_tiny(family, folder))
  return out


@functools.partial(xla_settings.production_jit, static_argnums=0)
def _apply(module, variables, pixels):
  return module.apply(variables, pixels)


def _pixels(height=32, width=32, batch=2, seed=0):
  return np.random.default_rng(seed).standard_normal((batch, 3, height, width)).astype(np.float32)


def _check_parity(module, variables, torch_model, pixels):
  out = _apply(module, variables, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
  with torch.no_grad():
    ref = torch_model(pixel_values=torch.tensor(pixels))
  np.testing.assert_allclose(
    out["last_hidden_state"],
    ref.last_hidden_state.numpy().transpose(0, 2, 3, 1),
    atol=ATOL,
    rtol=0,
  )
  np.testing.assert_allclose(out["pooler_output"], ref.pooler_output.numpy(), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
  "family, size",
  [(f, size) for f in ("convnext", "convnextv2") for size in ((32, 32), (37, 50))]
  + [("convnext_p2", (37, 50))],
  ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v,
)
def test_parity(family, size, checkpoints):
  path, torch_model = checkpoints[family]
  module, variables, _ = hf.load_pretrained(path)
  assert isinstance(module, encoder.Encoder) and module.inputs == ("pixel_values",)
  assert (module.num_layers, module.hidden_size) == (0, 28)
  assert variables.keys() == {"params"}
  _check_parity(module, variables, torch_model, _pixels(*size))


def test_param_names(checkpoints):
  paths = {
    family: set(rules.flatten(hf.load_pretrained(path)[1]["params"]))
    for family, (path, _) in checkpoints.items()
  }
  shared = {
    "embeddings/patch_embeddings/kernel",
    "embeddings/norm/scale",
    "encoder/stage_0/layer_0/dwconv/kernel",
    "encoder/stage_1/layer_2/fc1/kernel",
    "encoder/stage_2/layer_3/downsample/conv/kernel",
    "encoder/stage_2/layer_3/fc2/bias",
    "layernorm/scale",
  }
  assert all(shared <= p for p in paths.values())
  for family in ("convnext", "convnextv2"):  # stage 1 starts at block 1, stage 2 at block 3
    downsamples = {p.rsplit("/downsample/", 1)[0] for p in paths[family] if "/downsample/" in p}
    assert downsamples == {"encoder/stage_1/layer_1", "encoder/stage_2/layer_3"}
  assert "encoder/stage_1/layer_2/downsample/norm/scale" in paths["convnext_p2"]
  assert "encoder/stage_1/layer_1/layer_scale" in paths["convnext"]
  assert not any("layer_scale" in p or "grn" in p for p in paths["convnext_p2"])
  assert {"encoder/stage_0/layer_0/grn/gamma", "encoder/stage_0/layer_0/grn/beta"} <= (
    paths["convnextv2"]
  )
  # A depthwise torch weight (C, 1, 7, 7) becomes nn.Conv(feature_group_count=C)'s kernel.
  shapes = rules.flatten(hf.variable_shapes(hf.build_module(checkpoints["convnext"][0])))
  assert shapes["params/encoder/stage_1/layer_2/dwconv/kernel"].shape == (7, 7, 1, 20)


def test_freeze_stem_and_first_stages(checkpoints):
  """One regex freezes the stem and stages 0-1, downsampling layers included."""
  params = {"image_encoder": hf.load_pretrained(checkpoints["convnext"][0])[1]["params"]}
  mask = rules.flatten(
    optim.freeze_mask(params, {"frozen": ["image_encoder/(embeddings|encoder/stage_[01])/.*"]})
  )
  frozen = {p for p, f in mask.items() if f}
  blocks = lambda paths: {p.split("/")[3] for p in paths if "/encoder/" in p}
  assert blocks(frozen) == {"layer_0", "layer_1", "layer_2"}
  assert blocks(set(mask) - frozen) == {"layer_3"}
  assert "image_encoder/encoder/stage_1/layer_1/downsample/conv/kernel" in frozen
  assert "image_encoder/embeddings/patch_embeddings/kernel" in frozen
  assert not mask["image_encoder/layernorm/scale"]


def test_layer_decay(checkpoints):
  params = {
    "image_encoder": hf.load_pretrained(checkpoints["convnext"][0])[1]["params"],
    "head": {"kernel": np.zeros((28, 2))},
  }
  mults = rules.flatten(optim.lr_mults(params, {"layer_decay": {"rate": 0.5}}))
  tower = "image_encoder/encoder"
  blocks = [
    mults[f"{tower}/stage_{s}/layer_{k}/fc1/kernel"] for s, k in ((0, 0), (1, 1), (1, 2), (2, 3))
  ]
  assert blocks == [0.5**4, 0.5**3, 0.5**2, 0.5**1]  # increasing with depth
  embeddings = {v for p, v in mults.items() if "/embeddings/" in p}
  assert embeddings == {0.5**5}  # below every block
  assert mults[f"{tower}/stage_1/layer_1/downsample/conv/kernel"] == blocks[1]
  assert mults[f"{tower}/stage_2/layer_3/downsample/norm/bias"] == blocks[3]
  assert mults["image_encoder/layernorm/scale"] == mults["head/kernel"] == 1.0


@pytest.mark.parametrize("family", list(CONFIGS))
def test_export_reloads_in_transformers(family, checkpoints, tmp_path):
  path, torch_model = checkpoints[family]
  module, variables, _ = hf.load_pretrained(path)
  reloaded = export_and_reload(module, variables, tmp_path)
  assert type(reloaded) is type(torch_model)
  pixels = torch.tensor(_pixels(37, 50))
  with torch.no_grad():
    ours, ref = reloaded(pixel_values=pixels), torch_model(pixel_values=pixels)
  for key in ("last_hidden_state", "pooler_output"):
    np.testing.assert_array_equal(ours[key].numpy(), ref[key].numpy())


@pytest.mark.parametrize("family", list(HEADS))
def test_image_classification_checkpoint(family, tmp_path):
  """The encoder of a *ForImageClassification checkpoint (under `convnext.` / `convnextv2.`)
  loads; the classifier is skipped."""
  torch_model = _save_tiny(family, tmp_path, head=True)
  module, variables, _ = hf.load_pretrained(tmp_path)
  _check_parity(module, variables, getattr(torch_model, module.hf_base_prefix), _pixels(37, 50))


def _zeros(shapes):
  """Zeros of the shapes in `shapes`, host arrays: a random init, or jnp.zeros per shape,
  compiles for long on CPU."""
  return jax.tree.map(lambda v: np.zeros(v.shape, v.dtype), shapes)


def test_checkpoint_errors(checkpoints):
  path = checkpoints["convnext"][0]
  wider = hf.build_module({**hf.read_config(path), "hidden_sizes": [12, 20, 30]})
  variables = {"params": {"image_encoder": _zeros(hf.variable_shapes(wider))["params"]}}
  with pytest.raises(hf.CheckpointError) as e:
    hf.load_into(variables, "image_encoder", path)
  msg = str(e.value)
  assert (
    "image_encoder/encoder/stage_2/layer_3/fc1/kernel: checkpoint (28, 112) vs model (30, 120)"
    in msg
  )
  assert "Build the module from the checkpoint's config.json" in msg

  # A V1 checkpoint into a V2 tower: GRN missing, layer scale unexpected.
  v2 = hf.build_module({**hf.read_config(path), "model_type": "convnextv2"})
  variables = {"params": {"image_encoder": _zeros(hf.variable_shapes(v2))["params"]}}
  with pytest.raises(hf.CheckpointError) as e:
    hf.load_into(variables, "image_encoder", path)
  assert "missing from the checkpoint: image_encoder/encoder/stage_0/layer_0/grn/" in str(e.value)
  assert "does not have: image_encoder/encoder/stage_0/layer_0/layer_scale" in str(e.value)


def test_input_errors(checkpoints):
  module, variables, _ = hf.load_pretrained(checkpoints["convnext"][0])
  with pytest.raises(ValueError, match=r"transpose NCHW"):
    jax.eval_shape(module.apply, variables, np.zeros((1, 3, 32, 32)))
  with pytest.raises(ValueError, match=r"downsamples by 16x16"):
    jax.eval_shape(module.apply, variables, np.zeros((1, 32, 12, 3)))
  with pytest.raises(ValueError, match=r"one hidden size and one depth per stage"):
    hf.build_module(dict(model_type="convnext", num_stages=3, hidden_sizes=[12, 20]))
  with pytest.raises(ValueError, match="remat='some'"):
    hf.variable_shapes(module.clone(remat="some"))


@functools.partial(jax.jit, static_argnums=0)
def _train_apply(module, variables, pixels, rng):
  return module.apply(variables, pixels, deterministic=False, rngs={"dropout": rng})


def _eqns(module, variables, x, rng=None):
  """The computation `module` runs (a jaxpr's equations): equal ones compute equal outputs,
  and comparing them compiles nothing."""
  kw = {} if rng is None else dict(deterministic=False, rngs={"dropout": rng})
  return str(jax.make_jaxpr(lambda v: module.apply(v, x, **kw))(variables).eqns)


def test_drop_path(checkpoints):
  """Stochastic depth: per example, only in training, from the "dropout" rng."""
  path, _ = checkpoints["convnext"]
  module, variables, config = hf.load_pretrained(path)
  dropping = hf.build_module({**config, "drop_path_rate": 0.6})
  x = jnp.asarray(np.repeat(_pixels(batch=1), 2, 0).transpose(0, 2, 3, 1))  # 2 equal images
  eval_out = np.asarray(_apply(module, variables, x)["last_hidden_state"])
  train = [
    np.asarray(_train_apply(dropping, variables, x, jax.random.PRNGKey(i))["last_hidden_state"])
    for i in range(4)
  ]
  assert not np.allclose(train[0], train[1], atol=1e-3)
  assert not all(np.allclose(t, eval_out, atol=1e-3) for t in train)
  # A mask per example: some key drops different blocks for the two equal images.
  assert not all(np.allclose(t[0], t[1], atol=1e-3) for t in train)
  # No drop path at inference; and with drop_path_rate 0, training computes what inference does.
  assert _eqns(dropping, variables, x) == _eqns(module, variables, x)
  assert _eqns(module, variables, x, jax.random.PRNGKey(1)) == _eqns(module, variables, x)
  assert _eqns(dropping, variables, x, jax.random.PRNGKey(1)) != _eqns(module, variables, x)


def test_remat(checkpoints):
  """remat wraps each block in jax.checkpoint (jaxprs only: compiling gradients is slow)."""
  module, variables, _ = hf.load_pretrained(checkpoints["convnextv2"][0])
  x = jnp.asarray(_pixels().transpose(0, 2, 3, 1))

  def primitives(m):
    def loss(params):
      out = m.apply({"params": params}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
      return out["pooler_output"].sum()

    jaxpr = jax.make_jaxpr(jax.grad(loss))(variables["params"])
    return collections.Counter(e.primitive.name for e in jaxpr.eqns)

  plain, remat = primitives(module), primitives(module.clone(remat="full"))
  added = set(remat) - set(plain)  # jax.checkpoint's primitive
  assert len(added) == 1 and remat[added.pop()] == 4  # one per block


@pytest.mark.parametrize("fusion_type", ["concat", "cross_attention"])
def test_fusion_tower(fusion_type, checkpoints):
  path, _ = checkpoints["convnextv2"]
  text = hf.build_module(
    dict(
      model_type="bert",
      vocab_size=50,
      hidden_size=16,
      num_hidden_layers=1,
      num_attention_heads=2,
      intermediate_size=32,
    )
  )
  model = fusion.FusionModel(
    towers=dict(image=hf.build_module(path), text=text),
    fusion_type=fusion_type,
    pools=dict(image="pooler"),
    width=8,
  )
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), model.dummy_batch())
  variables = _zeros(shapes)
  loaded = hf.load_into(variables, "image_encoder", path)
  jax.tree.map(
    np.testing.assert_array_equal,
    loaded["params"]["image_encoder"],
    hf.load_pretrained(path)[1]["params"],
  )
  assert loaded["params"]["text_encoder"] is variables["params"]["text_encoder"]
  batch = dict(
    pixel_values=jnp.asarray(_pixels(37, 50).transpose(0, 2, 3, 1)),
    input_ids=np.ones((2, 5), np.int32),
    attention_mask=np.ones((2, 5), np.int32),
  )
  if fusion_type == "concat":  # traced only: the tower's numbers are test_parity's
    out = jax.eval_shape(model.apply, loaded, batch)
  else:
    out = jax.jit(model.apply)(loaded, batch)
    assert np.isfinite(out["features"]).all()
  assert out["logits"].shape == (2, 2)
