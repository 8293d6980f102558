"""BEiT computes what transformers' BeitModel computes and round-trips; drop path (BEiT's
and DINOv2's).

Tiny odd-shaped random transformers models (hidden 36, 3 heads, 28 px images, patch 7) with
every weight perturbed: transformers initializes BEiT's relative position tables, tokens and
positions to zeros and its layer scales to a constant, which would hide mix-ups (the tables
get a large perturbation, so a wrong index or resize is far above the tolerance).
"""

import dataclasses
import functools
import json

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from mmtl import config as config_lib
from mmtl import hf, rules
from mmtl.models import beit, encoder, fusion, layers
from tests import xla_settings
from tests.hf_fixtures import export_and_reload, perturb_weights

ATOL = 1e-5
TINY = dict(
  hidden_size=36,
  num_hidden_layers=2,
  num_attention_heads=3,
  intermediate_size=40,
  image_size=28,
  patch_size=7,
)
BEIT = {
  # Per-layer tables, mean pooling, layer scale, a mask token.
  "relative": dict(use_relative_position_bias=True, use_mask_token=True),
  # One table for all layers, absolute positions, [CLS] pooling, no layer scale.
  "shared_absolute_cls": dict(
    use_shared_relative_position_bias=True,
    use_absolute_position_embeddings=True,
    use_mean_pooling=False,
    layer_scale_init_value=0.0,
  ),
  # No relative bias at all: absolute positions, mean pooling.
  "absolute": dict(use_absolute_position_embeddings=True, layer_scale_init_value=0.3),
  # Both kinds of table on a non-square grid (4 x 5 patches).
  "both_nonsquare": dict(
    use_relative_position_bias=True, use_shared_relative_position_bias=True, image_size=[28, 35]
  ),
}


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
  torch.manual_seed(0)
  return perturb_weights(model, lambda name: 1.0 if "relative_position_bias_table" in name else 0.1)


def _beit_config(variant: str, **kw) -> transformers.BeitConfig:
  return transformers.BeitConfig(**{**TINY, **BEIT[variant], **kw})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[str, torch.nn.Module]]:
  """{variant: (folder, the BeitModel saved there)}."""
  out = {}
  for variant in BEIT:
    folder = tmp_path_factory.mktemp(variant)
    model = _perturb(transformers.BeitModel(_beit_config(variant)))
    model.save_pretrained(folder)
    out[variant] = (str(folder), model)
  return out


@functools.partial(xla_settings.production_jit, static_argnums=0)
def _apply(module, variables, pixels, bool_masked_pos):
  kw = {} if bool_masked_pos is None else dict(bool_masked_pos=bool_masked_pos)
  return module.apply(variables, pixels, **kw)


def _pixels(height=28, width=28, batch=2, seed=0):
  return np.random.default_rng(seed).standard_normal((batch, 3, height, width)).astype(np.float32)


def _check_parity(module, variables, torch_model, pixels, bool_masked_pos=None, **torch_kw):
  masked = None if bool_masked_pos is None else jnp.asarray(bool_masked_pos)
  out = _apply(module, variables, jnp.asarray(pixels.transpose(0, 2, 3, 1)), masked)
  if bool_masked_pos is not None:
    torch_kw["bool_masked_pos"] = torch.tensor(bool_masked_pos)
  with torch.no_grad():
    ref = torch_model(pixel_values=torch.tensor(pixels), **torch_kw)
  for key in ("last_hidden_state", "pooler_output"):
    np.testing.assert_allclose(out[key], ref[key].numpy(), atol=ATOL, rtol=0, err_msg=key)


def _size(variant: str) -> tuple[int, int]:
  size = BEIT[variant].get("image_size", TINY["image_size"])
  return tuple(size) if isinstance(size, list) else (size, size)


@pytest.mark.parametrize("variant", list(BEIT))
def test_beit_parity(variant, checkpoints):
  path, torch_model = checkpoints[variant]
  module, variables, _ = hf.load_pretrained(path)
  assert isinstance(module, encoder.Encoder) and module.inputs == ("pixel_values",)
  assert (module.num_layers, module.hidden_size) == (2, 36)
  _check_parity(module, variables, torch_model, _pixels(*_size(variant)))


