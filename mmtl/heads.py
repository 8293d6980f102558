"""Task heads: what a fused model predicts and how it is trained, one registry entry each.

`config.model.head` names a `Head` in `HEADS`. A head owns
- `outputs(model, features, towers)`: its params (under `head/`) and outputs on the fused
  features (B, width), or on the towers' own outputs (tokens, mask, pooled, presence of
  each given modality: a per-token head such as CTC over an audio tower's frames), called
  inside the model's forward pass (the heads that replace the fusion or
  the model, contrastive and captioning, are modules of mmtl.models.fusion instead);
- `loss(outputs, batch, loss_cfg)`: `(sum, weight)` over the batch (mmtl.losses), which
  the trainer adds up over microbatches and devices before dividing once;
- `separable`: whether that sum over a microbatch is the microbatch's share (a loss over
  examples), or each example needs the whole batch (contrastive losses): then gradient
  accumulation takes the gradient cache (mmtl.train_step), computing the loss on the whole
  batch of the head's outputs;
- `fields`: the batch fields its loss reads (the trainer checks the input gives them before
  anything is written);
- `config` / `loss_config`: its keys of `config.model` (the model carries their values as
  `model.head_config`) and of `config.loss`, with their defaults: they join the config
  schema, so overrides and type checks cover them; its loss gets the values of both in
  `loss_cfg` (a CTC loss needs the vocabulary's blank);
- `predict_fns(model, mesh)`: the functions of (variables, batch) evaluators call by name
  (big_vision's `get_predict_fns`), one per name of `predict_names`: "predict" (every
  head: outputs, labels, example weights), "generate" and "token_loss" (captioning:
  generated token ids; teacher-forced loss sums);
  an evaluator names the one it needs (`Evaluator.PREDICT`), checked against
  `predict_names` when the config is read.
Adding a head is one class with `@register("name")`, in mmtl or in the user's own module
imported before training (tests/test_heads.py trains and evaluates a toy head that way).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmtl import ctc, losses, low_precision, sharding

Outputs = Mapping[str, jax.Array]
PredictFn = Callable[..., Any]


class Head:
  """A task head (see the module docstring); subclasses are registered, never instantiated."""

  separable: ClassVar[bool] = True
  fields: ClassVar[tuple[str, ...]] = ("labels",)
  config: ClassVar[dict[str, Any]] = {}
  loss_config: ClassVar[dict[str, Any]] = {}
  predict_names: ClassVar[tuple[str, ...]] = ("predict",)  # the keys of `predict_fns`
  # Reads the towers' token sequences, not only their pooled vectors (mmtl.feature_cache
  # then stores a locked tower's tokens).
  reads_tokens: ClassVar[bool] = False

  @classmethod
  def outputs(
    cls, model: Any, features: jax.Array, towers: Mapping[str, Any]
  ) -> dict[str, jax.Array]:
    """The head's outputs on `features` (B, width) or `towers` ({modality:
    mmtl.models.fusion.TowerOutput} of the modalities given); called in `model`'s compact
    forward pass, so the modules it creates are `model`'s (name the outermost one "head")."""
    raise NotImplementedError(f"{cls.__name__} is a module of mmtl.models.fusion.")

  @classmethod
  def loss(
    cls, outputs: Outputs, batch: Mapping[str, Any], loss_cfg: Mapping[str, Any]
  ) -> tuple[jax.Array, jax.Array]:
    raise NotImplementedError

  @classmethod
  def predict_fns(cls, model: Any, mesh: jax.sharding.Mesh) -> dict[str, PredictFn]:
    """{name: fn(variables, batch, **kw)} on batches placed on `mesh`: "predict", the
    jitted eval forward pass (`predict`), its outputs replicated on every host."""
    return {
      "predict": jax.jit(functools.partial(predict, model), out_shardings=sharding.replicated(mesh))
    }


def merged(variables: Any) -> Any:
  """`variables` with the params the model computes with: low-precision leaves read back,
  LoRA's updates merged into the params they adapt (mmtl.low_precision.model_params)."""
  return {**variables, "params": low_precision.model_params(variables["params"])}


