"""RoBERTa, XLM-RoBERTa and DistilBERT compute what transformers' PyTorch models compute.

Tiny odd-shaped random transformers models (hidden 36, 3 heads, intermediate 37, vocab
53) with every weight perturbed (transformers zeroes biases and the padding rows of the
embeddings, which would hide mix-ups). XLM-R uses pad_token_id 4 so the RoBERTa position
rule is checked away from the released models' 1; DistilBERT uses sinusoidal positions.
"""

import functools
import json
from pathlib import Path
import re

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mmtl import config as config_lib
from mmtl import hf, rules
from mmtl.models import encoder, fusion
from tests import xla_settings
from tests.hf_fixtures import export_and_reload, perturb_weights

ATOL = 1e-5
VOCAB, MAX_POSITIONS = 53, 20
BERT_LIKE = dict(hidden_size=36, num_hidden_layers=2, num_attention_heads=3, intermediate_size=37)
CONFIGS = {
  "roberta": (transformers.RobertaConfig, dict(BERT_LIKE, type_vocab_size=1)),
  "xlm-roberta": (
    transformers.XLMRobertaConfig,
    dict(BERT_LIKE, pad_token_id=4, hidden_act="gelu_new", layer_norm_eps=1e-5),
  ),
  "distilbert": (
    transformers.DistilBertConfig,
    dict(
      dim=36, n_layers=2, n_heads=3, hidden_dim=37, activation="relu", sinusoidal_pos_embds=True
    ),
  ),
}
TASK_MODELS = {
  "roberta": transformers.RobertaForSequenceClassification,
  "xlm-roberta": transformers.XLMRobertaForSequenceClassification,
  "distilbert": transformers.DistilBertForSequenceClassification,
}
FAMILIES = list(CONFIGS)


def _save_tiny(family: str, out: Path) -> transformers.PreTrainedModel:
  config_cls, extra = CONFIGS[family]
  torch.manual_seed(0)
  config = config_cls(vocab_size=VOCAB, max_position_embeddings=MAX_POSITIONS, **extra)
  fixed = "embeddings.position_embeddings.weight" if family == "distilbert" else None
  # (DistilBERT's sinusoidal table stays exact.)
  model = perturb_weights(
    transformers.AutoModel.from_config(config), lambda name: 0.0 if name == fixed else 0.1
  )
  model.save_pretrained(out)
  return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[str, transformers.PreTrainedModel]]:
  """{family: (folder, the torch model saved there)}."""
  return {f: (str(d := tmp_path_factory.mktemp(f)), _save_tiny(f, d)) for f in FAMILIES}


@functools.partial(xla_settings.production_jit, static_argnums=0)
def _apply(module, variables, inputs):
  return module.apply(variables, **inputs)


def _inputs(
  module, torch_model, side: str, length: int = 9, seed: int = 0
) -> dict[str, np.ndarray]:
  """Random ids (no pad id among them) with rows of 9, 6 and 2 real tokens, padded on `side`
  with the pad token; token types where the model has more than one."""
  pad = torch_model.config.pad_token_id
  rng = np.random.default_rng(seed)
  ids = rng.integers(pad + 1, VOCAB, (3, length))
  mask = np.ones_like(ids)
  for row, n in enumerate((length, 6, 2)):
    padding = slice(n, None) if side == "right" else slice(0, length - n)
    mask[row, padding], ids[row, padding] = 0, pad
  inputs = dict(input_ids=ids, attention_mask=mask)
  if getattr(torch_model.config, "type_vocab_size", 1) > 1:
    inputs["token_type_ids"] = rng.integers(0, 2, ids.shape)
  assert set(inputs) <= set(module.inputs)
  return inputs


def _check_parity(module, variables, torch_model, inputs):
  out = _apply(module, variables, {k: jnp.asarray(v) for k, v in inputs.items()})
  with torch.no_grad():
    ref = torch_model(**{k: torch.tensor(v) for k, v in inputs.items()})
  np.testing.assert_allclose(out["last_hidden_state"], ref.last_hidden_state, atol=ATOL, rtol=0)
  if "pooler_output" in ref:
    np.testing.assert_allclose(out["pooler_output"], ref.pooler_output, atol=ATOL, rtol=0)
  else:  # DistilBERT: no pooler, as in transformers
    assert out["pooler_output"] is None
  return out


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", FAMILIES)
def test_parity_on_padded_batches(family, side, checkpoints):
  path, torch_model = checkpoints[family]
  module, variables, _ = hf.load_pretrained(path)
  assert type(module).config_class.model_type == family
  inputs = _inputs(module, torch_model, side)
  out = _check_parity(module, variables, torch_model, inputs)
  if family == "distilbert" and side == "left":
    return  # DistilBERT (as BERT) numbers positions 0 .. L-1 whatever the padding.
  # RoBERTa's position ids follow the padding: a row's real tokens give what they give unpadded.
  row = inputs["attention_mask"][1].astype(bool)
  alone = {k: v[1:2, row] for k, v in inputs.items()}
  unpadded = _apply(module, variables, {k: jnp.asarray(v) for k, v in alone.items()})
  np.testing.assert_allclose(
    out["last_hidden_state"][1, row], unpadded["last_hidden_state"][0], atol=ATOL, rtol=0
  )


