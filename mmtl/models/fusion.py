"""Fusion models: encoders of any number of modalities combined into one model.

Any module that implements the encoder protocol (mmtl.models.encoder.Encoder:
BERT, ViT, the CLIP towers) can be a tower. `FusionModel.towers` maps each modality
(mmtl.modalities) to its tower, whose params are `<modality>_encoder/...`
(`image_encoder`, `text_encoder`, ...), so pretrained checkpoints load into them by
name and regex rules address them as `text_encoder/encoder/layer_3/...`; fusion
params live under `fusion/...` and the task head under `head/...`.

Fusion types (`fusion_type`, the keys of `FUSIONS`):
  concat:          pooled tower features projected to `width`, concatenated,
                   one hidden layer (a linear head on a concat cannot model
                   interactions such as "is the *named* shape in the image").
  gated:           gated multimodal unit: a learned per-dimension softmax over
                   modalities mixes the projected features.
  bilinear:        low-rank bilinear pooling (MLB): tanh projections multiplied
                   elementwise; the interaction is there from the first step.
  cross_attention: every modality's tokens attend to the other modalities'
                   tokens (text->image patches and back), then pooled + concat.
  bottleneck:      MBT (Nagrani et al. 2021): towers run layers
                   [0, fusion_layer) alone; in [fusion_layer, L) they exchange
                   information only through a few shared bottleneck tokens. A
                   tower without token layers (a CNN) takes part through a
                   cross-attention of the bottleneck tokens over its feature
                   map at each fusion layer.
  pooled:          one tower's pooled features as they are: the head is a linear
                   classifier on a backbone's features (a linear probe when the tower
                   is locked; fine-tuning as in the ViT and ResNet papers).
  contrastive:     two towers and a CLIP/LiT/SigLIP head: projected, L2-normalized
                   embeddings and a learnable temperature (and bias: sigmoid loss).

Captioning (`CaptioningModel`, head "captioning"): no pooled fusion; every tower's
tokens, projected to the decoder width (`enc_to_dec_proj/<modality>`, as HF's
VisionEncoderDecoder), are concatenated and a text decoder (`decoder/...`: GPT-2,
BERT as a decoder) cross-attends to them, or reads them as a prefix of its input
embeddings (ClipCap-style, `conditioning="prefix"`, for decoders without
cross-attention). Image tokens give captions; image + question tokens give
generative VQA.

Domain adaptation (mmtl.domain_adaptation): with `domain_classifier` > 0 the model also
gives `domain_logits` (B,), a domain classifier (`domain_classifier/...`, two hidden
layers of that width) on the fused features behind a gradient reversal layer (DANN).

Cached towers: a batch may carry a locked tower's outputs instead of its inputs
(`cached_<modality>_pooled`, and `_tokens` / `_mask` where the fusion or head reads
tokens: mmtl.feature_cache); the tower is then not run.

Missing modalities: a tower runs only when its modality's primary batch field (or its
cached outputs) is in the batch, and `<modality>_present` (B,) floats (1 = present) zero
a modality per example, so a fused model can be trained with modality dropout and
evaluated with a modality missing.
"""

from __future__ import annotations

from collections.abc import Mapping
import dataclasses
import difflib
from typing import Any, ClassVar

from flax.core import FrozenDict
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmtl import adapters, config_keys, heads, modalities, optim, prompts
from mmtl.modalities import MODALITIES
from mmtl.models.encoder import Encoder
from mmtl.models.layers import CrossAttentionBlock, masked_mean, pool

# How a captioning head's decoder reads the towers' tokens.
CONDITIONINGS = ("cross_attention", "prefix")
# The parts of a tower's output a batch can carry cached (mmtl.feature_cache).
CACHED_PARTS = ("pooled", "tokens", "mask")


def cached_field(modality: str, part: str) -> str:
  """The batch field of a cached tower output `part` (one of CACHED_PARTS)."""
  return f"cached_{modality}_{part}"


def tower_inputs(
  modality: str, encoder: Encoder, batch: Mapping[str, Any], *, train: bool
) -> dict[str, Any]:
  """Keyword arguments of `encoder.embed`: the batch fields of `modality` among its
  declared `inputs` (under their input names) and `deterministic`."""
  fields = modalities.tower_fields(modality, encoder.inputs)
  out = {arg: batch[field] for field, arg in fields.items() if field in batch}
  return {**out, "deterministic": not train}


@dataclasses.dataclass
class TowerOutput:
  """What fusion sees of one tower."""

  tokens: jax.Array  # (B, T, D) last hidden state
  mask: jax.Array  # (B, T) bool
  pooled: jax.Array  # (B, D)
  present: jax.Array  # (B,) float, 1 = modality present for that example


def _stack_present(
  towers: Mapping[str, TowerOutput], feats: Mapping[str, jax.Array]
) -> tuple[jax.Array, jax.Array]:
  """Features (B, M, W) with absent modalities zeroed, and presence (B, M)."""
  present = jnp.stack([towers[m].present for m in feats], axis=1)
  x = jnp.stack(list(feats.values()), axis=1)
  return x * present[..., None].astype(x.dtype), present


class Fusion(nn.Module):
  """A fusion module: `from_model(model, name)` builds it from a FusionModel's fields,
  and `fusion(towers, train=...)` maps every tower's output (absent towers as zero
  stand-ins) to the features (B, width) the head sees. `reads_tokens`: it reads the
  towers' token sequences, not only their pooled vectors."""

  reads_tokens: ClassVar[bool] = False
  width: int
  dtype: Any = jnp.float32

  @classmethod
  def from_model(cls, model: FusionModel, name: str) -> Fusion:
    return cls(width=model.width, dtype=model.dtype, name=name)


