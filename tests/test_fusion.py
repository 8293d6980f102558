"""Fusion models over stand-in encoders: shapes, param names, missing modalities."""

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmtl import config as config_lib
from mmtl import hf, rules
from mmtl.models import fusion


class TinyEncoder(nn.Module):
  """Smallest modules implementing mmtl.models.encoder.Encoder (TinyImage, TinyText)."""

  hidden: int = 16
  depth: int = 2

  inputs: ClassVar[tuple[str, ...]]

  @property
  def num_layers(self):
    return self.depth

  @property
  def hidden_size(self):
    return self.hidden

  def setup(self):
    self.layers = [nn.Dense(self.hidden, name=f"layer_{i}") for i in range(self.depth)]
    self.pooler = nn.Dense(self.hidden)

  def run_layers(self, x, mask, start, stop, *, deterministic=True):
    for layer in self.layers[start:stop]:
      # Mix tokens through the mask so the bottleneck tokens matter.
      ctx = fusion.masked_mean(x, mask)[:, None]
      x = x + jnp.tanh(layer(x + ctx))
    return x

  def finalize(self, x, mask):
    return {"last_hidden_state": x, "pooler_output": jnp.tanh(self.pooler(x[:, 0]))}


class TinyImage(TinyEncoder):
  """pixel_values NHWC, 4 pixels a token."""

  inputs: ClassVar[tuple[str, ...]] = ("pixel_values",)

  def setup(self):
    super().setup()
    self.patch = nn.Dense(self.hidden)

  def dummy_inputs(self):
    return {"pixel_values": jnp.zeros((1, 2, 2, 3))}

  def embed(self, pixel_values, *, deterministic=True):
    b, h, w, c = pixel_values.shape
    x = self.patch(pixel_values.reshape(b, h * w // 4, 4 * c))
    return x, jnp.ones(x.shape[:2], bool)


class TinyText(TinyEncoder):
  inputs: ClassVar[tuple[str, ...]] = ("input_ids", "attention_mask")

  def setup(self):
    super().setup()
    self.embedding = nn.Embed(50, self.hidden)

  def dummy_inputs(self):
    ids = jnp.zeros((1, 1), jnp.int32)
    return {"input_ids": ids, "attention_mask": jnp.ones_like(ids)}

  def embed(self, input_ids, attention_mask, *, deterministic=True):
    return self.embedding(input_ids), attention_mask.astype(bool)


def towers(depth_image=2, depth_text=2):
  return dict(image=TinyImage(depth=depth_image), text=TinyText(hidden=24, depth=depth_text))


def batch(b=4):
  rng = np.random.default_rng(0)
  mask = np.ones((b, 6), np.int32)
  mask[:, 4:] = 0
  return {
    "pixel_values": rng.normal(size=(b, 4, 4, 3)).astype(np.float32),
    "input_ids": rng.integers(1, 50, size=(b, 6)).astype(np.int32),
    "attention_mask": mask,
    "token_type_ids": np.zeros((b, 6), np.int32),
    "labels": np.arange(b) % 3,
  }


def init(model, b=None):
  b = b or batch()
  return model.init(jax.random.PRNGKey(0), b)["params"]


def fused_classifier(model_towers, fusion_type, *, fusion_layer, **kw):
  """A 3-class, width-8 fused model of `model_towers` (2 heads, 2 bottleneck tokens)."""
  return fusion.FusionModel(
    towers=model_towers,
    fusion_type=fusion_type,
    head_config=dict(num_classes=3) if kw.get("head_type") != "contrastive" else {},
    width=8,
    num_heads=2,
    bottleneck_tokens=2,
    fusion_layer=fusion_layer,
    **kw,
  )


@pytest.mark.parametrize(
  "fusion_type", ["concat", "gated", "bilinear", "cross_attention", "bottleneck"]
)
def test_fused_classifier_shapes_and_param_names(fusion_type):
  model = fused_classifier(towers(), fusion_type, fusion_layer=1)
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
  model = fusion.FusionModel(
    towers=towers(),
    fusion_type="contrastive",
    head_type="contrastive",
    width=8,
    head_config=dict(temperature_init=0.1),
  )
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
  model = fusion.FusionModel(
    towers=dict(text=TinyText()), head_type="regression", head_config=dict(num_classes=1), width=8
  )
  params = init(model)
  assert set(params) == {"text_encoder", "fusion", "head"}
  assert model.apply({"params": params}, batch())["predictions"].shape == (4, 1)


@pytest.mark.parametrize(
  "fusion_type", ["concat", "gated", "bilinear", "cross_attention", "bottleneck"]
)
def test_absent_image_equals_missing_image(fusion_type):
  """image_present=0 gives the same prediction as not passing the image at all."""
  model = fused_classifier(towers(), fusion_type, fusion_layer=-1)
  params = init(model)
  # A non-zero head so logits depend on the features.
  params["head"]["kernel"] = jax.random.normal(
    jax.random.PRNGKey(1), params["head"]["kernel"].shape
  )
  b = batch()
  absent = dict(b, image_present=np.zeros(4, np.float32))
  missing = {k: v for k, v in b.items() if k != "pixel_values"}
  out_absent = model.apply({"params": params}, absent)["logits"]
  out_missing = model.apply({"params": params}, missing)["logits"]
  np.testing.assert_allclose(out_absent, out_missing, rtol=1e-5, atol=1e-5)
  # ...and differs from the image being present.
  assert not np.allclose(out_absent, model.apply({"params": params}, b)["logits"])


def test_bottleneck_unequal_depths():
  model = fusion.FusionModel(
    towers=towers(depth_image=3, depth_text=2), fusion_type="bottleneck", width=8, fusion_layer=-1
  )
  assert init(model)["fusion"]["tokens"].shape == (4, 8)
  bad = fusion.FusionModel(
    towers=towers(depth_image=3, depth_text=2), fusion_type="bottleneck", width=8, fusion_layer=1
  )
  with pytest.raises(ValueError, match="negative fusion_layer"):
    init(bad)


def test_bottleneck_with_a_tower_without_layers():
  """A CNN-like tower (num_layers 0, its tokens final after `embed`) joins MBT fusion: at
  each fusion layer the bottleneck tokens read its feature map by cross-attention, so
  the image reaches the text tower only through them."""
  model = fusion.FusionModel(
    towers=towers(depth_image=0, depth_text=2),
    fusion_type="bottleneck",
    width=8,
    num_heads=2,
    fusion_layer=-2,
  )
  params = init(model)
  assert {"read_image_0", "read_image_1"} <= set(params["fusion"])
  assert "read_text_0" not in params["fusion"]

  def text_tokens(pixels):
    _, state = model.apply(
      {"params": params},
      dict(batch(), pixel_values=pixels),
      capture_intermediates=lambda module, method: method == "finalize",
    )
    return state["intermediates"]["text_encoder"]["finalize"][0]["last_hidden_state"]

  pixels = batch()["pixel_values"]
  assert not np.allclose(text_tokens(pixels), text_tokens(pixels + 1.0))
  all_cnn = fusion.FusionModel(
    towers=dict(image=TinyImage(depth=0), audio=TinyImage(depth=0)), fusion_type="bottleneck"
  )
  with pytest.raises(ValueError, match="needs a tower with token layers"):
    init(all_cnn)


def test_bad_fusion_type_names_choices():
  with pytest.raises(ValueError, match="Unknown fusion_type 'late'.*concat"):
    fusion.FusionModel(towers=towers(), fusion_type="late")
  with pytest.raises(ValueError, match="needs at least two towers"):
    fusion.FusionModel(towers=dict(text=TinyText()), fusion_type="cross_attention")


def test_bottleneck_refuses_cudnn_attention():
  bert = hf.build_module(
    dict(
      model_type="bert",
      vocab_size=50,
      hidden_size=16,
      num_hidden_layers=1,
      num_attention_heads=2,
      intermediate_size=32,
    ),
    attention_impl="cudnn",
  )
  with pytest.raises(ValueError, match="attention_impl='xla'"):
    fusion.FusionModel(towers=dict(image=TinyImage(), text=bert), fusion_type="bottleneck")


# --- dummy_batch and the encoder protocol ---------------------------------------------


def hf_towers():
  """Image, text and audio towers built by mmtl.hf from tiny config dicts (no weights)."""
  vit = dict(
    model_type="vit",
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    image_size=8,
    patch_size=4,
  )
  bert = dict(
    model_type="bert",
    vocab_size=50,
    hidden_size=24,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=16,
  )
  return dict(
    image=hf.build_module(vit),
    text=hf.build_module(bert),
    audio=hf.build_module({**vit, "num_channels": 1, "image_size": [8, 12]}),
  )


def hf_batch(b=3):
  rng = np.random.default_rng(0)
  out = batch(b)
  out.update(
    pixel_values=rng.normal(size=(b, 8, 8, 3)).astype(np.float32),
    audio_values=rng.normal(size=(b, 8, 12, 1)).astype(np.float32),
  )
  return out


def param_shapes(model, b):
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), b)["params"]
  return {path: (x.shape, x.dtype) for path, x in rules.flatten(shapes).items()}


