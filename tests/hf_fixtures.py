"""Tiny random Hugging Face checkpoints (PyTorch transformers) for tests.

Session fixtures, each a folder path (str) written by `save_pretrained` of a
randomly initialized transformers model, plus a matching tokenizer or
`preprocessor_config.json`, so every loader in mmtl can read them like a hub
checkpoint:
- `tiny_bert_dir`: BertModel, hidden 32, 2 layers, 4 heads, max 32 tokens,
  WordPiece tokenizer over lowercase letters (any lowercase text tokenizes).
- `tiny_vit_dir`: ViTModel, 16x16x3 images, patch 4 (17 tokens), hidden 32, 2 layers.
- `tiny_clip_dir`: CLIPModel, vision 16x16 patch 4, text max 32 tokens, hidden 32,
  2 layers each, projection 24; character-level BPE CLIP tokenizer.
`make_tiny_checkpoint(family, out_dir, **config_overrides)` writes variants;
`export_and_reload` checks an export round trip.
"""

from __future__ import annotations

import json
from pathlib import Path
import string

import pytest

_LETTERS = list(string.ascii_lowercase) + list(string.digits)
_WORDS = ["a", "the", "photo", "of", "red", "green", "blue", "circle", "square", "triangle"]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _bert_tokenizer(out: Path):
  from transformers import BertTokenizer

  vocab = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    *".,!?'-",
    *_LETTERS,
    *(f"##{c}" for c in _LETTERS),
    *_WORDS[1:],
  ]
  tok = BertTokenizer(
    vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True, model_max_length=32
  )
  tok.save_pretrained(out)
  return tok


def _clip_tokenizer(out: Path):
  from transformers import CLIPTokenizer

  # Character-level BPE: every letter alone and at a word's end ("</w>"), a few merges.
  vocab = [
    "<|startoftext|>",
    "<|endoftext|>",
    *".,!?'-",
    *_LETTERS,
    *(f"{c}</w>" for c in _LETTERS),
  ]
  merges = [("r", "e"), ("re", "d</w>"), ("o", "f</w>")]
  vocab += ["".join(m) for m in merges]
  tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=32)
  tok.save_pretrained(out)
  return tok


def _preprocessor(out: Path, processor: str, mean, std, size: dict, crop: dict | None = None):
  cfg = dict(
    image_processor_type=processor,
    do_resize=True,
    do_rescale=True,
    rescale_factor=1 / 255,
    do_normalize=True,
    image_mean=mean,
    image_std=std,
    size=size,
    resample=3,
  )
  if crop:
    cfg.update(do_center_crop=True, crop_size=crop)
  (out / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2))