class ConcatFusion(Fusion):
  """Project each tower to `width`, zero absent ones, concat, one hidden layer."""

  @nn.compact
  def __call__(self, towers: Mapping[str, TowerOutput], *, train: bool) -> jax.Array:
    del train  # no dropout
    feats = {
      m: nn.Dense(self.width, dtype=self.dtype, name=f"proj_{m}")(t.pooled)
      for m, t in towers.items()
    }
    x, _ = _stack_present(towers, feats)
    x = x.reshape(x.shape[0], -1)
    return nn.gelu(nn.Dense(self.width, dtype=self.dtype, name="hidden")(x))


class PooledFeatures(Fusion):
  """The single tower's pooled features, unchanged (no params)."""

  @nn.compact
  def __call__(self, towers: Mapping[str, TowerOutput], *, train: bool) -> jax.Array:
    del train
    (tower,) = towers.values()
    return tower.pooled


class GatedFusion(Fusion):
  """Gated multimodal unit (Arevalo et al. 2017) for any number of modalities.

  h_m = tanh(W_m x_m); z = softmax over present modalities of W_z [h_1..h_M],
  per output dimension; output sum_m z_m * h_m.
  """

  @nn.compact
  def __call__(self, towers: Mapping[str, TowerOutput], *, train: bool) -> jax.Array:
    del train  # no dropout
    feats = {
      m: jnp.tanh(nn.Dense(self.width, dtype=self.dtype, name=f"proj_{m}")(t.pooled))
      for m, t in towers.items()
    }
    h, present = _stack_present(towers, feats)  # (B, M, W), (B, M)
    b, m, w = h.shape
    gate = nn.Dense(m * w, dtype=self.dtype, name="gate")(h.reshape(b, m * w))
    gate = gate.reshape(b, m, w).astype(jnp.float32)
    gate = jnp.where(present[..., None] > 0, gate, -1e9)
    z = jax.nn.softmax(gate, axis=1).astype(h.dtype)
    # Each modality's mean gate (B, M), in `towers` order: where the fusion looks (mmtl.interpret).
    self.sow("intermediates", "modality_gates", z.mean(-1).astype(jnp.float32))
    return (z * h).sum(1)


class BilinearFusion(Fusion):
  """Low-rank bilinear pooling (MLB, Kim et al. 2017): tanh projections multiplied
  elementwise across modalities, an absent modality contributing 1.

  Products make "does the image contain what the text asks about" a linear
  function of the features from the start, where a concat + MLP first has to
  discover the interaction (a long loss plateau when neither modality alone
  predicts the label, as in mmtl_shapes).
  """

  @nn.compact
  def __call__(self, towers: Mapping[str, TowerOutput], *, train: bool) -> jax.Array:
    del train  # no dropout
    out = None
    for m, t in towers.items():
      h = jnp.tanh(nn.Dense(self.width, dtype=self.dtype, name=f"proj_{m}")(t.pooled))
      present = t.present[:, None].astype(h.dtype)
      h = present * h + (1 - present)
      out = h if out is None else out * h
    return out


class CrossAttentionFusion(Fusion):
  """Each modality's tokens attend to all other modalities' tokens, `depth` times."""

  reads_tokens = True
  num_heads: int = 4
  depth: int = 1
  dropout: float = 0.0

  @classmethod
  def from_model(cls, model: FusionModel, name: str) -> CrossAttentionFusion:
    return cls(
      width=model.width,
      num_heads=model.num_heads,
      depth=model.fusion_depth,
      dropout=model.dropout,
      dtype=model.dtype,
      name=name,
    )

  @nn.compact
  def __call__(self, towers: Mapping[str, TowerOutput], *, train: bool) -> jax.Array:
    x = {
      m: nn.Dense(self.width, dtype=self.dtype, name=f"proj_{m}")(t.tokens)
      for m, t in towers.items()
    }
    mask = {m: t.mask & (t.present[:, None] > 0) for m, t in towers.items()}
    for i in range(self.depth):
      x = {
        m: CrossAttentionBlock(
          self.width, self.num_heads, self.dropout, self.dtype, name=f"cross_{m}_{i}"
        )(
          x[m],
          mask[m],
          jnp.concatenate([x[o] for o in x if o != m], axis=1),
          jnp.concatenate([mask[o] for o in x if o != m], axis=1),
          train=train,
        )
        for m in x
      }
    pooled = {m: masked_mean(x[m], mask[m]) for m in x}
    h, _ = _stack_present(towers, pooled)
    h = nn.LayerNorm(dtype=self.dtype, name="ln_out")(h.reshape(h.shape[0], -1))
    return nn.gelu(nn.Dense(self.width, dtype=self.dtype, name="hidden")(h))


