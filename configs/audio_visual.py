r"""Audio-visual classification: a bouncing ball seen and heard (MBT-style fusion).

`mmtl_bounces` (docs/video.md) holds 1 s clips of a ball bouncing along one axis,
each bounce making a knock; the label is the axis (seen) and the knocks' pitch (heard), so
either modality alone is right on at most half of the examples. A small ViT reads each of
8 frames (every second one of the clip's 16) and a temporal model runs over the frames
(`temporal`: ViViT's factorised encoder by default); a small AST reads the soundtrack's
log-mel features, computed in the pipeline as AST's feature extractor computes them.
`fusion=bottleneck` is MBT (Nagrani et al. 2021): the towers' layers exchange information
only through 4 shared bottleneck tokens (`fusion_layer=-2`: both layers of each tower);
`fusion=concat` is late fusion of the pooled towers.

No video or audio checkpoint is available offline, and a fused model whose towers start
from random weights learns the pitch from the sound first and then stays there: its ViT
never learns where the ball is within 600 steps (the greedy learning of multimodal
networks, Wu et al. 2022), while the same ViT trained on the video alone does. So, as
MBT starts from pretrained towers, the recipe pretrains its frame tower: the video-only
run (`modalities=video`) is exported (`mmtl.export --tower video` writes its frame tower,
a transformers ViT) and the fused run starts from it (`init=FOLDER`: model_init.
video_encoder; the temporal layers start anew). Any image checkpoint loads the same way
(`init=google/vit-base-patch16-224-in21k`, with `--config.input.video.stats_from=` it for
its frame size and normalization).

The fused runs also evaluate each modality blanked at test time (`test_no_video`,
`test_no_audio`: the missing-modality evaluation of MBT), trained with modality dropout
(`dropout=P`, 0 by default) or without.

Commands (offline; the dataset prepares on first use, ~10 s):

  python -m mmtl.train --config configs/audio_visual.py:modalities=video --workdir workdirs/av_video
  python -m mmtl.export --workdir workdirs/av_video --tower video --out workdirs/av_video/frame
  python -m mmtl.train --config configs/audio_visual.py:init=workdirs/av_video/frame \
      --workdir workdirs/av_bottleneck
  python -m mmtl.train --config configs/audio_visual.py:init=workdirs/av_video/frame,fusion=concat \
      --workdir workdirs/av_concat
  python -m mmtl.train --config configs/audio_visual.py:modalities=audio --workdir workdirs/av_audio

Arguments (`--config configs/audio_visual.py:key=value,...`):
  modalities=both | video | audio    the towers used
  fusion=bottleneck | concat         MBT's bottleneck tokens, or late fusion (both only)
  temporal=factorised | joint | attention | mean
                                     the video tower's temporal model (mmtl.models.video)
  init=scratch | FOLDER              the frame tower's weights: random, or an image checkpoint
  dropout=P                          modality dropout: each modality blanked with rate P
  steps=N, seed=N, train=N           train steps, seed, training clips used

Expected results: docs/video.md, "Recipe: seen and heard" (3 seeds each).
"""

import ml_collections as mlc

from configs import speech
from mmtl.config import parse_arg

# The frame tower: configs/speech.py's small ViT (2 layers, width 64) over 32 x 32 RGB
# frames in 8 x 8 patches (16 patches + [CLS]).
SMALL_FRAME_VIT = dict(speech.SMALL_AUDIO_VIT, num_channels=3)
# The audio tower: configs/speech.py's small AST over 32 Kaldi mel bins x 96 frames (the
# 1 s clip), 16 x 16 patches at strides 8 and 8: 3 x 11 patches.
SMALL_AST = dict(speech.SMALL_AST, num_mel_bins=32, max_length=96)
NUM_FRAMES = 8


def get_config(arg=None):
  arg = parse_arg(
    arg,
    modalities="both",
    fusion="bottleneck",
    temporal="factorised",
    init="scratch",
    dropout=0.0,
    steps=600,
    seed=0,
    train=2000,
  )
  used = dict(both="video,log_mel", video="video", audio="log_mel")
  if arg.modalities not in used:
    raise ValueError(f"modalities={arg.modalities!r}: use modalities=both | video | audio.")
  if arg.fusion not in ("bottleneck", "concat"):
    raise ValueError(f"fusion={arg.fusion!r}: use fusion=bottleneck | concat.")
  both = arg.modalities == "both"
  config = mlc.ConfigDict()
  config.seed = arg.seed
  config.total_steps = arg.steps
  config.batch_size = 32
  config.input = dict(
    dataset="mmtl_bounces",
    split=f"train[:{arg.train}]",
    fields=dict(image=None, text=None, video="video", log_mel="audio", label="label"),
    video=dict(num_frames=NUM_FRAMES, stride=2),
    log_mel=dict(rate=16000, front_end="kaldi", num_mel_bins=32, frames=96),
    modality_dropout=dict(video=arg.dropout, log_mel=arg.dropout) if both else {},
    cache=True,
  )
  config.model = dict(
    towers=dict(
      video=dict(
        name=SMALL_FRAME_VIT,
        temporal=dict(type=arg.temporal, layers=2, max_frames=NUM_FRAMES),
      ),
      log_mel=dict(name=SMALL_AST, pool="mean"),
    ),
    modalities=used[arg.modalities],
    fusion=arg.fusion if both else "concat",
    # Both layers of each tower exchange bottleneck tokens: the tokens one layer updates
    # carry the other tower's view into the next (one fusion layer would exchange nothing
    # the classifier sees, as in MBT, whose towers read its tokens only in later layers).
    fusion_layer=-2,
    bottleneck_tokens=4,
    head="classification",
    num_classes=4,
    width=64,
  )
  config.model_init = {} if arg.init == "scratch" else {"video_encoder": arg.init}
  config.optim = dict(
    name="adamw",
    lr=3e-4,  # at 1e-3 the ViT from scratch never learns where the ball is (loss stays ln 2)
    wd=1e-4,
    schedule=dict(warmup_steps=min(50, arg.steps // 10), decay="cosine"),
    grad_clip_norm=1.0,
  )
  evals = dict(
    val=dict(type="classification", input=dict(split="validation")),
    test=dict(type="classification", input=dict(split="test")),
  )
  if both:  # the missing-modality evaluation: each modality blanked at test time
    evals.update(
      test_no_video=dict(type="classification", input=dict(split="test", blank=("video",))),
      test_no_audio=dict(type="classification", input=dict(split="test", blank=("log_mel",))),
    )
  config.evals = evals
  config.log_every = 50
  config.ckpt_every = 1000
  return config
