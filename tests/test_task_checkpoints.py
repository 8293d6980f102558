"""Task checkpoints load as they are: every `*ForImageClassification`,
`*ForSequenceClassification` and `*ForMaskedLM` layout of the supported families loads with
no flags (optional parts it does not hold, such as the pooler of a
ViTForImageClassification, are not built) and computes what transformers' base model inside
it computes.

Tiny odd-shaped random models (hidden 36, 3 heads, one layer, 28 px images, patch 7) with
every weight perturbed (transformers zeroes biases, which would hide mix-ups).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tr

from mmtl import config as config_lib
from mmtl import hf, train
from mmtl.models import fusion
from tests.hf_fixtures import perturb_weights

ATOL = 1e-5
VIT = dict(hidden_size=36, num_hidden_layers=1, num_attention_heads=3, intermediate_size=37)
IMAGE = dict(VIT, image_size=28, patch_size=7)
TEXT = dict(VIT, vocab_size=53, max_position_embeddings=20)
CNN = dict(num_stages=2, hidden_sizes=[12, 20], depths=[1, 1])
TOWER = dict(VIT, image_size=28, patch_size=7)
# {family: (config, [task classes], tower)}; every class below is a layout transformers saves.
FAMILIES = {
  "vit": (
    tr.ViTConfig(**IMAGE),
    [tr.ViTForImageClassification, tr.ViTForMaskedImageModeling],
    None,
  ),
  "deit": (
    tr.DeiTConfig(**IMAGE),
    [tr.DeiTForImageClassification, tr.DeiTForImageClassificationWithTeacher],
    None,
  ),
  "beit": (
    tr.BeitConfig(**IMAGE, use_relative_position_bias=True),
    [tr.BeitForImageClassification, tr.BeitForMaskedImageModeling],
    None,
  ),
  "beit_cls": (  # [CLS] + final LayerNorm instead of mean pooling: no pooler weights at all
    tr.BeitConfig(**IMAGE, use_mean_pooling=False),
    [tr.BeitForImageClassification],
    None,
  ),
  "dinov2": (tr.Dinov2Config(**IMAGE, mlp_ratio=2), [tr.Dinov2ForImageClassification], None),
  "convnext": (tr.ConvNextConfig(**CNN, patch_size=4), [tr.ConvNextForImageClassification], None),
  "convnextv2": (
    tr.ConvNextV2Config(**CNN, patch_size=4),
    [tr.ConvNextV2ForImageClassification],
    None,
  ),
  "resnet": (
    tr.ResNetConfig(**CNN, embedding_size=8, layer_type="basic"),
    [tr.ResNetForImageClassification],
    None,
  ),
  "clip": (
    tr.CLIPConfig(text_config=dict(TEXT, eos_token_id=2), vision_config=TOWER),
    [tr.CLIPForImageClassification],
    "vision",
  ),
  "siglip": (
    tr.SiglipConfig(text_config=TEXT, vision_config=TOWER),
    [tr.SiglipForImageClassification],
    "vision",
  ),
  "bert": (
    tr.BertConfig(**TEXT),
    [tr.BertForSequenceClassification, tr.BertForMaskedLM],
    None,
  ),
  "roberta": (
    tr.RobertaConfig(**TEXT),
    [tr.RobertaForSequenceClassification, tr.RobertaForMaskedLM],
    None,
  ),
  "xlm-roberta": (
    tr.XLMRobertaConfig(**TEXT, pad_token_id=4),
    [tr.XLMRobertaForSequenceClassification, tr.XLMRobertaForMaskedLM],
    None,
  ),
  "distilbert": (
    tr.DistilBertConfig(
      vocab_size=53, max_position_embeddings=20, dim=36, n_layers=1, n_heads=3, hidden_dim=37
    ),
    [tr.DistilBertForSequenceClassification, tr.DistilBertForMaskedLM],
    None,
  ),
}
# Layouts whose family has a pooler that these checkpoints do not hold.
WITHOUT_POOLER = {
  tr.ViTForImageClassification,
  tr.ViTForMaskedImageModeling,
  tr.DeiTForImageClassification,
  tr.DeiTForImageClassificationWithTeacher,
  tr.BeitForMaskedImageModeling,
  tr.BertForMaskedLM,
  tr.RobertaForSequenceClassification,
  tr.RobertaForMaskedLM,
  tr.XLMRobertaForSequenceClassification,
  tr.XLMRobertaForMaskedLM,
}
TEXT_FAMILIES = ("bert", "roberta", "xlm-roberta", "distilbert")
LAYOUTS = [(f, cls) for f, (_, classes, _) in FAMILIES.items() for cls in classes]
LAYOUT_IDS = [f"{f}-{cls.__name__}" for f, cls in LAYOUTS]


def _base(task: tr.PreTrainedModel) -> torch.nn.Module:
  """The base model transformers runs inside a task model (CLIP's: its vision transformer)."""
  return getattr(task, task.base_model_prefix, None) or task.vision_model


@functools.partial(jax.jit, static_argnums=0)
def _apply(module, variables, inputs):
  return module.apply(variables, **inputs)


def _inputs(family: str, config: tr.PretrainedConfig) -> dict[str, np.ndarray]:
  """Pixels (NCHW, as torch takes them), or padded token ids with an attention mask."""
  rng = np.random.default_rng(0)
  if family not in TEXT_FAMILIES:
    return dict(pixel_values=rng.normal(size=(2, 3, 28, 28)).astype(np.float32))
  pad = config.pad_token_id
  ids = rng.integers(pad + 1, config.vocab_size, (3, 9))
  mask = (np.arange(9) < np.array([[9], [6], [2]])).astype(np.int64)
  return dict(input_ids=np.where(mask, ids, pad), attention_mask=mask)


@pytest.mark.parametrize(("family", "task_cls"), LAYOUTS, ids=LAYOUT_IDS)
def test_task_layout_loads_with_no_flags(family, task_cls, tmp_path):
  config, _, tower = FAMILIES[family]
  torch.manual_seed(0)
  task = perturb_weights(task_cls(config))
  task.save_pretrained(tmp_path)

  module, variables, _ = hf.load_pretrained(tmp_path, tower=tower)

  inputs = _inputs(family, config)
  with torch.no_grad():
    ref = _base(task)(**{k: torch.tensor(v) for k, v in inputs.items()})
  if "pixel_values" in inputs:
    inputs["pixel_values"] = inputs["pixel_values"].transpose(0, 2, 3, 1)
  out = _apply(module, variables, {k: jnp.asarray(v) for k, v in inputs.items()})
  last = ref.last_hidden_state.numpy()
  if last.ndim == 4:  # CNN feature maps: NCHW in torch, NHWC in mmtl
    last = last.transpose(0, 2, 3, 1)
  np.testing.assert_allclose(out["last_hidden_state"], last, atol=ATOL, rtol=0)
  pooled = getattr(ref, "pooler_output", None)
  if pooled is None:
    assert out["pooler_output"] is None
  else:
    np.testing.assert_allclose(out["pooler_output"], pooled.reshape(len(pooled), -1), atol=ATOL)
  left_out = {"add_pooling_layer": "pooler"} if task_cls in WITHOUT_POOLER else {}
  assert hf.left_out(module) == left_out
  # The module built from the folder alone (a fusion tower's) has the loaded params' shapes.
  shapes = hf.variable_shapes(hf.build_module(tmp_path, tower=tower))
  assert jax.tree.map(np.shape, shapes) == jax.tree.map(np.shape, variables)


@pytest.fixture(scope="module")
def vit_classifier(tmp_path_factory) -> str:
  """A ViTForImageClassification folder: a checkpoint without a pooler."""
  folder = tmp_path_factory.mktemp("vit_classifier")
  torch.manual_seed(0)
  tr.ViTForImageClassification(FAMILIES["vit"][0]).save_pretrained(folder)
  return str(folder)


def test_part_asked_for_but_not_held_is_an_error(vit_classifier):
  with pytest.raises(
    hf.CheckpointError, match="2 param\\(s\\) missing from the checkpoint: pooler/dense/bias"
  ):
    hf.load_pretrained(vit_classifier, add_pooling_layer=True)
  module = hf.build_module(vit_classifier, add_pooling_layer=True)
  assert module.add_pooling_layer and not hf.left_out(module, ["add_pooling_layer"])
  # dont_load keeps the asked-for part, initialized.
  _, variables, _ = hf.load_pretrained(
    vit_classifier, add_pooling_layer=True, dont_load=["pooler/.*"]
  )
  assert "pooler" in variables["params"]


def test_fusion_tower_from_a_task_checkpoint(vit_classifier):
  """The start-up summary says what was left out; pool='pooler' on it names the reason."""
  model_cfg = {
    **config_lib.model_defaults(),
    "towers": dict(image=dict(name=vit_classifier, pool="cls")),
  }
  model = fusion.build(model_cfg)
  summary = train.describe_towers(model_cfg, dict(image_encoder=vit_classifier), model)
  weights = f"(weights from {vit_classifier}; no pooler: the checkpoint holds none)"
  assert f"image: {vit_classifier} {weights}" in summary
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), model.dummy_batch())["params"]
  assert "pooler" not in params["image_encoder"]
  model_cfg["towers"]["image"]["pool"] = "pooler"
  model = fusion.build(model_cfg)
  with pytest.raises(ValueError, match="a checkpoint that holds none, such as a ViTFor"):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), model.dummy_batch())