class BottleneckFusion(Fusion):
  """MBT's shared tokens, the per-tower maps in and out of each tower's width,
  and the late concat that combines the towers after the fusion layers.

  FusionModel runs the towers' layers through `init_tokens` / `enter` / `leave`
  before calling it as the other fusions on the towers' outputs.
  """

  num_tokens: int = 4
  hidden_sizes: tuple[tuple[str, int], ...] = ()  # (modality, tower width) per tower
  # Towers without token layers (CNNs) and the number of fusion layers: at each, the
  # bottleneck tokens read such a tower's feature map by cross-attention (`read`).
  layerless: tuple[str, ...] = ()
  num_fusion: int = 0
  num_heads: int = 4

  @classmethod
  def from_model(cls, model: FusionModel, name: str) -> BottleneckFusion:
    return cls(
      width=model.width,
      num_tokens=model.bottleneck_tokens,
      hidden_sizes=tuple((m, model.tower(m).hidden_size) for m in model.modalities),
      layerless=tuple(m for m in model.modalities if not model.tower(m).num_layers),
      num_fusion=model._fusion_starts()[1],
      num_heads=model.num_heads,
      dtype=model.dtype,
      name=name,
    )

  def setup(self) -> None:
    self.tokens = self.param("tokens", nn.initializers.normal(0.02), (self.num_tokens, self.width))
    self.to_tower = {m: nn.Dense(d, dtype=self.dtype, name=f"to_{m}") for m, d in self.hidden_sizes}
    self.from_tower = {
      m: nn.Dense(self.width, dtype=self.dtype, name=f"from_{m}") for m, _ in self.hidden_sizes
    }
    widths = dict(self.hidden_sizes)
    self.readers = {
      m: [
        CrossAttentionBlock(widths[m], self.num_heads, dtype=self.dtype, name=f"read_{m}_{k}")
        for k in range(self.num_fusion)
      ]
      for m in self.layerless
    }
    self.late = ConcatFusion(self.width, self.dtype)

  def read(
    self, m: str, k: int, b: jax.Array, tokens: jax.Array, mask: jax.Array, *, train: bool
  ) -> jax.Array:
    """Fusion layer `k` of a tower without layers: its bottleneck tokens `b` (in its width)
    attend to its final tokens."""
    return self.readers[m][k](b, jnp.ones(b.shape[:2], bool), tokens, mask, train=train)

  def init_tokens(self, batch_size: int) -> jax.Array:
    return jnp.broadcast_to(self.tokens, (batch_size, *self.tokens.shape)).astype(self.dtype)

  def enter(self, m: str, b: jax.Array) -> jax.Array:
    return self.to_tower[m](b)

  def leave(self, m: str, b: jax.Array) -> jax.Array:
    return self.from_tower[m](b)

  def __call__(self, towers: Mapping[str, TowerOutput], *, train: bool) -> jax.Array:
    return self.late(towers, train=train)


CONTRASTIVE_LOSSES = ("softmax", "sigmoid")
# SigLIP's init of the bias (with temperature_init=0.1): the ~B^2 negative pairs do not
# dominate the first steps.
SIGMOID_BIAS_INIT = -10.0


class ContrastiveHead(Fusion):
  """CLIP / LiT / SigLIP head: per-tower linear projections, L2 norm, learnable temperature.

  Takes the place of fusion and head (params `head/...`): called on the given
  towers only, it returns the model's outputs rather than features. `logit_scale`
  is log(1 / temperature), as CLIP stores it (a CLIP checkpoint's loads as is:
  mmtl.hf.load_into(head=True)); logits are exp(logit_scale) * cosine. The
  sigmoid loss adds `logit_bias` (mmtl.losses picks the loss by its presence).
  `width=0` drops the projections, as SigLIP (whose temperature and bias load too).
  """

  temperature_init: float = 0.07
  loss: str = "softmax"

  @classmethod
  def from_model(cls, model: FusionModel, name: str) -> ContrastiveHead:
    return cls(
      width=model.width,
      temperature_init=model.head_config["temperature_init"],
      loss=model.head_config["contrastive_loss"],
      dtype=model.dtype,
      name=name,
    )

  @nn.compact
  def __call__(self, towers: Mapping[str, TowerOutput], *, train: bool) -> dict[str, jax.Array]:
    del train  # no dropout
    out = {}
    if not self.width and len({t.pooled.shape[-1] for t in towers.values()}) > 1:
      raise ValueError(
        "A contrastive head with width=0 (no projections) needs pooled features of one size; "
        f"got { ({m: t.pooled.shape[-1] for m, t in towers.items()}) }. Set config.model.width."
      )
    for m, t in towers.items():
      z = t.pooled  # width 0: no projection, the pooled features are the embedding (SigLIP)
      if self.width:
        z = nn.Dense(self.width, use_bias=False, dtype=self.dtype, name=f"{m}_proj")(z)
      z = z.astype(jnp.float32)
      out[f"{m}_embeds"] = z / jnp.linalg.norm(z, axis=-1, keepdims=True).clip(1e-6)
    out["logit_scale"] = self.param(
      "logit_scale", nn.initializers.constant(np.log(1 / self.temperature_init)), ()
    )
    if self.loss == "sigmoid":
      out["logit_bias"] = self.param("logit_bias", nn.initializers.constant(SIGMOID_BIAS_INIT), ())
    out["features"] = out.get("image_embeds", next(iter(out.values())))
    return out


# fusion_type -> module. Two are used differently from the rest: bottleneck also runs
# inside the towers' layers (FusionModel._bottleneck_layers), and contrastive is the
# model's head (no classifier after it; it sees only the towers given).
FUSIONS: dict[str, type[Fusion]] = {
  "concat": ConcatFusion,
  "gated": GatedFusion,
  "bilinear": BilinearFusion,
  "cross_attention": CrossAttentionFusion,
  "bottleneck": BottleneckFusion,
  "pooled": PooledFeatures,
  "contrastive": ContrastiveHead,
}


@jax.custom_vjp
def gradient_reversal(x: jax.Array, scale: jax.Array) -> jax.Array:
  """The identity forward; backward, the gradient times -scale (Ganin et al. 2016's GRL)."""
  del scale
  return x


def _reversal_fwd(x, scale):
  return x, scale


def _reversal_bwd(scale, g):
  return (-jnp.asarray(scale, g.dtype) * g, jnp.zeros_like(scale))


gradient_reversal.defvjp(_reversal_fwd, _reversal_bwd)


