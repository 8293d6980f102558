"""mmtl's Flax encoders compute what transformers' PyTorch models compute.

Tiny random checkpoints (tests/hf_fixtures.py) are loaded into both; outputs
must agree within 1e-5 (float32) on random inputs with padding.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mmtl import hf, rules
from mmtl.models import encoder
from tests import xla_settings
from tests.hf_fixtures import make_tiny_checkpoint

ATOL = 1e-5


@functools.partial(xla_settings.production_jit, static_argnums=(0, 1, 2))
def _jitted_apply(module, method, static_kw, variables, args, kw):
  return module.apply(variables, *args, method=method, **dict(static_kw), **kw)


def jitted_apply(module, variables, *args, method=None, deterministic=None, **kw):
  """Jitted module.apply (compiles are cached per module): much cheaper than op-by-op dispatch."""
  static_kw = () if deterministic is None else (("deterministic", deterministic),)
  return _jitted_apply(module, method, static_kw, variables, args, kw)


def _torch_model(path, cls=transformers.AutoModel):
  return cls.from_pretrained(path).eval()


def _close(ours, ref, atol=ATOL):
  np.testing.assert_allclose(np.asarray(ours, np.float32), ref.detach().numpy(), atol=atol, rtol=0)


def _text_inputs(vocab_size, eos=None, batch=3, length=9, seed=0):
  """Random ids, right-padded rows of different lengths (row 0 full, last row 2 tokens)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab_size - 1, (batch, length))
  mask = np.ones_like(ids)
  for row, n in enumerate(np.linspace(length, 2, batch).astype(int)):
    mask[row, n:] = 0
    if eos is not None:
      ids[row, n - 1] = eos
      ids[row, n:] = eos  # CLIP pads with the EOS token
  return ids, mask


def _pixels(batch=2, size=16, channels=3, seed=0):
  return (
    np.random.default_rng(seed).standard_normal((batch, channels, size, size)).astype(np.float32)
  )


def _nhwc(pixels):
  return jnp.asarray(pixels.transpose(0, 2, 3, 1))