@pytest.mark.parametrize("fusion_type", list(fusion.FUSIONS))
@pytest.mark.parametrize("tower_set", ["tiny", "image_text_audio"])
def test_dummy_batch_inits_the_params_of_a_real_batch(fusion_type, tower_set):
  kind = "contrastive" if fusion_type == "contrastive" else "classification"
  if tower_set == "tiny":
    model_towers, real = towers(), batch()
  else:
    model_towers, real = hf_towers(), hf_batch()
  fields = {"pixel_values", "input_ids", "attention_mask"}
  if tower_set != "tiny":
    fields |= {"token_type_ids", "audio_values"}
  if fusion_type == "pooled":  # One tower's features.
    model_towers, fields = {"text": model_towers["text"]}, fields - {"pixel_values", "audio_values"}
  model = fused_classifier(model_towers, fusion_type, fusion_layer=-1, head_type=kind)
  dummy = model.dummy_batch()
  assert set(dummy) == fields and {x.shape[0] for x in dummy.values()} == {1}
  assert real["input_ids"].shape[1] > dummy["input_ids"].shape[1]  # Longer and padded.
  assert param_shapes(model, dummy) == param_shapes(model, real)
  assert {p.split("/")[0] for p in param_shapes(model, dummy)} >= {
    f"{m}_encoder" for m in model.modalities
  }


