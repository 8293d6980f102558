"""Video: the video tower (an image tower per frame + a temporal model), frame sampling in
the pipeline, the `mmtl_bounces` dataset and its audio-visual recipe."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
import transformers

from mmtl import checkpoint, data, export, hf, modalities, rules, train
from mmtl import config as config_lib
from mmtl.config_keys import ConfigError
from mmtl.data import bounces
from mmtl.models import fusion, video
from tests.test_train import TINY_VIT

CLIP = tfds.features.Tensor(shape=(None, 16, 16, 3), dtype=np.uint8)
TINY_AST = dict(
  model_type="audio-spectrogram-transformer",
  hidden_size=16,
  num_hidden_layers=1,
  num_attention_heads=2,
  intermediate_size=32,
  patch_size=16,
  frequency_stride=16,
  time_stride=16,
  num_mel_bins=16,
  max_length=32,
)
TINY_DINOV2 = dict(
  model_type="dinov2",
  image_size=16,
  patch_size=8,
  hidden_size=16,
  num_hidden_layers=1,
  num_attention_heads=2,
  mlp_ratio=2,
)
TINY_RESNET = dict(
  model_type="resnet", embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"
)


def video_modality(cfg: dict, train_mode=False, feature=CLIP, **input_cfg) -> modalities.Video:
  """The modality as a pipeline makes it, for `config.input.video = cfg`."""
  input_cfg = data.input_config(
    dict(dataset="clips", fields=dict(video="v"), video=cfg, **input_cfg)
  )
  return modalities.Video(input_cfg, feature, train=train_mode)


def prepare(modality, clips, present=None, seed=0):
  rng = np.random.default_rng(seed)
  examples = [modality.example(modality.decode(c), rng) for c in clips]
  batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
  present = np.ones(len(clips), np.float32) if present is None else np.asarray(present, np.float32)
  return modality.batch(batch, present)


def numbered_clip(frames: int, size: int = 16, channels: int = 3) -> np.ndarray:
  """Frame i is filled with the value 10 * i: which frames were sampled is readable."""
  return np.broadcast_to(
    (10 * np.arange(frames, dtype=np.uint8))[:, None, None, None], (frames, size, size, channels)
  ).copy()


def frame_indices(batch_video: np.ndarray, modality) -> list[int]:
  """The clip frame each sampled frame came from (inverting numbered_clip and normalization)."""
  pixels = (batch_video[:, 0, 0, 0] * modality.std[0] + modality.mean[0]) * 255
  return [round(p / 10) for p in pixels]


def test_frames_are_sampled_at_random_in_training_and_centred_at_evaluation():
  clip = numbered_clip(20)
  evaluation = video_modality(dict(num_frames=4, stride=3))  # spans 10 of 20 frames
  out = prepare(evaluation, [clip])
  assert frame_indices(out["video"][0], evaluation) == [5, 8, 11, 14]  # the centred window
  assert out["video_mask"].tolist() == [[1, 1, 1, 1]]
  training = video_modality(dict(num_frames=4, stride=3), train_mode=True)
  starts = [
    frame_indices(prepare(training, [clip], seed=s)["video"][0], training)[0] for s in range(40)
  ]
  assert set(starts) == set(range(11))  # every start that fits, from the element's RNG
  again = [
    frame_indices(prepare(training, [clip], seed=s)["video"][0], training)[0] for s in range(40)
  ]
  assert starts == again  # deterministic: the same RNG gives the same clip


def test_short_clips_are_padded_with_a_frame_mask_or_refused():
  modality = video_modality(dict(num_frames=4, stride=2))
  out = prepare(modality, [numbered_clip(5), numbered_clip(8)])
  assert out["video_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
  assert frame_indices(out["video"][0][:3], modality) == [0, 2, 4]
  np.testing.assert_array_equal(out["video"][0][3], 0.0)  # padding: zeros (the mean colour)
  strict = video_modality(dict(num_frames=4, stride=2, short_clips="error"))
  with pytest.raises(ConfigError, match=r"has 5 frames; num_frames=4 at stride=2 spans 7"):
    prepare(strict, [numbered_clip(5)])


def test_frame_sizes_channels_flip_and_blanking():
  modality = video_modality(dict(num_frames=2, size=8))
  big, gray = numbered_clip(2, size=24), numbered_clip(2, size=8, channels=1)
  out = prepare(modality, [big, gray], present=[1, 0])
  assert out["video"].shape == (2, 2, 8, 8, 3)  # resized to `size`, gray repeated to RGB
  assert frame_indices(out["video"][0], modality) == [0, 1]
  # Blanked (modality dropout, missing-modality evaluation): mean colour, every frame real.
  assert not out["video"][1].any() and out["video_mask"][1].all()
  flipping = video_modality(dict(num_frames=2), train_mode=True, augment=dict(flip=True))
  ramp = np.broadcast_to(np.arange(16, dtype=np.uint8)[None, None, :, None], (3, 16, 16, 3))
  flips = {
    bool(prepare(flipping, [ramp], seed=s)["video"][0, :, 0, 0, 0].std() > 0) for s in range(8)
  }
  assert flips == {False}  # the whole clip flips or not, never some of its frames
  firsts = {float(prepare(flipping, [ramp], seed=s)["video"][0, 0, 0, 0, 0]) for s in range(8)}
  assert len(firsts) == 2  # flipped and not
  with pytest.raises(ConfigError, match=r"has shape \(16, 16, 3\); a video is \(frames"):
    modality.decode(np.zeros((16, 16, 3), np.uint8))
  with pytest.raises(ConfigError, match=r"has shape \(2, 16, 16, 4\)"):
    modality.decode(np.zeros((2, 16, 16, 4), np.uint8))
  with pytest.raises(ConfigError, match=r"Video clips of clips have shape \(None, None, None, 3\)"):
    video_modality({}, feature=tfds.features.Tensor(shape=(None, None, None, 3), dtype=np.uint8))


def video_tower(temporal: str, frame=TINY_VIT, **kw) -> video.VideoEncoder:
  model_cfg = dict(
    config_lib.model_defaults(),
    towers=dict(video=dict(name=frame, temporal=dict(type=temporal, max_frames=4, **kw))),
  )
  return fusion.build(model_cfg).tower("video")


@functools.partial(jax.jit, static_argnums=0)
def run_tower(tower, variables, pixels, mask):
  return tower.apply(variables, pixels, mask)["pooler_output"]


@pytest.mark.parametrize("temporal", video.TEMPORAL_MODELS)
def test_padded_frames_change_nothing_and_order_matters_except_to_the_mean(temporal):
  tower = video_tower(temporal, num_heads=2)
  rng = np.random.default_rng(0)
  pixels = jnp.asarray(rng.normal(size=(2, 4, 16, 16, 3)), jnp.float32)
  mask = jnp.asarray([[1, 1, 1, 0], [1, 1, 1, 1]])
  variables = jax.jit(tower.init)(jax.random.PRNGKey(0), pixels, mask)
  out = run_tower(tower, variables, pixels, mask)
  assert out.shape == (2, 16)
  changed = pixels.at[0, 3].set(5.0)  # the padded frame of clip 0
  np.testing.assert_allclose(run_tower(tower, variables, changed, mask), out, atol=1e-6)
  reversed_ = run_tower(tower, variables, pixels[:, ::-1], jnp.ones((2, 4)))
  if temporal == "mean":
    np.testing.assert_allclose(reversed_[1], out[1], atol=1e-5)
  else:  # temporal position embeddings: the order of frames is seen
    assert not np.allclose(reversed_[1], out[1], atol=1e-4)


def test_the_mean_model_is_the_image_tower_on_each_frame(tiny_vit_dir):
  """`mean` with the image checkpoint in its frame tower: the average over real frames of
  the image tower's [CLS] state on each frame, as the image tower alone computes it."""
  tower = video_tower("mean", frame=tiny_vit_dir)
  image_tower, image_vars, _ = hf.load_pretrained(tiny_vit_dir)
  variables = {c: {"frame": t} for c, t in image_vars.items()}
  pixels = jnp.asarray(np.random.default_rng(1).normal(size=(1, 3, 16, 16, 3)), jnp.float32)
  mask = jnp.asarray([[1, 1, 0]])
  cls = [image_tower.apply(image_vars, pixels[:, i])["last_hidden_state"][:, 0] for i in (0, 1)]
  np.testing.assert_allclose(
    run_tower(tower, variables, pixels, mask), (cls[0] + cls[1]) / 2, atol=1e-5
  )


