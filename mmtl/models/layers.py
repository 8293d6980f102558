"""Transformer pieces shared by the BERT, ViT, DeiT, DINOv2 and CLIP encoders.

The HF families differ only in where the layer norms sit (post-LN BERT,
pre-LN ViT/CLIP), the activation, biases, causality and DINOv2's layer scale and
SwiGLU MLP, so one `EncoderLayer` driven by a `LayerSpec` covers all of them and
keeps the param names uniform:
`encoder/layer_{i}/{attn/{query,key,value,out},attn_norm,mlp/{fc1,fc2},mlp_norm}`
(+ `attn_scale`, `mlp_scale` with layer scale).
Uniform names let one regex (e.g. `.*/attn/(query|value)/kernel`) address every
family for freezing, LoRA or sharding.

Also here, what the modules built on towers share (fusion, the video tower): pooling a
tower's tokens (`pool`, `masked_mean`) and the pre-LN cross-attention block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
import dataclasses
from typing import Any, ClassVar, Self

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmtl.models.weights import HFName, Transform

Dtype = Any


def _quick_gelu(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(1.702 * x)


# HF `hidden_act` names (transformers.activations.ACT2FN) -> the same math in jax.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
  "quick_gelu": _quick_gelu,
  "relu": jax.nn.relu,
  "silu": jax.nn.silu,
  "swish": jax.nn.silu,
  "tanh": jnp.tanh,
}

# `remat` attribute of the encoders -> jax.checkpoint policy for each layer.
REMAT_POLICIES: dict[str, Callable[..., Any] | None] = {
  "full": None,  # save nothing inside a layer: recompute all of it in backward
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  "dots_with_batch": jax.checkpoint_policies.checkpoint_dots,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(
      f"Unsupported hidden_act {name!r}: mmtl implements {sorted(ACTIVATIONS)}; "
      "add the function to mmtl.models.layers.ACTIVATIONS."
    )
  return ACTIVATIONS[name]


class HFConfig:
  """Mixin for frozen dataclasses that mirror an HF `config.json`.

  Fields are the HF keys mmtl uses, with the HF defaults, so `from_hf` of a
  config.json that omits a default gives what transformers would build. Keys
  mmtl does not use are dropped (they do not change the encoder's math).
  """

  model_type: ClassVar[str]

  @classmethod
  def from_hf(cls, d: dict[str, Any]) -> Self:
    kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
    # Lists (e.g. image_size [H, W]) become tuples so configs stay hashable.
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
    return cls(**kw)

  def to_hf(self) -> dict[str, Any]:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
    return {"model_type": self.model_type, **d}


def pair(x: int | tuple[int, int]) -> tuple[int, int]:
  return tuple(x) if isinstance(x, (tuple, list)) else (x, x)


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """What distinguishes one family's encoder layer from another's."""

  hidden_size: int
  num_heads: int
  mlp_dim: int
  activation: str
  layer_norm_eps: float
  pre_norm: bool  # ViT/CLIP: LN -> sublayer -> residual. BERT: sublayer -> residual -> LN.
  qkv_bias: bool = True
  key_bias: bool = True  # False: no bias on the key projection alone (Whisper's k_proj)
  dropout: float = 0.0  # on each sublayer's output, before the residual add
  attention_dropout: float = 0.0  # on the attention probabilities
  activation_dropout: float = 0.0  # inside the MLP, after its activation (wav2vec2)
  attn_output_dropout: bool = True  # False: `dropout` on the MLP's output only (DistilBERT)
  causal: bool = False  # CLIP text
  # Per-channel learned scales `attn_scale`, `mlp_scale` on each sublayer's output, initialized
  # to this value (DINOv2's LayerScale); None: no layer scale.
  layer_scale: float | None = None
  # fc1 gives 2 * mlp_dim features, [gate, up]: activation(gate) * up goes to fc2 (SwiGLU).
  gated_mlp: bool = False

  def has_bias(self, projection: str) -> bool:
    """Whether the attention's "query", "key" or "value" projection has a bias."""
    return self.qkv_bias and (projection != "key" or self.key_bias)


def layer_norm(
  eps: float, dtype: Dtype, param_dtype: Dtype, name: str | None = None
) -> nn.LayerNorm:
  # Two-pass variance like torch.nn.LayerNorm: the fast E[x^2]-E[x]^2 costs parity.
  return nn.LayerNorm(
    epsilon=eps, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False, name=name
  )


# Collection of the running statistics a BatchNorm layer reads but must not update
# (its layer is frozen): mmtl.train_step moves them here from "batch_stats" for the step.
FROZEN_BATCH_STATS = "frozen_batch_stats"


class BatchNorm(nn.Module):
  """BatchNorm over the last axis (NHWC), as torch.nn.BatchNorm2d.

  Its running `mean` and `var` live in the "batch_stats" collection. In training
  (`deterministic=False`, "batch_stats" mutable) it normalizes with the batch's
  statistics, the mean over every other axis of the global batch (under jit on a
  sharded batch that reduction spans all devices: synchronised BatchNorm), and
  updates the running ones as torch does (`momentum` weights the new batch;
  unbiased variance). Otherwise, or when its statistics were passed in the
  FROZEN_BATCH_STATS collection instead, it uses the running statistics and
  leaves them bit-identical: a frozen layer keeps its pretrained statistics.
  """

  eps: float = 1e-5
  momentum: float = 0.1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    features = x.shape[-1]
    frozen = self.has_variable(FROZEN_BATCH_STATS, "mean")
    stats = FROZEN_BATCH_STATS if frozen else "batch_stats"
    mean = self.variable(stats, "mean", lambda: jnp.zeros((features,), jnp.float32))
    var = self.variable(stats, "var", lambda: jnp.ones((features,), jnp.float32))
    scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
    train = not deterministic and not frozen and self.is_mutable_collection("batch_stats")
    if train and not self.is_initializing():
      axes = tuple(range(x.ndim - 1))
      x32 = x.astype(jnp.float32)
      batch_mean = x32.mean(axes)
      batch_var = jnp.square(x32 - batch_mean).mean(axes)  # two-pass, as torch
      n = np.prod([x.shape[a] for a in axes])
      mean.value = (1 - self.momentum) * mean.value + self.momentum * batch_mean
      var.value = (1 - self.momentum) * var.value + self.momentum * batch_var * n / max(n - 1, 1)
      m, v = batch_mean, batch_var
    else:
      m, v = mean.value, var.value
    mul = jax.lax.rsqrt(v + self.eps) * scale.astype(jnp.float32)
    y = (x.astype(jnp.float32) - m) * mul + bias.astype(jnp.float32)
    return y.astype(self.dtype)


def check_remat(remat: str) -> None:
  if remat != "none" and remat not in REMAT_POLICIES:
    raise ValueError(f"remat={remat!r}: use 'none' or one of {sorted(REMAT_POLICIES)}.")


class DropPath(nn.Module):
  """Stochastic depth (timm's / transformers' `drop_path`) on a residual branch: in training,
  each example's branch is zeroed with probability `rate` and kept ones are scaled by
  1 / (1 - rate), using the "dropout" rng; the identity when `deterministic`."""

  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    dims = tuple(range(1, x.ndim))  # one draw per example
    return nn.Dropout(self.rate, broadcast_dims=dims)(x, deterministic=deterministic)


class Attention(nn.Module):
  """Multi-head self-attention over a key padding mask (True = real token)."""

  spec: LayerSpec
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
    s = self.spec
    if s.hidden_size % s.num_heads:
      raise ValueError(
        f"hidden_size {s.hidden_size} is not a multiple of num_attention_heads {s.num_heads}."
      )
    head_dim = s.hidden_size // s.num_heads
    dense = lambda name, bias: nn.Dense(
      s.hidden_size, use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name
    )
    split = lambda y: y.reshape(*y.shape[:-1], s.num_heads, head_dim)
    q, k, v = (split(dense(n, s.has_bias(n))(x)) for n in ("query", "key", "value"))
    if self.is_mutable_collection("intermediates"):  # Asked for (mmtl.interpret): no cost else.
      self.sow("intermediates", "attention", attention_weights(q, k, mask, causal=s.causal))
    if s.attention_dropout and not deterministic:
      # jax.nn.dot_product_attention has no dropout on the probabilities.
      mask = mask[:, None, None, :]  # (B, heads, queries, keys)
      if s.causal:
        mask = nn.combine_masks(mask, nn.make_causal_mask(x[..., 0], dtype=jnp.bool_))
      out = nn.dot_product_attention(
        q,
        k,
        v,
        mask=mask,
        dropout_rng=self.make_rng("dropout"),
        dropout_rate=s.attention_dropout,
        deterministic=False,
        dtype=self.dtype,
      )
    elif self.attention_impl == "cudnn":
      # cuDNN flash attention takes padding as per-example lengths (its PADDING mask
      # type). A boolean mask would become a dense additive bias: slower, and cuDNN
      # then needs an even sequence length in training (ViT-B/16 has 197 tokens).
      # Exact for masks with the real tokens first (images, right-padded text).
      if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(
          f"attention_impl='cudnn' needs bfloat16 or float16 compute, got "
          f"{q.dtype}: set the model dtype to bfloat16 (params can stay float32) "
          "or use attention_impl='xla'."
        )
      lengths = mask.sum(-1, dtype=jnp.int32)
      out = jax.nn.dot_product_attention(
        q,
        k,
        v,
        is_causal=s.causal,
        query_seq_lengths=lengths,
        key_value_seq_lengths=lengths,
        implementation="cudnn",
      )
    else:
      out = jax.nn.dot_product_attention(
        q, k, v, mask=mask[:, None, None, :], is_causal=s.causal, implementation=self.attention_impl
      )
    return dense("out", True)(out.reshape(*x.shape[:-1], s.hidden_size))


def attention_weights(q: jax.Array, k: jax.Array, mask: jax.Array, *, causal: bool) -> jax.Array:
  """Softmax attention probabilities (B, heads, queries, keys) in float32 of queries and keys
  (B, T, heads, head_dim) over a key padding mask (B, T), as the attention computes them."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / np.sqrt(q.shape[-1])
  allowed = mask[:, None, None, :]
  if causal:
    allowed = allowed & jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
  return jax.nn.softmax(jnp.where(allowed, logits, -1e30), axis=-1)


class Mlp(nn.Module):
  spec: LayerSpec
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    s = self.spec
    features = 2 * s.mlp_dim if s.gated_mlp else s.mlp_dim
    x = nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, name="fc1")(x)
    if s.gated_mlp:
      gate, up = jnp.split(x, 2, axis=-1)
      x = activation(s.activation)(gate) * up
    else:
      x = activation(s.activation)(x)
    if s.activation_dropout:
      x = nn.Dropout(s.activation_dropout)(x, deterministic=deterministic)
    return nn.Dense(s.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype, name="fc2")(x)


class EncoderLayer(nn.Module):
  """One transformer block, pre-LN or post-LN per `spec.pre_norm`."""

  spec: LayerSpec
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  def _scaled(self, name: str, h: jax.Array) -> jax.Array:
    """`h` times the layer scale param `name` when the spec has layer scale, else `h`."""
    s = self.spec
    if s.layer_scale is None:
      return h
    init = nn.initializers.constant(s.layer_scale)
    return h * self.param(name, init, (s.hidden_size,), self.param_dtype).astype(self.dtype)

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool) -> jax.Array:
    s = self.spec
    norm = lambda name: layer_norm(s.layer_norm_eps, self.dtype, self.param_dtype, name)
    drop = nn.Dropout(s.dropout)
    attn_norm, mlp_norm = norm("attn_norm"), norm("mlp_norm")

    h = attn_norm(x) if s.pre_norm else x
    h = Attention(s, self.dtype, self.param_dtype, self.attention_impl, name="attn")(
      h, mask, deterministic
    )
    h = self._scaled("attn_scale", h)
    x = x + (drop(h, deterministic=deterministic) if s.attn_output_dropout else h)
    if not s.pre_norm:
      x = attn_norm(x)

    h = mlp_norm(x) if s.pre_norm else x
    h = Mlp(s, self.dtype, self.param_dtype, name="mlp")(h, deterministic)
    x = x + drop(self._scaled("mlp_scale", h), deterministic=deterministic)
    if not s.pre_norm:
      x = mlp_norm(x)
    return x


class Encoder(nn.Module):
  """`num_layers` blocks named `layer_{i}`; any contiguous range can be run.

  Running a range (not only all layers) is what lets fusion interleave towers,
  e.g. bottleneck tokens exchanged between layers 4..8 of two encoders.
  """

  spec: LayerSpec
  num_layers: int
  remat: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  # LayerDrop (Fan et al. 2019; wav2vec2's `layerdrop`): in training each layer is skipped
  # with this probability (one draw of the "dropout" rng per layer and step).
  layerdrop: float = 0.0

  def setup(self) -> None:
    check_remat(self.remat)
    layer_cls = EncoderLayer
    if self.remat != "none":
      # static_argnums counts `self`: (self, x, mask, deterministic).
      layer_cls = nn.remat(EncoderLayer, policy=REMAT_POLICIES[self.remat], static_argnums=(3,))
    for i in range(self.num_layers):
      setattr(
        self, f"layer_{i}", layer_cls(self.spec, self.dtype, self.param_dtype, self.attention_impl)
      )

  def __call__(
    self, x: jax.Array, mask: jax.Array, start: int, stop: int, *, deterministic: bool = True
  ) -> jax.Array:
    if not 0 <= start <= stop <= self.num_layers:
      raise ValueError(
        f"Layer range [{start}, {stop}) is outside the encoder's "
        f"{self.num_layers} layers; need 0 <= start <= stop <= {self.num_layers}."
      )
    for i in range(start, stop):
      y = getattr(self, f"layer_{i}")(x, mask, deterministic)
      if self.layerdrop and not deterministic:
        y = jnp.where(jax.random.uniform(self.make_rng("dropout")) < self.layerdrop, x, y)
      x = y
    return x


class EncoderTower(nn.Module):
  """What every encoder (BERT, ViT, CLIP towers) shares: fields, layer stack, protocol.

  Implements `mmtl.models.encoder.Encoder`: subclasses set `config_class` and
  `inputs`, add `dummy_inputs`, `embed`, `finalize` and an HF-named `__call__`,
  and create `self.encoder = self.make_encoder()` in `setup`.
  """

  config: Any
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str = "none"
  attention_impl: str | None = None

  config_class: ClassVar[type[HFConfig]]  # what mmtl.hf builds `config` with from config.json
  inputs: ClassVar[tuple[str, ...]]  # `embed`'s input names, the primary one first

  @property
  def num_layers(self) -> int:
    return self.config.num_hidden_layers

  @property
  def hidden_size(self) -> int:
    return self.config.hidden_size

  def make_encoder(self, **encoder_kw: Any) -> Encoder:
    """The layer stack of `config.layer_spec()`; `encoder_kw` sets other `Encoder` fields
    (wav2vec2's `layerdrop`)."""
    c = self.config
    return Encoder(
      c.layer_spec(),
      c.num_hidden_layers,
      self.remat,
      self.dtype,
      self.param_dtype,
      self.attention_impl,
      **encoder_kw,
    )

  def run_layers(
    self, x: jax.Array, mask: jax.Array, start: int, stop: int, *, deterministic: bool = True
  ) -> jax.Array:
    return self.encoder(x, mask, start, stop, deterministic=deterministic)


class ConvTower(nn.Module):
  """What the CNN families (ResNet, ConvNeXt) share: a tower without token layers.

  Implements `mmtl.models.encoder.Encoder` with `num_layers == 0`: `embed` runs
  the whole network and returns its last feature map (B, h, w, C) as tokens
  (B, h*w, C), so cross-attention fusion attends over its positions and pooled
  fusions get `pooler_output` (the mean over positions, `pool_features` of it).
  Subclasses set `config_class`, create their submodules in `setup` and define
  `features` (NHWC maps) and, where the family has one, `pool_features` (ConvNeXt's
  final LayerNorm).
  """

  config: Any
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str = "none"  # jax.checkpoint policy name (REMAT_POLICIES) for each block

  config_class: ClassVar[type[HFConfig]]
  inputs: ClassVar[tuple[str, ...]] = ("pixel_values",)

  @property
  def num_layers(self) -> int:
    return 0

  @property
  def hidden_size(self) -> int:
    return self.config.hidden_sizes[-1]

  def dummy_inputs(self) -> dict[str, jax.Array]:
    # Params do not depend on the image size; 32 px survives a /32 network.
    return dict(pixel_values=jnp.zeros((1, 32, 32, self.config.num_channels), jnp.float32))

  def features(self, pixel_values: jax.Array, deterministic: bool) -> jax.Array:
    """The last stage's feature map (B, h, w, C) of NHWC `pixel_values`."""
    raise NotImplementedError

  def pool_features(self, mean: jax.Array) -> jax.Array:
    """`pooler_output` (B, C) from the mean over positions."""
    return mean

  def embed(
    self, pixel_values: jax.Array, *, deterministic: bool = True
  ) -> tuple[jax.Array, jax.Array]:
    maps = self.features(pixel_values, deterministic)
    b, h, w, c = maps.shape
    return maps.reshape(b, h * w, c), jnp.ones((b, h * w), bool)

  def run_layers(
    self, x: jax.Array, mask: jax.Array, start: int, stop: int, *, deterministic: bool = True
  ) -> jax.Array:
    if start != stop:
      raise ValueError(
        f"{type(self).__name__} has no token layers (num_layers=0): run_layers({start}, {stop}). "
        "A CNN tower runs whole in `embed`."
      )
    return x

  def finalize(self, x: jax.Array, mask: jax.Array) -> dict[str, jax.Array | None]:
    del mask  # every position is real
    return dict(last_hidden_state=x, pooler_output=self.pool_features(x.mean(1)))

  def __call__(
    self, pixel_values: jax.Array, *, deterministic: bool = True
  ) -> dict[str, jax.Array | None]:
    """As the HF model: `last_hidden_state` (B, h, w, C) NHWC and `pooler_output` (B, C)."""
    maps = self.features(pixel_values, deterministic)
    return dict(last_hidden_state=maps, pooler_output=self.pool_features(maps.mean((1, 2))))


def image_dummy_inputs(config: Any) -> dict[str, jax.Array]:
  """Smallest valid `pixel_values` of an image tower, for `init` and shape evaluation."""
  return dict(
    pixel_values=jnp.zeros((1, *pair(config.image_size), config.num_channels), jnp.float32)
  )


class Pooler(nn.Module):
  """Dense + activation on the first token (BERT and ViT `pooler`)."""

  features: int
  act: str = "tanh"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="dense")
    return activation(self.act)(dense(x[:, 0]))


def patchify(
  pixel_values: jax.Array,
  *,
  image_size: int | tuple[int, int] | None,
  patch_size: int | tuple[int, int],
  num_channels: int,
  features: int,
  use_bias: bool,
  dtype: Dtype,
  param_dtype: Dtype,
  name: str,
) -> jax.Array:
  """Non-overlapping patches of NHWC pixels -> tokens (B, N, features), N row-major.

  `image_size` None takes any height and width (pixels past the last whole patch are
  dropped, as torch's strided conv does). Call from a compact method: the patch
  nn.Conv (param `{name}/kernel`) lands there.
  """
  if image_size is None:
    shape_ok = pixel_values.ndim == 4 and pixel_values.shape[-1] == num_channels
    expected = f"(B, H, W, {num_channels})"
  else:
    shape_ok = tuple(pixel_values.shape[1:]) == (*pair(image_size), num_channels)
    expected = f"(B, {', '.join(map(str, (*pair(image_size), num_channels)))})"
  if not shape_ok:
    resize = "" if image_size is None else "Resize to the checkpoint's image_size and "
    raise ValueError(
      f"pixel_values has shape {tuple(pixel_values.shape)}; the model expects NHWC {expected}. "
      f"{resize}transpose NCHW inputs (as HF processors return them) with x.transpose(0, 2, 3, 1)."
    )
  p = pair(patch_size)
  x = nn.Conv(
    features,
    p,
    strides=p,
    padding="VALID",
    use_bias=use_bias,
    dtype=dtype,
    param_dtype=param_dtype,
    name=name,
  )(pixel_values.astype(dtype))
  return x.reshape(x.shape[0], -1, features)


def _torch_bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
  """(size_out, size_in) weights of torch's bicubic resize along one axis.

  torch.nn.functional.interpolate(mode="bicubic", align_corners=False, antialias=False):
  Keys' cubic with a=-0.75 (jax.image.resize uses a=-0.5 and antialiases when
  downsampling, so it does not match), source index (i + 0.5) * in / out - 0.5,
  taps clamped to the border. Equal sizes give the identity.
  """
  a = -0.75
  near = lambda t: ((a + 2) * t - (a + 3)) * t * t + 1  # |t| <= 1
  far = lambda t: ((a * t - 5 * a) * t + 8 * a) * t - 4 * a  # 1 < |t| < 2
  src = (np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5
  first = np.floor(src).astype(int)
  t = src - first
  weights = np.zeros((size_out, size_in))
  for k, w in enumerate((far(t + 1), near(t), near(1 - t), far(2 - t))):
    np.add.at(weights, (np.arange(size_out), np.clip(first - 1 + k, 0, size_in - 1)), w)
  return weights


def resize_grid(grid: jax.Array, size: tuple[int, int]) -> jax.Array:
  """(H, W, D) -> (*size, D) as torch's bicubic `interpolate` (HF position-embedding interpolation).

  Computed in float32, as transformers does.
  """
  rows, cols = (
    jnp.asarray(_torch_bicubic_matrix(n, m), jnp.float32) for n, m in zip(grid.shape[:2], size)
  )
  hp = jax.lax.Precision.HIGHEST
  return jnp.einsum("ih,hwd,jw->ijd", rows, grid.astype(jnp.float32), cols, precision=hp)


# --- HF name mapping helpers -------------------------------------------------
# Model files list their params as {mmtl leaf path: HFName(HF state-dict key, transform)};
# mmtl.hf applies each transform (mmtl.models.weights) when loading and exporting.


def hf_dense(
  path: str,
  hf: str,
  bias: bool = True,
  transform: Transform = Transform.LINEAR,
  part: tuple[int, int] | None = None,
) -> Iterator[tuple[str, HFName]]:
  """A torch Linear (or, with `transform=IN_OUT`, GPT-2's Conv1D) at `hf`; with `part=(i,
  n)`, the i-th of n slices of a fused one along its outputs (`HFName.part`)."""
  yield f"{path}/kernel", HFName(f"{hf}.weight", transform, part)
  if bias:
    yield f"{path}/bias", HFName(f"{hf}.bias", part=part)


def hf_conv(
  path: str, hf: str, bias: bool = True, transform: Transform = Transform.CONV2D
) -> Iterator[tuple[str, HFName]]:
  """A torch Conv2d (or, with `transform=CONV1D`, a Conv1d) at `hf`."""
  yield from hf_dense(path, hf, bias, transform)


def hf_norm(path: str, hf: str) -> Iterator[tuple[str, HFName]]:
  yield f"{path}/scale", HFName(f"{hf}.weight")
  yield f"{path}/bias", HFName(f"{hf}.bias")


def hf_batch_norm(path: str, hf: str) -> tuple[dict[str, HFName], dict[str, HFName]]:
  """({param path: HF name}, {batch_stats path: HF name}) of a `BatchNorm` at `path` for the
  torch BatchNorm at `hf`."""
  params = dict(hf_norm(path, hf))
  stats = {f"{path}/mean": HFName(f"{hf}.running_mean"), f"{path}/var": HFName(f"{hf}.running_var")}
  return params, stats


def hf_embed(path: str, hf: str) -> Iterator[tuple[str, HFName]]:
  yield f"{path}/embedding", HFName(f"{hf}.weight")


def hf_params(names: dict[str, str]) -> dict[str, HFName]:
  """{path: HF key} of params read as they are (tokens, tables, scales) as HF names."""
  return {path: HFName(key) for path, key in names.items()}


def _hf_layer(path: str, spec: LayerSpec, hf: dict[str, str]) -> Iterator[tuple[str, HFName]]:
  """Names of one `EncoderLayer`; `hf` gives the HF module prefix of each part."""
  for name in ("query", "key", "value"):
    yield from hf_dense(f"{path}/attn/{name}", hf[name], spec.has_bias(name))
  yield from hf_dense(f"{path}/attn/out", hf["out"])
  yield from hf_norm(f"{path}/attn_norm", hf["attn_norm"])
  yield from hf_dense(f"{path}/mlp/fc1", hf["fc1"])
  yield from hf_dense(f"{path}/mlp/fc2", hf["fc2"])
  yield from hf_norm(f"{path}/mlp_norm", hf["mlp_norm"])
  if spec.layer_scale is not None:  # `hf` gives the full keys of these leaves
    yield f"{path}/attn_scale", HFName(hf["attn_scale"])
    yield f"{path}/mlp_scale", HFName(hf["mlp_scale"])


def hf_layers(
  spec: LayerSpec, num_layers: int, hf_prefix: str, parts: dict[str, str]
) -> dict[str, HFName]:
  """Names of every `encoder/layer_{i}`: the HF key of part `p` of layer i is
  `{hf_prefix}.{i}.{parts[p]}` (BERT: "encoder.layer", fc1 "intermediate.dense")."""
  names = {}
  for i in range(num_layers):
    hf = {part: f"{hf_prefix}.{i}.{name}" for part, name in parts.items()}
    names.update(_hf_layer(f"encoder/layer_{i}", spec, hf))
  return names


# What fusion modules and the video tower share: pooling tokens and pre-LN blocks.
POOL_TYPES = ("mean", "cls", "pooler")


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean over tokens (axis 1) where mask is True."""
  w = mask.astype(x.dtype)[..., None]
  return (x * w).sum(1) / jnp.maximum(w.sum(1), 1.0)


def pool(out: Mapping[str, jax.Array], mask: jax.Array, how: str) -> jax.Array:
  """Tower-level representation: masked mean, first token, or the pooler."""
  if how == "mean":
    return masked_mean(out["last_hidden_state"], mask)
  if how == "cls":
    return out["last_hidden_state"][:, 0]
  if how == "pooler":
    if out.get("pooler_output") is None:
      raise ValueError(
        "pool='pooler' on a tower without a pooler (DistilBERT; a checkpoint that holds none, "
        "such as a ViTForImageClassification or RobertaForMaskedLM; add_pooling_layer=False): "
        "set config.model.towers.<modality>.pool='cls' or 'mean'."
      )
    return out["pooler_output"]
  raise ValueError(f"Unknown pool {how!r}; use one of {POOL_TYPES}.")


class MlpBlock(nn.Module):
  width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.Dense(4 * self.width, dtype=self.dtype, name="fc1")(x)
    return nn.Dense(self.width, dtype=self.dtype, name="fc2")(nn.gelu(y))


class CrossAttentionBlock(nn.Module):
  """Pre-LN cross-attention + MLP: queries of one modality, keys of the others."""

  width: int
  num_heads: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(
    self, q: jax.Array, q_mask: jax.Array, kv: jax.Array, kv_mask: jax.Array, *, train: bool
  ) -> jax.Array:
    attn_mask = q_mask[:, None, :, None] & kv_mask[:, None, None, :]
    y = nn.MultiHeadDotProductAttention(
      num_heads=self.num_heads,
      dtype=self.dtype,
      dropout_rate=self.dropout,
      deterministic=not train,
      name="attn",
    )(
      nn.LayerNorm(dtype=self.dtype, name="ln_q")(q),
      nn.LayerNorm(dtype=self.dtype, name="ln_kv")(kv),
      mask=attn_mask,
      # Its probabilities (B, heads, queries, keys) as "attention_weights", when asked for.
      sow_weights=self.is_mutable_collection("intermediates"),
    )
    # Nothing to attend to (the other modalities absent): add nothing.
    y = y * kv_mask.any(-1)[:, None, None].astype(y.dtype)
    x = q + y
    return x + MlpBlock(self.width, self.dtype, name="mlp")(
      nn.LayerNorm(dtype=self.dtype, name="ln_mlp")(x)
    )
