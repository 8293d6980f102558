"""mmtl.interpret: attention maps, rollout, gates, gradient x input; their two evaluators."""

import contextlib
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmtl import interpret, train
from mmtl.models import layers
from tests.test_fusion import fused_classifier, hf_batch, hf_towers
from tests.test_train import TINY_VIT, tiny_config


def image_text_model(fusion_type, seed=0):
  """A tiny ViT + BERT fused classifier with random (non-zero) head weights."""
  towers = {m: t for m, t in hf_towers().items() if m in ("image", "text")}
  model = fused_classifier(towers, fusion_type, fusion_layer=-1)
  batch = {k: v for k, v in hf_batch().items() if k != "audio_values"}
  variables = model.init(jax.random.PRNGKey(0), batch)
  rng = np.random.default_rng(seed)
  variables = jax.tree.map(lambda x: x + 0.2 * rng.normal(size=x.shape).astype(x.dtype), variables)
  return model, variables, batch


def test_attention_weights_are_the_probabilities_the_attention_uses():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 5, 3, 4)), jnp.float32) for _ in range(3))
  mask = jnp.asarray([[True] * 5, [True] * 3 + [False] * 2])
  for causal in (False, True):
    probs = layers.attention_weights(q, k, mask, causal=causal)
    expected = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, None, :], is_causal=causal)
    np.testing.assert_allclose(jnp.einsum("bhqk,bkhd->bqhd", probs, v), expected, atol=1e-5)
    assert float(probs[1, :, :, 3:].max()) == 0.0  # Padding gets none.


@pytest.mark.parametrize("fusion_type", ["cross_attention", "gated", "concat", "bottleneck"])
def test_explain_gives_the_maps_of_the_fusion_and_the_plain_outputs(fusion_type):
  model, variables, batch = image_text_model(fusion_type)
  out = jax.jit(lambda v, b: interpret.explain(model, v, b))(variables, batch)
  np.testing.assert_allclose(out["logits"], model.apply(variables, batch)["logits"], atol=1e-5)
  # The ViT: CLS + 4 patches; BERT: 6 tokens, 2 of them padding.
  assert out["rollout/image"].shape == (3, 5) and out["rollout/text"].shape == (3, 6)
  np.testing.assert_allclose(out["rollout/image"].sum(-1), 1.0, rtol=1e-5)
  assert float(np.abs(out["rollout/text"][:, 4:]).max()) < 1e-6  # Nothing on padding.
  np.testing.assert_allclose(out["attribution"].sum(-1), 1.0, rtol=1e-5)
  assert ("gate" in out) == (fusion_type == "gated")
  if fusion_type == "gated":
    np.testing.assert_allclose(out["gate"].sum(-1), 1.0, rtol=1e-5)
  cross = {k for k in out if k.startswith("cross_attention/")}
  if fusion_type == "cross_attention":
    assert cross == {"cross_attention/text->image", "cross_attention/image->text"}
    np.testing.assert_allclose(out["cross_attention/text->image"].sum(-1), 1.0, rtol=1e-5)
    assert float(np.abs(out["cross_attention/image->text"][:, 4:]).max()) < 1e-6
  else:
    assert not cross


def test_one_layer_rollout_is_the_residual_mixed_attention_of_the_cls_token():
  attention = jnp.asarray(np.random.default_rng(0).dirichlet(np.ones(4), size=(1, 2, 4)))
  rollout = interpret._rollout([attention], jnp.ones((1, 4), bool), "cls")
  expected = 0.5 * np.asarray(attention).mean(1)[0, 0] + 0.5 * np.eye(4)[0]
  np.testing.assert_allclose(rollout[0], expected, rtol=1e-6)