@pytest.mark.parametrize("temporal", video.TEMPORAL_MODELS)
def test_every_temporal_model_fuses_by_bottleneck_with_an_audio_tower(temporal):
  frame = TINY_RESNET if temporal == "mean" else TINY_VIT  # a CNN per frame too
  model = fusion.build(
    dict(
      config_lib.model_defaults(),
      towers=dict(
        video=dict(name=frame, temporal=dict(type=temporal, layers=1, num_heads=2)),
        log_mel=dict(name=TINY_AST),
      ),
      fusion="bottleneck",
      fusion_layer=-1,
      width=16,
      num_classes=4,
    )
  )
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), model.dummy_batch())
  batch = dict(
    video=jnp.ones((2, 3, 16, 16, 3)),
    video_mask=jnp.asarray([[1, 1, 1], [1, 1, 0]]),
    log_mel=jnp.ones((2, 32, 16)),
  )
  apply = jax.jit(model.apply)
  assert apply(variables, batch)["logits"].shape == (2, 4)
  audio_only = {"log_mel": batch["log_mel"]}  # no video in the batch: its tower is skipped
  assert np.isfinite(apply(variables, audio_only)["logits"]).all()


def test_bad_video_configs_name_the_fix():
  from configs import audio_visual  # pylint: disable=g-import-not-at-top

  config = audio_visual.get_config()
  config.model.towers.video.temporal.layer = 3
  with pytest.raises(ConfigError, match=r"temporal.layer. Did you mean .*temporal.layers\?"):
    config_lib.check(config)
  with pytest.raises(ValueError, match="temporal.type='spacetime'; use one of"):
    video_tower("spacetime")
  with pytest.raises(ValueError, match="this frame tower is a CNN"):
    video_tower("joint", frame=TINY_RESNET)
  with pytest.raises(ValueError, match="num_heads=3 does not divide the frame tower's width 16"):
    video_tower("attention", num_heads=3)
  towers = dict(video=dict(name=TINY_VIT, pool="cls"))
  with pytest.raises(ConfigError, match=r"pool='cls' takes the first token, but this tower's"):
    fusion.build(dict(config_lib.model_defaults(), towers=towers))
  towers = dict(image=dict(name=TINY_VIT, temporal=dict(type="mean")))
  with pytest.raises(
    ConfigError, match=r"towers\.image\.temporal is set, but only the video tower reads it: drop it"
  ):
    fusion.build(dict(config_lib.model_defaults(), towers=towers))
  tower = video_tower("attention", num_heads=2)
  batch = dict(video=np.zeros((2, 8, 16, 16, 3), np.float32))
  with pytest.raises(
    ConfigError, match=r"num_frames=8, but the video tower has temporal positions for 4"
  ):
    modalities.Video.check_tower(tower, batch)
  batch = dict(video=np.zeros((2, 4, 32, 32, 3), np.float32))
  with pytest.raises(
    ConfigError,
    match=r"clips of shape \(4, 32, 32, 3\): pixel_values .*expects NHWC \(B, 16, 16, 3\)"
    r".*config\.input\.video\.size",
  ):
    modalities.Video.check_tower(tower, batch)
  # A frame tower that takes any frame size (DINOv2 resizes its position embeddings).
  modalities.Video.check_tower(video_tower("attention", frame=TINY_DINOV2, num_heads=2), batch)
  modalities.Video.check_tower(tower, dict(video=np.zeros((2, 4, 16, 16, 3), np.float32)))