def make_tiny_checkpoint(
  family: str, out_dir: str | Path, seed: int = 0, **config_overrides
) -> str:
  """Save a tiny random transformers `family` ("bert", "vit", "resnet", "clip", "wav2vec2",
  "whisper", "ast") model, with its tokenizer or feature extractor config, to `out_dir`.

  For "clip", `config_overrides` may hold `text_config` / `vision_config` dicts
  that update the tiny defaults.
  """
  import torch
  import transformers as tr

  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  torch.manual_seed(seed)
  common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
  if family == "bert":
    tok = _bert_tokenizer(out)
    cfg = tr.BertConfig(
      **{**common, "vocab_size": len(tok), "max_position_embeddings": 32, **config_overrides}
    )
    model = tr.BertModel(cfg)
  elif family == "vit":
    _preprocessor(out, "ViTImageProcessor", [0.5] * 3, [0.5] * 3, dict(height=16, width=16))
    cfg = tr.ViTConfig(**{**common, "image_size": 16, "patch_size": 4, **config_overrides})
    model = tr.ViTModel(cfg)
  elif family == "resnet":
    # microsoft/resnet-50's preprocessing (ImageNet mean/std, ConvNeXt's processor).
    size = dict(shortest_edge=16)
    _preprocessor(out, "ConvNextImageProcessor", IMAGENET_MEAN, IMAGENET_STD, size)
    cfg = tr.ResNetConfig(
      **{"embedding_size": 8, "hidden_sizes": [8, 12], "depths": [1, 1], **config_overrides}
    )
    model = tr.ResNetModel(cfg)
  elif family == "clip":
    tok = _clip_tokenizer(out)
    _preprocessor(
      out,
      "CLIPImageProcessor",
      OPENAI_CLIP_MEAN,
      OPENAI_CLIP_STD,
      dict(shortest_edge=16),
      crop=dict(height=16, width=16),
    )
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    text = dict(
      common,
      vocab_size=len(tok),
      max_position_embeddings=32,
      eos_token_id=eos,
      pad_token_id=eos,
      bos_token_id=tok.convert_tokens_to_ids("<|startoftext|>"),
    )
    vision = dict(common, image_size=16, patch_size=4)
    text.update(config_overrides.pop("text_config", {}))
    vision.update(config_overrides.pop("vision_config", {}))
    cfg = tr.CLIPConfig(
      text_config=text, vision_config=vision, projection_dim=24, **config_overrides
    )
    model = tr.CLIPModel(cfg)
  elif family == "wav2vec2":
    # 16 kHz, normalized input, as facebook/wav2vec2-base's feature extractor; a 3-conv
    # feature encoder with 320 samples per frame (as the base model), 400-sample field.
    (out / "preprocessor_config.json").write_text(
      json.dumps(
        dict(
          feature_extractor_type="Wav2Vec2FeatureExtractor",
          sampling_rate=16_000,
          do_normalize=True,
          feature_size=1,
          padding_value=0.0,
          return_attention_mask=True,
        )
      )
    )
    cfg = tr.Wav2Vec2Config(
      **{
        **common,
        "conv_dim": (16, 16, 24),
        "conv_stride": (5, 8, 8),
        "conv_kernel": (10, 8, 8),
        "num_conv_pos_embeddings": 8,
        "num_conv_pos_embedding_groups": 4,
        "mask_time_length": 2,
        **config_overrides,
      }
    )
    model = tr.Wav2Vec2Model(cfg)
  elif family == "whisper":
    # 13 mel bins; the feature extractor pads clips to 1 s (100 frames, 50 positions).
    tr.WhisperFeatureExtractor(feature_size=13, chunk_length=1).save_pretrained(out)
    cfg = tr.WhisperConfig(
      **{
        "d_model": 32,
        "encoder_layers": 2,
        "encoder_attention_heads": 4,
        "encoder_ffn_dim": 37,
        "decoder_layers": 1,
        "decoder_attention_heads": 4,
        "decoder_ffn_dim": 37,
        "num_mel_bins": 13,
        "max_source_positions": 50,
        "max_target_positions": 16,
        "vocab_size": 40,
        "pad_token_id": 1,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "decoder_start_token_id": 1,
        "begin_suppress_tokens": None,
        **config_overrides,
      }
    )
    model = tr.WhisperModel(cfg)
  elif family == "ast":
    # 16 mel bins, 64 frames (0.64 s) in 8 x 8 patches: 2 x 8 of them.
    extractor = dict(num_mel_bins=16, max_length=64, mean=-5.1, std=3.3)
    tr.ASTFeatureExtractor(**extractor).save_pretrained(out)
    cfg = tr.ASTConfig(
      **{
        **common,
        "num_mel_bins": 16,
        "max_length": 64,
        "patch_size": 8,
        "frequency_stride": 8,
        "time_stride": 8,
        **config_overrides,
      }
    )
    model = tr.ASTModel(cfg)
  else:
    raise ValueError(
      f"family={family!r}: use 'bert', 'vit', 'resnet', 'clip', 'wav2vec2', 'whisper' or 'ast'."
    )
  model.eval().save_pretrained(out)
  return str(out)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> str:
  return make_tiny_checkpoint("bert", tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory) -> str:
  return make_tiny_checkpoint("vit", tmp_path_factory.mktemp("tiny_vit"))


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> str:
  return make_tiny_checkpoint("clip", tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def tiny_wav2vec2_dir(tmp_path_factory) -> str:
  return make_tiny_checkpoint("wav2vec2", tmp_path_factory.mktemp("tiny_wav2vec2"))


@pytest.fixture(scope="session")
def tiny_whisper_dir(tmp_path_factory) -> str:
  return make_tiny_checkpoint("whisper", tmp_path_factory.mktemp("tiny_whisper"))


@pytest.fixture(scope="session")
def tiny_ast_dir(tmp_path_factory) -> str:
  return make_tiny_checkpoint("ast", tmp_path_factory.mktemp("tiny_ast"))


def perturb_weights(model, scale=0.1):
  """`model` in eval mode, every parameter moved by `scale` * N(0, 1) (torch's global RNG:
  seed it first), so that parity tests see weights far from their initialization, where a
  wrongly mapped or transposed tensor shows. `scale` may be a function of the parameter's
  name (0 keeps a fixed table, such as sinusoidal positions, exact)."""
  import torch

  with torch.no_grad():
    for name, p in model.named_parameters():
      p.add_((scale(name) if callable(scale) else scale) * torch.randn_like(p))
  return model.eval()


def export_and_reload(module, variables, out_dir, torch_cls=None):
  """`hf.save_pretrained(module, variables, out_dir)`, checked both ways: mmtl reloads it
  exactly, and transformers (`torch_cls`, default AutoModel) loads it as the class
  config.json names with no missing, unexpected or mismatched keys. Returns that
  transformers model, in eval mode, for the caller to compare outputs."""
  import jax
  import numpy as np
  import transformers

  from mmtl import hf

  out = hf.save_pretrained(module, variables, out_dir)
  jax.tree.map(np.testing.assert_array_equal, hf.load_pretrained(out)[1], variables)
  assert hf.read_config(out)["architectures"] == [module.hf_architecture]
  torch_model, info = (torch_cls or transformers.AutoModel).from_pretrained(
    out, output_loading_info=True
  )
  assert type(torch_model).__name__ == module.hf_architecture
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  return torch_model.eval()


SIGLIP_VOCAB = 99


@pytest.fixture(scope="session")
def tiny_siglip_dir(tmp_path_factory) -> str:
  """A tiny random SiglipModel with odd shapes: towers of different widths, a text head
  (32 -> 48) that is not square, MAP head MLP of another width; logit_scale / logit_bias
  not at their init."""
  import torch
  import transformers

  torch.manual_seed(0)
  common = dict(num_hidden_layers=2, num_attention_heads=4, hidden_act="gelu_pytorch_tanh")
  config = transformers.SiglipConfig(
    text_config=dict(
      common,
      hidden_size=32,
      intermediate_size=37,
      vocab_size=SIGLIP_VOCAB,
      max_position_embeddings=16,
      projection_size=48,
    ),
    vision_config=dict(common, hidden_size=48, intermediate_size=40, image_size=16, patch_size=4),
  )
  model = transformers.SiglipModel(config).eval()
  with torch.no_grad():
    model.logit_scale.fill_(2.3)
    model.logit_bias.fill_(-1.7)
  out = tmp_path_factory.mktemp("tiny_siglip")
  model.save_pretrained(out)
  return str(out)
