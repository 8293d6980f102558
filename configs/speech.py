r"""Counting by ear: how many objects an `mmtl_shapes` scene has, from its sound alone.

`mmtl_shapes/audio` gives every scene a 0.5 s noisy tone whose pitch says how many objects
it holds (330, 660 or 1320 Hz, +-3%, with noise), as 16 kHz samples (`waveform`) and as a
log-mel spectrogram (`audio`); the label is `count` (1, 2 or 3). This recipe trains a small
wav2vec 2.0 tower from scratch on the raw samples (the waveform input and the speech
family of docs/audio.md, end to end); or a small Whisper encoder or AST on log-mel features
the pipeline computes from the same samples as Whisper's or AST's feature extractor does
(the `log_mel` input); or a small ViT on the dataset's spectrogram for comparison.
No speech checkpoint is available offline, so every tower starts from random weights; with
a pretrained one, set `--config.model.towers.<waveform|log_mel>.name`, `--config.model_init
.<waveform|log_mel>_encoder` and `--config.input.<waveform|log_mel>.stats_from` to it (and
freeze its feature encoder or conv stem: `--config.optim.frozen`, docs/audio.md).

Commands (offline; the dataset prepares on first use):

  python -m mmtl.train --config configs/speech.py --workdir workdirs/speech
  python -m mmtl.train --config configs/speech.py:input=spectrogram --workdir workdirs/speech_spec
  python -m mmtl.train --config configs/speech.py:input=whisper --workdir workdirs/speech_whisper
  python -m mmtl.train --config configs/speech.py:input=ast --workdir workdirs/speech_ast

Arguments (`--config configs/speech.py:key=value,...`):
  input=waveform | whisper | ast | spectrogram
                                 the tower: wav2vec2 on samples, a Whisper encoder or AST
                                 on log-mel features of the samples, or a ViT on the
                                 dataset's spectrogram
  steps=N, train=N               train steps, training examples used

Expected results: docs/audio.md, "Recipe: counting by ear" (3 seeds each).
"""

import ml_collections as mlc

from mmtl.config import parse_arg

# A wav2vec2 small enough to train from scratch on 2 CPU cores: 3 convs (320 samples per
# frame, as the base model; 24 frames per clip), 2 pre-LN layers of width 64.
SMALL_WAV2VEC2 = dict(
  model_type="wav2vec2",
  hidden_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  intermediate_size=128,
  conv_dim=(32, 32, 64),
  conv_stride=(5, 8, 8),
  conv_kernel=(10, 8, 8),
  conv_bias=True,
  feat_extract_norm="layer",
  do_stable_layer_norm=True,
  num_conv_pos_embeddings=8,
  num_conv_pos_embedding_groups=4,
  mask_time_prob=0.05,
  mask_time_length=2,
  hidden_dropout=0.0,
  attention_dropout=0.0,
  activation_dropout=0.0,
  layerdrop=0.0,
)
# Log-mel towers of the same size. Whisper: 80 mel bins of the 0.5 s clip (50 frames, 25
# tokens); AST: 64 Kaldi mel bins of its 48 frames, in 16 x 16 patches at strides 8 and 8
# (7 x 5 patches).
SMALL_WHISPER = dict(
  model_type="whisper",
  d_model=64,
  encoder_layers=2,
  encoder_attention_heads=4,
  encoder_ffn_dim=128,
  num_mel_bins=80,
  max_source_positions=25,
)
SMALL_AST = dict(
  model_type="audio-spectrogram-transformer",
  hidden_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  intermediate_size=128,
  patch_size=16,
  frequency_stride=8,
  time_stride=8,
  num_mel_bins=64,
  max_length=48,
)
LOG_MEL = dict(  # config.input.log_mel of each log-mel input (no checkpoint: set here)
  whisper=dict(rate=16000, front_end="whisper", num_mel_bins=80, max_seconds=0.5),
  ast=dict(rate=16000, front_end="kaldi", num_mel_bins=64, frames=48),
)
# The spectrogram baseline: a ViT over the (32 mel, 32 frame, 1) log-mel image.
SMALL_AUDIO_VIT = dict(
  model_type="vit",
  image_size=(32, 32),
  patch_size=8,
  num_channels=1,
  hidden_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  intermediate_size=128,
)


def get_config(arg=None):
  arg = parse_arg(arg, input="waveform", steps=100, train=2000)
  modality = dict(waveform="waveform", whisper="log_mel", ast="log_mel", spectrogram="audio")
  if arg.input not in modality:
    raise ValueError(f"input={arg.input!r}: use input={' | '.join(modality)}.")
  used = modality[arg.input]
  config = mlc.ConfigDict()
  config.seed = 0
  config.total_steps = arg.steps
  config.batch_size = 32
  config.input = dict(
    dataset="mmtl_shapes/audio",
    split=f"train[:{arg.train}]",
    fields=dict(
      image=None,
      text=None,
      waveform="waveform" if used == "waveform" else None,
      log_mel="waveform" if used == "log_mel" else None,
      audio="audio" if used == "audio" else None,
      label="count",
    ),
    waveform=dict(rate=16000),  # normalized per clip, as wav2vec2's feature extractor does
    log_mel=LOG_MEL.get(arg.input, {}),
    cache=True,
  )
  config.model = dict(
    towers=dict(
      waveform=dict(name=SMALL_WAV2VEC2),
      log_mel=dict(name=SMALL_AST if arg.input == "ast" else SMALL_WHISPER),
      audio=dict(name=SMALL_AUDIO_VIT, pool="mean"),
    ),
    modalities=used,
    fusion="concat",
    head="classification",
    num_classes=3,
    width=64,
  )
  config.model_init = {}
  config.optim = dict(
    name="adamw",
    lr=1e-3,
    wd=1e-4,
    schedule=dict(warmup_steps=min(30, arg.steps // 10), decay="cosine"),
    grad_clip_norm=1.0,
  )
  config.evals = dict(val=dict(type="classification", input=dict(split="validation[:1000]")))
  config.log_every = 50
  config.ckpt_every = 1000
  return config