def test_tower_inputs_are_the_declared_ones():
  text = hf_towers()["text"]
  b = dict(hf_batch(), labels=np.zeros(3))
  got = fusion.tower_inputs("text", text, b, train=True)
  assert set(got) == {"input_ids", "attention_mask", "token_type_ids", "deterministic"}
  assert not got["deterministic"]
  audio = fusion.tower_inputs("audio", hf_towers()["audio"], b, train=False)
  assert set(audio) == {"pixel_values", "deterministic"}
  assert audio["pixel_values"] is b["audio_values"]  # The batch field renamed to the input name.


def test_tower_of_the_wrong_modality_names_both():
  bert = hf_towers()["text"]
  with pytest.raises(
    config_lib.ConfigError,
    match=r"towers\.image: 'bert' builds a BertModel, whose inputs are "
    r"\['input_ids', 'attention_mask', 'token_type_ids'\]; an image tower "
    r"takes pixel_values \(batch field 'pixel_values'\)",
  ):
    fusion._check_tower_inputs("image", bert, {"model_type": "bert"})
  clip = hf.build_module({"model_type": "clip"})
  with pytest.raises(
    config_lib.ConfigError, match=r"CLIPModel, which is not a tower.*tower='vision'"
  ):
    fusion._check_tower_inputs("image", clip, "openai/clip")
  fusion._check_tower_inputs("audio", hf_towers()["audio"], "vit")


def test_pooled_fusion_is_a_linear_classifier_on_the_tower_features():
  model = fused_classifier({"image": TinyImage(depth=2)}, "pooled", fusion_layer=-1)
  b = batch()
  variables = model.init(jax.random.PRNGKey(0), b)
  assert "fusion" not in variables["params"]  # No params between the tower and the head.
  out = model.apply(variables, b)
  pooled = model.apply(
    variables, b, method=lambda m, x: m._run_towers(x, None, train={"image": False})["image"].pooled
  )
  np.testing.assert_array_equal(out["features"], pooled)
  head = variables["params"]["head"]
  np.testing.assert_allclose(out["logits"], pooled @ head["kernel"] + head["bias"], rtol=1e-5)
  with pytest.raises(ValueError, match="fusion_type='pooled' reads one tower"):
    fused_classifier(towers(), "pooled", fusion_layer=-1).init(jax.random.PRNGKey(0), b)