@pytest.mark.parametrize(
  "variant, size", [("relative", (35, 49)), ("shared_absolute_cls", (21, 28))]
)
def test_beit_other_image_sizes(variant, size, checkpoints):
  """Up- and down-sized, non-square images: the tables resized as transformers does (with or
  without interpolate_pos_encoding, which changes nothing in BeitModel)."""
  path, torch_model = checkpoints[variant]
  module, variables, _ = hf.load_pretrained(path)
  for interpolate in (False, True):
    _check_parity(
      module, variables, torch_model, _pixels(*size), interpolate_pos_encoding=interpolate
    )


def test_beit_mask_token(checkpoints):
  path, torch_model = checkpoints["relative"]
  module, variables, _ = hf.load_pretrained(path)
  masked = np.random.default_rng(1).random((2, 16)) < 0.5
  _check_parity(module, variables, torch_model, _pixels(), masked)
  with pytest.raises(ValueError, match="use_mask_token=False"):
    module, variables, _ = hf.load_pretrained(checkpoints["absolute"][0])
    _apply(module, variables, jnp.zeros((1, 28, 28, 3)), jnp.asarray(masked[:1]))


def test_beit_param_names(checkpoints):
  paths = {
    v: set(rules.flatten(hf.load_pretrained(p)[1]["params"])) for v, (p, _) in checkpoints.items()
  }
  shared = {
    "embeddings/cls_token",
    "encoder/layer_1/attn/query/bias",
    "encoder/layer_1/attn/value/bias",
    "encoder/layer_1/attn/key/kernel",
    "encoder/layer_0/mlp/fc1/kernel",
    "encoder/layer_0/attn_norm/scale",
  }
  assert all(shared <= p for p in paths.values())
  assert not any("attn/key/bias" in p for ps in paths.values() for p in ps)
  assert {"encoder/layer_1/attn/relative_position_bias", "encoder/layer_1/attn_scale"} <= (
    paths["relative"]
  )
  assert "encoder/relative_position_bias" in paths["shared_absolute_cls"]
  assert (
    "pooler/layernorm/scale" in paths["relative"] and "layernorm/scale" not in paths["relative"]
  )
  cls = paths["shared_absolute_cls"]
  assert "layernorm/scale" in cls and not any(p.endswith("_scale") for p in cls)
  assert not any("relative_position_bias" in p for p in paths["absolute"])


@pytest.mark.parametrize("variant", list(BEIT))
def test_beit_export_reloads_in_transformers(variant, checkpoints, tmp_path):
  path, torch_model = checkpoints[variant]
  module, variables, _ = hf.load_pretrained(path)
  reloaded = export_and_reload(module, variables, tmp_path)
  assert type(reloaded) is type(torch_model)
  pixels = torch.tensor(_pixels(*_size(variant)))
  with torch.no_grad():
    ours, ref = reloaded(pixel_values=pixels), torch_model(pixel_values=pixels)
  for key in ("last_hidden_state", "pooler_output"):
    np.testing.assert_array_equal(ours[key].numpy(), ref[key].numpy())


def test_beit_image_classification_checkpoint(tmp_path):
  torch_model = _perturb(
    transformers.BeitForImageClassification(_beit_config("relative", num_labels=5))
  )
  torch_model.save_pretrained(tmp_path)
  module, variables, _ = hf.load_pretrained(tmp_path)
  assert isinstance(module, beit.BeitModel)
  _check_parity(module, variables, torch_model.beit, _pixels())


def test_beit_masked_image_modeling_checkpoint(tmp_path):
  """The hub's pretraining checkpoints (BeitForMaskedImageModeling, [CLS] pooling) have a
  `layernorm` of their own beside the encoder's `beit.layernorm`."""
  config = _beit_config("shared_absolute_cls", use_mask_token=True, vocab_size=11)
  torch_model = _perturb(transformers.BeitForMaskedImageModeling(config))
  torch_model.save_pretrained(tmp_path)
  module, variables, _ = hf.load_pretrained(tmp_path)
  pixels = _pixels()
  out = _apply(module, variables, jnp.asarray(pixels.transpose(0, 2, 3, 1)), None)
  with torch.no_grad():
    ref = torch_model.beit(pixel_values=torch.tensor(pixels)).last_hidden_state.numpy()
  np.testing.assert_allclose(out["last_hidden_state"], ref, atol=ATOL, rtol=0)