def predict(model: Any, variables: Any, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
  """The model's outputs on `batch` (LoRA merged; scalar outputs such as logit_scale
  dropped), with the batch's `labels` and `example_weight` (1 where it has none)."""
  out = model.apply(merged(variables), batch)
  out = {k: v for k, v in out.items() if jnp.ndim(v)}
  out["example_weight"] = batch.get(
    "example_weight", jnp.ones(next(iter(out.values())).shape[:1], jnp.float32)
  )
  if "labels" in batch:
    out["labels"] = batch["labels"]
  return out


HEADS: dict[str, type[Head]] = {}


def register(name: str) -> Callable[[type[Head]], type[Head]]:
  """Class decorator: `config.model.head=name` trains with this head."""

  def add(cls: type[Head]) -> type[Head]:
    if name in HEADS and HEADS[name] is not cls:
      raise ValueError(f"A head named {name!r} is registered already ({HEADS[name].__name__}).")
    for section in ("config", "loss_config"):
      known = config_keys(section)
      if clash := {k for k, v in getattr(cls, section).items() if known.get(k, v) != v}:
        raise ValueError(
          f"Head {name!r} declares {sorted(clash)} in its {section} with other defaults than "
          "a registered head: a key shared by heads has one default."
        )
    HEADS[name] = cls
    return cls

  return add


def config_keys(section: str = "config") -> dict[str, Any]:
  """The keys every registered head declares in `section` ("config": `config.model`,
  "loss_config": `config.loss`), with their defaults."""
  return {k: v for head in HEADS.values() for k, v in getattr(head, section).items()}


def get(name: str) -> type[Head]:
  if name not in HEADS:
    raise ValueError(
      f"Unknown head {name!r}; registered heads: {sorted(HEADS)} (a head of your own is a "
      "class decorated with mmtl.heads.register, imported before the model is built)."
    )
  return HEADS[name]


def linear(model: Any, features: jax.Array) -> jax.Array:
  """`num_classes` outputs of a zero-initialized Dense named "head" (big_vision's
  transfer head: the first steps don't fight random logits), in float32."""
  dense = nn.Dense(
    model.head_config["num_classes"],
    dtype=model.dtype,
    kernel_init=nn.initializers.zeros,
    name="head",
  )
  return dense(features).astype(jnp.float32)


@register("classification")
class Classification(Head):
  """Softmax over `num_classes`; cross-entropy with optional label smoothing."""

  config = dict(num_classes=2)
  loss_config = dict(label_smoothing=0.0)
  predict_names = ("predict", "explain")

  @classmethod
  def outputs(cls, model: Any, features: jax.Array, towers: Mapping[str, Any]) -> dict:
    del towers
    return {"logits": linear(model, features)}

  @classmethod
  def predict_fns(cls, model: Any, mesh: jax.sharding.Mesh) -> dict[str, PredictFn]:
    """And "explain": attention maps, gates and modality attributions (mmtl.interpret)."""
    from mmtl import interpret  # pylint: disable=g-import-not-at-top

    def explain(variables, batch):
      return interpret.explain(model, merged(variables), batch)

    jitted = jax.jit(explain, out_shardings=sharding.replicated(mesh))
    return {**super().predict_fns(model, mesh), "explain": jitted}

  @classmethod
  def loss(cls, outputs, batch, loss_cfg):
    per_example = losses.softmax_xent_per_example(
      outputs["logits"], batch["labels"], loss_cfg["label_smoothing"]
    )
    return losses.weighted_sum(per_example, batch.get("example_weight"))


@register("multilabel")
class MultiLabel(Classification):
  """Multi-label classification: the classification head's logits, each class an
  independent sigmoid (present or not), trained on multi-hot labels (a label field holding
  a list of classes) with the binary cross-entropy per class, averaged over the classes."""

  loss_config = {}

  @classmethod
  def loss(cls, outputs, batch, loss_cfg):
    del loss_cfg
    per_example = losses.sigmoid_xent_per_example(outputs["logits"], batch["labels"])
    return losses.weighted_sum(per_example, batch.get("example_weight"))


@register("regression")
class Regression(Head):
  """`num_classes` real values; mean squared error."""

  config = dict(num_classes=2)

  @classmethod
  def outputs(cls, model: Any, features: jax.Array, towers: Mapping[str, Any]) -> dict:
    del towers
    return {"predictions": linear(model, features)}

  @classmethod
  def loss(cls, outputs, batch, loss_cfg):
    del loss_cfg
    predictions = outputs["predictions"]
    targets = jnp.asarray(batch["labels"], jnp.float32).reshape(predictions.shape)
    per_example = ((predictions - targets) ** 2).mean(-1)
    return losses.weighted_sum(per_example, batch.get("example_weight"))


@register("contrastive")
class Contrastive(Head):
  """CLIP / LiT / SigLIP (mmtl.models.fusion.ContrastiveHead, which takes the place of the
  fusion): InfoNCE over the batch, or SigLIP's sigmoid loss when the model outputs a
  `logit_bias` (contrastive_loss="sigmoid"). Each example is compared with the whole
  batch, so the loss does not split over microbatches."""

  separable = False
  fields = ()
  # temperature_init: the initial temperature (CLIP 0.07, SigLIP 0.1); contrastive_loss:
  # "softmax" (CLIP's InfoNCE) or "sigmoid" (SigLIP's pairwise loss; adds a learned
  # logit_bias).
  config = dict(temperature_init=0.07, contrastive_loss="softmax")

  @classmethod
  def loss(cls, outputs, batch, loss_cfg):
    del loss_cfg
    if "logit_bias" in outputs:
      per_example = losses.sigmoid_per_example(
        outputs["image_embeds"],
        outputs["text_embeds"],
        outputs["logit_scale"],
        outputs["logit_bias"],
      )
    else:
      per_example = losses.contrastive_per_example(
        outputs["image_embeds"], outputs["text_embeds"], outputs["logit_scale"]
      )
    return losses.weighted_sum(per_example, batch.get("example_weight"))


@register("captioning")
class Captioning(Head):
  """A text decoder over the towers' tokens (mmtl.models.fusion.CaptioningModel):
  teacher-forced next-token cross-entropy, a mean over target tokens."""

  fields = ("decoder_target_ids", "decoder_loss_mask")
  reads_tokens = True
  loss_config = dict(label_smoothing=0.0)
  predict_names = ("predict", "generate", "token_loss")

  @classmethod
  def loss(cls, outputs, batch, loss_cfg):
    return losses.token_loss(outputs["logits"], batch, loss_cfg["label_smoothing"])

  @classmethod
  def predict_fns(cls, model: Any, mesh: jax.sharding.Mesh) -> dict[str, PredictFn]:
    """And "generate": token ids (B, prompt + max_new_tokens) that `mmtl.generate.generate`
    decodes after each row's `decoder_input_ids` prompt, with its keyword arguments;
    "token_loss": the batch's teacher-forced cross-entropy (the training loss without label
    smoothing) as (sum, weight) over its target tokens, reduced on device so that no
    full-vocabulary logits leave it."""

    def generate(variables, batch, **generate_kw):
      from mmtl.generate import generate as decode  # The decoding loop: only to generate.

      return decode(model, merged(variables), batch, **generate_kw)

    def token_loss(variables, batch):
      return losses.token_loss(predict(model, variables, batch)["logits"], batch)

    return {
      **super().predict_fns(model, mesh),
      "generate": generate,
      "token_loss": jax.jit(token_loss, out_shardings=sharding.replicated(mesh)),
    }


@register("ctc")
class CTC(Head):
  """Speech recognition: per-frame scores over a CTC vocabulary (mmtl.ctc) from the tokens
  of the tower of `ctc_modality`, whose tokens must be frames in time order (wav2vec2,
  HuBERT, the Whisper encoder: `time_frames`), through a Dense named "head" as
  `Wav2Vec2ForCTC`'s `lm_head` (a *ForCTC checkpoint's loads with `model_init.head`; no
  dropout before it, where transformers applies `final_dropout`).
  Loss: CTC (optax.ctc_loss, blank `blank_id`) on `ctc_labels`, `ctc_loss_reduction` as
  transformers': "mean" per label, "sum" per example; the trainer's loss is their mean
  over examples (transformers' "sum" is summed over the batch: the same gradient direction,
  divided by the batch size). Examples whose frames cannot hold their labels weigh 0 (the
  `transcription` evaluator counts them). The fused features are computed but unused."""

  fields = ("ctc_labels",)
  reads_tokens = True
  config = dict(vocab_size=32, blank_id=0, ctc_modality="waveform")
  loss_config = dict(ctc_loss_reduction="mean")
  predict_names = ("predict", "transcribe")

  @classmethod
  def outputs(cls, model: Any, features: jax.Array, towers: Mapping[str, Any]) -> dict:
    del features
    m = model.head_config["ctc_modality"]
    if m not in model.towers or not getattr(type(model.tower(m)), "time_frames", False):
      kind = type(model.tower(m)).__name__ if m in model.towers else "no tower"
      raise ValueError(
        f"The ctc head reads the frames of the {m!r} tower (config.model.ctc_modality), which "
        f"is {kind}: use a speech tower whose tokens are time frames (wav2vec2, HuBERT, "
        "Whisper's encoder) for a modality the model has."
      )
    if m not in towers:  # another modality alone: no frames to score
      batch_size = next(iter(towers.values())).pooled.shape[0]
      tokens = jnp.zeros((batch_size, 1, model.tower(m).hidden_size), model.dtype)
      mask = jnp.zeros((batch_size, 1), bool)
    else:
      tokens, mask = towers[m].tokens, towers[m].mask & (towers[m].present[:, None] > 0)
    dense = nn.Dense(
      model.head_config["vocab_size"],
      dtype=model.dtype,
      kernel_init=nn.initializers.zeros,
      name="head",
    )
    return {"logits": dense(tokens).astype(jnp.float32), "frame_mask": mask}

  @classmethod
  def loss(cls, outputs, batch, loss_cfg):
    per_example, feasible = losses.ctc_per_example(
      outputs["logits"],
      outputs["frame_mask"],
      batch["ctc_labels"],
      loss_cfg["blank_id"],
      loss_cfg["ctc_loss_reduction"],
    )
    weights = batch.get("example_weight", jnp.ones(per_example.shape, jnp.float32))
    return losses.weighted_sum(per_example, weights * feasible)

  @classmethod
  def predict_fns(cls, model: Any, mesh: jax.sharding.Mesh) -> dict[str, PredictFn]:
    """And "transcribe" (`beam_size`: 1 greedy, more a prefix beam search; mmtl.ctc):
    decoded label ids `ids` (B, T; -1 after), `frames` (B,) per example, and where the
    batch has `ctc_labels`: them as `references`, the CTC loss per label `loss` and
    `feasible` (B,)."""
    blank = model.head_config["blank_id"]

    def transcribe(variables, batch, beam_size=1):
      out = predict(model, variables, batch)
      logits, mask = out["logits"], out["frame_mask"]
      if beam_size > 1:
        ids = ctc.prefix_beam_search(logits, mask, blank, beam_size)[0]
      else:
        ids = ctc.greedy(logits, mask, blank)
      result = {"ids": ids, "frames": mask.sum(1), "example_weight": out["example_weight"]}
      if "ctc_labels" in batch:
        loss, feasible = losses.ctc_per_example(logits, mask, batch["ctc_labels"], blank, "mean")
        result.update(references=batch["ctc_labels"], loss=loss, feasible=feasible)
      return result

    return {
      **super().predict_fns(model, mesh),
      "transcribe": jax.jit(
        transcribe, static_argnames="beam_size", out_shardings=sharding.replicated(mesh)
      ),
    }


@register("masked_lm")
class MaskedLM(Head):
  """Masked-language modelling of the text tower, BERT's pretraining objective, for
  domain-adaptive continued pretraining (Gururangan et al. 2020): the tower's tokens
  through `BertForMaskedLM`'s `cls.predictions` (mmtl.models.bert.BertLMHead, named
  "head": dense, activation, LayerNorm, then the tower's word embeddings, tied, and a
  bias); cross-entropy on the masked tokens (`mlm_labels`: the original ids where
  config.input.text.mlm_probability masked a token, -100 elsewhere), a mean over them as
  transformers' loss. A BertForMaskedLM checkpoint's head loads with `model_init.head`;
  without one it starts as transformers initializes it. The fused features are computed
  but unused."""

  fields = ("mlm_labels",)
  reads_tokens = True
  predict_names = ("predict", "masked_tokens")

  @classmethod
  def outputs(cls, model: Any, features: jax.Array, towers: Mapping[str, Any]) -> dict:
    del features
    from mmtl.models import bert  # pylint: disable=g-import-not-at-top

    tower = model.towers.get("text")
    if tower is None or not isinstance(getattr(tower, "config", None), bert.BertConfig):
      raise ValueError(
        "The masked_lm head predicts the text tower's tokens with BERT's MLM head: the model "
        "needs a BERT-family text tower (config.model.towers.text)."
      )
    if "text" not in towers:
      raise ValueError("The masked_lm head needs the text in the batch (config.input.fields).")
    table = tower.variables["params"]["embeddings"]["word_embeddings"]["embedding"]
    head = bert.BertLMHead(tower.config, model.dtype, name="head")
    return {"logits": head(towers["text"].tokens, table)}

  @classmethod
  def loss(cls, outputs, batch, loss_cfg):
    del loss_cfg
    return losses.masked_token_loss(outputs["logits"], batch)

  @classmethod
  def predict_fns(cls, model: Any, mesh: jax.sharding.Mesh) -> dict[str, PredictFn]:
    """And "masked_tokens": per example, the loss sum over its masked tokens (`loss_sum`),
    their number (`tokens`) and how many the argmax predicts (`correct`), reduced on device
    so that no full-vocabulary logits leave it."""

    def masked_tokens(variables, batch):
      logits = predict(model, variables, batch)["logits"]
      labels = batch["mlm_labels"]
      masked = (labels >= 0).astype(jnp.float32)
      per_token = losses.softmax_xent_per_example(logits, jnp.maximum(labels, 0))
      hits = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
      return {
        "loss_sum": (per_token * masked).sum(-1),
        "tokens": masked.sum(-1),
        "correct": (hits * masked).sum(-1),
        "example_weight": batch.get("example_weight", jnp.ones(labels.shape[:1], jnp.float32)),
      }

    return {
      **super().predict_fns(model, mesh),
      "masked_tokens": jax.jit(masked_tokens, out_shardings=sharding.replicated(mesh)),
    }
