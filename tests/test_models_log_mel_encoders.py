"""The Whisper encoder and AST compute what transformers' PyTorch models compute, and
round-trip.

Tiny odd-shaped random models with every weight perturbed: Whisper with 13 mel bins and
with large-v3's 128 (width 12, 3 heads, 11 positions: 22 frames), AST with 17 mel bins, 23
frames, 5 x 5 patches at strides 3 (frequency) and 4 (time).
"""

import functools
import json
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mmtl import hf, optim, rules
from mmtl.models import encoder, whisper
from tests import xla_settings
from tests.hf_fixtures import export_and_reload, perturb_weights

ATOL = 1e-5
WHISPER = dict(
  d_model=12,
  encoder_layers=2,
  encoder_attention_heads=3,
  encoder_ffn_dim=20,
  decoder_layers=1,
  decoder_attention_heads=3,
  decoder_ffn_dim=20,
  max_source_positions=11,
  max_target_positions=16,
  vocab_size=40,
  pad_token_id=1,
  bos_token_id=1,
  eos_token_id=2,
  decoder_start_token_id=1,
  begin_suppress_tokens=None,
)
WHISPER_MELS = {"whisper_13_mels": 13, "whisper_128_mels": 128}
AST = dict(
  hidden_size=12,
  num_hidden_layers=2,
  num_attention_heads=3,
  intermediate_size=20,
  patch_size=5,
  frequency_stride=3,
  time_stride=4,
  num_mel_bins=17,
  max_length=23,
)


def _perturbed(model: transformers.PreTrainedModel) -> transformers.PreTrainedModel:
  torch.manual_seed(0)
  # Whisper's sinusoids stay as they are.
  return perturb_weights(model, lambda name: 0.0 if "embed_positions" in name else 0.1)


def _whisper(mels: int, model_cls=transformers.WhisperModel, **extra):
  torch.manual_seed(0)
  return _perturbed(
    model_cls(transformers.WhisperConfig(**{**WHISPER, "num_mel_bins": mels, **extra}))
  )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[str, transformers.PreTrainedModel]]:
  """{family: (folder, the torch model saved there)}."""
  models = {name: _whisper(mels) for name, mels in WHISPER_MELS.items()}
  torch.manual_seed(0)
  models["ast"] = _perturbed(transformers.ASTModel(transformers.ASTConfig(**AST)))
  out = {}
  for family, model in models.items():
    folder = tmp_path_factory.mktemp(family)
    model.save_pretrained(folder)
    out[family] = (str(folder), model)
  return out


def features(batch: int, frames: int, mels: int, seed: int = 0) -> np.ndarray:
  """(B, frames, mels) float32 features, mmtl's layout."""
  return np.random.default_rng(seed).standard_normal((batch, frames, mels)).astype(np.float32)


@functools.partial(xla_settings.production_jit, static_argnums=0)
def _apply(module, variables, x):
  return module.apply(variables, x)


