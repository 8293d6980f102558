"""mmtl.hf: checkpoint formats, hub cache, errors, towers, load_into, export."""

import json
from pathlib import Path
import shutil

import flax.serialization
import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from mmtl import hf, preprocess, rules
from mmtl.models import clip, registry
from tests.hf_fixtures import export_and_reload, make_tiny_checkpoint


def _assert_trees_equal(a, b):
  assert rules.flatten(a).keys() == rules.flatten(b).keys()
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _copy(src, dst):
  shutil.copytree(src, dst)
  return dst


def _state(folder):
  return safetensors.numpy.load_file(Path(folder) / "model.safetensors")


def _hf_flax_tree(state):
  """A torch state dict in the layout of HF's Flax models (what a hub flax_model.msgpack holds)."""
  flat = {}
  for key, x in state.items():
    *module, leaf = key.split(".")
    if leaf == "weight":
      if "norm" in module[-1].lower():
        leaf = "scale"
      elif "embedding" in module[-1] and x.ndim == 2:
        leaf = "embedding"
      else:
        leaf, x = "kernel", (x.T if x.ndim == 2 else x.transpose(2, 3, 1, 0))
    flat["/".join([*module, leaf])] = x
  return rules.unflatten(flat)


# --- Formats ---------------------------------------------------------------------


def test_flax_msgpack_and_sharded_checkpoints_load_the_same(tiny_bert_dir, tmp_path):
  _, ref, _ = hf.load_pretrained(tiny_bert_dir)
  state = _state(_copy(tiny_bert_dir, tmp_path / "src"))
  tree = _hf_flax_tree(state)
  # The names of real FlaxBertModel checkpoints.
  assert tree["encoder"]["layer"]["0"]["attention"]["self"]["query"]["kernel"].shape == (32, 32)
  assert (
    "scale" in tree["embeddings"]["LayerNorm"]
    and "embedding" in tree["embeddings"]["word_embeddings"]
  )

  def folder(name, files):
    d = tmp_path / name
    d.mkdir()
    shutil.copy(tmp_path / "src" / "config.json", d)
    for file, content in files.items():
      if isinstance(content, bytes):
        (d / file).write_bytes(content)
      elif file.endswith(".json"):
        (d / file).write_text(json.dumps(content))
      else:
        safetensors.numpy.save_file(content, d / file)
    return d

  keys = sorted(state)
  half = len(keys) // 2
  shards = {
    "model-00001-of-00002.safetensors": {k: state[k] for k in keys[:half]},
    "model-00002-of-00002.safetensors": {k: state[k] for k in keys[half:]},
  }
  index = {"weight_map": {k: f for f, part in shards.items() for k in part}}
  flax_shards = {
    "flax_model-00001-of-00002.msgpack": {"embeddings": tree["embeddings"]},
    "flax_model-00002-of-00002.msgpack": {k: v for k, v in tree.items() if k != "embeddings"},
  }
  flax_index = {
    "weight_map": {k: f for f, part in flax_shards.items() for k in rules.flatten(part)}
  }
  checkpoints = {
    "msgpack": {"flax_model.msgpack": flax.serialization.msgpack_serialize(tree)},
    "sharded": {**shards, "model.safetensors.index.json": index},
    "sharded_msgpack": {
      **{f: flax.serialization.msgpack_serialize(t) for f, t in flax_shards.items()},
      "flax_model.msgpack.index.json": flax_index,
    },
  }
  for name, files in checkpoints.items():
    _, variables, _ = hf.load_pretrained(folder(name, files))
    _assert_trees_equal(variables, ref)


def test_bert_for_task_checkpoint_loads_encoder(tiny_bert_dir, tmp_path):
  """`bert.`-prefixed weights with a head (BertForSequenceClassification) load; the head is
  skipped."""
  torch_model = transformers.BertForSequenceClassification.from_pretrained(
    tiny_bert_dir, num_labels=3
  )
  torch_model.save_pretrained(tmp_path)
  assert any(k.startswith("bert.") for k in _state(tmp_path))
  _, variables, _ = hf.load_pretrained(tmp_path)
  _, ref, _ = hf.load_pretrained(tiny_bert_dir)
  _assert_trees_equal(variables, ref)


