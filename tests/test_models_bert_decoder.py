"""BERT as a decoder (`BertLMHeadModel`) computes what transformers' PyTorch model computes.

Tiny odd-shaped random models (vocab 67, hidden 36, 3 heads, intermediate 37, 2 layers,
40 positions), every weight perturbed, with and without cross-attention. Checked: logits
on right-padded batches (cross-attention over padded encoder tokens included), cached
incremental decoding against the full forward, exports that transformers reloads as
`BertLMHeadModel` with its own names, a MaskedLM checkpoint warm-starting a decoder
(cross-attention created and logged, everything else the checkpoint's), a ViT + BERT
`VisionEncoderDecoderModel` (logits, export, greedy and beam generation token for token),
and the one-line errors for misused decoders.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mmtl import hf, rules
from mmtl.models import bert, decoder, encoder_decoder
from tests.hf_fixtures import export_and_reload, perturb_weights
from tests.test_generate import assert_generates_transformers_tokens, images_and_eos
from tests.test_models_gpt2 import (
  _assert_close_where,
  _encoder_tokens,
  _ours,
  _torch_logits,
  _ved_inputs,
  _ved_torch_logits,
)
from tests.test_models_parity import jitted_apply

VOCAB, HIDDEN, PAD = 67, 36, 0  # HIDDEN: test_models_gpt2's encoder tokens are 36 wide
BERT_SHAPES = dict(
  vocab_size=VOCAB,
  hidden_size=HIDDEN,
  num_hidden_layers=2,
  num_attention_heads=3,
  intermediate_size=37,
  max_position_embeddings=40,
  pad_token_id=PAD,
  is_decoder=True,
)
VARIANTS = {"plain": {}, "cross": dict(add_cross_attention=True)}


def save_tiny_bert_lm(out: Path, cls=transformers.BertLMHeadModel, seed: int = 0, **overrides):
  torch.manual_seed(seed)
  model = cls(transformers.BertConfig(**{**BERT_SHAPES, **overrides}))
  torch.manual_seed(seed)
  perturb_weights(model, 0.1)
  model.save_pretrained(out)
  return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """{variant: (folder, torch model, mmtl module, variables)}."""
  out = {}
  for name, overrides in VARIANTS.items():
    folder = tmp_path_factory.mktemp(f"bert_lm_{name}")
    torch_model = save_tiny_bert_lm(folder, **overrides)
    out[name] = (str(folder), torch_model, *hf.load_pretrained(folder)[:2])
  return out


def _batch(length: int = 9, seed: int = 0) -> dict[str, np.ndarray]:
  """Right-padded ids, rows of 9, 6 and 2 real tokens."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(PAD + 1, VOCAB, (3, length))
  mask = np.ones_like(ids)
  for row, n in enumerate((length, 6, 2)):
    mask[row, n:], ids[row, n:] = 0, PAD
  return dict(input_ids=ids, attention_mask=mask)


def _inputs(variant: str) -> dict[str, np.ndarray]:
  return {**_batch(), **(_encoder_tokens() if variant == "cross" else {})}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(variant, checkpoints):
  _, torch_model, module, variables = checkpoints[variant]
  assert isinstance(module, bert.BertLMHeadModel) and isinstance(module, decoder.TextDecoder)
  assert module.cross_attention == (variant == "cross")
  inputs = _inputs(variant)
  got, ref = _ours(module, variables, inputs), _torch_logits(torch_model, inputs)
  assert got.shape == ref.shape == (3, 9, VOCAB)
  _assert_close_where(got, ref, inputs["attention_mask"])
  cross = [p for p in rules.flatten(variables["params"]) if "/cross_attn" in p]
  assert len(cross) == (2 * 10 if variant == "cross" else 0)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_decoding_matches_full_forward(variant, checkpoints):
  """Prefill 3 tokens, then one token at a time: the full forward's logits."""
  _, _, module, variables = checkpoints[variant]
  inputs = _inputs(variant)
  full = _ours(module, variables, inputs)
  cond = {k: jnp.asarray(v) for k, v in inputs.items() if k.startswith("encoder_")}
  cache = jax.jit(functools.partial(module.apply, method=module.init_cache), static_argnums=(1, 2))(
    variables, 3, 10, **cond
  )
  logits = []
  for start, stop in [(0, 3), *((t, t + 1) for t in range(3, 9))]:
    piece = {k: jnp.asarray(inputs[k][:, start:stop]) for k in ("input_ids", "attention_mask")}
    out = jitted_apply(module, variables, **piece, cache=cache)
    cache = out["cache"]
    logits.append(np.asarray(out["logits"]))
  assert cache["index"] == 9
  _assert_close_where(np.concatenate(logits, 1), full, inputs["attention_mask"])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_reloads_in_transformers(variant, checkpoints, tmp_path):
  path, torch_model, module, variables = checkpoints[variant]
  reloaded = export_and_reload(module, variables, tmp_path, transformers.BertLMHeadModel)
  original, exported = hf.read_weights(Path(path)), hf.read_weights(tmp_path)
  for key, x in exported.items():
    np.testing.assert_array_equal(x, original[key], err_msg=key)
  assert reloaded.config.is_decoder
  assert reloaded.config.add_cross_attention == (variant == "cross")
  inputs = _inputs(variant)
  np.testing.assert_array_equal(_torch_logits(reloaded, inputs), _torch_logits(torch_model, inputs))