def _bert_parity(path):
  module, variables, config = hf.load_pretrained(path)
  ids, mask = _text_inputs(config["vocab_size"])
  types = np.random.default_rng(1).integers(0, 2, ids.shape)
  out = jitted_apply(module, variables, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
  with torch.no_grad():
    ref = _torch_model(path)(
      input_ids=torch.tensor(ids),
      attention_mask=torch.tensor(mask),
      token_type_ids=torch.tensor(types),
    )
  assert (mask == 0).any()  # padded rows; every position is compared, padding included
  _close(out["last_hidden_state"], ref.last_hidden_state)
  _close(out["pooler_output"], ref.pooler_output)


def test_bert_parity(tiny_bert_dir):
  _bert_parity(tiny_bert_dir)


def test_bert_gelu_new_parity(tmp_path):
  _bert_parity(
    make_tiny_checkpoint(
      "bert", tmp_path, hidden_act="gelu_new", layer_norm_eps=1e-6, type_vocab_size=3
    )
  )


def _vit_parity(path, size=16, channels=3):
  module, variables, _ = hf.load_pretrained(path)
  pixels = _pixels(size=size, channels=channels)
  out = jitted_apply(module, variables, _nhwc(pixels))
  with torch.no_grad():
    ref = _torch_model(path)(pixel_values=torch.tensor(pixels))
  _close(out["last_hidden_state"], ref.last_hidden_state)
  _close(out["pooler_output"], ref.pooler_output)


def test_vit_parity(tiny_vit_dir):
  _vit_parity(tiny_vit_dir)


def test_vit_variant_parity(tmp_path):
  """No qkv bias, quick_gelu, 1 channel (the audio encoder), other pooler size."""
  path = make_tiny_checkpoint(
    "vit",
    tmp_path,
    qkv_bias=False,
    hidden_act="quick_gelu",
    num_channels=1,
    pooler_output_size=8,
    image_size=8,
  )
  _vit_parity(path, size=8, channels=1)


def _clip_parity(path):
  module, variables, config = hf.load_pretrained(path)
  text = config["text_config"]
  ids, mask = _text_inputs(text["vocab_size"], eos=text["eos_token_id"])
  pixels = _pixels()
  out = jitted_apply(module, variables, jnp.asarray(ids), _nhwc(pixels), jnp.asarray(mask))
  with torch.no_grad():
    ref = _torch_model(path)(
      input_ids=torch.tensor(ids),
      attention_mask=torch.tensor(mask),
      pixel_values=torch.tensor(pixels),
    )
  for key in ("logits_per_image", "logits_per_text", "image_embeds", "text_embeds"):
    _close(out[key], getattr(ref, key))
  # transformers 5 overwrites the towers' pooler_output with the projection; mmtl keeps the tower's
  # own pooler_output there (as CLIPVisionModel / CLIPTextModel give it; tested below).
  _close(out["vision_model_output"]["last_hidden_state"], ref.vision_model_output.last_hidden_state)
  _close(out["text_model_output"]["last_hidden_state"], ref.text_model_output.last_hidden_state)


def test_clip_parity(tiny_clip_dir):
  _clip_parity(tiny_clip_dir)


def test_clip_legacy_eos_parity(tmp_path):
  """eos_token_id == 2 (configs before transformers #24773): pool at the largest token id."""
  path = make_tiny_checkpoint("clip", tmp_path, text_config=dict(eos_token_id=2, hidden_act="gelu"))
  _clip_parity(path)


def test_clip_towers_match_hf_towers(tiny_clip_dir):
  """Towers loaded out of a full CLIP checkpoint are HF's CLIPVisionModel / CLIPTextModel."""
  vision, vision_vars, _ = hf.load_pretrained(tiny_clip_dir, tower="vision")
  text, text_vars, config = hf.load_pretrained(tiny_clip_dir, tower="text")
  ids, mask = _text_inputs(
    config["text_config"]["vocab_size"], eos=config["text_config"]["eos_token_id"]
  )
  pixels = _pixels()
  with torch.no_grad():
    vref = _torch_model(tiny_clip_dir, transformers.CLIPVisionModel)(
      pixel_values=torch.tensor(pixels)
    )
    tref = _torch_model(tiny_clip_dir, transformers.CLIPTextModel)(
      input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)
    )
  vout = jitted_apply(vision, vision_vars, _nhwc(pixels))
  tout = jitted_apply(text, text_vars, jnp.asarray(ids), jnp.asarray(mask))
  for key in ("last_hidden_state", "pooler_output"):
    _close(vout[key], vref[key])
    _close(tout[key], tref[key])


def test_clip_tower_params_are_clip_subtrees(tiny_clip_dir):
  _, full, _ = hf.load_pretrained(tiny_clip_dir)
  for tower in ("vision", "text"):
    _, variables, _ = hf.load_pretrained(tiny_clip_dir, tower=tower)
    jax.tree.map(np.testing.assert_array_equal, variables["params"], full["params"][tower])
  paths = rules.flatten(full["params"])
  for path in (
    "vision/encoder/layer_1/attn/query/kernel",
    "text/encoder/layer_0/mlp/fc1/kernel",
    "visual_projection/kernel",
    "text_projection/kernel",
    "logit_scale",
  ):
    assert path in paths


@pytest.mark.parametrize("family", ["bert", "vit", "clip_vision", "clip_text"])
def test_encoder_protocol_runs_layer_ranges(family, tiny_bert_dir, tiny_vit_dir, tiny_clip_dir):
  """embed -> run_layers in pieces -> finalize == __call__ (what fusion relies on)."""
  if family == "bert":
    module, variables, _ = hf.load_pretrained(tiny_bert_dir)
    inputs = dict(zip(("input_ids", "attention_mask"), map(jnp.asarray, _text_inputs(90))))
  elif family == "vit":
    module, variables, _ = hf.load_pretrained(tiny_vit_dir)
    inputs = dict(pixel_values=_nhwc(_pixels()))
  elif family == "clip_vision":
    module, variables, _ = hf.load_pretrained(tiny_clip_dir, tower="vision")
    inputs = dict(pixel_values=_nhwc(_pixels()))
  else:
    module, variables, config = hf.load_pretrained(tiny_clip_dir, tower="text")
    ids, mask = _text_inputs(80, eos=config["text_config"]["eos_token_id"])
    inputs = dict(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask))
  assert (module.num_layers, module.hidden_size) == (2, 32)
  assert isinstance(module, encoder.Encoder) and set(module.dummy_inputs()) == set(module.inputs)

  def pieces(m):
    x, mask = m.embed(**inputs, deterministic=True)
    assert x.shape[:2] == mask.shape and mask.dtype == jnp.bool_ and x.shape[2] == m.hidden_size
    for start in range(m.num_layers):
      x = m.run_layers(x, mask, start, start + 1)
    return m.finalize(x, mask)

  whole = jitted_apply(module, variables, **inputs)
  split = jitted_apply(module, variables, method=pieces)
  for key in ("last_hidden_state", "pooler_output"):
    np.testing.assert_allclose(split[key], whole[key], atol=1e-6)
  with pytest.raises(ValueError, match="outside the encoder's 2 layers"):
    jitted_apply(module, variables, method=lambda m: m.run_layers(*m.embed(**inputs), 1, 3))


