"""wav2vec 2.0 and HuBERT compute what transformers' PyTorch models compute, and round-trip.

Tiny odd-shaped random models (hidden 12, 3 heads, a 3-layer feature encoder of widths 8,
6, 10 with strides 5, 2, 3, position convs of even and odd width) with every weight
perturbed, on padded batches of waveforms of odd lengths.
"""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from mmtl import hf, rules
from mmtl.models import encoder, layers, wav2vec2
from tests import xla_settings
from tests.hf_fixtures import export_and_reload, perturb_weights

ATOL = 1e-5
TINY = dict(
  hidden_size=12,
  num_hidden_layers=2,
  num_attention_heads=3,
  intermediate_size=20,
  conv_dim=(8, 6, 10),
  conv_stride=(5, 2, 3),
  conv_kernel=(10, 3, 4),
  num_conv_pos_embeddings=6,
  num_conv_pos_embedding_groups=2,
)
W2V, HUBERT = transformers.Wav2Vec2Config, transformers.HubertConfig
CONFIGS = {  # family: (config class, its settings): both norm variants of each
  "wav2vec2_group_post_ln": (W2V, dict(feat_extract_norm="group")),
  "wav2vec2_layer_stable": (
    W2V,
    dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True),
  ),
  "hubert_group_post_ln": (HUBERT, dict(feat_extract_norm="group", num_conv_pos_embeddings=5)),
  "hubert_layer_stable_no_projection_norm": (
    HUBERT,
    dict(
      feat_extract_norm="layer",
      do_stable_layer_norm=True,
      conv_bias=True,
      feat_proj_layer_norm=False,
    ),
  ),
}
LENGTHS = (1001, 777, 431)  # samples of the three waveforms of a padded batch


def _tiny(family: str, model_cls=None) -> transformers.PreTrainedModel:
  """The family's tiny model (or `model_cls` of its config: a task model), every weight
  perturbed."""
  config_cls, extra = CONFIGS[family]
  config = config_cls(**{**TINY, **extra})
  torch.manual_seed(0)
  return perturb_weights(
    model_cls(config) if model_cls else transformers.AutoModel.from_config(config)
  )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[str, transformers.PreTrainedModel]]:
  """{family: (folder, the torch model saved there)}."""
  out = {}
  for family in CONFIGS:
    folder = tmp_path_factory.mktemp(family)
    model = _tiny(family)
    model.save_pretrained(folder)
    out[family] = (str(folder), model)
  return out


def waveforms(lengths=LENGTHS, seed=0):
  """(B, max length) float32 waveforms, zero past each length, and their (B, max) mask."""
  size = max(lengths)
  mask = (np.arange(size)[None] < np.array(lengths)[:, None]).astype(np.int32)
  x = np.random.default_rng(seed).standard_normal((len(lengths), size)).astype(np.float32)
  return (x * mask).astype(np.float32), mask


@functools.partial(xla_settings.production_jit, static_argnums=0)
def _apply(module, variables, x, mask):
  return module.apply(variables, x, mask)


def check_parity(module, variables, torch_model, x, mask=None):
  out = _apply(module, variables, jnp.asarray(x), None if mask is None else jnp.asarray(mask))
  kw = {} if mask is None else dict(attention_mask=torch.tensor(mask))
  with torch.no_grad():
    ref = torch_model(input_values=torch.tensor(x), **kw)
  keys = ["last_hidden_state"] + (["extract_features"] if "extract_features" in ref else [])
  for key in keys:
    np.testing.assert_allclose(out[key], ref[key].numpy(), atol=ATOL, rtol=0, err_msg=key)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_parity_on_a_padded_batch_and_one_waveform(family, checkpoints):
  path, torch_model = checkpoints[family]
  module, variables, _ = hf.load_pretrained(path)
  assert isinstance(module, encoder.Encoder)
  assert module.inputs == ("input_values", "attention_mask")
  assert (module.num_layers, module.hidden_size) == (2, 12)
  x, mask = waveforms()
  check_parity(module, variables, torch_model, x, mask)
  check_parity(module, variables, torch_model, x[1:2, :777])  # no mask, an odd length


