"""A video tower: any image tower applied to every frame, and a temporal model over them.

`VideoEncoder` wraps an image tower (ViT, CLIP's vision tower, DINOv2, ResNet, ConvNeXt:
anything with `pixel_values`, mmtl.models.encoder.Encoder) as the `frame` submodule,
whose params (`video_encoder/frame/...`) are those of the image checkpoint, so
`config.model_init.video_encoder` loads an image checkpoint into it. What it adds lives
under `video_encoder/temporal/...` (learned temporal position embeddings, layers, the
pooling probe): new layers, trained from scratch, freezable apart from the frame tower
(`config.optim.frozen=["video_encoder/frame/.*"]`: a locked per-frame tower under a
trained temporal model).

Temporal models (`temporal`, config.model.towers.video.temporal.type; the section's keys
are `mmtl.modalities.Video.tower_config`):
  mean:       the frame tower on each frame, one vector per frame (its `frame_pool`),
              averaged over the real frames (TSN-style; blind to frame order).
  attention:  per-frame vectors + temporal position embeddings, pooled by a learned query's
              attention (MAP, as big_vision's ViT head).
  factorised: ViViT's factorised encoder (Arnab et al. 2021, model 2): per-frame vectors
              + temporal position embeddings through `layers` new temporal transformer
              layers, then the mean over frames.
  joint:      ViViT's spatio-temporal attention (model 1, as MBT's video tower): every
              frame's patch tokens, with temporal position embeddings added, in one
              sequence through the frame tower's own layers; the mean over tokens.
The tower's token layers are what bottleneck fusion (MBT) interleaves with another
tower's: the temporal layers (factorised), the frame tower's layers (joint); mean and
attention have none (bottleneck tokens read their frame vectors by cross-attention).

Inputs: `pixel_values` (B, T, H, W, C) and `frame_mask` (B, T) (1 = a real frame; clips
shorter than the sampled frame count are padded, mmtl.modalities.Video).
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmtl.models import layers
from mmtl.models.encoder import Encoder

TEMPORAL_MODELS = ("mean", "attention", "factorised", "joint")
FRAME_POOLS = ("cls", "mean", "pooler")


def _frame_vectors(frame: Encoder, pixel_values: jax.Array, how: str, deterministic: bool):
  """(B*T, D) vector of every frame: the whole frame tower, pooled as `how` says."""
  x, mask = frame.embed(pixel_values=pixel_values, deterministic=deterministic)
  hidden = frame.run_layers(x, mask, 0, frame.num_layers, deterministic=deterministic)
  return layers.pool(frame.finalize(hidden, mask), mask, how)


class Temporal(nn.Module):
  """What VideoEncoder adds to the frame tower (params `video_encoder/temporal/...`)."""

  kind: str
  width: int
  num_layers: int
  max_frames: int
  num_heads: int
  dtype: Any = jnp.float32

  def setup(self) -> None:
    if self.kind != "mean":
      self.position = self.param(
        "position_embeddings", nn.initializers.normal(0.02), (self.max_frames, self.width)
      )
    if self.kind == "attention":
      self.probe = self.param("probe", nn.initializers.normal(0.02), (1, self.width))
      self.pool = layers.CrossAttentionBlock(self.width, self.num_heads, dtype=self.dtype)
    # Self-attention blocks: the frames' tokens attend to themselves.
    self.layers = [
      layers.CrossAttentionBlock(self.width, self.num_heads, dtype=self.dtype, name=f"layer_{i}")
      for i in range(self.num_layers)
    ]
    if self.kind == "factorised":
      self.norm = nn.LayerNorm(dtype=self.dtype, name="layernorm")

  def positions(self, num_frames: int) -> jax.Array:
    """(T, D) temporal position embeddings of the first `num_frames` frames."""
    if num_frames > self.max_frames:
      raise ValueError(
        f"config.input.video.num_frames={num_frames}, but the video tower has temporal "
        f"positions for {self.max_frames} frames: lower num_frames or raise "
        "config.model.towers.video.temporal.max_frames."
      )
    return self.position[:num_frames].astype(self.dtype)

  def layer(self, i: int, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
    return self.layers[i](x, mask, x, mask, train=not deterministic)

  def attention_pool(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    probe = jnp.broadcast_to(self.probe.astype(self.dtype), (x.shape[0], *self.probe.shape))
    ones = jnp.ones(probe.shape[:2], bool)
    return self.pool(probe, ones, x, mask, train=False)[:, 0]


class VideoEncoder(nn.Module):
  """An image tower over each frame + a temporal model (module docstring)."""

  frame: nn.Module
  temporal: str = "factorised"
  temporal_layers: int = 1
  max_frames: int = 16
  num_heads: int = 4
  frame_pool: str = "cls"
  dtype: Any = jnp.float32

  inputs: ClassVar[tuple[str, ...]] = ("pixel_values", "frame_mask")
  # Inside `video_encoder`: the subtree an image checkpoint gives, and the new layers.
  pretrained_subtree: ClassVar[str] = "frame"
  new_layers: ClassVar[tuple[str, ...]] = ("temporal/.*",)

  def __post_init__(self) -> None:
    if self.temporal not in TEMPORAL_MODELS:
      raise ValueError(
        f"config.model.towers.video.temporal.type={self.temporal!r}; use one of {TEMPORAL_MODELS}."
      )
    if self.frame_pool not in FRAME_POOLS:
      raise ValueError(
        f"config.model.towers.video.temporal.frame_pool={self.frame_pool!r}; use one of "
        f"{FRAME_POOLS}."
      )
    if self.temporal == "joint" and not self.frame.num_layers:
      raise ValueError(
        "temporal.type='joint' runs every frame's tokens through the frame tower's layers, "
        "but this frame tower is a CNN (no token layers): use 'mean', 'attention' or "
        "'factorised'."
      )
    if self.temporal != "mean" and self.frame.hidden_size % self.num_heads:
      raise ValueError(
        f"temporal.num_heads={self.num_heads} does not divide the frame tower's width "
        f"{self.frame.hidden_size}: set config.model.towers.video.temporal.num_heads."
      )
    super().__post_init__()

  def setup(self) -> None:
    self.temporal_model = Temporal(
      self.temporal,
      self.frame.hidden_size,
      self.temporal_layers if self.temporal == "factorised" else 0,
      self.max_frames,
      self.num_heads,
      self.dtype,
      name="temporal",
    )

  @property
  def num_layers(self) -> int:
    return {"joint": self.frame.num_layers, "factorised": self.temporal_layers}.get(
      self.temporal, 0
    )

  @property
  def hidden_size(self) -> int:
    return self.frame.hidden_size

  def dummy_inputs(self) -> dict[str, jax.Array]:
    pixels = self.frame.dummy_inputs()["pixel_values"]
    return dict(pixel_values=pixels[:, None], frame_mask=jnp.ones((1, 1), jnp.int32))

  def embed(
    self, pixel_values: jax.Array, frame_mask: jax.Array | None = None, *, deterministic=True
  ) -> tuple[jax.Array, jax.Array]:
    """joint: (B, T*N, D) patch tokens of every frame; else (B, T, D) frame vectors."""
    b, t = pixel_values.shape[:2]
    frames = pixel_values.reshape(b * t, *pixel_values.shape[2:])
    mask = jnp.ones((b, t), bool) if frame_mask is None else frame_mask > 0
    tm = self.temporal_model
    if self.temporal == "joint":
      x, token_mask = self.frame.embed(pixel_values=frames, deterministic=deterministic)
      n = x.shape[1]
      x = x.reshape(b, t, n, -1) + tm.positions(t)[None, :, None]
      return x.reshape(b, t * n, -1), (token_mask.reshape(b, t, n) & mask[..., None]).reshape(
        b, t * n
      )
    x = _frame_vectors(self.frame, frames, self.frame_pool, deterministic).reshape(b, t, -1)
    if self.temporal != "mean":
      x = x + tm.positions(t)[None]
    return x, mask

  def run_layers(
    self, x: jax.Array, mask: jax.Array, start: int, stop: int, *, deterministic: bool = True
  ) -> jax.Array:
    if self.temporal == "joint":
      return self.frame.run_layers(x, mask, start, stop, deterministic=deterministic)
    if not 0 <= start <= stop <= self.num_layers:
      raise ValueError(
        f"run_layers({start}, {stop}) of a video tower with {self.num_layers} token layers."
      )
    for i in range(start, stop):
      x = self.temporal_model.layer(i, x, mask, deterministic)
    return x

  def finalize(self, hidden: jax.Array, mask: jax.Array) -> dict[str, jax.Array | None]:
    """`pooler_output`: the temporal model's pooling (mean over real frames or tokens,
    or the attention pool)."""
    if self.temporal == "joint":
      hidden = self.frame.finalize(hidden, mask)["last_hidden_state"]
    elif self.temporal == "factorised":
      hidden = self.temporal_model.norm(hidden)
    if self.temporal == "attention":
      pooled = self.temporal_model.attention_pool(hidden, mask)
    else:
      pooled = layers.masked_mean(hidden, mask)
    return dict(last_hidden_state=hidden, pooler_output=pooled)

  def __call__(
    self, pixel_values: jax.Array, frame_mask: jax.Array | None = None, *, deterministic=True
  ) -> dict[str, jax.Array | None]:
    x, mask = self.embed(pixel_values, frame_mask, deterministic=deterministic)
    x = self.run_layers(x, mask, 0, self.num_layers, deterministic=deterministic)
    return self.finalize(x, mask)
