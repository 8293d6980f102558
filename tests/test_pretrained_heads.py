"""A contrastive FusionModel loaded whole from a CLIP (or SigLIP) checkpoint, towers and
head, is transformers' CLIPModel (SiglipModel): same logits and retrieval at step 0."""

import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest
import torch
import transformers

from mmtl import config as config_lib
from mmtl import evaluators, heads, hf, sharding, train_state
from mmtl.models import fusion
from tests.hf_fixtures import make_tiny_checkpoint
from tests.test_models_parity import jitted_apply
from tests.test_models_siglip import inputs as siglip_inputs

ATOL = 1e-5
BATCH = 6


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  """Towers of different widths (square kernels would hide a missing transpose) and a
  logit_scale that is not log(1 / 0.07), the head's own init."""
  return make_tiny_checkpoint(
    "clip",
    tmp_path_factory.mktemp("odd_clip"),
    vision_config=dict(hidden_size=48, intermediate_size=40),
    logit_scale_init_value=3.1,
  )


def clip_config(path, width=24, head=None):
  towers = {
    m: dict(name=path, tower=tower, pool="pooler")
    for m, tower in (("image", "vision"), ("text", "text"))
  }
  return config_lib.with_defaults(
    mlc.ConfigDict(
      dict(
        model=dict(towers=towers, fusion="contrastive", head="contrastive", width=width),
        model_init=dict(
          image_encoder=dict(name=path, tower="vision"),
          text_encoder=dict(name=path, tower="text"),
          head=path if head is None else head,
        ),
      )
    )
  )


def init(config, notes=None):
  """(model, mesh, params) of `config`'s initial model; the start-up notes go to `notes`."""
  mesh = sharding.make_mesh(config.mesh)
  model = fusion.build(config.model)
  layout = train_state.param_layout(model, config, mesh)
  note = (lambda _: None) if notes is None else notes.append
  variables = train_state.init_variables(model, config, layout, note=note)
  return model, mesh, variables["params"]


def padded_batch(path):
  """Random pixels; random text right-padded with EOS to different lengths."""
  text = hf.read_config(path)["text_config"]
  rng = np.random.default_rng(0)
  ids = rng.integers(3, text["vocab_size"] - 1, (BATCH, 9))
  mask = np.ones_like(ids)
  for row, n in enumerate(np.linspace(9, 2, BATCH).astype(int)):
    ids[row, n - 1 :] = text["eos_token_id"]
    mask[row, n:] = 0
  pixels = rng.standard_normal((BATCH, 3, 16, 16)).astype(np.float32)
  return ids, mask, pixels


def recall_from_logits(logits, ks):
  """Recall@k both ways of a square image x text score matrix (positives on the diagonal)."""
  positive = np.diag(logits)
  ranks = {
    "i2t": (logits >= positive[:, None]).sum(1) - 1,
    "t2i": (logits >= positive[None, :]).sum(0) - 1,
  }
  return {f"{d}_recall@{k}": float((r < k).mean()) for d, r in ranks.items() for k in ks}


def test_clip_dual_encoder_matches_transformers_at_step_0(clip_dir):
  notes = []
  model, mesh, params = init(clip_config(clip_dir), notes)
  assert not [n for n in notes if "zero-shot" in n]  # Pooled as the checkpoint's head expects.
  assert float(params["head"]["logit_scale"]) == pytest.approx(3.1)
  ids, mask, pixels = padded_batch(clip_dir)
  assert (mask == 0).any()
  batch = dict(
    pixel_values=jnp.asarray(pixels.transpose(0, 2, 3, 1)),
    input_ids=jnp.asarray(ids, jnp.int32),
    attention_mask=jnp.asarray(mask, jnp.int32),
  )
  out = jitted_apply(model, {"params": params}, batch)
  logits = np.exp(out["logit_scale"]) * np.asarray(out["image_embeds"] @ out["text_embeds"].T)
  with torch.no_grad():
    ref = transformers.CLIPModel.from_pretrained(clip_dir).eval()(
      input_ids=torch.tensor(ids),
      attention_mask=torch.tensor(mask),
      pixel_values=torch.tensor(pixels),
    )
  ref_logits = ref.logits_per_image.numpy()
  np.testing.assert_allclose(logits, ref_logits, atol=ATOL, rtol=0)
  np.testing.assert_allclose(out["image_embeds"], ref.image_embeds.numpy(), atol=ATOL, rtol=0)
  np.testing.assert_allclose(out["text_embeds"], ref.text_embeds.numpy(), atol=ATOL, rtol=0)

  ks = (1, 2, 3)
  context = evaluators.EvalContext(
    head_type="contrastive",
    make_batches=lambda cfg: [batch],
    predict_fns=heads.get("contrastive").predict_fns(model, mesh),
  )
  retrieval = evaluators.make("val", dict(type="retrieval", ks=ks), context)
  assert retrieval.run({"params": params}) == {
    f"val/{k}": v for k, v in recall_from_logits(ref_logits, ks).items()
  }