def test_frame_lengths_are_transformers():
  config = wav2vec2.Wav2Vec2Config.from_hf(TINY)
  ref = transformers.Wav2Vec2Model(W2V(**TINY))
  lengths = torch.tensor([50, 51, 431, 777, 1001])
  expected = ref._get_feat_extract_output_lengths(lengths).tolist()
  assert config.output_lengths(lengths.numpy()).tolist() == expected
  assert config.receptive_field == 50 and config.output_lengths(49) == 0
  assert config.output_lengths(50) == 1 and config.frame_stride == 30
  base = wav2vec2.Wav2Vec2Config()
  assert (base.receptive_field, base.frame_stride) == (400, 320)  # 25 ms and 20 ms at 16 kHz


def test_param_names(checkpoints):
  paths = {
    family: set(rules.flatten(hf.load_pretrained(path)[1]["params"]))
    for family, (path, _) in checkpoints.items()
  }
  shared = {
    "feature_extractor/conv_layers_0/conv/kernel",
    "feature_extractor/conv_layers_0/layer_norm/scale",
    "feature_projection/kernel",
    "pos_conv_embed/weight_g",
    "pos_conv_embed/weight_v",
    "masked_spec_embed",
    "encoder/layer_1/attn/query/kernel",
    "encoder/layer_0/mlp/fc1/kernel",
    "encoder_norm/scale",
  }
  assert all(shared <= p for p in paths.values())
  # Group norm on the first conv only; layer norm on every conv, with conv biases.
  assert "feature_extractor/conv_layers_2/layer_norm/scale" not in paths["wav2vec2_group_post_ln"]
  assert {
    "feature_extractor/conv_layers_2/layer_norm/scale",
    "feature_extractor/conv_layers_2/conv/bias",
  } <= paths["wav2vec2_layer_stable"]
  assert "feature_norm/scale" not in paths["hubert_layer_stable_no_projection_norm"]


@pytest.mark.parametrize("family", list(CONFIGS))
def test_export_reloads_in_transformers(family, checkpoints, tmp_path):
  path, torch_model = checkpoints[family]
  module, variables, _ = hf.load_pretrained(path)
  reloaded = export_and_reload(module, variables, tmp_path)
  assert type(reloaded) is type(torch_model)
  x, mask = waveforms()
  with torch.no_grad():
    a = reloaded(input_values=torch.tensor(x), attention_mask=torch.tensor(mask))
    b = torch_model(input_values=torch.tensor(x), attention_mask=torch.tensor(mask))
  np.testing.assert_array_equal(a.last_hidden_state.numpy(), b.last_hidden_state.numpy())


def test_weight_g_and_weight_v_names_load(checkpoints, tmp_path):
  """Checkpoints saved before torch's weight-norm parametrizations (the Hub's wav2vec2-base)
  name the position conv's g and v `weight_g` / `weight_v`."""
  path, torch_model = checkpoints["wav2vec2_group_post_ln"]
  state = safetensors.numpy.load_file(Path(path) / "model.safetensors")
  old = {
    k.replace("parametrizations.weight.original0", "weight_g").replace(
      "parametrizations.weight.original1", "weight_v"
    ): v
    for k, v in state.items()
  }
  assert "encoder.pos_conv_embed.conv.weight_g" in old
  (tmp_path / "config.json").write_text((Path(path) / "config.json").read_text())
  safetensors.numpy.save_file(old, tmp_path / "model.safetensors", metadata={"format": "pt"})
  module, variables, _ = hf.load_pretrained(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, variables, hf.load_pretrained(path)[1])


@pytest.mark.parametrize(
  "model_cls,family",
  [
    (transformers.Wav2Vec2ForCTC, "wav2vec2_layer_stable"),
    (transformers.HubertForSequenceClassification, "hubert_group_post_ln"),
  ],
)
def test_the_encoder_of_a_task_checkpoint_loads(model_cls, family, tmp_path):
  """Wav2Vec2ForCTC / HubertForSequenceClassification nest the encoder under `wav2vec2.` /
  `hubert.`: mmtl loads that encoder (the task head is not part of it)."""
  torch_model = _tiny(family, model_cls)
  torch_model.save_pretrained(tmp_path)
  module, variables, _ = hf.load_pretrained(tmp_path)
  base = getattr(torch_model, module.hf_base_prefix)
  x, mask = waveforms()
  check_parity(module, variables, base, x, mask)