@pytest.mark.parametrize("family", ["roberta", "xlm-roberta"])
def test_roberta_longest_input(family, checkpoints):
  """Positions run to pad_token_id + L: the table covers max_position_embeddings - pad - 1."""
  path, torch_model = checkpoints[family]
  module, variables, _ = hf.load_pretrained(path)
  longest = MAX_POSITIONS - torch_model.config.pad_token_id - 1
  _check_parity(module, variables, torch_model, _inputs(module, torch_model, "right", longest))
  too_long = {
    k: jnp.asarray(v) for k, v in _inputs(module, torch_model, "right", longest + 1).items()
  }
  with pytest.raises(ValueError, match=f"{longest + 1} > {longest}, the longest"):
    _apply(module, variables, too_long)


@pytest.mark.parametrize("family", FAMILIES)
def test_encoder_protocol_and_param_names(family, checkpoints):
  path, torch_model = checkpoints[family]
  module, variables, _ = hf.load_pretrained(path)
  assert isinstance(module, encoder.Encoder) and set(module.dummy_inputs()) == set(module.inputs)
  assert (module.num_layers, module.hidden_size) == (2, 36)
  inputs = {k: jnp.asarray(v) for k, v in _inputs(module, torch_model, "left").items()}

  def pieces(m):
    x, mask = m.embed(**inputs)
    for start in range(m.num_layers):
      x = m.run_layers(x, mask, start, start + 1)
    return m.finalize(x, mask)

  split = module.apply(variables, method=pieces)
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, atol=1e-6),
    split,
    _apply(module, variables, inputs),
  )
  paths = set(rules.flatten(variables["params"]))
  assert {
    "embeddings/word_embeddings/embedding",
    "embeddings/position_embeddings/embedding",
    "embeddings/layer_norm/scale",
    "encoder/layer_1/attn/out/kernel",
    "encoder/layer_0/attn_norm/bias",
    "encoder/layer_1/mlp/fc2/kernel",
    "encoder/layer_0/mlp_norm/scale",
  } <= paths
  assert sum(re.fullmatch(r".*/attn/(query|value)/kernel", p) is not None for p in paths) == 4
  bert_only = {"pooler/dense/kernel", "embeddings/token_type_embeddings/embedding"}
  assert bert_only <= paths if family != "distilbert" else not bert_only & paths


@pytest.mark.parametrize("family", FAMILIES)
def test_export_reloads_in_transformers(family, checkpoints, tmp_path):
  path, torch_model = checkpoints[family]
  module, variables, _ = hf.load_pretrained(path)
  reloaded = export_and_reload(module, variables, tmp_path)
  assert type(reloaded) is type(torch_model)
  inputs = {k: torch.tensor(v) for k, v in _inputs(module, torch_model, "left").items()}
  with torch.no_grad():
    ours, ref = reloaded(**inputs), torch_model(**inputs)
  assert ours.keys() == ref.keys()
  for key in ref:
    np.testing.assert_array_equal(ours[key].numpy(), ref[key].numpy(), err_msg=key)


@pytest.mark.parametrize("family", FAMILIES)
def test_task_checkpoint_loads_encoder(family, checkpoints, tmp_path):
  path, _ = checkpoints[family]
  TASK_MODELS[family].from_pretrained(path, num_labels=3).save_pretrained(tmp_path)
  module, variables, _ = hf.load_pretrained(path)
  prefix = f"{module.hf_base_prefix}."
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["architectures"] == [TASK_MODELS[family].__name__]
  keys = set(hf.read_weights(tmp_path))
  assert all(k.startswith((prefix, "classifier.", "pre_classifier.")) for k in keys)
  if family == "distilbert":
    jax.tree.map(np.testing.assert_array_equal, hf.load_pretrained(tmp_path)[1], variables)
    return
  # RobertaForSequenceClassification has no pooler (its head pools the first token itself):
  # the module is built without one.
  task_module, task, _ = hf.load_pretrained(tmp_path)
  assert hf.left_out(task_module) == {"add_pooling_layer": "pooler"}
  del variables["params"]["pooler"]
  jax.tree.map(np.testing.assert_array_equal, task, variables)