def test_towers_pooled_otherwise_than_the_head_expects_are_noted(clip_dir):
  config = clip_config(clip_dir)
  config.model.towers.image.pool = "mean"
  notes = []
  init(config, notes)
  assert [n for n in notes if "zero-shot" in n] == [
    f"Note: model_init.head <- {clip_dir} holds projections trained on its towers' pooler "
    "outputs, but config.model.towers.image.pool='mean': the model at step 0 is not "
    f"{clip_dir}'s own zero-shot model (pool='pooler' makes it so)."
  ]


def test_head_width_must_be_the_projection_dim(clip_dir):
  with pytest.raises(
    hf.CheckpointError,
    match=r"head/image_proj/kernel: checkpoint \(48, 24\) vs model \(48, 16\).*"
    r"config.model.width must equal the checkpoint's projection_dim \(24\)",
  ):
    init(clip_config(clip_dir, width=16))


def test_head_needs_a_dual_encoder_checkpoint(clip_dir, tiny_bert_dir):
  with pytest.raises(hf.CheckpointError, match="BertModel checkpoint.*model_init.head"):
    init(clip_config(clip_dir, head=tiny_bert_dir))
  with pytest.raises(hf.CheckpointError, match="with tower='vision'"):
    init(clip_config(clip_dir, head=dict(name=clip_dir, tower="vision")))


def siglip_config(path, width=0, loss="sigmoid"):
  config = clip_config(path, width=width)
  config.model.contrastive_loss = loss
  return config


def test_siglip_dual_encoder_matches_transformers_at_step_0(tiny_siglip_dir):
  """SigLIP has no projections (width=0): its towers' poolers, temperature and bias make
  the head, and the model is transformers' SiglipModel at step 0."""
  model, _, params = init(siglip_config(tiny_siglip_dir))
  assert "image_proj" not in params["head"]
  ids, mask, pixels = siglip_inputs()
  batch = dict(
    pixel_values=jnp.asarray(pixels.transpose(0, 2, 3, 1)),
    input_ids=jnp.asarray(ids, jnp.int32),
    attention_mask=jnp.asarray(mask, jnp.int32),
  )
  out = jitted_apply(model, {"params": params}, batch)
  logits = np.exp(out["logit_scale"]) * np.asarray(out["image_embeds"] @ out["text_embeds"].T)
  logits = logits + np.asarray(out["logit_bias"])
  with torch.no_grad():
    ref = transformers.SiglipModel.from_pretrained(tiny_siglip_dir).eval()(
      input_ids=torch.tensor(ids),
      attention_mask=torch.tensor(mask),
      pixel_values=torch.tensor(pixels),
    )
  np.testing.assert_allclose(logits, ref.logits_per_image.numpy(), atol=ATOL, rtol=0)
  assert float(out["logit_bias"]) == pytest.approx(-1.7)


def test_siglip_head_needs_width_0_and_the_sigmoid_loss(tiny_siglip_dir):
  with pytest.raises(hf.CheckpointError, match="config.model.width must be 0"):
    init(siglip_config(tiny_siglip_dir, width=16))
  with pytest.raises(
    hf.CheckpointError, match="logit_bias.*config.model.contrastive_loss='sigmoid'"
  ):
    init(siglip_config(tiny_siglip_dir, loss="softmax"))