def _flax_layout(state: dict[str, np.ndarray]) -> dict:
  """A saved torch state dict in FlaxBeitModel's param tree (transformers 4.x
  modeling_flax_beit.py: modules nested as the torch names, Dense/Conv `kernel` transposed,
  LayerNorm `scale`)."""
  flat = {}
  for key, x in state.items():
    *parents, leaf = key.split(".")
    if leaf == "weight" and x.ndim == 1:
      leaf = "scale"
    elif leaf == "weight":
      leaf, x = "kernel", (x.T if x.ndim == 2 else x.transpose(2, 3, 1, 0))
    flat["/".join([*parents, leaf])] = x
  return rules.unflatten(flat)


@pytest.mark.parametrize("variant", ["relative", "shared_absolute_cls"])
def test_beit_reads_hf_flax_msgpack(variant, checkpoints, tmp_path):
  path, _ = checkpoints[variant]
  _, variables, config = hf.load_pretrained(path)
  tree = _flax_layout(safetensors.numpy.load_file(f"{path}/model.safetensors"))
  assert "relative_position_bias_table" in str(jax.tree_util.tree_structure(tree))
  (tmp_path / "flax_model.msgpack").write_bytes(flax.serialization.msgpack_serialize(tree))
  (tmp_path / "config.json").write_text(json.dumps(config))
  jax.tree.map(np.testing.assert_array_equal, hf.load_pretrained(tmp_path)[1], variables)


def test_beit_shape_mismatch_names_the_param(checkpoints):
  """A 28 px checkpoint into a 35 px BEiT: the relative tables' shapes differ, named."""
  path, _ = checkpoints["relative"]
  config = dict(model_type="beit", **{**TINY, **BEIT["relative"], "image_size": 35})
  bigger = hf.build_module(config)
  variables = {"params": {"image_encoder": hf.variable_shapes(bigger)["params"]}}
  with pytest.raises(hf.CheckpointError) as e:
    hf.load_into(variables, "image_encoder", path)
  assert (
    "image_encoder/encoder/layer_0/attn/relative_position_bias: checkpoint (52, 3) vs model "
    "(84, 3)" in str(e.value)
  )


def test_beit_tower_protocol(checkpoints):
  """embed -> run_layers -> finalize with 3 tokens appended after the image's (as bottleneck
  fusion does; they get no bias) and masked out is the model's forward; as a tower, other
  image sizes are refused when there is a relative bias."""
  path, _ = checkpoints["both_nonsquare"]
  module, variables, _ = hf.load_pretrained(path)
  pixels = jnp.asarray(_pixels(28, 35).transpose(0, 2, 3, 1))

  def tower(m):
    x, mask = m.embed(pixels)
    x = jnp.concatenate([x, jnp.ones((2, 3, 36))], 1)
    x = m.run_layers(x, jnp.concatenate([mask, jnp.zeros((2, 3), bool)], 1), 0, m.num_layers)
    return m.finalize(x[:, :-3], mask)

  out = jax.jit(lambda v: module.apply(v, method=tower))(variables)
  ref = _apply(module, variables, pixels, None)
  for key in ("last_hidden_state", "pooler_output"):
    np.testing.assert_allclose(out[key], ref[key], atol=1e-6, rtol=0, err_msg=key)
  with pytest.raises(ValueError, match=r"patch grid, but as a tower .* \(4, 5\)"):
    module.apply(variables, pixels[:, :21], method=module.embed)