def test_hub_id_from_the_hf_cache_offline_with_revision(tiny_bert_dir, tmp_path, monkeypatch):
  """A hub id resolves through the HF cache (HF_HUB_OFFLINE=1 in conftest), `revision` included."""
  repo = tmp_path / "hub" / "models--mmtl-test--tiny-bert"
  main, other = "a" * 40, "b" * 40
  shutil.copytree(tiny_bert_dir, repo / "snapshots" / main)
  make_tiny_checkpoint("bert", repo / "snapshots" / other, seed=1)
  (repo / "refs").mkdir()
  (repo / "refs" / "main").write_text(main)
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

  _, variables, _ = hf.load_pretrained("mmtl-test/tiny-bert")
  _assert_trees_equal(variables, hf.load_pretrained(tiny_bert_dir)[1])
  _, variables_b, _ = hf.load_pretrained("mmtl-test/tiny-bert", revision=other)
  assert not np.array_equal(
    variables_b["params"]["pooler"]["dense"]["kernel"],
    variables["params"]["pooler"]["dense"]["kernel"],
  )
  assert len(preprocess.load_tokenizer("mmtl-test/tiny-bert")) == 92
  with pytest.raises(hf.CheckpointError, match="not in the HF cache and downloads are off"):
    hf.load_pretrained("mmtl-test/not-cached")


# --- Errors ------------------------------------------------------------------------


def test_unknown_model_type(tiny_bert_dir, tmp_path):
  d = _copy(tiny_bert_dir, tmp_path / "ckpt")
  (d / "config.json").write_text(
    json.dumps({**json.loads((d / "config.json").read_text()), "model_type": "mamba"})
  )
  with pytest.raises(
    hf.CheckpointError,
    match=r"Unknown model_type 'mamba'.*implements \[[^]]*'bert'.*"
    r"one line in mmtl/models/registry\.py",
  ):
    hf.load_pretrained(d)


def test_missing_files_and_bad_arguments(tiny_bert_dir, tiny_vit_dir, tmp_path):
  d = _copy(tiny_bert_dir, tmp_path / "ckpt")
  (d / "model.safetensors").unlink()
  with pytest.raises(
    hf.CheckpointError, match=r"No weights in .*expected one of \['model.safetensors'"
  ):
    hf.load_pretrained(d)
  (d / "config.json").unlink()
  with pytest.raises(hf.CheckpointError, match="No config.json"):
    hf.load_pretrained(d)
  with pytest.raises(hf.CheckpointError, match="neither an existing folder nor a valid hub id"):
    hf.load_pretrained(str(tmp_path / "nowhere" / "x" / "y"))
  with pytest.raises(hf.CheckpointError, match="revision='v1' only applies to hub ids"):
    hf.load_pretrained(tiny_bert_dir, revision="v1")
  with pytest.raises(
    hf.CheckpointError,
    match="tower='vision' picks a tower of a 'clip' or 'siglip' checkpoint.*model_type='vit'",
  ):
    hf.load_pretrained(tiny_vit_dir, tower="vision")
  with pytest.raises(hf.CheckpointError, match=r"tower='audio': use one of \['text', 'vision'\]"):
    hf.build_module({"model_type": "clip"}, tower="audio")


def test_shape_mismatch_names_path_and_both_shapes(tiny_bert_dir, tmp_path):
  d = _copy(tiny_bert_dir, tmp_path / "ckpt")
  config = json.loads((d / "config.json").read_text())
  (d / "config.json").write_text(json.dumps({**config, "intermediate_size": 40}))
  with pytest.raises(
    hf.CheckpointError,
    match=r"encoder/layer_0/mlp/fc1/kernel: checkpoint \(32, 37\) vs model \(32, 40\)",
  ):
    hf.load_pretrained(d)