def test_bounces_are_heard_when_seen_and_the_label_needs_both():
  cfg = bounces.BouncesConfig(name="t", snrs_db=(40.0,))
  examples = [bounces.make_example(cfg, "train", i) for i in range(40)]
  again = bounces.make_example(cfg, "train", 3)
  np.testing.assert_array_equal(again["video"], examples[3]["video"])
  np.testing.assert_array_equal(again["audio"], examples[3]["audio"])
  assert {e["label"] for e in examples} == set(range(4))
  assert all(e["label"] == 2 * e["motion"] + e["pitch"] for e in examples)
  assert all(1 <= e["bounces"] <= 3 for e in examples)
  seen_turns = 0
  for e in examples[:10]:
    # The knocks start where the ball meets a wall: the soundtrack's onsets are the
    # frames at which the ball turns (its velocity along the axis changes sign).
    audio = np.abs(e["audio"].astype(np.float32)) / 32768
    frame_of = lambda sample: sample / bounces.RATE * cfg.fps  # noqa: E731
    onsets = [
      i for i in range(1, len(audio)) if audio[i] > 0.3 and audio[max(0, i - 400) : i].max() <= 0.3
    ]
    assert len(onsets) == e["bounces"]
    axis = 1 - e["motion"]  # horizontal: x (the last image axis) changes
    frames = e["video"].astype(np.float32)
    moving = np.abs(frames - np.median(frames, 0)).sum(-1)  # the ball, off the still scene
    coords = np.arange(cfg.size, dtype=np.float32)
    track = (moving.sum(2 - axis) * coords).sum(1) / moving.sum((1, 2))  # its centre
    turns = [
      i
      for i in range(1, cfg.frames - 1)
      if (track[i] - track[i - 1]) * (track[i + 1] - track[i]) < 0
    ]
    for turn in turns:
      assert min(abs(frame_of(o) - turn) for o in onsets) <= 1.0
    seen_turns += len(turns)
  assert seen_turns >= 8


