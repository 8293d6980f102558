"""DINOv2 and DeiT compute what transformers' PyTorch models compute, and round-trip.

Tiny odd-shaped random transformers models (hidden 36, 3 heads, 28 px images, patch 7)
with every weight perturbed (transformers initializes DeiT's tokens and position
embeddings to zeros and layer scales to a constant, which would hide mix-ups).
"""

import functools
import json
from pathlib import Path

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mmtl import config as config_lib
from mmtl import hf, rules
from mmtl.models import encoder, fusion, layers
from tests import xla_settings
from tests.hf_fixtures import export_and_reload, perturb_weights

ATOL = 1e-5
TINY = dict(hidden_size=36, num_hidden_layers=2, num_attention_heads=3, image_size=28, patch_size=7)
CONFIGS = {
  "dinov2": (transformers.Dinov2Config, dict(mlp_ratio=2, layerscale_value=0.3)),
  "dinov2_swiglu": (transformers.Dinov2Config, dict(mlp_ratio=3, use_swiglu_ffn=True)),
  "deit": (transformers.DeiTConfig, dict(intermediate_size=40, pooler_output_size=20)),
}


def _save_tiny(family: str, out: Path) -> transformers.PreTrainedModel:
  config_cls, extra = CONFIGS[family]
  torch.manual_seed(0)
  model = perturb_weights(transformers.AutoModel.from_config(config_cls(**TINY, **extra)))
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
def _apply(module, variables, pixels, bool_masked_pos=None):
  kw = {} if bool_masked_pos is None else dict(bool_masked_pos=bool_masked_pos)
  return module.apply(variables, pixels, **kw)


def _pixels(height=28, width=28, batch=2, seed=0):
  return np.random.default_rng(seed).standard_normal((batch, 3, height, width)).astype(np.float32)


def _check_parity(module, variables, torch_model, pixels, bool_masked_pos=None):
  nhwc = jnp.asarray(pixels.transpose(0, 2, 3, 1))
  masked = None if bool_masked_pos is None else jnp.asarray(bool_masked_pos)
  out = _apply(module, variables, nhwc, masked)
  kw = {} if bool_masked_pos is None else dict(bool_masked_pos=torch.tensor(bool_masked_pos))
  with torch.no_grad():
    ref = torch_model(pixel_values=torch.tensor(pixels), **kw)
  for key in ("last_hidden_state", "pooler_output"):
    np.testing.assert_allclose(out[key], ref[key].numpy(), atol=ATOL, rtol=0, err_msg=key)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_parity(family, checkpoints):
  path, torch_model = checkpoints[family]
  module, variables, _ = hf.load_pretrained(path)
  assert isinstance(module, encoder.Encoder) and module.inputs == ("pixel_values",)
  assert (module.num_layers, module.hidden_size) == (2, 36)
  _check_parity(module, variables, torch_model, _pixels())


@pytest.mark.parametrize("size", [(35, 49), (21, 21), (30, 16)])
def test_dinov2_interpolates_position_embeddings(size, checkpoints):
  """Up, down and non-square image sizes (and a remainder of pixels past the last patch)."""
  path, torch_model = checkpoints["dinov2"]
  module, variables, _ = hf.load_pretrained(path)
  _check_parity(module, variables, torch_model, _pixels(*size))


def test_dinov2_mask_token(checkpoints):
  path, torch_model = checkpoints["dinov2_swiglu"]
  module, variables, _ = hf.load_pretrained(path)
  masked = np.random.default_rng(1).random((2, 16)) < 0.5
  _check_parity(module, variables, torch_model, _pixels(), masked)


@pytest.mark.parametrize("size", [((4, 4), (7, 9)), ((4, 4), (3, 2)), ((5, 3), (5, 3))])
def test_resize_grid_is_torch_bicubic(size):
  (h, w), new = size
  grid = np.random.default_rng(0).standard_normal((h, w, 6)).astype(np.float32)
  ref = torch.nn.functional.interpolate(
    torch.tensor(grid).permute(2, 0, 1)[None], size=new, mode="bicubic", align_corners=False
  )
  # torch's float32 coefficient arithmetic is ~1e-6 off the exact weights mmtl uses; a wrong
  # kernel (jax.image.resize's a=-0.5) or source offset is off by ~1e-2.
  np.testing.assert_allclose(
    layers.resize_grid(jnp.asarray(grid), new), ref[0].permute(1, 2, 0).numpy(), atol=5e-6
  )


def test_param_names(checkpoints):
  paths = {
    family: set(rules.flatten(hf.load_pretrained(path)[1]["params"]))
    for family, (path, _) in checkpoints.items()
  }
  shared = {
    "embeddings/cls_token",
    "encoder/layer_1/attn/query/kernel",
    "encoder/layer_0/mlp/fc1/kernel",
  }
  assert all(shared <= p for p in paths.values())
  assert {"encoder/layer_1/attn_scale", "encoder/layer_1/mlp_scale", "embeddings/mask_token"} <= (
    paths["dinov2"] & paths["dinov2_swiglu"]
  )
  assert {"embeddings/distillation_token", "pooler/dense/kernel"} <= paths["deit"]
  assert not any(p.endswith(("attn_scale", "mlp_scale")) for p in paths["deit"])


