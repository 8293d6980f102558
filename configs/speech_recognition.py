r"""Speech recognition with CTC on real (synthesised) speech, by voices never heard in training.

`mmtl_spoken_digits` (docs/audio.md) holds sequences of 1-3 English digit words spoken by
eSpeak NG voices, with noise; validation and test voices are not in training. A small
wav2vec 2.0 tower (configs/speech.py's) reads the 16 kHz samples and a CTC head (mmtl.heads)
scores each 20 ms frame over a character vocabulary; the evaluator decodes greedily and
reports WER and CER (jiwer) on the unseen voices, writing each transcript beside its
reference (`transcripts_step<N>-val.jsonl`).

The wav2vec 2.0 protocol of fine-tuning (Baevski et al. 2020: the convolutional feature
encoder frozen, the transformer and a new CTC head trained) needs a pretrained tower. No
speech checkpoint is available offline, so the recipe makes one on the same audio: `stage=
pretrain` trains the tower to classify the first digit of each of the 3000 training clips,
`mmtl.export` writes it as a transformers folder, and `init=<that folder>` fine-tunes it
with CTC on the transcripts of 300 of them (transcripts are the scarce labels, as in the
paper's low-resource settings). `init=scratch` trains the same model on the same 300
transcripts from random weights (the feature encoder trained too, or frozen with
`freeze=1`: the same protocol without the pretraining).

Commands (offline; the dataset prepares on first use, ~40 s):

  python -m mmtl.train --config configs/speech_recognition.py --workdir workdirs/asr_scratch
  python -m mmtl.train --config configs/speech_recognition.py:stage=pretrain \
      --workdir workdirs/asr_pretrain
  python -m mmtl.export --workdir workdirs/asr_pretrain --tower waveform \
      --out workdirs/asr_pretrain/tower
  python -m mmtl.train --config configs/speech_recognition.py:init=workdirs/asr_pretrain/tower \
      --workdir workdirs/asr_finetuned
  python -m mmtl.generate --workdir workdirs/asr_finetuned --split test   # transcripts

Arguments (`--config configs/speech_recognition.py:key=value,...`):
  stage=ctc | pretrain       CTC fine-tuning, or the first-digit classification pretraining
  init=scratch | FOLDER      the tower's weights: random, or a transformers wav2vec2 folder
  freeze=0 | 1               freeze the feature encoder (default: 1 with a FOLDER, else 0)
  steps=N, seed=N            train steps, seed
  train=N                    training examples used (default: the first 300 clips, their
                             transcripts, for ctc; all 3000, their first digits, for pretrain)

Expected results: docs/audio.md, "Recipe: spoken digits by unseen voices" (3 seeds each).
"""

import ml_collections as mlc

from configs.speech import SMALL_WAV2VEC2
from mmtl.config import parse_arg
from mmtl.data.spoken_digits import CHARACTERS, DIGITS

# Transcribed clips the CTC stage learns from: a tenth of the training split, the
# low-resource setting where pretraining pays (wav2vec 2.0's 10 min / 1 h / 10 h subsets).
LABELED = 300
# The feature encoder: the convolutions before the transformer (the wav2vec 2.0 protocol
# freezes them in fine-tuning).
FEATURE_ENCODER = r"waveform_encoder/feature_extractor/.*"


def get_config(arg=None):
  arg = parse_arg(arg, stage="ctc", init="scratch", freeze=-1, steps=600, train=-1, seed=0)
  if arg.stage not in ("ctc", "pretrain"):
    raise ValueError(f"stage={arg.stage!r}: use stage=ctc | pretrain.")
  ctc = arg.stage == "ctc"
  train = arg.train if arg.train > 0 else (LABELED if ctc else 3000)
  freeze = (arg.init != "scratch") if arg.freeze < 0 else bool(arg.freeze)
  config = mlc.ConfigDict()
  config.seed = arg.seed
  config.total_steps = arg.steps
  config.batch_size = 32
  config.input = dict(
    dataset="mmtl_spoken_digits",
    split=f"train[:{train}]",
    fields=dict(
      image=None,
      text=None,
      waveform="waveform",
      label=None if ctc else "first_digit",
      target="transcript" if ctc else None,
    ),
    waveform=dict(rate=16000, max_seconds=2.0),  # every clip fits: padded, never cut
    # CTC labels: wav2vec 2.0's special tokens and the letters of the digit words.
    target=dict(format="ctc", characters=CHARACTERS, max_length=24),
    cache=True,
  )
  head = (
    dict(head="ctc", vocab_size=5 + len(CHARACTERS), ctc_modality="waveform")
    if ctc
    else dict(head="classification", num_classes=len(DIGITS))
  )
  config.model = dict(
    towers=dict(waveform=dict(name=SMALL_WAV2VEC2 if arg.init == "scratch" else arg.init)),
    modalities="waveform",
    fusion="concat",
    width=64,
    **head,
  )
  config.model_init = {} if arg.init == "scratch" else dict(waveform_encoder=arg.init)
  config.optim = dict(
    name="adamw",
    lr=2e-3 if ctc else 1e-3,  # the pretraining stalls at chance for some seeds at 2e-3
    wd=1e-4,
    schedule=dict(warmup_steps=min(60, arg.steps // 10), decay="cosine"),
    grad_clip_norm=1.0,
    frozen=[FEATURE_ENCODER] if freeze else [],
  )
  if ctc:  # unseen voices: validation (greedy), test (greedy, and a prefix beam search)
    config.evals = dict(
      val=dict(type="transcription", input=dict(split="validation")),
      test=dict(type="transcription", input=dict(split="test")),
      test_beam=dict(type="transcription", beam_size=8, input=dict(split="test")),
    )
  else:
    config.evals = dict(val=dict(type="classification", input=dict(split="validation")))
  config.best_metric = "val/wer" if ctc else "val/accuracy"
  config.best_mode = "min" if ctc else "max"
  config.log_every = 50
  config.ckpt_every = 1000
  return config
