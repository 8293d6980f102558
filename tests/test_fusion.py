"""Fusion models over stand-in encoders: shapes, param names, missing modalities."""
import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from mmtl import rules
from mmtl.models import fusion


class TinyEncoder(nn.Module):
  """Smallest module following the encoder protocol (embed/run_layers/finalize)."""
  kind: str  # "image" (pixel_values NHWC) or "text" (input_ids)
  hidden: int = 16
  depth: int = 2

  @property
  def num_layers(self):
    return self.depth

  @property
  def hidden_size(self):
    return self.hidden

  def setup(self):
    if self.kind == "text":
      self.embedding = nn.Embed(50, self.hidden)
    else:
      self.patch = nn.Dense(self.hidden)
    self.layers = [nn.Dense(self.hidden, name=f"layer_{i}") for i in range(self.depth)]
    self.pooler = nn.Dense(self.hidden)

  def embed(self, pixel_values=None, input_ids=None, attention_mask=None):
    if self.kind == "text":
      return self.embedding(input_ids), attention_mask.astype(bool)
    b, h, w, c = pixel_values.shape
    x = self.patch(pixel_values.reshape(b, h * w // 4, 4 * c))
    return x, jnp.ones(x.shape[:2], bool)

  def run_layers(self, x, mask, start, stop, *, deterministic=True):
    for layer in self.layers[start:stop]:
      # Mix tokens through the mask so the bottleneck tokens matter.
      ctx = fusion.masked_mean(x, mask)[:, None]
      x = x + jnp.tanh(layer(x + ctx))
    return x

  def finalize(self, x, mask):
    return {"last_hidden_state": x, "pooler_output": jnp.tanh(self.pooler(x[:, 0]))}


def towers(depth_image=2, depth_text=2):
  return dict(image_encoder=TinyEncoder("image", depth=depth_image),
              text_encoder=TinyEncoder("text", hidden=24, depth=depth_text))


def batch(b=4):
  rng = np.random.default_rng(0)
  mask = np.ones((b, 6), np.int32)
  mask[:, 4:] = 0
  return {"pixel_values": rng.normal(size=(b, 4, 4, 3)).astype(np.float32),
          "input_ids": rng.integers(1, 50, size=(b, 6)).astype(np.int32),
          "attention_mask": mask, "token_type_ids": np.zeros((b, 6), np.int32),
          "labels": np.arange(b) % 3}


def init(model, b=None):
  b = b or batch()
  return model.init(jax.random.PRNGKey(0), b)["params"]


@pytest.mark.parametrize("fusion_type", ["concat", "gated", "bilinear", "cross_attention", "bottleneck"])
def test_fused_classifier_shapes_and_param_names(fusion_type):
  model = fusion.FusionModel(**towers(), fusion_type=fusion_type, num_classes=3, width=8,
                             num_heads=2, bottleneck_tokens=2, fusion_layer=1)
  params = init(model)
  out = model.apply({"params": params}, batch())
  assert out["logits"].shape == (4, 3) and out["features"].shape == (4, 8)
  top = set(params)
  assert top == {"image_encoder", "text_encoder", "fusion", "head"}
  assert set(params["head"]) == {"kernel", "bias"}
  paths = rules.flatten(params)
  assert "image_encoder/layer_1/kernel" in paths and "text_encoder/embedding/embedding" in paths
  if fusion_type == "bottleneck":
    assert paths["fusion/tokens"].shape == (2, 8)
    assert paths["fusion/to_text/kernel"].shape == (8, 24)


def test_contrastive_two_tower():
  model = fusion.FusionModel(**towers(), fusion_type="contrastive", head_type="contrastive",
                             width=8, temperature_init=0.1)
  params = init(model)
  assert set(params["head"]) == {"image_proj", "text_proj", "logit_scale"}
  np.testing.assert_allclose(params["head"]["logit_scale"], np.log(10.0), rtol=1e-6)
  out = model.apply({"params": params}, batch())
  np.testing.assert_allclose(np.linalg.norm(out["image_embeds"], axis=-1), 1.0, rtol=1e-5)
  # Text alone (zero-shot prompts) embeds without the image tower.
  text_only = {k: v for k, v in batch().items() if k != "pixel_values"}
  out_t = model.apply({"params": params}, text_only)
  assert "image_embeds" not in out_t
  np.testing.assert_allclose(out_t["text_embeds"], out["text_embeds"], rtol=1e-5, atol=1e-6)


def test_regression_head_and_single_tower():
  model = fusion.FusionModel(text_encoder=TinyEncoder("text"), head_type="regression",
                             num_classes=1, width=8)
  params = init(model)
  assert set(params) == {"text_encoder", "fusion", "head"}
  assert model.apply({"params": params}, batch())["predictions"].shape == (4, 1)


@pytest.mark.parametrize("fusion_type", ["concat", "gated", "bilinear", "cross_attention", "bottleneck"])
def test_absent_image_equals_missing_image(fusion_type):
  """image_present=0 gives the same prediction as not passing the image at all."""
  model = fusion.FusionModel(**towers(), fusion_type=fusion_type, num_classes=3, width=8,
                             num_heads=2, bottleneck_tokens=2, fusion_layer=-1)
  params = init(model)
  # A non-zero head so logits depend on the features.
  params["head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(1), params["head"]["kernel"].shape)
  b = batch()
  absent = dict(b, image_present=np.zeros(4, np.float32))
  missing = {k: v for k, v in b.items() if k != "pixel_values"}
  out_absent = model.apply({"params": params}, absent)["logits"]
  out_missing = model.apply({"params": params}, missing)["logits"]
  np.testing.assert_allclose(out_absent, out_missing, rtol=1e-5, atol=1e-5)
  # ...and differs from the image being present.
  assert not np.allclose(out_absent, model.apply({"params": params}, b)["logits"])


def test_bottleneck_unequal_depths():
  model = fusion.FusionModel(**towers(depth_image=3, depth_text=2), fusion_type="bottleneck",
                             width=8, fusion_layer=-1)
  assert init(model)["fusion"]["tokens"].shape == (4, 8)
  bad = fusion.FusionModel(**towers(depth_image=3, depth_text=2), fusion_type="bottleneck",
                           width=8, fusion_layer=1)
  with pytest.raises(ValueError, match="negative fusion_layer"):
    init(bad)


def test_bad_fusion_type_names_choices():
  with pytest.raises(ValueError, match="Unknown fusion_type 'late'.*concat"):
    fusion.FusionModel(**towers(), fusion_type="late")
  with pytest.raises(ValueError, match="needs at least two towers"):
    fusion.FusionModel(text_encoder=TinyEncoder("text"), fusion_type="cross_attention")


def test_bottleneck_refuses_cudnn_attention():
  from mmtl import hf
  bert = hf.build_module(dict(model_type="bert", vocab_size=50, hidden_size=16, num_hidden_layers=1,
                              num_attention_heads=2, intermediate_size=32), attention_impl="cudnn")
  with pytest.raises(ValueError, match="attention_impl='xla'"):
    fusion.FusionModel(image_encoder=TinyEncoder("image"), text_encoder=bert, fusion_type="bottleneck")