def test_fusion_with_beit_tower():
  """A bottleneck-fused BEiT image tower (its last layer attends to 4 bottleneck tokens too)
  builds and traces in training (test_beit_tower_protocol computes with appended tokens)."""
  small = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24)
  image = dict(model_type="beit", **small, image_size=14, patch_size=7)
  image.update(use_relative_position_bias=True, use_shared_relative_position_bias=True)
  text = dict(model_type="bert", vocab_size=50, **small)
  towers = dict(image=dict(name=image, pool="pooler"), text=dict(name=text))
  cfg = {**config_lib.model_defaults(), "towers": towers, "width": 8, "fusion": "bottleneck"}
  model = fusion.build({**cfg, "fusion_layer": -1})
  batch = model.dummy_batch()
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), batch)
  flat = rules.flatten(variables["params"])
  assert flat["image_encoder/encoder/layer_0/attn/relative_position_bias"].shape == (12, 2)
  assert flat["image_encoder/encoder/relative_position_bias"].shape == (12, 2)
  train = functools.partial(model.apply, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  assert jax.eval_shape(train, variables, batch)["logits"].shape == (1, 2)


# --- Drop path ------------------------------------------------------------------------


def test_drop_path_drops_whole_examples():
  x = jnp.ones((4000, 3, 2))
  y = layers.DropPath(0.25).apply({}, x, False, rngs={"dropout": jax.random.PRNGKey(0)})
  per_example = np.asarray(y).reshape(4000, -1)
  assert set(np.unique(per_example)) == {0.0, np.float32(1 / 0.75)}
  assert (per_example == per_example[:, :1]).all()  # one draw per example
  assert abs((per_example[:, 0] == 0).mean() - 0.25) < 0.03
  assert layers.DropPath(0.25).apply({}, x, True) is x


def test_beit_drop_path_rates_are_transformers():
  config = _beit_config("relative", num_hidden_layers=4, drop_path_rate=0.3)
  torch_model = transformers.BeitModel(config)
  ref = [getattr(layer.drop_path, "drop_prob", 0.0) for layer in torch_model.layers]
  ours = beit.BeitConfig.from_hf(config.to_dict()).drop_path_rates()
  np.testing.assert_allclose(ours, ref, rtol=1e-12)
  assert ours[0] == 0.0 and ours[-1] == pytest.approx(0.3)


@functools.partial(xla_settings.production_jit, static_argnums=0)  # as _apply: compared bit for bit
def _train(module, variables, pixels, rng):
  out = module.apply(variables, pixels, deterministic=False, rngs={"dropout": rng})
  return out["last_hidden_state"]


def _differs_across_rngs(module, variables, pixels) -> np.ndarray:
  """The training-mode output of rng 0 (checked to differ from rng 1's, to be repeatable)."""
  a, b = (_train(module, variables, pixels, jax.random.PRNGKey(seed)) for seed in (0, 1))
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a, _train(module, variables, pixels, jax.random.PRNGKey(0)))
  return a


def test_dinov2_drop_path(tmp_path):
  """Drop path 0.5 in every layer (as transformers): training outputs vary with the rng;
  eval mode is transformers' eval; rate 0 trains as it evaluates."""
  config = transformers.Dinov2Config(**TINY, mlp_ratio=2, drop_path_rate=0.5)
  torch_model = _perturb(transformers.Dinov2Model(config))
  assert {layer.drop_path.drop_prob for layer in torch_model.encoder.layer} == {0.5}
  torch_model.save_pretrained(tmp_path)
  module, variables, _ = hf.load_pretrained(tmp_path)
  assert module.config.drop_path_rates() == (0.5, 0.5)
  _check_parity(module, variables, torch_model, _pixels())
  pixels = jnp.asarray(_pixels().transpose(0, 2, 3, 1))
  eval_out = _apply(module, variables, pixels, None)["last_hidden_state"]
  assert not np.allclose(_differs_across_rngs(module, variables, pixels), eval_out)
  no_drop = module.clone(config=dataclasses.replace(module.config, drop_path_rate=0.0))
  np.testing.assert_array_equal(
    _train(no_drop, variables, pixels, jax.random.PRNGKey(0)),
    _apply(no_drop, variables, pixels, None)["last_hidden_state"],
  )


def test_beit_drop_path_in_training(checkpoints):
  """Training outputs vary with the rng (layer 1 drops at 0.6), also under remat (whose
  static arguments include the patch grid)."""
  path, _ = checkpoints["relative"]
  module, variables, _ = hf.load_pretrained(path)
  module = module.clone(config=dataclasses.replace(module.config, drop_path_rate=0.6))
  pixels = jnp.asarray(_pixels().transpose(0, 2, 3, 1))
  out = _differs_across_rngs(module, variables, pixels)
  remat = _train(module.clone(remat="full"), variables, pixels, jax.random.PRNGKey(0))
  np.testing.assert_allclose(remat, out, atol=1e-6)