def test_a_modality_the_prediction_ignores_gets_no_attribution():
  """Concat fusion with the text projection zeroed: the logits do not depend on the text."""
  model, variables, batch = image_text_model("concat")
  params = jax.tree.map(lambda x: x, variables["params"])
  params["fusion"]["proj_text"] = jax.tree.map(jnp.zeros_like, params["fusion"]["proj_text"])
  out = interpret.explain(model, {**variables, "params": params}, batch)
  np.testing.assert_allclose(out["attribution"][:, 0], 1.0, rtol=1e-6)  # model.modalities[0]
  assert model.modalities[0] == "image"


def test_patch_grid_drops_the_class_token():
  assert interpret.patch_grid(np.arange(5.0)).tolist() == [[1.0, 2.0], [3.0, 4.0]]
  assert interpret.patch_grid(np.arange(4.0)).shape == (2, 2)
  assert interpret.patch_grid(np.arange(6.0)).shape == (2, 2)  # CLS + distillation token
  assert interpret.patch_grid(np.arange(7.0)) is None


@pytest.mark.slow
def test_a_run_writes_attention_maps_and_the_modality_contribution_table(
  tiny_bert_dir, data_dir, tmp_path
):
  held_out = dict(split="validation[:20]")
  config = tiny_config(
    tiny_bert_dir,
    data_dir,
    total_steps=2,
    evals=dict(
      maps=dict(type="attention_maps", examples=3, input=held_out),
      contribution=dict(type="modality_contribution", input=held_out),
    ),
  )
  config.model.fusion = "cross_attention"
  with contextlib.redirect_stdout(io.StringIO()):
    final = train.train(config, str(tmp_path / "run"))
  ms = ("image", "text")
  assert set(final) == {"step"} | {
    f"contribution/{k}"
    for k in ("accuracy", *(f"accuracy_without_{m}" for m in ms), *(f"attribution_{m}" for m in ms))
  }
  assert final["contribution/attribution_image"] + final["contribution/attribution_text"] == (
    pytest.approx(1.0)
  )
  table = json.loads((tmp_path / "run" / "contribution_step2-contribution.json").read_text())
  assert table["examples"] == 20 and [r["modality"] for r in table["modalities"]] == list(ms)
  assert table["modalities"][0]["accuracy_without"] == final["contribution/accuracy_without_image"]
  pictures = sorted((tmp_path / "run" / "attention_step2-maps").iterdir())
  assert [p.name for p in pictures] == ["0.png", "1.png", "2.png"]
  assert all(p.read_bytes()[:4] == b"\x89PNG" for p in pictures)
  assert TINY_VIT["image_size"] // TINY_VIT["patch_size"] == 2  # 2 x 2 patch maps drawn


def test_a_video_towers_rollout_is_over_its_frames():
  """A video tower's frame layers attend within frames (batch x frames rows): its rollout
  is that of the temporal layers over the clip's frames."""
  from mmtl import config as config_lib  # pylint: disable=g-import-not-at-top
  from mmtl.models import fusion  # pylint: disable=g-import-not-at-top

  bert = dict(
    model_type="bert",
    vocab_size=50,
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=32,
    max_position_embeddings=16,
  )
  video = dict(name=TINY_VIT, temporal=dict(max_frames=4, num_heads=2))
  towers = dict(video=video, text=dict(name=bert))
  model = fusion.build(dict(config_lib.model_defaults(), towers=towers, width=8))
  rng = np.random.default_rng(0)
  batch = {
    "video": rng.normal(size=(2, 4, 16, 16, 3)).astype(np.float32),  # 4 frames of 2 x 2 patches
    "video_mask": np.ones((2, 4), np.int32),
    "input_ids": rng.integers(1, 50, size=(2, 6)).astype(np.int32),
    "attention_mask": np.ones((2, 6), np.int32),
  }
  variables = model.init(jax.random.PRNGKey(0), batch)
  out = interpret.explain(model, variables, batch)
  # The factorised model's temporal layer attends over the clip's 4 frames.
  assert out["rollout/video"].shape == (2, 4) and out["rollout/text"].shape == (2, 6)
  np.testing.assert_allclose(out["rollout/video"].sum(-1), 1.0, rtol=1e-5)
  assert out["attribution"].shape == (2, 2)