def _whisper_reference(torch_model, x: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return torch_model.encoder(torch.tensor(x).transpose(1, 2)).last_hidden_state.numpy()


@pytest.mark.parametrize("family", list(WHISPER_MELS))
def test_whisper_parity(family, checkpoints):
  path, torch_model = checkpoints[family]
  module, variables, _ = hf.load_pretrained(path)
  assert isinstance(module, encoder.Encoder) and module.inputs == ("input_features",)
  assert (module.num_layers, module.hidden_size) == (2, 12)
  x = features(3, 22, WHISPER_MELS[family])
  out = _apply(module, variables, jnp.asarray(x))
  np.testing.assert_allclose(
    out["last_hidden_state"], _whisper_reference(torch_model, x), atol=ATOL
  )


def test_whisper_takes_shorter_inputs_with_the_first_positions(checkpoints):
  """A clip shorter than 2 * max_source_positions frames gets the first positions: the
  reference is transformers' encoder with only those positions (which then takes it)."""
  path, torch_model = checkpoints["whisper_13_mels"]
  module, variables, _ = hf.load_pretrained(path)
  short = _whisper(13, max_source_positions=4)
  state = {k: v for k, v in torch_model.state_dict().items() if "embed_positions" not in k}
  short.load_state_dict(state, strict=False)
  with torch.no_grad():
    short.encoder.embed_positions.weight.copy_(torch_model.encoder.embed_positions.weight[:4])
  x = features(2, 8, 13, seed=1)
  out = _apply(module, variables, jnp.asarray(x))
  np.testing.assert_allclose(out["last_hidden_state"], _whisper_reference(short, x), atol=ATOL)
  odd = _apply(module, variables, jnp.asarray(x[:, :7]))  # an odd count: 4 tokens, as torch
  assert odd["last_hidden_state"].shape == (2, 4, 12)


@pytest.mark.parametrize(
  "model_cls",
  [transformers.WhisperForConditionalGeneration, transformers.WhisperForAudioClassification],
)
def test_the_whisper_encoder_of_a_task_checkpoint_loads(model_cls, tmp_path):
  """WhisperForConditionalGeneration nests the model under `model.`; the audio classifier
  holds the encoder alone. Decoder and head weights are not read."""
  torch_model = _whisper(13, model_cls)
  torch_model.save_pretrained(tmp_path)
  module, variables, _ = hf.load_pretrained(tmp_path)
  x = features(2, 22, 13)
  out = _apply(module, variables, jnp.asarray(x))
  np.testing.assert_allclose(
    out["last_hidden_state"],
    _whisper_reference(torch_model.model if hasattr(torch_model, "model") else torch_model, x),
    atol=ATOL,
  )


def test_whisper_export_loads_in_transformers(checkpoints, tmp_path):
  """The export is a WhisperModel folder holding the encoder: transformers reads every
  encoder weight and initializes only the decoder it lacks."""
  path, torch_model = checkpoints["whisper_128_mels"]
  module, variables, _ = hf.load_pretrained(path)
  out = hf.save_pretrained(module, variables, tmp_path)
  jax.tree.map(np.testing.assert_array_equal, hf.load_pretrained(out)[1], variables)
  reloaded, info = transformers.WhisperModel.from_pretrained(out, output_loading_info=True)
  assert info["missing_keys"] and all(k.startswith("decoder.") for k in info["missing_keys"])
  assert not info["unexpected_keys"] and not info["mismatched_keys"]
  assert reloaded.config.num_mel_bins == 128 and reloaded.config.decoder_layers == 1
  x = features(2, 22, 128)
  np.testing.assert_array_equal(
    _whisper_reference(reloaded.eval(), x), _whisper_reference(torch_model, x)
  )


def test_whisper_positions_are_never_trained(checkpoints):
  path, _ = checkpoints["whisper_13_mels"]
  params = hf.load_pretrained(path)[1]["params"]
  frozen = rules.flatten(optim.freeze_mask(params, {}))
  assert frozen["position_sinusoids"]
  assert not any(f for p, f in frozen.items() if p != "position_sinusoids")
  np.testing.assert_allclose(
    params["position_sinusoids"], whisper.sinusoids(11, 12), atol=1e-6
  )  # what transformers initializes them to


def test_whisper_spec_augment_zeroes_spans_in_training(checkpoints):
  path, _ = checkpoints["whisper_13_mels"]
  module, variables, _ = hf.load_pretrained(path)
  config = whisper.WhisperConfig.from_hf(
    {
      **hf.read_config(path),
      "apply_spec_augment": True,
      "mask_time_prob": 0.3,
      "mask_time_length": 3,
      "mask_feature_prob": 0.3,
      "mask_feature_length": 2,
    }
  )
  module = module.clone(config=config)
  x = jnp.asarray(features(2, 22, 13)) + 5.0  # no zeros of its own
  masked = module.apply(
    variables, x, method=module.spec_augment, rngs={"dropout": jax.random.key(0)}
  )
  zero = np.asarray(masked == 0)
  assert zero.any() and not zero.all()
  frames, bins = zero.all(2), zero.all(1)  # whole frames and whole mel bins
  np.testing.assert_array_equal(zero, frames[:, :, None] | bins[:, None, :])
  apply = jax.jit(module.apply, static_argnames="deterministic")
  np.testing.assert_array_equal(
    apply(variables, x)["last_hidden_state"],
    apply(variables, x, deterministic=True)["last_hidden_state"],
  )


def test_bad_whisper_inputs_name_the_fix(checkpoints):
  module, variables, _ = hf.load_pretrained(checkpoints["whisper_13_mels"][0])
  with pytest.raises(ValueError, match=r"channels-first.*x.swapaxes\(1, 2\)"):
    module.apply(variables, jnp.zeros((1, 13, 22)))
  with pytest.raises(ValueError, match=r"\(B, frames, 13\) log-mel features \(13 mel bins\)"):
    module.apply(variables, jnp.zeros((1, 22, 80)))
  with pytest.raises(ValueError, match="24 frames; the encoder's 11 positions cover 22"):
    module.apply(variables, jnp.zeros((1, 24, 13)))


def test_ast_parity_and_pooler(checkpoints):
  path, torch_model = checkpoints["ast"]
  module, variables, _ = hf.load_pretrained(path)
  assert isinstance(module, encoder.Encoder) and module.inputs == ("input_features",)
  x = features(3, 23, 17)
  out = _apply(module, variables, jnp.asarray(x))
  with torch.no_grad():
    ref = torch_model(input_values=torch.tensor(x))
  # (17 - 5) // 3 + 1 = 5 frequency by (23 - 5) // 4 + 1 = 5 time patches, + 2 tokens.
  assert out["last_hidden_state"].shape == (3, 27, 12)
  for key in ("last_hidden_state", "pooler_output"):
    np.testing.assert_allclose(out[key], ref[key].numpy(), atol=ATOL, err_msg=key)


def test_ast_export_reloads_in_transformers(checkpoints, tmp_path):
  path, torch_model = checkpoints["ast"]
  module, variables, _ = hf.load_pretrained(path)
  reloaded = export_and_reload(module, variables, tmp_path)
  config = hf.read_config(tmp_path)
  assert config["model_type"] == "audio-spectrogram-transformer" and "image_size" not in config
  x = torch.tensor(features(2, 23, 17))
  with torch.no_grad():
    np.testing.assert_array_equal(
      reloaded(input_values=x).last_hidden_state.numpy(),
      torch_model(input_values=x).last_hidden_state.numpy(),
    )


def test_the_ast_of_a_classifier_checkpoint_loads(tmp_path):
  torch.manual_seed(0)
  torch_model = _perturbed(
    transformers.ASTForAudioClassification(transformers.ASTConfig(**AST, num_labels=3))
  )
  torch_model.save_pretrained(tmp_path)
  module, variables, _ = hf.load_pretrained(tmp_path)
  x = features(2, 23, 17)
  with torch.no_grad():
    ref = torch_model.audio_spectrogram_transformer(input_values=torch.tensor(x))
  out = _apply(module, variables, jnp.asarray(x))
  np.testing.assert_allclose(out["pooler_output"], ref.pooler_output.numpy(), atol=ATOL)


def test_bad_ast_inputs_name_the_fix(checkpoints):
  module, variables, _ = hf.load_pretrained(checkpoints["ast"][0])
  with pytest.raises(ValueError, match=r"takes \(B, 23, 17\): 23 frames .*pad or cut"):
    module.apply(variables, jnp.zeros((1, 20, 17)))


def test_whisper_reads_hf_flax_msgpack(checkpoints, tmp_path):
  """flax_model.msgpack as transformers 4.x's FlaxWhisperModel wrote it (torch's module
  paths, Flax leaves: conv and dense `kernel`s in Flax's layout, norms' `scale`, the
  positions' `embedding`) loads to the params of the safetensors."""
  path, _ = checkpoints["whisper_13_mels"]
  module, variables, config = hf.load_pretrained(path)
  flat = {}
  for key, x in hf.read_weights(Path(path)).items():
    *parents, leaf = key.split(".")
    if leaf == "weight":
      if "norm" in parents[-1]:
        leaf = "scale"
      elif parents[-1] == "embed_positions":
        leaf = "embedding"
      else:
        leaf, x = "kernel", x.T  # (out, in[, k]) -> ([k,] in, out)
    flat["/".join([*parents, leaf])] = x
  (tmp_path / "flax_model.msgpack").write_bytes(
    flax.serialization.msgpack_serialize(rules.unflatten(flat))
  )
  (tmp_path / "config.json").write_text(json.dumps(config))
  jax.tree.map(np.testing.assert_array_equal, hf.load_pretrained(tmp_path)[1], variables)