class DomainClassifier(nn.Module):
  """DANN's domain classifier: features -> ReLU MLP (two hidden layers of `width`) -> one
  logit per example (target domain vs source)."""

  width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    x = features
    for _ in range(2):
      x = nn.relu(nn.Dense(self.width, dtype=self.dtype)(x))
    return nn.Dense(1, dtype=self.dtype)(x)[:, 0].astype(jnp.float32)


class FusionModel(nn.Module):
  """Encoder towers keyed by modality, a fusion module and a head.

  `towers`: {modality: encoder}, any registered modalities (mmtl.modalities), each
  tower's params under `<modality>_encoder/`; `pools`: {modality: "mean" | "cls" |
  "pooler"}, where a modality's own default (`Modality.pool`) is not wanted;
  `head_config`: values of the head's own keys (`Head.config` of mmtl.heads, e.g.
  num_classes), its defaults where not given.
  Call with a batch dict (the data pipeline's field names). Returns a dict:
  classification `logits` (B, C); regression `predictions` (B, C); contrastive
  `image_embeds`, `text_embeds` (B, width, L2-normalized), `logit_scale` (and `logit_bias`
  with contrastive_loss="sigmoid").
  `features` is the representation the head sees (the linear-probe input);
  `domain_logits` (B,) that of the domain classifier, when `domain_classifier` (its
  width) > 0.
  """

  towers: Mapping[str, nn.Module] = FrozenDict()
  pools: Mapping[str, str] = FrozenDict()
  fusion_type: str = "concat"
  head_type: str = "classification"
  head_config: Mapping[str, Any] = FrozenDict()
  width: int = 256
  dropout: float = 0.0
  num_heads: int = 4
  fusion_depth: int = 1
  fusion_layer: int = -2
  bottleneck_tokens: int = 4
  domain_classifier: int = 0
  dtype: Any = jnp.float32
  # Towers keep the names given them here (`<modality>_encoder`), not their field's.
  preserve_adopted_names = True

  def __post_init__(self) -> None:
    if unknown := [m for m in (*self.towers, *self.pools) if m not in MODALITIES]:
      raise ValueError(
        f"FusionModel: no modality is named {unknown}; registered: {list(MODALITIES)}."
      )
    if missing := [m for m in self.pools if m not in self.towers]:
      raise ValueError(f"FusionModel: pools for {missing}, which have no tower.")
    # In registry order, named by modality: param paths do not depend on the caller.
    towers = {m: self.towers[m] for m in MODALITIES if m in self.towers}
    towers = {
      m: t if t.name == f"{m}_encoder" else t.clone(name=f"{m}_encoder") for m, t in towers.items()
    }
    object.__setattr__(self, "towers", FrozenDict(towers))  # hashable: jit takes models
    object.__setattr__(self, "pools", FrozenDict(self.pools))
    if self.fusion_type not in FUSIONS:
      raise ValueError(f"Unknown fusion_type {self.fusion_type!r}; use one of {tuple(FUSIONS)}.")
    head = heads.get(self.head_type)  # a registered head (mmtl.heads)
    if unknown := sorted(set(self.head_config) - set(head.config)):
      raise ValueError(
        f"head_config has {unknown}, which the {self.head_type!r} head does not declare "
        f"(its keys: {sorted(head.config)})."
      )
    object.__setattr__(self, "head_config", FrozenDict({**head.config, **self.head_config}))
    if self.head_type == "contrastive" and (
      (loss := self.head_config["contrastive_loss"]) not in CONTRASTIVE_LOSSES
    ):
      raise ValueError(f"Unknown contrastive_loss {loss!r}; use one of {CONTRASTIVE_LOSSES}.")
    names = list(self.modalities)
    if not names:
      raise ValueError("FusionModel needs at least one tower (towers={modality: encoder}).")
    if (self.fusion_type == "contrastive") != (self.head_type == "contrastive"):
      raise ValueError(
        "fusion_type='contrastive' goes with head_type='contrastive' and "
        f"vice versa; got {self.fusion_type!r} / {self.head_type!r}."
      )
    if self.fusion_type == "contrastive" and not {"image", "text"} <= set(names):
      raise ValueError(f"Contrastive model needs image and text towers, got {names}.")
    if self.width <= 0 and self.fusion_type != "contrastive":
      raise ValueError(
        f"width={self.width}: only a contrastive head goes without projections (width=0, "
        "SigLIP); set config.model.width > 0."
      )
    if self.fusion_type in ("cross_attention", "bottleneck") and len(names) < 2:
      raise ValueError(
        f"fusion_type={self.fusion_type!r} needs at least two towers, got "
        f"{names}; use fusion_type='concat' for a single-modality model."
      )
    if self.fusion_type == "pooled" and len(names) != 1:
      raise ValueError(
        f"fusion_type='pooled' reads one tower, got {names}: use it with a single modality "
        "(config.model.modalities), or another fusion_type to combine them."
      )
    if self.fusion_type == "bottleneck" and any(
      getattr(self.tower(m), "attention_impl", None) == "cudnn" for m in names
    ):
      # cuDNN attention takes padding as lengths (real tokens first); bottleneck tokens
      # are appended after padded text, so that mask cannot be expressed.
      raise ValueError(
        "fusion_type='bottleneck' does not work with attention_impl='cudnn'; "
        "use attention_impl='xla' (or None) for the towers."
      )
    super().__post_init__()

  @property
  def new_layers(self) -> tuple[str, ...]:
    """Regexes of the params no tower checkpoint gives (they start random), which
    mmtl.optim's parameter-efficient presets always train: the fusion and the head (and
    the domain classifier)."""
    return optim.NEW_LAYERS + (("domain_classifier/.*",) if self.domain_classifier else ())

  @property
  def modalities(self) -> tuple[str, ...]:
    """The modalities with a tower, in registry order."""
    return tuple(m for m in MODALITIES if m in self.towers)

  def tower(self, m: str) -> Encoder:
    """The encoder of modality `m`."""
    return self.towers[m]

  def pool_of(self, m: str) -> str:
    """How the tower of modality `m` is pooled (`pools`, else the modality's default)."""
    return self.pools.get(m, MODALITIES[m].pool)

  def dummy_batch(self) -> dict[str, jax.Array]:
    """The smallest batch (batch size 1) with every tower's inputs under their batch fields:
    `init` on it gives the params `init` on a real batch gives, without an example."""
    batch = {}
    for m in self.modalities:
      batch.update(MODALITIES[m].dummy_batch(self.tower(m)))
    return batch

  def _present(self, m: str, batch: Mapping[str, Any], batch_size: int) -> jax.Array:
    if not _given(m, batch):
      return jnp.zeros((batch_size,), jnp.float32)
    return jnp.asarray(batch.get(f"{m}_present", jnp.ones((batch_size,), jnp.float32)), jnp.float32)

  def _run_towers(
    self, batch: Mapping[str, Any], bottleneck: BottleneckFusion | None, *, train: dict[str, bool]
  ) -> dict[str, TowerOutput]:
    """Run every tower whose inputs are in the batch (`train`: per modality, whether
    in training mode); bottleneck towers exchange tokens."""
    given = [m for m in self.modalities if _given(m, batch)]
    if not given:
      raise ValueError(
        f"The batch has none of the model's inputs "
        f"{[MODALITIES[m].primary() for m in self.modalities]}; got {sorted(batch)}."
      )
    cached = [m for m in given if cached_field(m, "pooled") in batch]
    if cached and bottleneck is not None:
      raise ValueError(
        f"Bottleneck fusion runs the towers' top layers together; the batch carries cached "
        f"outputs of the {cached} tower(s) instead of their inputs."
      )
    with adapters.applied():
      return self._run_given(batch, given, cached, bottleneck, train=train)

  def _run_given(
    self,
    batch: Mapping[str, Any],
    given: list[str],
    cached: list[str],
    bottleneck: BottleneckFusion | None,
    *,
    train: dict[str, bool],
  ) -> dict[str, TowerOutput]:
    """`_run_towers`' work, with each tower's adapters applied (mmtl.adapters) and its prompts
    (mmtl.prompts) in place, where its params hold them."""
    prompted = [m for m in given if m not in cached and prompts.of(self.tower(m)) is not None]
    if prompted and bottleneck is not None:
      raise ValueError(
        f"Bottleneck fusion appends its tokens to the towers' top layers; the {prompted} "
        "tower(s) hold prompts (config.optim.prompts): use another fusion_type, or adapters."
      )
    embedded = {
      m: prompts.insert(
        self.tower(m), *self.tower(m).embed(**tower_inputs(m, self.tower(m), batch, train=train[m]))
      )
      for m in given
      if m not in cached
    }
    batch_size = (
      batch[cached_field(cached[0], "pooled")].shape[0]
      if cached
      else next(iter(embedded.values()))[0].shape[0]
    )
    present = {m: self._present(m, batch, batch_size) for m in given}
    if bottleneck is not None:
      hidden = self._bottleneck_layers(bottleneck, embedded, present, train=train)
    else:
      hidden = {
        m: prompts.run_layers(
          self.tower(m), x, mask, 0, self.tower(m).num_layers, deterministic=not train[m]
        )
        for m, (x, mask) in embedded.items()
      }
    out = {}
    for m in given:
      if m in cached:
        out[m] = _cached_output(m, batch, present[m])
        continue
      x, mask = prompts.remove(self.tower(m), hidden[m], embedded[m][1])
      final = self.tower(m).finalize(x, mask)
      out[m] = TowerOutput(
        tokens=final["last_hidden_state"],
        mask=mask,
        pooled=pool(final, mask, self.pool_of(m)),
        present=present[m],
      )
    # What fusion reads of each tower, recorded and as `perturbations` (zero; both no-ops
    # unless those collections are asked for, and neither is a variable `init` makes):
    # mmtl.interpret's gradient x input.
    if self.is_initializing():
      return out
    for m, t in out.items():
      for part in ("tokens", "mask", "pooled"):
        self.sow("intermediates", f"{m}_{part}", getattr(t, part))
    return {
      m: dataclasses.replace(
        t,
        tokens=self.perturb(f"{m}_tokens", t.tokens),
        pooled=self.perturb(f"{m}_pooled", t.pooled),
      )
      for m, t in out.items()
    }

  def tower_outputs(self, batch: Mapping[str, Any], m: str) -> dict[str, jax.Array]:
    """What fusion and head read of tower `m` on `batch`, at inference: its
    CACHED_PARTS (mmtl.feature_cache stores them)."""
    out = self._run_towers(batch, None, train=dict.fromkeys(self.modalities, False))[m]
    return dict(pooled=out.pooled, tokens=out.tokens, mask=out.mask)

  def _fusion_starts(self) -> tuple[dict[str, int], int]:
    """First fusion layer of each tower with token layers, and the number of fusion layers."""
    depths = {m: self.tower(m).num_layers for m in self.modalities if self.tower(m).num_layers}
    if not depths:
      raise ValueError(
        "Bottleneck fusion needs a tower with token layers (a transformer); every tower here "
        "is a CNN. Use fusion_type='cross_attention' or 'concat'."
      )
    starts = {
      m: self.fusion_layer if self.fusion_layer >= 0 else d + self.fusion_layer
      for m, d in depths.items()
    }
    num_fusion = {depths[m] - s for m, s in starts.items()}
    if len(num_fusion) != 1 or min(starts.values()) < 0 or num_fusion == {0}:
      raise ValueError(
        f"Bottleneck fusion_layer={self.fusion_layer} does not give every tower the same "
        f"(>0) number of fusion layers (depths {depths}). Use a negative fusion_layer "
        "(-k: the top k layers of every tower exchange bottleneck tokens) or towers of "
        "equal depth."
      )
    return starts, num_fusion.pop()

  def _bottleneck_layers(
    self,
    bn: BottleneckFusion,
    embedded: dict[str, tuple[jax.Array, jax.Array]],
    present: dict[str, jax.Array],
    *,
    train: dict[str, bool],
  ) -> dict[str, jax.Array]:
    starts, num_fusion = self._fusion_starts()
    hidden = {
      m: self.tower(m).run_layers(x, mask, 0, starts.get(m, 0), deterministic=not train[m])
      for m, (x, mask) in embedded.items()
    }
    n = self.bottleneck_tokens
    b = bn.init_tokens(next(iter(hidden.values())).shape[0])
    weights = jnp.stack([present[m] for m in hidden], 1)  # (B, M)
    weights = weights / jnp.maximum(weights.sum(1, keepdims=True), 1.0)
    for k in range(num_fusion):
      updates = []
      for m, (_, mask) in embedded.items():
        if m not in starts:  # no token layers: the bottleneck tokens read its feature map
          x = bn.read(m, k, bn.enter(m, b), hidden[m], mask, train=train[m])
          updates.append(bn.leave(m, x))
          continue
        x = jnp.concatenate([hidden[m], bn.enter(m, b)], axis=1)
        x_mask = jnp.concatenate([mask, jnp.ones((mask.shape[0], n), bool)], axis=1)
        x = self.tower(m).run_layers(
          x, x_mask, starts[m] + k, starts[m] + k + 1, deterministic=not train[m]
        )
        hidden[m] = x[:, :-n]
        updates.append(bn.leave(m, x[:, -n:]))
      # Shared tokens: the present towers' views averaged (MBT); absent ones don't vote.
      b = jnp.einsum("bm,bmnd->bnd", weights.astype(b.dtype), jnp.stack(updates, 1))
    return hidden

  @nn.compact
  def __call__(
    self,
    batch: Mapping[str, Any],
    *,
    train: bool = False,
    inference_towers: tuple[str, ...] = (),
    domain_grl: float | jax.Array = 1.0,
  ) -> dict[str, jax.Array]:
    """Outputs on `batch`. With `train`, dropout is on everywhere except in the towers
    of `inference_towers` (modalities): locked towers run as at inference (LiT).
    `domain_grl`: the gradient reversal's scale (DANN's lambda) before the domain
    classifier."""
    contrastive = self.head_type == "contrastive"
    fusion = FUSIONS[self.fusion_type].from_model(self, name="head" if contrastive else "fusion")
    towers = self._run_towers(
      batch,
      fusion if isinstance(fusion, BottleneckFusion) else None,
      train={m: train and m not in inference_towers for m in self.modalities},
    )
    if contrastive:
      return fusion(towers, train=train)
    features = fusion(self._fill_absent(towers), train=train)
    x = nn.Dropout(self.dropout, deterministic=not train)(features)
    outputs = heads.get(self.head_type).outputs(self, x, towers)
    if self.domain_classifier:
      classifier = DomainClassifier(self.domain_classifier, self.dtype, name="domain_classifier")
      scale = jnp.asarray(domain_grl, jnp.float32)
      outputs["domain_logits"] = classifier(gradient_reversal(features, scale))
    return {**outputs, "features": features.astype(jnp.float32)}

  def _fill_absent(self, towers: dict[str, TowerOutput]) -> dict[str, TowerOutput]:
    """Zero stand-ins for towers whose inputs were not given (keeps param shapes)."""
    ref = next(iter(towers.values()))
    b = ref.pooled.shape[0]
    out = {}
    for m in self.modalities:
      if m in towers:
        out[m] = towers[m]
        continue
      d = self.tower(m).hidden_size
      out[m] = TowerOutput(
        tokens=jnp.zeros((b, 1, d), ref.tokens.dtype),
        mask=jnp.zeros((b, 1), bool),
        pooled=jnp.zeros((b, d), ref.pooled.dtype),
        present=jnp.zeros((b,), jnp.float32),
      )
    return out


