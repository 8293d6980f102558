"""GPT-2 and VisionEncoderDecoder compute what transformers' PyTorch models compute.

Tiny odd-shaped random transformers models (vocab 61, n_embd 36, 3 heads, n_inner 37,
2 layers, 40 positions) with every weight perturbed (transformers zeroes biases, which
would hide mix-ups of the fused c_attn split or the Conv1D transposes). Checked: logits on
right- and left-padded batches (with cross-attention over padded encoder tokens, the
inverse-layer-idx attention scale, an untied head), cached incremental decoding against
the full forward, exports that transformers reloads with its own key names and shapes, a
bare GPT2Model checkpoint, prefix embeddings, and ViT + GPT-2 encoder-decoders with and
without enc_to_dec_proj.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mmtl import hf, rules
from mmtl.models import decoder, encoder_decoder, gpt2
from tests import xla_settings
from tests.hf_fixtures import export_and_reload, perturb_weights

ATOL = 1e-5
VOCAB, N_POSITIONS, N_EMBD = 61, 40, 36
PAD, BOS = 0, 1
GPT2_SHAPES = dict(
  vocab_size=VOCAB,
  n_positions=N_POSITIONS,
  n_embd=N_EMBD,
  n_layer=2,
  n_head=3,
  n_inner=37,
  bos_token_id=BOS,
  eos_token_id=None,
  pad_token_id=PAD,
)
VARIANTS = {
  "plain": {},
  "cross": dict(add_cross_attention=True),
  "inverse_layer_idx": dict(scale_attn_by_inverse_layer_idx=True),
  "untied": dict(tie_word_embeddings=False),
}


def save_tiny_gpt2(out: Path, scale: float = 0.1, seed: int = 0, **overrides):
  """A tiny random transformers GPT2LMHeadModel (GPT2_SHAPES + `overrides`) saved to `out`."""
  torch.manual_seed(seed)
  model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**GPT2_SHAPES, **overrides}))
  torch.manual_seed(seed)
  perturb_weights(model, scale)
  model.save_pretrained(out)
  return model


def save_tiny_ved(out: Path, encoder_hidden: int = 32, scale: float = 0.1, seed: int = 0):
  """A tiny random VisionEncoderDecoderModel: ViT (16x16 images, patch 4, `encoder_hidden`
  wide) + GPT-2 (GPT2_SHAPES) with cross-attention, decoder_start_token_id BOS."""
  torch.manual_seed(seed)
  vit = transformers.ViTConfig(
    hidden_size=encoder_hidden,
    num_hidden_layers=2,
    num_attention_heads=4 if encoder_hidden % 4 == 0 else 3,
    intermediate_size=37,
    image_size=16,
    patch_size=4,
  )
  gpt = transformers.GPT2Config(**GPT2_SHAPES, add_cross_attention=True, is_decoder=True)
  config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(vit, gpt)
  config.decoder_start_token_id, config.pad_token_id = BOS, PAD
  model = transformers.VisionEncoderDecoderModel(config)
  torch.manual_seed(seed)
  perturb_weights(model, scale)
  model.save_pretrained(out)
  return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[str, transformers.GPT2LMHeadModel]]:
  """{variant: (folder, the torch model saved there)}."""
  out = {}
  for name, overrides in VARIANTS.items():
    folder = tmp_path_factory.mktemp(f"gpt2_{name}")
    out[name] = (str(folder), save_tiny_gpt2(folder, **overrides))
  return out


@pytest.fixture(scope="module")
def loaded(checkpoints):
  """{variant: (module, variables)} as mmtl loads them."""
  return {name: hf.load_pretrained(path)[:2] for name, (path, _) in checkpoints.items()}


@functools.partial(xla_settings.production_jit, static_argnums=0)
def _apply(module, variables, inputs):
  return module.apply(variables, **inputs)


def _batch(side: str, length: int = 9, seed: int = 0) -> dict[str, np.ndarray]:
  """Ids (no pad id among them) with rows of 9, 6 and 2 real tokens, padded on `side`;
  left-padded rows get transformers' generate() positions (cumsum of the mask - 1)."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(PAD + 1, VOCAB, (3, length))
  mask = np.ones_like(ids)
  for row, n in enumerate((length, 6, 2)):
    padding = slice(n, None) if side == "right" else slice(0, length - n)
    mask[row, padding], ids[row, padding] = 0, PAD
  batch = dict(input_ids=ids, attention_mask=mask)
  if side == "left":
    batch["position_ids"] = np.maximum(np.cumsum(mask, -1) - 1, 0)
  return batch