def test_masked_lm_checkpoint_warm_starts_a_cross_attending_decoder(tmp_path, caplog):
  """Rothe et al. (2020): an encoder checkpoint (BertForMaskedLM, no is_decoder, no
  cross-attention) becomes a causal decoder; only the cross-attention is new, and it is
  logged as initialized."""
  torch_model = save_tiny_bert_lm(tmp_path, transformers.BertForMaskedLM, is_decoder=False)
  with caplog.at_level(logging.WARNING):
    module, variables, _ = hf.load_decoder(tmp_path)
  assert isinstance(module, bert.BertLMHeadModel) and module.cross_attention
  (message,) = [r.getMessage() for r in caplog.records if "are initialized" in r.getMessage()]
  new = {p for p in rules.flatten(variables["params"]) if "/cross_attn" in p}
  assert f"{len(new)} param(s) not in the checkpoint are initialized" in message
  assert "decoder/layer_0/cross_attn/query/kernel" in message and "/attn/query" not in message
  # Without cross-attention every param is the checkpoint's: the same logits as the masked LM
  # made causal (transformers' BertLMHeadModel from the same weights).
  plain, plain_vars, _ = hf.load_decoder(tmp_path, cross_attention=False)
  causal = transformers.BertLMHeadModel.from_pretrained(tmp_path, is_decoder=True).eval()
  inputs = _batch()
  _assert_close_where(
    _ours(plain, plain_vars, inputs), _torch_logits(causal, inputs), inputs["attention_mask"]
  )
  for path, x in rules.flatten(plain_vars["params"]).items():
    np.testing.assert_array_equal(rules.flatten(variables["params"])[path], x, err_msg=path)
  del torch_model


@pytest.fixture(scope="module")
def bert_ved(tmp_path_factory):
  """(folder, torch model, mmtl module, variables) of a ViT (32 wide) + BERT decoder (36
  wide) VisionEncoderDecoderModel: enc_to_dec_proj, decoder_start_token_id 2."""
  torch.manual_seed(0)
  vit = transformers.ViTConfig(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    image_size=16,
    patch_size=4,
  )
  dec = transformers.BertConfig(**BERT_SHAPES, add_cross_attention=True)
  config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(vit, dec)
  config.decoder_start_token_id, config.pad_token_id = 2, PAD
  torch_model = transformers.VisionEncoderDecoderModel(config)
  torch.manual_seed(0)
  perturb_weights(torch_model, 0.3)
  folder = tmp_path_factory.mktemp("bert_ved")
  torch_model.save_pretrained(folder)
  return (folder, torch_model, *hf.load_pretrained(folder)[:2])


def test_vision_encoder_decoder_with_a_bert_decoder(bert_ved, tmp_path):
  """Logits with enc_to_dec_proj, and an export that transformers loads."""
  _, torch_model, module, variables = bert_ved
  assert isinstance(module, encoder_decoder.VisionEncoderDecoderModel) and module.needs_projection
  inputs = _ved_inputs()
  inputs["decoder_input_ids"] = inputs["decoder_input_ids"] % VOCAB
  ref = _ved_torch_logits(torch_model, inputs)
  _assert_close_where(_ours(module, variables, inputs), ref, inputs["decoder_attention_mask"])
  reloaded = export_and_reload(module, variables, tmp_path, transformers.VisionEncoderDecoderModel)
  np.testing.assert_array_equal(_ved_torch_logits(reloaded, inputs), ref)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_vision_encoder_decoder_with_a_bert_decoder_generates_transformers_tokens(
  num_beams, bert_ved
):
  _, torch_model, module, variables = bert_ved
  assert_generates_transformers_tokens(
    torch_model, module, variables, *images_and_eos(torch_model), num_beams, start=2
  )


def test_misused_decoders_name_the_fix(checkpoints):
  _, _, plain, plain_vars = checkpoints["plain"]
  _, _, cross, cross_vars = checkpoints["cross"]
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  tokens = {k: jnp.asarray(v) for k, v in _encoder_tokens().items()}
  with pytest.raises(ValueError, match=r"no cross-attention layers.*cross_attention=True"):
    plain.apply(plain_vars, **batch, **tokens)
  with pytest.raises(ValueError, match=r"pass encoder_hidden_states"):
    cross.apply(cross_vars, **batch)
  narrow = dict(tokens, encoder_hidden_states=tokens["encoder_hidden_states"][..., :32])
  with pytest.raises(ValueError, match=r"32 wide.*36.*enc_to_dec_proj"):
    cross.apply(cross_vars, **batch, **narrow)
  with pytest.raises(ValueError, match=r"32 wide.*36.*enc_to_dec_proj"):
    cross.apply(cross_vars, 3, 10, **narrow, method=cross.init_cache)