def _given(m: str, batch: Mapping[str, Any]) -> bool:
  """Whether the batch gives modality `m`: its inputs, or its tower's cached outputs."""
  return MODALITIES[m].primary() in batch or cached_field(m, "pooled") in batch


def _cached_output(m: str, batch: Mapping[str, Any], present: jax.Array) -> TowerOutput:
  """A tower's output read from the batch; pooled alone where nothing reads tokens."""
  pooled = batch[cached_field(m, "pooled")]
  if cached_field(m, "tokens") in batch:
    tokens, mask = batch[cached_field(m, "tokens")], batch[cached_field(m, "mask")]
  else:
    tokens, mask = pooled[:, None], jnp.ones((pooled.shape[0], 1), bool)
  return TowerOutput(tokens=tokens, mask=jnp.asarray(mask, bool), pooled=pooled, present=present)


class EncoderToDecoder(nn.Module):
  """Per modality, a Dense from the tower width to the decoder's (`enc_to_dec_proj/<m>`)."""

  modalities: tuple[str, ...]
  width: int
  dtype: Any = jnp.float32

  def setup(self) -> None:
    self.projections = {m: nn.Dense(self.width, dtype=self.dtype, name=m) for m in self.modalities}

  def __call__(self, m: str, tokens: jax.Array) -> jax.Array:
    return self.projections[m](tokens)