def _encoder_tokens(seed: int = 1) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  mask = np.ones((3, 5), np.int64)
  mask[1, 3:] = 0
  mask[2, 1:] = 0
  states = rng.normal(size=(3, 5, N_EMBD)).astype(np.float32)
  return dict(encoder_hidden_states=states, encoder_attention_mask=mask)


def _inputs(variant: str, side: str) -> dict[str, np.ndarray]:
  return {**_batch(side), **(_encoder_tokens() if variant == "cross" else {})}


def _torch_logits(model, inputs: dict[str, np.ndarray]) -> np.ndarray:
  with torch.no_grad():
    return model(**{k: torch.tensor(v) for k, v in inputs.items()}).logits.numpy()


def _ours(module, variables, inputs: dict[str, np.ndarray]) -> np.ndarray:
  return np.asarray(
    _apply(module, variables, {k: jnp.asarray(v) for k, v in inputs.items()})["logits"]
  )


def _assert_close_where(got, ref, mask, atol=ATOL):
  """Logits (B, T, V) equal at the positions `mask` (B, T) marks real."""
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], ref[real], atol=atol, rtol=0)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(variant, side, checkpoints, loaded):
  _, torch_model = checkpoints[variant]
  module, variables = loaded[variant]
  assert isinstance(module, gpt2.GPT2LMHeadModel) and isinstance(module, decoder.TextDecoder)
  assert module.cross_attention == (variant == "cross")
  inputs = _inputs(variant, side)
  got, ref = _ours(module, variables, inputs), _torch_logits(torch_model, inputs)
  assert got.shape == ref.shape == (3, 9, VOCAB)
  _assert_close_where(got, ref, inputs["attention_mask"])


def test_variant_params(loaded):
  paths = {name: set(rules.flatten(v["params"])) for name, (_, v) in loaded.items()}
  assert "lm_head/kernel" in paths["untied"] and "lm_head/kernel" not in paths["plain"]
  cross = {p for p in paths["cross"] if "/cross_attn" in p}
  assert "decoder/layer_1/cross_attn/query/kernel" in cross and len(cross) == 2 * 10
  assert not any("/cross_attn" in p for p in paths["plain"])
  assert loaded["inverse_layer_idx"][0].config.attn_scales() == (1.0, 0.5)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("variant", ["plain", "cross"])
def test_cached_decoding_matches_full_forward(variant, side, loaded):
  """Prefill 4 tokens into an init_cache cache, then feed one token at a time."""
  module, variables = loaded[variant]
  inputs = _inputs(variant, side)
  full = _ours(module, variables, inputs)
  cond = {k: jnp.asarray(v) for k, v in inputs.items() if k.startswith("encoder_")}
  cache = module.apply(variables, 3, 12, **cond, method=module.init_cache)
  assert cache["index"] == 0 and cache["mask"].shape == (3, 12)
  assert cache["layer_1"]["key"].shape == (3, 3, 12, 12)  # (B, heads, max_length, head_dim)
  step_inputs = {k: v for k, v in inputs.items() if not k.startswith("encoder_")}
  logits = []
  for start, stop in [(0, 4), *((t, t + 1) for t in range(4, 9))]:
    piece = {k: jnp.asarray(v[:, start:stop]) for k, v in step_inputs.items()}
    out = _apply(module, variables, {**piece, "cache": cache})
    cache = out["cache"]
    logits.append(np.asarray(out["logits"]))
  assert cache["index"] == 9
  np.testing.assert_array_equal(cache["mask"][:, :9], inputs["attention_mask"].astype(bool))
  _assert_close_where(np.concatenate(logits, 1), full, inputs["attention_mask"])