def test_bad_waveforms_name_the_fix(checkpoints):
  module, variables, _ = hf.load_pretrained(checkpoints["wav2vec2_group_post_ln"][0])
  stereo = jnp.zeros((2, 800, 2))
  with pytest.raises(ValueError, match=r"mono waveforms \(B, samples\). Average the channels"):
    module.apply(variables, stereo)
  with pytest.raises(ValueError, match="receptive field \\(50 samples.*pad them to at least 50"):
    module.apply(variables, jnp.zeros((2, 49)))
  with pytest.raises(ValueError, match="add_adapter or adapter_attn_dim.*does not implement"):
    hf.build_module(dict(model_type="wav2vec2", add_adapter=True))
  with pytest.raises(ValueError, match="conv_pos_batch_norm=True"):
    hf.build_module(dict(model_type="hubert", conv_pos_batch_norm=True))


# --- Training mode: SpecAugment and LayerDrop ----------------------------------------------


def test_time_mask_spans_follow_transformers_counts():
  """Spans start inside each row's real frames; per row, the mean number of masked frames
  over many draws is that of transformers' `_compute_mask_indices` (same span counts, same
  uniform starts without replacement)."""
  lengths, size, prob, span, min_spans = np.array([200, 150, 100, 37]), 200, 0.3, 5, 2
  draw = jax.jit(
    lambda key: wav2vec2.time_mask_spans(
      key, lengths, size, prob=prob, span=span, min_spans=min_spans
    )
  )
  ours = np.stack([np.asarray(draw(jax.random.key(i))) for i in range(300)])
  assert not ours[:, np.arange(size)[None, :] >= lengths[:, None]].any()  # never past the end
  from transformers.models.wav2vec2 import modeling_wav2vec2 as ref  # pylint: disable=g-import-not-at-top

  np.random.seed(0)
  mask = torch.tensor(np.arange(size)[None] < lengths[:, None])
  theirs = np.stack(
    [ref._compute_mask_indices((4, size), prob, span, mask, min_spans) for _ in range(300)]
  )
  np.testing.assert_allclose(ours.sum(-1).mean(0), theirs.sum(-1).mean(0), rtol=0.05)
  assert (ours.sum(-1) >= span * 1).all()  # min_spans = 2 spans: at least one span's frames


def test_spec_augment_replaces_spans_with_the_masked_embedding(checkpoints):
  path, _ = checkpoints["wav2vec2_group_post_ln"]
  module, variables, _ = hf.load_pretrained(path)
  module = module.clone(
    config=wav2vec2.Wav2Vec2Config.from_hf(
      {**hf.read_config(path), "mask_time_prob": 0.5, "mask_time_length": 2}
    )
  )
  x, mask = waveforms()
  features = functools.partial(module.apply, variables, method=module.features)
  clean, _, frames = features(jnp.asarray(x), jnp.asarray(mask), True)
  masked, _, _ = features(
    jnp.asarray(x), jnp.asarray(mask), False, rngs={"dropout": jax.random.key(3)}
  )
  replaced = np.asarray((masked != clean).any(-1))
  assert replaced.any() and not replaced[~np.asarray(frames)].any()
  embed = np.asarray(variables["params"]["masked_spec_embed"])
  np.testing.assert_array_equal(
    np.asarray(masked)[replaced], np.broadcast_to(embed, (replaced.sum(), 12))
  )
  # Evaluation is untouched; training with SpecAugment off (apply_spec_augment) too.
  off = module.clone(
    config=module.config.__class__(**{**vars(module.config), "apply_spec_augment": False})
  )
  unmasked, _, _ = functools.partial(off.apply, variables, method=off.features)(
    jnp.asarray(x), jnp.asarray(mask), False, rngs={"dropout": jax.random.key(3)}
  )
  np.testing.assert_array_equal(np.asarray(unmasked), np.asarray(clean))


@pytest.mark.parametrize("layerdrop,same_as", [(1.0, "input"), (0.0, "layers")])
def test_layerdrop_skips_whole_layers_in_training(layerdrop, same_as):
  spec = layers.LayerSpec(
    hidden_size=8, num_heads=2, mlp_dim=16, activation="gelu", layer_norm_eps=1e-5, pre_norm=True
  )
  stack = layers.Encoder(spec, 3, layerdrop=layerdrop)
  x = jax.random.normal(jax.random.key(0), (2, 5, 8))
  mask = jnp.ones((2, 5), bool)
  variables = stack.init(jax.random.key(1), x, mask, 0, 3)
  train = stack.apply(
    variables, x, mask, 0, 3, deterministic=False, rngs={"dropout": jax.random.key(2)}
  )
  expected = x if same_as == "input" else stack.apply(variables, x, mask, 0, 3)
  np.testing.assert_allclose(train, expected, atol=1e-6)
