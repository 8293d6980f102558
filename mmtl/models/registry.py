"""The model families mmtl implements: HF `model_type` -> module class.

A family is its own file in mmtl/models/ (a module class with `config_class`,
`hf_names()`, `hf_architecture`, `hf_base_prefix`, `dummy_inputs()`, and
`optional_parts` where a checkpoint may lack a part such as the pooler; towers
implement mmtl.models.encoder.Encoder) plus one line here. mmtl.hf builds any
checkpoint's module from this table; a class with `towers` (CLIP) also gives
its towers alone (`tower=`).

One `model_type` serves several roles, a table each: `MODELS` (the model a config.json
describes: an encoder, GPT-2's LM, an encoder-decoder) and `DECODERS` (a text decoder
with an LM head: a BERT checkpoint becomes the causal `BertLMHeadModel`). A new role is
one more table here and the builder that reads it in mmtl.hf (`build_decoder`).
"""

from __future__ import annotations

import flax.linen as nn

from mmtl.models import (
  audio_spectrogram_transformer,
  beit,
  bert,
  clip,
  convnext,
  deit,
  dinov2,
  distilbert,
  encoder_decoder,
  gpt2,
  hubert,
  resnet,
  roberta,
  siglip,
  vit,
  wav2vec2,
  whisper,
)

# Keyed by `config_class.model_type` ("bert", "vit", "clip", "clip_vision_model",
# "clip_text_model"): the key read from config.json is the one save_pretrained writes.
MODELS: dict[str, type[nn.Module]] = {
  cls.config_class.model_type: cls
  for cls in (
    bert.BertModel,
    vit.ViTModel,
    clip.CLIPModel,
    clip.CLIPVisionModel,  # a CLIP tower saved alone
    clip.CLIPTextModel,
    deit.DeiTModel,
    beit.BeitModel,
    dinov2.Dinov2Model,
    siglip.SiglipModel,
    siglip.SiglipVisionModel,  # a SigLIP tower saved alone
    siglip.SiglipTextModel,
    roberta.RobertaModel,
    roberta.XLMRobertaModel,
    distilbert.DistilBertModel,
    convnext.ConvNextModel,
    convnext.ConvNextV2Model,
    resnet.ResNetModel,
    wav2vec2.Wav2Vec2Model,
    hubert.HubertModel,
    whisper.WhisperEncoder,
    audio_spectrogram_transformer.ASTModel,
    gpt2.GPT2LMHeadModel,
    encoder_decoder.VisionEncoderDecoderModel,
  )
}
# Text decoders (mmtl.models.decoder.TextDecoder) by `model_type`: what a config with
# `is_decoder` (or a decoder sub-config, or mmtl.hf.load_decoder) builds.
DECODERS: dict[str, type[nn.Module]] = {
  cls.config_class.model_type: cls for cls in (gpt2.GPT2LMHeadModel, bert.BertLMHeadModel)
}
encoder_decoder.FAMILIES.update(encoder=MODELS, decoder=DECODERS)