@pytest.mark.parametrize("family", FAMILIES)
def test_reads_hf_flax_msgpack(family, checkpoints, tmp_path):
  """flax_model.msgpack in HF Flax's layout (the torch module path, Flax leaf names and
  kernels) loads to the params of the safetensors. FlaxDistilBert computed sinusoidal
  positions instead of storing them: such a checkpoint loads with dont_load, and mmtl's
  initialization of the table is transformers' table."""
  path, _ = checkpoints[family]
  module, variables, config = hf.load_pretrained(path)
  to_mmtl = {name.key: p for p, name in module.hf_names().items()}
  flat = {}
  for key, x in hf.read_weights(Path(path)).items():
    *parents, _ = key.split(".")
    leaf = to_mmtl[key].rsplit("/", 1)[1]
    flat["/".join([*parents, leaf])] = x.T if leaf == "kernel" else x
  dont_load = []
  if family == "distilbert":
    del flat["embeddings/position_embeddings/embedding"]
    dont_load = ["embeddings/position_embeddings/.*"]
  (tmp_path / "flax_model.msgpack").write_bytes(
    flax.serialization.msgpack_serialize(rules.unflatten(flat))
  )
  (tmp_path / "config.json").write_text(json.dumps(config))
  loaded = hf.load_pretrained(tmp_path, dont_load=dont_load)[1]
  jax.tree.map(np.testing.assert_array_equal, loaded, variables)


def test_distilbert_has_no_dropout_after_attention():
  """transformers' DistilBERT drops the embeddings and each MLP output, not the attention
  output (BERT and RoBERTa drop both sublayers' outputs)."""

  def dropout_calls(config):
    module = hf.build_module(config)
    calls = []

    def count(next_fun, args, kwargs, context):
      dropout = isinstance(context.module, nn.Dropout) and context.method_name == "__call__"
      if dropout and not kwargs.get("deterministic", True):
        calls.append(context.module.rate)
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(count):
      jax.eval_shape(
        lambda v: module.apply(
          v,
          **module.dummy_inputs(),
          deterministic=False,
          rngs={"dropout": jax.random.PRNGKey(0)},
        ),
        hf.variable_shapes(module),
      )
    return calls

  small = dict(
    vocab_size=VOCAB, max_position_embeddings=MAX_POSITIONS, attention_probs_dropout_prob=0
  )
  distil = dict(model_type="distilbert", dim=36, n_layers=2, n_heads=3, hidden_dim=37)
  assert dropout_calls({**distil, "dropout": 0.3, "attention_dropout": 0}) == [0.3] * 3
  roberta = dict(model_type="roberta", **BERT_LIKE, **small, hidden_dropout_prob=0.3)
  assert dropout_calls(roberta) == [0.3] * 5


def test_distilbert_config_takes_common_names():
  """`hidden_size` etc. (transformers' attribute_map) as in the other families' config dicts."""
  module = hf.build_module(
    dict(model_type="distilbert", hidden_size=12, num_hidden_layers=1, num_attention_heads=2)
  )
  assert (module.config.dim, module.config.n_layers, module.config.n_heads) == (12, 1, 2)
  assert (module.hidden_size, module.num_layers) == (12, 1)
  assert "hidden_size" not in module.config.to_hf()


@pytest.mark.parametrize("family", FAMILIES)
def test_fusion_with_text_tower(family, checkpoints):
  small_vit = dict(
    model_type="vit",
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=32,
    image_size=8,
    patch_size=4,
  )
  # No pooler in DistilBERT: its tower pools the first token, as DistilBertForX do.
  text = dict(name=checkpoints[family][0], **({"pool": "cls"} if family == "distilbert" else {}))
  towers = dict(image=dict(name=small_vit), text=text)
  model = fusion.build({**config_lib.model_defaults(), "towers": towers, "width": 8})
  batch = model.dummy_batch()
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), batch)
  assert "text_encoder/encoder/layer_1/attn/query/kernel" in rules.flatten(variables["params"])
  assert jax.eval_shape(model.apply, variables, batch)["logits"].shape == (1, 2)
  variables = hf.load_into(variables, "text_encoder", checkpoints[family][0])
  module, torch_model = model.tower("text"), checkpoints[family][1]
  real = dict(
    _inputs(module, torch_model, "right"), pixel_values=np.zeros((3, 8, 8, 3), np.float32)
  )
  assert jax.eval_shape(model.apply, variables, real)["logits"].shape == (3, 2)