def test_remat_wraps_each_layer(tiny_vit_dir):
  """remat puts every layer under jax.checkpoint with the policy (tracing only: cheap), same
  values."""
  module, variables, _ = hf.load_pretrained(tiny_vit_dir)
  pixels = _nhwc(_pixels())

  def remat_policies(m):
    loss = lambda p: jnp.sum(m.apply({"params": p}, pixels)["pooler_output"] ** 2)
    eqns = jax.make_jaxpr(jax.grad(loss))(variables["params"]).jaxpr.eqns
    return [e.params["policy"] for e in eqns if e.primitive.name.startswith("remat")]

  assert remat_policies(module) == []
  assert remat_policies(module.clone(remat="full")) == [None] * module.num_layers
  dots = remat_policies(module.clone(remat="dots"))
  assert len(dots) == module.num_layers and dots[0] is not None
  np.testing.assert_allclose(
    jitted_apply(module.clone(remat="dots"), variables, pixels)["pooler_output"],
    jitted_apply(module, variables, pixels)["pooler_output"],
    atol=1e-6,
  )
  with pytest.raises(ValueError, match="remat='most'"):
    hf.load_pretrained(tiny_vit_dir, remat="most")


def test_bfloat16_loading(tiny_bert_dir):
  module, variables, config = hf.load_pretrained(
    tiny_bert_dir, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16
  )
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.bfloat16)}
  _, variables32, _ = hf.load_pretrained(tiny_bert_dir)
  ids, mask = map(jnp.asarray, _text_inputs(config["vocab_size"]))
  out = jitted_apply(module, variables, ids, mask)["last_hidden_state"]
  ref = jitted_apply(module.clone(dtype=jnp.float32), variables32, ids, mask)["last_hidden_state"]
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=0.1)


def test_dropout_only_when_not_deterministic(tiny_bert_dir):
  module, variables, config = hf.load_pretrained(tiny_bert_dir)  # hidden/attention dropout 0.1
  ids, mask = map(jnp.asarray, _text_inputs(config["vocab_size"]))
  ref = jitted_apply(module, variables, ids, mask)["last_hidden_state"]
  train = lambda seed: jitted_apply(
    module, variables, ids, mask, deterministic=False, rngs={"dropout": jax.random.PRNGKey(seed)}
  )["last_hidden_state"]
  assert not np.allclose(train(0), ref, atol=1e-3)
  np.testing.assert_array_equal(train(0), train(0))
  assert not np.allclose(train(0), train(1), atol=1e-3)


def test_clip_text_pooling_without_input_ids(tiny_clip_dir):
  """Fusion calls finalize(x, mask): the last real token is the EOS of right-padded text."""
  module, variables, config = hf.load_pretrained(tiny_clip_dir, tower="text")
  ids, mask = map(jnp.asarray, _text_inputs(80, eos=config["text_config"]["eos_token_id"]))

  def no_ids(m):
    x, m_ = m.embed(ids, mask)
    return m.finalize(m.run_layers(x, m_, 0, m.num_layers), m_)

  np.testing.assert_allclose(
    jitted_apply(module, variables, method=no_ids)["pooler_output"],
    jitted_apply(module, variables, ids, mask)["pooler_output"],
    atol=1e-6,
  )


def test_pixel_layout_error_names_the_fix(tiny_vit_dir):
  module, variables, _ = hf.load_pretrained(tiny_vit_dir)
  with pytest.raises(ValueError, match=r"expects NHWC \(B, 16, 16, 3\).*transpose"):
    jitted_apply(module, variables, jnp.asarray(_pixels()))  # NCHW