def test_missing_and_unexpected_params_and_dont_load(tiny_bert_dir, tmp_path):
  d = _copy(tiny_bert_dir, tmp_path / "ckpt")
  state = _state(d)
  del state["pooler.dense.weight"]
  safetensors.numpy.save_file(state, d / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(
    hf.CheckpointError, match=r"1 param\(s\) missing from the checkpoint: pooler/dense/kernel"
  ):
    hf.load_pretrained(d)
  # dont_load keeps the initialized value instead (seeded), never silently.
  params = hf.load_pretrained(d, dont_load=["pooler/dense/kernel"])[1]["params"]
  again = hf.load_pretrained(d, dont_load=["pooler/dense/kernel"])[1]["params"]
  np.testing.assert_array_equal(
    params["pooler"]["dense"]["kernel"], again["pooler"]["dense"]["kernel"]
  )
  np.testing.assert_array_equal(params["pooler"]["dense"]["bias"], state["pooler.dense.bias"])
  # A module without the pooler: the checkpoint's pooler is unexpected unless left out.
  with pytest.raises(
    hf.CheckpointError,
    match="2 checkpoint param\\(s\\) the model does not have: "
    "pooler/dense/kernel, pooler/dense/bias",
  ):
    hf.load_pretrained(tiny_bert_dir, add_pooling_layer=False)
  module, variables, _ = hf.load_pretrained(
    tiny_bert_dir, add_pooling_layer=False, dont_load=["pooler/.*"]
  )
  assert "pooler" not in variables["params"] and not module.add_pooling_layer
  with pytest.raises(
    rules.RuleError, match=r"dont_load: rule\(s\) \['poler/\.\*'\] match no parameter"
  ):
    hf.load_pretrained(tiny_bert_dir, dont_load=["poler/.*"])


# --- Towers, load_into ------------------------------------------------------------------


def _fused_init(tiny_vit_dir, tiny_bert_dir):
  """Stand-in for a fused model's variables: two freshly initialized towers and a head."""
  image = hf.build_module(hf.read_config(tiny_vit_dir), param_dtype=jnp.bfloat16)
  text = hf.build_module(hf.read_config(tiny_bert_dir), add_pooling_layer=False)
  params = {
    "image_encoder": _zeros(image)["params"],
    "text_encoder": _zeros(text)["params"],
    "head": {"kernel": jnp.ones((64, 3))},
  }
  return {"params": params}


def _zeros(module):
  """Initialized-looking variables without compiling an init."""
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), hf.variable_shapes(module))


def test_load_into_subtrees(tiny_vit_dir, tiny_bert_dir, tiny_clip_dir):
  variables = _fused_init(tiny_vit_dir, tiny_bert_dir)
  params = variables["params"]
  before = jax.tree.map(np.asarray, variables)
  loaded = hf.load_into(variables, "image_encoder", tiny_vit_dir)
  _, vit, _ = hf.load_pretrained(tiny_vit_dir, param_dtype=jnp.bfloat16)
  assert loaded.keys() == {"params"}
  # Cast to the initialized dtype.
  _assert_trees_equal(loaded["params"]["image_encoder"], vit["params"])
  assert loaded["params"]["text_encoder"] is params["text_encoder"]
  assert loaded["params"]["head"] is params["head"]
  _assert_trees_equal(variables, before)  # not mutated

  with pytest.raises(hf.CheckpointError, match="text_encoder/pooler/dense/kernel"):
    hf.load_into(variables, "text_encoder", tiny_bert_dir)
  loaded = hf.load_into(variables, "text_encoder", tiny_bert_dir, dont_load=["pooler/.*"])
  _, bert, _ = hf.load_pretrained(tiny_bert_dir, add_pooling_layer=False, dont_load=["pooler/.*"])
  _assert_trees_equal(loaded["params"]["text_encoder"], bert["params"])

  # A CLIP tower into a ViT-shaped slot: names differ, so every param is reported.
  with pytest.raises(
    hf.CheckpointError, match="missing from the checkpoint: image_encoder/embeddings/cls_token"
  ):
    hf.load_into(variables, "image_encoder", tiny_clip_dir, tower="vision")
  with pytest.raises(
    hf.CheckpointError, match=r"No subtree 'audio_encoder' in params \(has \['head'"
  ):
    hf.load_into(variables, "audio_encoder", tiny_vit_dir)


