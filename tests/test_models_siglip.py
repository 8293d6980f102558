"""mmtl's SigLIP computes what transformers' SiglipModel computes: towers, logits with the
learned bias, the sigmoid loss; checkpoints round-trip; the fusion head's sigmoid option."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mmtl import heads, hf, losses, optim, rules, train_step
from mmtl.models import fusion, siglip
from tests import xla_settings
from tests.hf_fixtures import SIGLIP_VOCAB, export_and_reload
from tests.test_accumulation import run_steps, stateless
from tests.test_models_parity import jitted_apply

ATOL = 1e-5


def inputs(batch=4, length=9):
  """Random pixels; random ids right-padded (with pad id 1) to different lengths."""
  rng = np.random.default_rng(0)
  ids = rng.integers(3, SIGLIP_VOCAB, (batch, length))
  mask = np.ones_like(ids)
  for row, n in enumerate(np.linspace(length, 2, batch).astype(int)):
    ids[row, n:], mask[row, n:] = 1, 0
  return ids, mask, rng.standard_normal((batch, 3, 16, 16)).astype(np.float32)


def nhwc(pixels):
  return jnp.asarray(pixels.transpose(0, 2, 3, 1))


def close(ours, ref):
  np.testing.assert_allclose(np.asarray(ours), ref.detach().numpy(), atol=ATOL, rtol=0)


def test_siglip_parity_logits_and_loss(tiny_siglip_dir):
  module, variables, _ = hf.load_pretrained(tiny_siglip_dir)
  assert isinstance(module, siglip.SiglipModel)
  ids, mask, pixels = inputs()
  out = xla_settings.production_jit(module.apply)(
    variables, jnp.asarray(ids), nhwc(pixels), jnp.asarray(mask)
  )
  with torch.no_grad():
    ref = transformers.SiglipModel.from_pretrained(tiny_siglip_dir).eval()(
      input_ids=torch.tensor(ids),
      attention_mask=torch.tensor(mask),
      pixel_values=torch.tensor(pixels),
      return_loss=True,
    )
  for key in ("logits_per_image", "logits_per_text", "image_embeds", "text_embeds"):
    close(out[key], getattr(ref, key))
  for tower, ref_out in (("vision", ref.vision_model_output), ("text", ref.text_model_output)):
    for key in ("last_hidden_state", "pooler_output"):
      close(out[f"{tower}_model_output"][key], ref_out[key])
  # The head's sigmoid loss, as the trainer computes it (sum, weight), is SiglipModel's.
  loss_sum, weight = heads.get("contrastive").loss(
    dict(
      image_embeds=out["image_embeds"],
      text_embeds=out["text_embeds"],
      logit_scale=variables["params"]["logit_scale"],
      logit_bias=variables["params"]["logit_bias"],
    ),
    {},
    {},
  )
  np.testing.assert_allclose(float(losses.mean_of(loss_sum, weight)), float(ref.loss), rtol=1e-6)


def test_siglip_towers_alone(tiny_siglip_dir, tmp_path):
  """Towers out of the full checkpoint, and saved alone by transformers, are HF's towers;
  embed -> run_layers -> finalize (what fusion runs) gives the same."""
  ids, mask, pixels = inputs()
  args = {"vision": (nhwc(pixels),), "text": (jnp.asarray(ids), jnp.asarray(mask))}
  ref_classes = {"vision": transformers.SiglipVisionModel, "text": transformers.SiglipTextModel}
  ref_kw = {
    "vision": dict(pixel_values=torch.tensor(pixels)),
    "text": dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)),
  }
  _, full, _ = hf.load_pretrained(tiny_siglip_dir)
  for tower, ref_cls in ref_classes.items():
    ref_model = ref_cls.from_pretrained(tiny_siglip_dir).eval()
    with torch.no_grad():
      ref = ref_model(**ref_kw[tower])
    alone = tmp_path / tower
    ref_model.save_pretrained(alone)
    for path, kw in ((tiny_siglip_dir, dict(tower=tower)), (alone, {})):
      module, variables, _ = hf.load_pretrained(path, **kw)
      jax.tree.map(np.testing.assert_array_equal, variables["params"], full["params"][tower])
      out = jitted_apply(module, variables, *args[tower])
      for key in ("last_hidden_state", "pooler_output"):
        close(out[key], ref[key])

    def pieces(m, *a):
      x, m_ = m.embed(*a)
      return m.finalize(m.run_layers(x, m_, 0, m.num_layers), m_)

    split = jitted_apply(module, variables, *args[tower], method=pieces)  # the lone tower
    close(split["pooler_output"], ref.pooler_output)


@pytest.mark.parametrize("tower", [None, "vision", "text"])
def test_siglip_export_round_trip(tiny_siglip_dir, tower, tmp_path):
  module, variables, _ = hf.load_pretrained(tiny_siglip_dir, tower=tower)
  # AutoModel has no entry for siglip_text_model: load with the class config.json names.
  torch_cls = getattr(transformers, module.hf_architecture)
  torch_model = export_and_reload(module, variables, tmp_path / "export", torch_cls)
  ref_model = torch_cls.from_pretrained(tiny_siglip_dir).eval()
  ids, mask, pixels = inputs()
  kw = {}
  if tower in (None, "text"):
    kw.update(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
  if tower in (None, "vision"):
    kw.update(pixel_values=torch.tensor(pixels))
  with torch.no_grad():
    got, want = torch_model(**kw), ref_model(**kw)
  key = "logits_per_image" if tower is None else "pooler_output"
  torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)


def test_fusion_sigmoid_head(tiny_siglip_dir):
  """contrastive_loss="sigmoid" gives the head a logit_bias (SigLIP's init) and the loss the
  sigmoid one; SigLIP towers drive it through the encoder protocol."""
  towers = {
    m: hf.build_module(tiny_siglip_dir, tower=t) for m, t in (("image", "vision"), ("text", "text"))
  }
  model = fusion.FusionModel(
    towers=towers,
    fusion_type="contrastive",
    head_type="contrastive",
    width=16,
    pools=dict(image="pooler", text="pooler"),
    head_config=dict(temperature_init=0.1, contrastive_loss="sigmoid"),
  )
  ids, mask, pixels = inputs()
  batch = dict(
    pixel_values=nhwc(pixels), input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask)
  )
  params = jax.jit(model.init)(jax.random.PRNGKey(0), batch)["params"]
  assert float(params["head"]["logit_bias"]) == -10.0
  assert float(params["head"]["logit_scale"]) == pytest.approx(np.log(10.0))
  out = jitted_apply(model, {"params": params}, batch)
  got = heads.get("contrastive").loss(out, batch, heads.get("contrastive").loss_config)
  want = losses.sigmoid_per_example(
    out["image_embeds"], out["text_embeds"], out["logit_scale"], out["logit_bias"]
  ).sum()
  np.testing.assert_allclose(got[0], want, rtol=1e-6)
  assert float(got[1]) == len(ids)
  assert "head/logit_bias" in rules.flatten(params)
  with pytest.raises(ValueError, match="contrastive_loss 'hinge'"):
    model.clone(head_config=dict(contrastive_loss="hinge"))


def test_sigmoid_loss_accumulates_over_the_full_batch():
  """Each text's row needs every image, so the sigmoid loss takes the gradient cache: the
  step (temperature and bias included) is the full batch's under accumulation."""

  def forward(trainable, frozen, batch, rng):
    del rng
    p = optim.combine(trainable, frozen)
    image, text = batch["image"] @ p["image"], batch["text"] @ p["text"]
    return {
      "image_embeds": image / jnp.linalg.norm(image, axis=-1, keepdims=True),
      "text_embeds": text / jnp.linalg.norm(text, axis=-1, keepdims=True),
      "logit_scale": p["logit_scale"],
      "logit_bias": p["logit_bias"],
    }

  objective = train_step.Objective(
    stateless(forward), lambda o, b, t: heads.get("contrastive").loss(o, b, {}), separable=False
  )
  rng = np.random.default_rng(2)
  params = {
    "image": rng.normal(size=(6, 5)).astype(np.float32),
    "text": rng.normal(size=(4, 5)).astype(np.float32),
    "logit_scale": np.float32(np.log(10.0)),
    "logit_bias": np.float32(-2.0),
  }
  batch = {
    "image": rng.normal(size=(16, 6)).astype(np.float32),
    "text": rng.normal(size=(16, 4)).astype(np.float32),
  }
  mask = {name: False for name in params}
  out = {k: run_steps(objective, params, batch, mask, k, lr=0.1, steps=2) for k in (1, 4)}
  assert out[4][1] == pytest.approx(out[1][1], rel=1e-5)
  for name in params:
    np.testing.assert_allclose(out[4][0][name], out[1][0][name], rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(out[1][0][name]) - params[name]).max() > 1e-4, name
