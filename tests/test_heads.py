"""Heads are components: a head registered from outside mmtl trains and evaluates.

`OneVsRest` (independent sigmoids, trained one-vs-rest: a multi-label head) and its
evaluator live in this test module; no mmtl file names them.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmtl import evaluators, heads, losses, train
from mmtl.models import fusion
from tests.test_train import losses as train_losses
from tests.test_train import tiny_config


class OneVsRest(heads.Head):
  """`num_classes` sigmoid scores; binary cross-entropy against the one-hot label, its
  positive terms weighted by `config.loss.positive_weight` (a key of this head's own)."""

  config = dict(num_classes=2)  # shared with the classification head, same default
  loss_config = dict(positive_weight=1.0)

  @classmethod
  def outputs(cls, model, features, towers):
    dense = nn.Dense(
      model.head_config["num_classes"], kernel_init=nn.initializers.zeros, name="head"
    )
    scores = dense(features)
    return {"scores": scores.astype(jnp.float32)}

  @classmethod
  def loss(cls, outputs, batch, loss_cfg):
    targets = jax.nn.one_hot(batch["labels"], outputs["scores"].shape[-1])
    terms = optax.sigmoid_binary_cross_entropy(outputs["scores"], targets)
    per_example = (terms * jnp.where(targets > 0, loss_cfg["positive_weight"], 1.0)).sum(-1)
    return losses.weighted_sum(per_example, batch.get("example_weight"))


class OneVsRestAccuracy(evaluators.Evaluator):
  HEAD = "one_vs_rest"
  METRICS = ("accuracy", "loss")

  def compute(self, variables, predict):
    out = evaluators.collect(predict, self.batches(), ["scores", "labels"])
    loss, weight = OneVsRest.loss(out, {"labels": out["labels"]}, OneVsRest.loss_config)
    accuracy = (out["scores"].argmax(-1) == out["labels"]).mean()
    return {"accuracy": float(accuracy), "loss": float(loss / weight)}


@pytest.fixture
def one_vs_rest(monkeypatch):
  monkeypatch.setitem(evaluators.EVALUATORS, "one_vs_rest", OneVsRestAccuracy)
  yield heads.register("one_vs_rest")(OneVsRest)
  del heads.HEADS["one_vs_rest"]


@pytest.mark.slow
def test_a_head_registered_outside_mmtl_trains_and_evaluates(
  one_vs_rest, tiny_bert_dir, data_dir, tmp_path
):
  config = tiny_config(tiny_bert_dir, data_dir, total_steps=4, ckpt_every=4)
  config.model.head = "one_vs_rest"
  config.loss = dict(positive_weight=2.0)
  config.evals.val.type = "one_vs_rest"
  final = train.train(config, str(tmp_path / "run"))
  assert set(final) >= {"val/accuracy", "val/loss"}
  # Trained by its own loss with its own key: the BCE of 2 classes from a zero-initialized
  # head, the positive term weighted 2, starts at 3 ln 2 (the classification head's
  # cross-entropy would be ln 2, this loss unweighted 2 ln 2).
  by_step = train_losses(tmp_path / "run")
  assert sorted(by_step) == [1, 2, 3, 4] and np.isfinite(list(by_step.values())).all()
  assert by_step[1] == pytest.approx(3 * np.log(2), abs=1e-4)


def test_a_head_declares_its_config_keys(one_vs_rest, tiny_bert_dir, data_dir):
  config = tiny_config(tiny_bert_dir, data_dir)
  config.model.head = "one_vs_rest"
  filled = train.config_lib.with_defaults(config)
  assert filled.loss.positive_weight == 1.0 and filled.model.num_classes == 2
  config.loss = dict(positive_weight="2")
  with pytest.raises(
    train.config_lib.ConfigError, match=r"config\.loss\.positive_weight='2' is a string"
  ):
    train.config_lib.with_defaults(config)
  model = fusion.build(filled.model)
  assert model.head_config == {"num_classes": 2}
  with pytest.raises(ValueError, match=r"head_config has \['width'\], which the 'one_vs_rest'"):
    model.clone(head_config=dict(width=3))

  class Clashing(OneVsRest):
    config = dict(num_classes=3)

  with pytest.raises(ValueError, match=r"declares \['num_classes'\] .* other defaults"):
    heads.register("clashing")(Clashing)


def test_a_head_without_its_batch_fields_is_a_config_error(tiny_bert_dir, data_dir, tmp_path):
  config = tiny_config(tiny_bert_dir, data_dir)
  config.input.fields.label = None
  with pytest.raises(
    train.config_lib.ConfigError,
    match=r"config.model.head='classification' learns from the batch field\(s\) \['labels'\]",
  ):
    train.train(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "config.json").exists()


def test_unknown_head_names_the_registered_ones():
  with pytest.raises(ValueError, match=r"Unknown head 'clasification'; registered heads: \["):
    heads.get("clasification")
  with pytest.raises(ValueError, match="registered already"):
    heads.register("classification")(OneVsRest)


class TokenTagging(heads.Head):
  """Per-token scores over the text tower's tokens (not the fused features), as a CTC head
  reads an audio tower's frames; trained where the text is real."""

  config = dict(num_classes=2)
  fields = ("token_labels",)

  @classmethod
  def outputs(cls, model, features, towers):
    text = towers["text"]
    scores = nn.Dense(model.head_config["num_classes"], name="head")(text.tokens)
    return {"token_logits": scores.astype(jnp.float32), "token_mask": text.mask}

  @classmethod
  def loss(cls, outputs, batch, loss_cfg):
    per_token = optax.softmax_cross_entropy_with_integer_labels(
      outputs["token_logits"], batch["token_labels"]
    )
    mask = outputs["token_mask"].astype(jnp.float32)
    return (per_token * mask).sum(), mask.sum()


def test_a_head_reads_the_towers_tokens(monkeypatch, tiny_bert_dir, data_dir):
  monkeypatch.setitem(heads.HEADS, "token_tagging", TokenTagging)
  config = tiny_config(tiny_bert_dir, data_dir)
  config.model.head = "token_tagging"
  model = fusion.build(train.config_lib.with_defaults(config).model)
  batch = dict(
    model.dummy_batch(),
    input_ids=np.array([[2, 7, 9, 0]], np.int32),
    attention_mask=np.array([[1, 1, 1, 0]], np.int32),  # 3 real tokens, 1 of padding
    token_type_ids=np.zeros((1, 4), np.int32),
  )
  params = jax.jit(model.init)(jax.random.key(0), batch)["params"]
  assert params["head"]["kernel"].shape == (model.tower("text").hidden_size, 2)
  out = jax.jit(model.apply)({"params": params}, batch)
  assert out["token_logits"].shape == (1, 4, 2)
  loss, weight = TokenTagging.loss(out, {"token_labels": np.zeros((1, 4), np.int32)}, {})
  assert float(weight) == 3.0 and np.isfinite(float(loss))