def test_init_cache_checks(loaded):
  module, variables = loaded["cross"]
  with pytest.raises(ValueError, match="needs encoder_hidden_states"):
    module.apply(variables, 3, 12, method=module.init_cache)
  with pytest.raises(ValueError, match="lower max_new_tokens"):
    module.apply(variables, 1, N_POSITIONS + 1, method=module.init_cache)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_reloads_in_transformers(variant, checkpoints, loaded, tmp_path):
  path, torch_model = checkpoints[variant]
  module, variables = loaded[variant]
  reloaded = export_and_reload(module, variables, tmp_path, transformers.GPT2LMHeadModel)
  original, exported = hf.read_weights(Path(path)), hf.read_weights(tmp_path)
  # transformers' own names and Conv1D (in, out) layouts, c_attn fused: the very tensors.
  assert sorted(exported) == sorted(original)
  assert "transformer.h.0.attn.c_attn.weight" in exported
  for key, x in original.items():
    assert exported[key].shape == x.shape, key
    np.testing.assert_array_equal(exported[key], x, err_msg=key)
  for key in ("add_cross_attention", "scale_attn_by_inverse_layer_idx", "tie_word_embeddings"):
    assert getattr(reloaded.config, key) == getattr(torch_model.config, key), key
  inputs = _inputs(variant, "left")
  np.testing.assert_array_equal(_torch_logits(reloaded, inputs), _torch_logits(torch_model, inputs))


def test_bare_gpt2model_loads_into_lm(checkpoints, loaded, tmp_path):
  """A GPT2Model checkpoint (keys without `transformer.`) loads into the LM, head tied."""
  _, torch_model = checkpoints["plain"]
  torch_model.transformer.save_pretrained(tmp_path)
  assert not any(k.startswith("transformer.") for k in hf.read_weights(tmp_path))
  module, variables, config = hf.load_pretrained(tmp_path)
  assert config["architectures"] == ["GPT2Model"] and isinstance(module, gpt2.GPT2LMHeadModel)
  jax.tree.map(np.testing.assert_array_equal, variables, loaded["plain"][1])
  inputs = _batch("right")
  with torch.no_grad():
    hidden = torch_model.transformer(
      **{k: torch.tensor(v) for k, v in inputs.items()}
    ).last_hidden_state
    ref = (hidden @ torch_model.transformer.wte.weight.T).numpy()
  _assert_close_where(_ours(module, variables, inputs), ref, inputs["attention_mask"])


def test_prefix_embeds(checkpoints, loaded):
  """Prefix embeddings (positions 0..P-1) then the tokens, as transformers' inputs_embeds."""
  _, torch_model = checkpoints["plain"]
  module, variables = loaded["plain"]
  inputs = _batch("right", length=6)
  prefix = np.random.default_rng(2).normal(size=(3, 3, N_EMBD)).astype(np.float32)
  ids, mask = (torch.tensor(inputs[k]) for k in ("input_ids", "attention_mask"))
  with torch.no_grad():
    embeds = torch.cat([torch.tensor(prefix), torch_model.transformer.wte(ids)], 1)
    ref = torch_model(
      inputs_embeds=embeds,
      attention_mask=torch.cat([torch.ones(3, 3, dtype=mask.dtype), mask], 1),
      position_ids=torch.arange(9).expand(3, 9),
    ).logits.numpy()
  full_mask = np.concatenate([np.ones((3, 3), int), inputs["attention_mask"]], 1)
  got = _ours(module, variables, {**inputs, "prefix_embeds": prefix})
  assert got.shape == (3, 9, VOCAB)
  _assert_close_where(got, ref, full_mask)
  # Explicit token positions 0..T-1 are shifted past the prefix.
  positions = np.broadcast_to(np.arange(6), (3, 6))
  with_positions = _ours(
    module, variables, {**inputs, "prefix_embeds": prefix, "position_ids": positions}
  )
  _assert_close_where(with_positions, got, full_mask, atol=1e-6)