@pytest.fixture(scope="module")
def bounces_data_dir(data_dir):
  b = data.builder(dict(dataset="mmtl_bounces/small", data_dir=data_dir))
  assert {k: v.num_examples for k, v in b.info.splits.items()} == dict(
    train=64, validation=32, test=32
  )
  return data_dir


def test_clip_windows_are_deterministic_and_resume(bounces_data_dir):
  """A restored iterator gives the next batch's very clips (the same random windows)."""
  cfg = dict(
    dataset="mmtl_bounces/small",
    data_dir=bounces_data_dir,
    fields=dict(image=None, text=None, video="video", label="label"),
    video=dict(num_frames=4, stride=3),
  )

  def iterator():
    return data.make_train_iterator(cfg, batch_size=8, seed=0, process_index=0, process_count=1)

  it = iterator()
  next(it)
  state, second = it.get_state(), next(it)
  restored = iterator()
  restored.set_state(state)
  again = next(restored)
  assert second["video"].shape == (8, 4, 32, 32, 3)
  for key in ("video", "video_mask", "labels"):
    np.testing.assert_array_equal(again[key], second[key])


def recipe(data_dir, arg=""):
  from configs import audio_visual  # pylint: disable=g-import-not-at-top

  config = audio_visual.get_config(f"steps=3,train=64{',' if arg else ''}{arg}")
  config.batch_size = 16
  config.input.update(dataset="mmtl_bounces/small", data_dir=data_dir)
  for name, evaluation in config.evals.items():
    evaluation.input.split = f"{'test' if name.startswith('test') else 'validation'}[:16]"
  config.log_every = 1
  return config


@pytest.mark.slow
def test_recipe_with_an_image_checkpoint_in_the_locked_frame_tower(
  bounces_data_dir, tiny_vit_dir, tmp_path
):
  """The recipe's bottleneck fusion, short, with the image checkpoint loaded into the frame
  tower and locked: the frame tower ends as the checkpoint, the temporal layers train;
  the missing-modality evaluations run, and modality dropout trains."""
  config = recipe(bounces_data_dir, f"dropout=0.3,init={tiny_vit_dir}")
  assert config.model_init.video_encoder == tiny_vit_dir
  config.model.towers.video = dict(config.model.towers.video, name=tiny_vit_dir)
  config.input.video.stats_from = tiny_vit_dir  # its 16 x 16 frames and normalization
  config.optim.frozen = ["video_encoder/frame/.*"]
  config.update(ckpt_every=1, keep_ckpts=3)
  final = train.train(config, str(tmp_path / "run"))
  assert {"test_no_video/accuracy", "test_no_audio/accuracy", "val/accuracy"} <= set(final)
  ckpts = tmp_path / "run" / "checkpoints"
  first, last = (
    rules.flatten(jax.device_get(checkpoint.restore_variables(ckpts, step=s)["params"]))
    for s in (1, 3)
  )
  for p, x in rules.flatten(hf.load_pretrained(tiny_vit_dir)[1]["params"]).items():
    np.testing.assert_array_equal(last[f"video_encoder/frame/{p}"], x, err_msg=p)
  kernel = "video_encoder/temporal/layer_0/attn/query/kernel"
  assert not np.allclose(first[kernel], last[kernel])  # the temporal layers train
  # Exported, the video tower is its frame tower: the image checkpoint transformers loads.
  out = export.export_tower(str(tmp_path / "run"), "video", tmp_path / "frame")
  _, info = transformers.ViTModel.from_pretrained(out, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