@pytest.mark.parametrize("family", list(CONFIGS))
def test_export_reloads_in_transformers(family, checkpoints, tmp_path):
  path, torch_model = checkpoints[family]
  module, variables, _ = hf.load_pretrained(path)
  reloaded = export_and_reload(module, variables, tmp_path)
  assert type(reloaded) is type(torch_model)
  pixels = torch.tensor(_pixels())
  with torch.no_grad():
    ours, ref = reloaded(pixel_values=pixels), torch_model(pixel_values=pixels)
  for key in ("last_hidden_state", "pooler_output"):
    np.testing.assert_array_equal(ours[key].numpy(), ref[key].numpy())


@pytest.mark.parametrize("size", [(35, 21), (28, 30)])
def test_deit_other_image_sizes(size, checkpoints):
  """As transformers with interpolate_pos_encoding=True: [CLS] and [DIST] positions kept,
  the patches' resized bicubically (28 x 30 has the config's grid and a remainder)."""
  path, torch_model = checkpoints["deit"]
  module, variables, _ = hf.load_pretrained(path)
  pixels = _pixels(*size)
  out = _apply(module, variables, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
  with torch.no_grad():
    ref = torch_model(pixel_values=torch.tensor(pixels), interpolate_pos_encoding=True)
  for key in ("last_hidden_state", "pooler_output"):
    np.testing.assert_allclose(out[key], ref[key].numpy(), atol=ATOL, rtol=0, err_msg=key)


def test_wrong_family_names_the_path(checkpoints):
  """A DINOv2 / DeiT checkpoint into a ViT-shaped subtree: what differs is named."""
  vit = hf.build_module(dict(model_type="vit", intermediate_size=40, **TINY))
  image_encoder = hf.init_variables(vit, jax.random.PRNGKey(0))["params"]
  variables = {"params": {"image_encoder": image_encoder}}
  with pytest.raises(hf.CheckpointError) as e:
    hf.load_into(variables, "image_encoder", checkpoints["dinov2"][0])
  assert "image_encoder/encoder/layer_0/mlp/fc1/kernel: checkpoint (36, 72) vs model (36, 40)" in (
    str(e.value)
  )
  assert "image_encoder/encoder/layer_0/attn_scale" in str(e.value)
  with pytest.raises(hf.CheckpointError) as e:
    hf.load_into(variables, "image_encoder", checkpoints["deit"][0])
  assert (
    "image_encoder/embeddings/position_embeddings: checkpoint (1, 18, 36) vs model (1, 17, 36)"
    in (str(e.value))
  )
  assert "image_encoder/embeddings/distillation_token" in str(e.value)


def test_dinov2_reads_hf_flax_msgpack(checkpoints, tmp_path):
  """flax_model.msgpack in HF Flax's layout (FlaxDinov2Model: `encoder/layer/0/...`, kernels as
  Flax's) loads to the same params as the safetensors."""
  path, _ = checkpoints["dinov2_swiglu"]
  module, variables, config = hf.load_pretrained(path)
  flat = {}
  for p, x in rules.flatten(variables["params"]).items():
    *parents, leaf = module.hf_names()[p].key.split(".")
    flat["/".join([*parents, p.rsplit("/", 1)[1] if leaf == "weight" else leaf])] = np.asarray(x)
  (tmp_path / "flax_model.msgpack").write_bytes(
    flax.serialization.msgpack_serialize(rules.unflatten(flat))
  )
  (tmp_path / "config.json").write_text(json.dumps(config))
  jax.tree.map(np.testing.assert_array_equal, hf.load_pretrained(tmp_path)[1], variables)


@pytest.mark.parametrize("image", ["dinov2", "deit"])
def test_fusion_with_image_tower(image):
  small = dict(
    hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=14, patch_size=7
  )
  towers = dict(
    image=dict(
      name=dict(model_type=image, **small, **({"mlp_ratio": 2} if image == "dinov2" else {})),
      pool="pooler",
    ),
    text=dict(
      name=dict(
        model_type="bert",
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
      )
    ),
  )
  model = fusion.build({**config_lib.model_defaults(), "towers": towers, "width": 8})
  batch = model.dummy_batch()
  params = jax.jit(model.init)(jax.random.PRNGKey(0), batch)["params"]
  assert "image_encoder/encoder/layer_0/attn/query/kernel" in rules.flatten(params)
  assert jax.eval_shape(model.apply, {"params": params}, batch)["logits"].shape == (1, 2)