def test_load_into_shape_mismatch_and_dont_load(tiny_vit_dir, tmp_path):
  """An audio ViT (1 channel) initialized from an RGB checkpoint: all but the patch kernel."""
  config = {**hf.read_config(tiny_vit_dir), "num_channels": 1}
  audio = _zeros(hf.build_module(config))["params"]
  variables = {"params": {"audio_encoder": audio}}
  with pytest.raises(
    hf.CheckpointError,
    match=r"audio_encoder/embeddings/patch_embeddings/kernel: "
    r"checkpoint \(4, 4, 3, 32\) vs model \(4, 4, 1, 32\)",
  ):
    hf.load_into(variables, "audio_encoder", tiny_vit_dir)
  loaded = hf.load_into(
    variables, "audio_encoder", tiny_vit_dir, dont_load=["embeddings/patch_embeddings/kernel"]
  )
  kept = loaded["params"]["audio_encoder"]["embeddings"]["patch_embeddings"]
  np.testing.assert_array_equal(kept["kernel"], audio["embeddings"]["patch_embeddings"]["kernel"])
  np.testing.assert_array_equal(
    kept["bias"], _state(tiny_vit_dir)["embeddings.patch_embeddings.projection.bias"]
  )


# --- Export ---------------------------------------------------------------------------


@pytest.mark.parametrize(
  "family, tower, inputs",
  [
    ("bert", None, "text"),
    ("vit", None, "image"),
    ("clip", None, "both"),
    ("clip", "vision", "image"),
  ],
)
def test_export_round_trip_into_transformers(
  family, tower, inputs, tiny_bert_dir, tiny_vit_dir, tiny_clip_dir, tmp_path
):
  src = {"bert": tiny_bert_dir, "vit": tiny_vit_dir, "clip": tiny_clip_dir}[family]
  module, variables, _ = hf.load_pretrained(src, tower=tower)
  torch_model = export_and_reload(module, variables, tmp_path / "export")
  ref_cls = transformers.CLIPVisionModel if tower == "vision" else transformers.AutoModel
  ref_model = ref_cls.from_pretrained(src).eval()
  kw = {}
  if inputs in ("text", "both"):
    kw["input_ids"] = (
      torch.tensor([[2, 20, 30, 40, 3], [2, 25, 35, 3, 0]])
      if family == "bert"
      else torch.tensor([[0, 20, 30, 1], [0, 25, 1, 1]])
    )
    kw["attention_mask"] = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])[
      :, : kw["input_ids"].shape[1]
    ]
  if inputs in ("image", "both"):
    kw["pixel_values"] = torch.randn(2, 3, 16, 16)
  with torch.no_grad():
    got, want = torch_model(**kw), ref_model(**kw)
  key = "logits_per_image" if family == "clip" and tower is None else "pooler_output"
  torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)


def test_export_rejects_foreign_params(tiny_vit_dir, tmp_path):
  module, variables, _ = hf.load_pretrained(tiny_vit_dir)
  foreign = {"params": {**variables["params"], "lora_a": np.ones(2)}}
  with pytest.raises(hf.CheckpointError, match="params with no HF name.*lora_a"):
    hf.save_pretrained(module, foreign, tmp_path)


def test_export_rejects_a_bare_params_tree(tiny_vit_dir, tmp_path):
  """The old call, `save_pretrained(module, params, ...)`, says how to pass variables."""
  module, variables, _ = hf.load_pretrained(tiny_vit_dir)
  with pytest.raises(
    hf.CheckpointError,
    match=r"Export takes the encoder's variables.*got a tree with \['embeddings', 'encoder'.*"
    r"pass \{'params': params\}",
  ):
    hf.save_pretrained(module, variables["params"], tmp_path)
  assert not (tmp_path / "model.safetensors").exists()