class CaptioningModel(FusionModel):
  """Towers -> projected tokens -> text decoder: a FusionModel with a "captioning" head.

  Called on a batch (decoder_input_ids, decoder_attention_mask + the towers' inputs) it
  returns teacher-forced `logits` (B, T, vocab) of the tokens after the prefix.
  `encode` / `decode` / `init_cache` are what `mmtl.generate.generate` drives.
  """

  decoder: nn.Module | None = None
  conditioning: str = "cross_attention"
  head_type: str = "captioning"

  def __post_init__(self) -> None:
    if self.head_type != "captioning":
      raise ValueError(f"CaptioningModel has head_type 'captioning', got {self.head_type!r}.")
    if self.decoder is None:
      raise config_keys.ConfigError(
        "head='captioning' needs a decoder: set config.model.decoder.name (a GPT-2 or BERT "
        "checkpoint or config.json dict)."
      )
    if self.conditioning not in CONDITIONINGS:
      raise config_keys.ConfigError(
        f"config.model.conditioning={self.conditioning!r}; use one of {CONDITIONINGS}."
      )
    if self.conditioning == "cross_attention" and not self.decoder.cross_attention:
      raise config_keys.ConfigError(
        "conditioning='cross_attention' but the decoder has no cross-attention layers: set "
        "config.model.decoder.cross_attention=True (new layers, trained from init) or "
        "config.model.conditioning='prefix'."
      )
    super().__post_init__()

  @property
  def new_layers(self) -> tuple[str, ...]:
    """The projections to the decoder, and with cross-attention conditioning the decoder's
    cross-attention: new to an encoder checkpoint, and reading new projections' tokens
    when a decoder checkpoint has it."""
    cross = ("decoder/.*/cross_attn(_norm)?/.*",) if self.conditioning == "cross_attention" else ()
    return ("enc_to_dec_proj/.*", *cross)

  @property
  def vocab_size(self) -> int:
    return self.decoder.vocab_size

  @property
  def max_length(self) -> int:
    return self.decoder.max_length

  def setup(self) -> None:
    self.enc_to_dec_proj = EncoderToDecoder(
      self.modalities, self.decoder.hidden_size, self.dtype, name="enc_to_dec_proj"
    )

  def dummy_batch(self) -> dict[str, jax.Array]:
    ids = jnp.zeros((1, 1), jnp.int32)
    return {**super().dummy_batch(), "decoder_input_ids": ids, "decoder_attention_mask": ids + 1}

  def encode(
    self, batch: Mapping[str, Any], *, train: bool = False, inference_towers: tuple[str, ...] = ()
  ) -> dict[str, jax.Array]:
    """The decoder's conditioning from the towers: `encoder_hidden_states` and their mask,
    or `prefix_embeds`. Absent modalities (not in the batch, or `<m>_present` 0) are masked
    out (prefix: zeroed). Towers in `inference_towers` run as at inference (LiT)."""
    train_of = {m: train and m not in inference_towers for m in self.modalities}
    towers = self._run_towers(batch, None, train=train_of)
    tokens, masks = [], []
    for m, t in towers.items():
      present = t.present > 0
      tokens.append(self.enc_to_dec_proj(m, t.tokens) * present[:, None, None].astype(self.dtype))
      masks.append(t.mask & present[:, None])
    x, mask = jnp.concatenate(tokens, 1), jnp.concatenate(masks, 1)
    if self.conditioning == "prefix":
      return dict(prefix_embeds=x)
    return dict(encoder_hidden_states=x, encoder_attention_mask=mask)

  def decode(self, input_ids: jax.Array, attention_mask=None, position_ids=None, **kw) -> dict:
    """The decoder (`TextDecoder.__call__`) on `encode`'s conditioning or a cache."""
    return self.decoder(input_ids, attention_mask, position_ids, **kw)

  def init_cache(self, batch_size: int, max_length: int, **conditioning) -> dict[str, Any]:
    return self.decoder.init_cache(batch_size, max_length, **conditioning)

  def __call__(
    self, batch: Mapping[str, Any], *, train: bool = False, inference_towers: tuple[str, ...] = ()
  ) -> dict[str, jax.Array]:
    """Teacher forcing: `logits` (B, T, vocab) of `decoder_input_ids` given the towers.
    With `train`, locked towers (`inference_towers`) still run as at inference."""
    cond = self.encode(batch, train=train, inference_towers=inference_towers)
    out = self.decoder(
      batch["decoder_input_ids"],
      batch.get("decoder_attention_mask"),
      **cond,
      deterministic=not train,
    )
    logits = out["logits"]
    if "prefix_embeds" in cond:  # predictions at the prefix positions are not tokens
      logits = logits[:, cond["prefix_embeds"].shape[1] :]
    return {"logits": logits}