# --- VisionEncoderDecoderModel ---------------------------------------------------

VED_VARIANTS = {"projected": 32, "same_width": N_EMBD}  # ViT width; the decoder's is 36


@pytest.fixture(scope="module")
def ved_checkpoints(tmp_path_factory):
  """{variant: (folder, torch VisionEncoderDecoderModel, mmtl module, variables)}."""
  out = {}
  for name, width in VED_VARIANTS.items():
    folder = tmp_path_factory.mktemp(f"ved_{name}")
    torch_model = save_tiny_ved(folder, encoder_hidden=width)
    out[name] = (str(folder), torch_model, *hf.load_pretrained(folder)[:2])
  return out


def _ved_inputs(seed: int = 3) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  ids = rng.integers(PAD + 1, VOCAB, (3, 7))
  mask = np.ones_like(ids)
  mask[1, 5:], mask[2, 2:] = 0, 0
  ids[mask == 0] = PAD
  pixels = rng.normal(size=(3, 16, 16, 3)).astype(np.float32)
  return dict(pixel_values=pixels, decoder_input_ids=ids, decoder_attention_mask=mask)


def _ved_torch_logits(model, inputs):
  torch_inputs = {k: torch.tensor(v) for k, v in inputs.items()}
  torch_inputs["pixel_values"] = torch_inputs["pixel_values"].permute(0, 3, 1, 2)  # NCHW
  with torch.no_grad():
    return model(**torch_inputs).logits.numpy()


@pytest.mark.parametrize("variant", list(VED_VARIANTS))
def test_ved_logits_match_transformers(variant, ved_checkpoints):
  _, torch_model, module, variables = ved_checkpoints[variant]
  assert isinstance(module, encoder_decoder.VisionEncoderDecoderModel)
  assert module.needs_projection == (variant == "projected")
  assert ("enc_to_dec_proj" in variables["params"]) == (variant == "projected")
  assert module.config.decoder_start_token_id == BOS and module.vocab_size == VOCAB
  inputs = _ved_inputs()
  got, ref = _ours(module, variables, inputs), _ved_torch_logits(torch_model, inputs)
  assert got.shape == ref.shape == (3, 7, VOCAB)
  _assert_close_where(got, ref, inputs["decoder_attention_mask"])


@pytest.mark.parametrize("variant", list(VED_VARIANTS))
def test_ved_export_reloads_in_transformers(variant, ved_checkpoints, tmp_path):
  path, torch_model, module, variables = ved_checkpoints[variant]
  reloaded = export_and_reload(module, variables, tmp_path, transformers.VisionEncoderDecoderModel)
  original, exported = hf.read_weights(Path(path)), hf.read_weights(tmp_path)
  assert sorted(exported) == sorted(original)
  assert ("enc_to_dec_proj.weight" in exported) == (variant == "projected")
  for key, x in original.items():
    np.testing.assert_array_equal(exported[key], x, err_msg=key)
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["model_type"] == "vision-encoder-decoder" and config["is_encoder_decoder"]
  assert config["encoder"]["model_type"] == "vit"
  assert config["encoder"]["hidden_size"] == VED_VARIANTS[variant]
  assert config["decoder"]["model_type"] == "gpt2" and config["decoder"]["n_embd"] == N_EMBD
  assert config["decoder"]["add_cross_attention"] and config["decoder"]["is_decoder"]
  assert config["decoder_start_token_id"] == BOS
  inputs = _ved_inputs()
  np.testing.assert_array_equal(
    _ved_torch_logits(reloaded, inputs), _ved_torch_logits(torch_model, inputs)
  )