def test_bert_variables_are_params_only(tiny_bert_dir, tmp_path):
  """A family without BatchNorm has one collection, loaded and after an export round trip."""
  module, variables, _ = hf.load_pretrained(tiny_bert_dir)
  _, reloaded, _ = hf.load_pretrained(hf.save_pretrained(module, variables, tmp_path))
  assert variables.keys() == reloaded.keys() == {"params"}
  assert hf.variable_shapes(module).keys() == {"params"}


def test_build_module_from_config_dict():
  module = hf.build_module(
    {
      "model_type": "bert",
      "hidden_size": 16,
      "num_hidden_layers": 1,
      "num_attention_heads": 2,
      "intermediate_size": 24,
      "vocab_size": 50,
    },
    dtype=jnp.bfloat16,
    attention_impl="xla",
  )
  shapes = rules.flatten(hf.variable_shapes(module)["params"])
  assert shapes["encoder/layer_0/attn/query/kernel"].shape == (16, 16)
  assert "encoder/layer_1/attn/query/kernel" not in shapes
  assert module.dtype == jnp.bfloat16 and module.attention_impl == "xla"
  with pytest.raises(ValueError, match="position_embedding_type='relative_key'"):
    hf.build_module({"model_type": "bert", "position_embedding_type": "relative_key"})


def test_registry_and_towers():
  """Every registered class builds from its model_type; `tower` takes a CLIP half from a
  full config or accepts a lone tower's config."""
  composite = "vision-encoder-decoder"  # needs its encoder and decoder configs
  for model_type, cls in registry.MODELS.items():
    if model_type != composite:
      module = hf.build_module({"model_type": model_type})
      assert type(module) is cls and type(module.config) is cls.config_class
  for model_type, cls in registry.DECODERS.items():
    assert type(hf.build_module({"model_type": model_type, "is_decoder": True})) is cls
  with pytest.raises(ValueError, match="needs `encoder` and `decoder` sub-configs"):
    hf.build_module({"model_type": composite})
  parts = {"encoder": {"model_type": "vit"}, "decoder": {"model_type": "bert"}}
  module = hf.build_module({"model_type": composite, **parts})
  assert module.config.decoder.is_decoder and module.config.decoder.add_cross_attention
  full = {"model_type": "clip", "vision_config": {"hidden_size": 48}}
  vision = hf.build_module(full, tower="vision")
  assert type(vision) is clip.CLIPVisionModel and vision.hidden_size == 48
  lone = hf.build_module({"model_type": "clip_text_model"}, tower="text")
  assert type(lone) is clip.CLIPTextModel
  with pytest.raises(
    hf.CheckpointError, match="'clip' or 'siglip' checkpoint.*model_type='clip_text_model'"
  ):
    hf.build_module({"model_type": "clip_text_model"}, tower="vision")


# --- Preprocessing ------------------------------------------------------------------


def test_tokenizer_and_image_stats(tiny_bert_dir, tiny_vit_dir, tiny_clip_dir, tmp_path):
  tok = preprocess.load_tokenizer(tiny_bert_dir)
  assert tok.convert_ids_to_tokens(tok("a red circle")["input_ids"]) == [
    "[CLS]",
    "a",
    "red",
    "circle",
    "[SEP]",
  ]
  assert (
    preprocess.load_tokenizer(tiny_clip_dir)("red")["input_ids"][-1]
    == hf.read_config(tiny_clip_dir)["text_config"]["eos_token_id"]
  )
  assert preprocess.image_stats(tiny_vit_dir) == dict(mean=(0.5,) * 3, std=(0.5,) * 3, size=16)
  clip_stats = preprocess.image_stats(tiny_clip_dir)
  assert clip_stats["size"] == 16 and clip_stats["mean"][0] == pytest.approx(0.48145466)
  d = _copy(tiny_clip_dir, tmp_path / "no_processor")
  (d / "preprocessor_config.json").unlink()
  assert preprocess.image_stats(d) == dict(size=16, **preprocess.OPENAI_CLIP_STATS)
  with pytest.raises(hf.CheckpointError, match="is no image checkpoint"):
    preprocess.image_stats(tiny_bert_dir)