def test_attention_dropout_path_keeps_causal_and_padding_masks(tiny_clip_dir):
  """With attention dropout on, attention is computed without jax.nn.dot_product_attention; at a
  vanishing rate it must give the deterministic result (same causal + padding masking)."""
  _, variables, config = hf.load_pretrained(tiny_clip_dir, tower="text")
  module = hf.build_module(
    {**config["text_config"], "model_type": "clip_text_model", "attention_dropout": 1e-9}
  )
  ids, mask = map(jnp.asarray, _text_inputs(80, eos=config["text_config"]["eos_token_id"]))
  train = jitted_apply(
    module, variables, ids, mask, deterministic=False, rngs={"dropout": jax.random.PRNGKey(0)}
  )
  np.testing.assert_allclose(
    train["last_hidden_state"],
    jitted_apply(module, variables, ids, mask)["last_hidden_state"],
    atol=1e-5,
  )


def test_cudnn_attention_wiring_matches_mask_path(tiny_clip_dir, monkeypatch):
  """attention_impl="cudnn" passes padding as per-example lengths (+ causal for CLIP text).

  CPU has no cuDNN, so the call is routed to XLA's implementation of the same
  arguments: what is checked is mmtl's side (lengths, causality, dtype) - outputs on
  real tokens and the gradients of a loss on the pooled embeddings equal the boolean
  mask path's."""
  calls = []
  original = jax.nn.dot_product_attention

  def cudnn_on_xla(q, k, v, *args, implementation=None, **kw):
    if implementation == "cudnn":
      calls.append(kw)
      implementation = "xla"
    return original(q, k, v, *args, implementation=implementation, **kw)

  monkeypatch.setattr(jax.nn, "dot_product_attention", cudnn_on_xla)
  _, variables, config = hf.load_pretrained(tiny_clip_dir)
  ids, mask = map(
    jnp.asarray,
    _text_inputs(config["text_config"]["vocab_size"], eos=config["text_config"]["eos_token_id"]),
  )
  pixels = _nhwc(_pixels())

  def run(attention_impl):
    module = hf.build_module(tiny_clip_dir, dtype=jnp.bfloat16, attention_impl=attention_impl)

    def loss(p):
      calls.clear()
      out = module.apply({"params": p}, ids, pixels, mask)
      # The lengths the first causal (text) layer was given, read back from the program.
      lengths = [
        (c["query_seq_lengths"], c["key_value_seq_lengths"]) for c in calls if c["is_causal"]
      ][:1]
      return jnp.sum(out["text_embeds"] * out["image_embeds"].mean(0)), (out, lengths)

    (_, (out, lengths)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
      variables["params"]
    )
    return out, grads, lengths

  out, grads, [(query_lengths, key_value_lengths)] = run("cudnn")
  causal = [c["is_causal"] for c in calls]  # one call per layer, recorded while tracing
  ref, ref_grads, _ = run(None)
  real = np.asarray(mask, bool)
  layers = config["text_config"]["num_hidden_layers"] + config["vision_config"]["num_hidden_layers"]
  assert len(causal) == layers
  assert sum(causal) == config["text_config"]["num_hidden_layers"]
  np.testing.assert_array_equal(query_lengths, real.sum(1))
  np.testing.assert_array_equal(key_value_lengths, real.sum(1))
  for key in ("text_embeds", "image_embeds", "logits_per_image"):
    np.testing.assert_allclose(np.float32(out[key]), np.float32(ref[key]), atol=2e-2)
  np.testing.assert_allclose(
    np.float32(out["text_model_output"]["last_hidden_state"])[real],
    np.float32(ref["text_model_output"]["last_hidden_state"])[real],
    atol=2e-2,
  )
  for path, g in rules.flatten(grads).items():
    np.testing.assert_allclose(
      np.float32(g), np.float32(rules.flatten(ref_grads)[path]), atol=2e-2, rtol=2e-2, err_msg=path
    )


def test_cudnn_attention_needs_half_precision(tiny_vit_dir):
  with pytest.raises(ValueError, match="set the model dtype to bfloat16"):
    hf.load_pretrained(tiny_vit_dir, attention_impl="cudnn")