def selected_towers(model_cfg: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
  """The towers `model_cfg.modalities` selects (all when empty), in config order.

  Towers are keyed by modality: any other key is a typo (`towers.imgae`, which would
  otherwise leave the image tower as it was) and a ConfigError, unless
  `model_cfg.unused_towers` lists it as a tower kept in the config on purpose.
  """
  spare = list(model_cfg.get("unused_towers") or ())
  if missing := [key for key in spare if key not in model_cfg["towers"]]:
    raise config_keys.ConfigError(
      f"config.model.unused_towers lists {missing}, which config.model.towers does not have "
      f"(its towers: {sorted(model_cfg['towers'])})."
    )
  towers = {key: t for key, t in model_cfg["towers"].items() if key not in spare}
  for key in towers:
    if key not in MODALITIES:
      close = difflib.get_close_matches(key, MODALITIES, n=1)
      raise config_keys.ConfigError(
        f"config.model.towers.{key}: no modality is named {key!r}"
        + (f"; did you mean config.model.towers.{close[0]}?" if close else ".")
        + f" Towers are named by modality ({', '.join(MODALITIES)}); a tower kept in the "
        f"config unused must be listed in config.model.unused_towers."
      )
  if not model_cfg.get("modalities"):
    return towers
  wanted = [m.strip() for m in model_cfg["modalities"].split(",") if m.strip()]
  unknown = [m for m in wanted if m not in towers]
  if unknown or not wanted:
    raise ValueError(
      f"config.model.modalities={model_cfg['modalities']!r} names "
      f"{unknown or 'nothing'}; the config's towers are {sorted(towers)}."
    )
  return {m: towers[m] for m in towers if m in wanted}


def _check_tower_inputs(modality: str, encoder: nn.Module, name: Any) -> None:
  """A tower must take its modality's input: an image tower pointed at a BERT
  checkpoint fails here, naming both, not deep inside `embed`."""
  spec = MODALITIES[modality]
  wanted = spec.inputs[spec.primary()]
  is_encoder = isinstance(encoder, Encoder)
  if is_encoder and wanted in encoder.inputs:
    return
  takes = (
    f"whose inputs are {list(encoder.inputs)}"
    if is_encoder
    else "which is not a tower (mmtl.models.encoder.Encoder)"
  )
  what = name.get("model_type", "config dict") if isinstance(name, Mapping) else name
  a = "an" if modality[0] in "aeiou" else "a"
  raise config_keys.ConfigError(
    f"config.model.towers.{modality}: {what!r} builds a {type(encoder).__name__}, {takes}; "
    f"{a} {modality} tower takes {wanted} (batch field {spec.primary()!r}). "
    f"Point towers.{modality}.name at {a} {modality} encoder, or move this checkpoint to the tower "
    f"of the modality it encodes (for CLIP, pick its half with tower='vision' or 'text')."
  )


def build(model_cfg: Mapping[str, Any]) -> FusionModel:
  """The FusionModel that `config.model` describes (architecture only; see mmtl.config).

  Each tower is `mmtl.hf.build_module(name, tower=...)` of a checkpoint name or
  path or a config.json dict (a scratch or tiny encoder).
  """
  from mmtl import hf  # Loading code is only needed when building from a config.

  dtype, param_dtype = jnp.dtype(model_cfg["dtype"]), jnp.dtype(model_cfg["param_dtype"])
  towers, pools = {}, {}
  for m, t in selected_towers(model_cfg).items():
    name = t["name"]
    name = name.to_dict() if hasattr(name, "to_dict") else name
    kwargs = dict(t.get("kwargs") or {})
    towers[m] = hf.build_module(
      name,
      tower=t.get("tower"),
      dtype=dtype,
      param_dtype=param_dtype,
      remat=model_cfg.get("remat", "none"),
      **kwargs,
    )
    _check_tower_inputs(m, towers[m], name)
    for key in modalities.tower_config_keys():
      if t.get(key) and key not in MODALITIES[m].tower_config:
        readers = [n for n, spec in MODALITIES.items() if key in spec.tower_config]
        raise config_keys.ConfigError(
          f"config.model.towers.{m}.{key} is set, but only the {' and '.join(readers)} "
          "tower reads it: drop it."
        )
    pool = t.get("pool")
    tower = MODALITIES[m].tower(towers[m], t)
    if tower is not towers[m]:  # wrapped (video: frames): its first token is no [CLS] either
      if pool == "cls":
        raise config_keys.ConfigError(
          f"config.model.towers.{m}.pool='cls' takes the first token, but this tower's tokens "
          "are frames or patches of every frame: use pool='pooler' (its temporal pooling) or "
          "'mean'."
        )
      towers[m] = tower
    elif not towers[m].num_layers:  # a CNN: its first position is no [CLS] token
      if pool == "cls":
        raise config_keys.ConfigError(
          f"config.model.towers.{m}.pool='cls' takes the first token, but this tower is a CNN "
          "(its tokens are feature-map positions): use pool='pooler' or 'mean'."
        )
      pool = pool or "pooler"
    if pool:
      pools[m] = pool
  extra, cls = {}, FusionModel
  if model_cfg["head"] == "captioning":
    dec = dict(model_cfg.get("decoder") or {})
    if not dec.get("name"):
      raise config_keys.ConfigError(
        "config.model.head='captioning' needs config.model.decoder.name: a GPT-2 or BERT "
        "checkpoint (hub id or folder) or a config.json dict."
      )
    name = dec["name"].to_dict() if hasattr(dec["name"], "to_dict") else dec["name"]
    extra = dict(
      decoder=hf.build_decoder(
        name,
        cross_attention=dec.get("cross_attention", True),
        dtype=dtype,
        param_dtype=param_dtype,
        remat=model_cfg.get("remat", "none"),
        **dict(dec.get("kwargs") or {}),
      ),
      conditioning=model_cfg.get("conditioning", "cross_attention"),
    )
    cls = CaptioningModel
  return cls(
    towers=towers,
    pools=pools,
    **extra,
    fusion_type=model_cfg["fusion"],
    head_type=model_cfg["head"],
    head_config={k: model_cfg[k] for k in heads.get(model_cfg["head"]).config},
    width=model_cfg["width"],
    dropout=model_cfg["dropout"],
    num_heads=model_cfg["num_heads"],
    fusion_depth=model_cfg["fusion_depth"],
    fusion_layer=model_cfg["fusion_layer"],
    bottleneck_tokens=model_cfg["bottleneck_tokens"],
    domain_classifier=model_cfg["domain_classifier"],
    dtype=dtype,
  )
