"""mmtl.domain_adaptation: the target stream, DANN / Deep CORAL / MMD in the train step,
the built-in dataset's target domain, and the trainer end to end."""

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
import pytest

from mmtl import config as config_lib
from mmtl import (
  data,
  domain_adaptation,
  heads,
  losses,
  metrics,
  optim,
  rules,
  train,
  train_step,
)
from mmtl.data import shapes
from mmtl.models import fusion
from tests.test_train import assert_same_run, killed_at_step_5_then_resumed, tiny_config

TARGET = dict(split="validation[:32]")  # the small dataset's other split: the "target domain"


def da_config(text_dir, data_dir, method="dann", **overrides):
  config = tiny_config(text_dir, data_dir, **overrides)
  config.domain_adaptation = dict(method=method, input=TARGET)
  config.model.domain_classifier = 8 if method == "dann" else 0
  config.optim.frozen = ["text_encoder/.*"]  # locked: no dropout, deterministic outputs
  return config


def test_coral_is_the_distance_between_covariances():
  rng = np.random.default_rng(0)
  source = rng.normal(size=(16, 5)).astype(np.float32)
  target = (rng.normal(size=(12, 5)) * [1, 2, 1, 1, 3]).astype(np.float32)
  expected = np.sum((np.cov(source.T) - np.cov(target.T)) ** 2) / (4 * 5 * 5)
  assert float(domain_adaptation.coral(source, target)) == pytest.approx(expected, rel=1e-5)
  assert float(domain_adaptation.coral(source, source)) == pytest.approx(0.0, abs=1e-7)


def test_mmd_is_the_kernel_mean_discrepancy():
  rng = np.random.default_rng(1)
  source = rng.normal(size=(6, 3))
  target = rng.normal(size=(4, 3)) + 1.5
  x = np.concatenate([source, target])
  dist = ((x[:, None] - x[None]) ** 2).sum(-1)
  base = dist.sum() / (10 * 9)
  k = sum(np.exp(-dist / (base * 2.0**j)) for j in (-2, -1, 0, 1, 2))
  expected = k[:6, :6].mean() + k[6:, 6:].mean() - 2 * k[:6, 6:].mean()
  got = domain_adaptation.mmd(jnp.asarray(source), jnp.asarray(target))
  assert float(got) == pytest.approx(expected, rel=1e-4)
  a, b = rng.normal(size=(2, 64, 3))
  same, shifted = domain_adaptation.mmd(a, b), domain_adaptation.mmd(a, b + 1.5)
  assert float(same) < float(shifted) / 4


def test_gradient_reversal_flips_and_scales_the_gradient():
  x, w = jnp.arange(3.0), jnp.array([1.0, -2.0, 0.5])
  value, grad = jax.value_and_grad(lambda x: (fusion.gradient_reversal(x, 0.3) * w).sum())(x)
  assert float(value) == pytest.approx(float((x * w).sum()))
  np.testing.assert_allclose(grad, -0.3 * w, rtol=1e-6)


def test_lambda_follows_ganins_schedule():
  da = domain_adaptation.settings(dict(method="dann", input=TARGET, weight=0.5))
  at = lambda step: float(domain_adaptation.coefficient(step, 100, da))  # noqa: E731
  assert at(0) == 0.0
  assert at(50) == pytest.approx(0.5 * (2 / (1 + np.exp(-5)) - 1), rel=1e-6)
  assert at(100) == pytest.approx(0.5 * (2 / (1 + np.exp(-10)) - 1), rel=1e-6)
  constant = dict(da, schedule="constant")
  assert float(domain_adaptation.coefficient(0, 100, constant)) == 0.5


@pytest.mark.parametrize(
  "change, match",
  [
    (dict(domain_adaptation=dict(method="dan", input=TARGET)), "method='dan'"),
    (dict(domain_adaptation=dict(method="coral")), "input is empty"),
    (dict(domain_adaptation=dict(method="coral", input=TARGET, gama=1.0)), "Did you mean"),
    (dict(domain_adaptation=dict(method="dann", input=TARGET)), "needs config.model.domain_clas"),
    (dict(model=dict(domain_classifier=8)), "only DANN trains a domain classifier"),
    (
      dict(domain_adaptation=dict(method="mmd", input=TARGET), model=dict(domain_classifier=8)),
      "method='mmd' does not use it",
    ),
    (
      dict(domain_adaptation=dict(method="mmd", input=TARGET), model=dict(head="contrastive")),
      "head='contrastive' has none",
    ),
    (
      dict(domain_adaptation=dict(method="mmd", input=TARGET), feature_cache=dict(enable=True)),
      "feature_cache.enable=False",
    ),
  ],
)
def test_settings_it_cannot_run_are_one_line_errors(change, match):
  config = mlc.ConfigDict(change)
  with pytest.raises(config_lib.ConfigError, match=match):
    domain_adaptation.check(config_lib.with_defaults(config))


def test_the_target_domains_images_and_words_are_shifted():
  source = shapes.MmtlShapes.builder_configs["colour"]
  target = shapes.MmtlShapes.builder_configs["colour_shifted"]
  corner = lambda cfg, i: np.asarray(shapes.make_example(cfg, "train", i)["image"])[:2, :2].mean()  # noqa: E731
  assert max(corner(source, i) for i in range(20)) < 130 < min(corner(target, i) for i in range(20))
  novel = [shapes.make_example(target, "train", i)["novel_words"] > 0 for i in range(100)]
  assert 0.3 < np.mean(novel) < 0.9  # held-out wording in its unlabeled training split too
  with pytest.raises(ValueError, match="style='cartoon'"):
    shapes.ShapesConfig(name="x", style="cartoon")


def test_the_target_stream_resumes_and_carries_only_model_inputs(tiny_bert_dir, data_dir):
  config = config_lib.with_defaults(da_config(tiny_bert_dir, data_dir))
  da = domain_adaptation.check(config)

  def paired():
    kw = dict(batch_size=8, seed=0)
    return domain_adaptation.PairedIterator(
      data.make_train_iterator(config.input, **kw),
      data.make_train_iterator(domain_adaptation.target_input(config, da), **kw),
    )

  it = paired()
  for _ in range(5):  # past the end of the 32-example target split's first epoch
    next(it)
  state = it.get_state()
  expected = next(it)
  again = paired()
  again.set_state(state)
  got = next(again)
  assert sorted(got[domain_adaptation.TARGET]) == [
    "attention_mask",
    "image_present",
    "input_ids",
    "pixel_values",
    "text_present",
    "token_type_ids",
  ]
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)
  domain_adaptation.check_batches(got)
  short = {**got, domain_adaptation.TARGET: {"pixel_values": got["pixel_values"][:, :8]}}
  with pytest.raises(config_lib.ConfigError, match="no 'attention_mask'"):
    domain_adaptation.check_batches(short)


@pytest.fixture(scope="module")
def step_problem(tiny_bert_dir, data_dir):
  """A tiny model's params and a batch with target rows, under a DANN config."""
  config = config_lib.with_defaults(da_config(tiny_bert_dir, data_dir))
  model = fusion.build(config.model)
  source = next(data.make_train_iterator(config.input, batch_size=8, seed=0))
  target_cfg = domain_adaptation.target_input(config, domain_adaptation.check(config))
  target = next(data.make_train_iterator(target_cfg, batch_size=8, seed=1))
  batch = {k: v for k, v in source.items() if k in ("labels", "example_weight")}
  batch.update({k: source[k] for k in domain_adaptation.input_fields() if k in source})
  batch[domain_adaptation.TARGET] = {
    k: target[k] for k in domain_adaptation.input_fields() if k in source
  }
  params = jax.jit(model.init)(jax.random.PRNGKey(0), model.dummy_batch())["params"]
  return config, model, params, batch


def objective_grads(config, model, params, batch, step):
  mask = optim.freeze_mask(params, config.optim)
  objective = train_step.make_objective(model, config, None, mask)
  trainable, frozen = optim.split(params, mask)

  def loss(trainable):
    outputs, _ = objective.forward(trainable, frozen, {}, batch, jax.random.PRNGKey(0), step)
    return losses.mean_of(*objective.loss(outputs, batch, None)), outputs

  return jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable), objective


def test_dann_reverses_the_domain_gradient_into_the_features(step_problem):
  """The step's gradient: the task's, plus the domain classifier's own gradient for the
  classifier, and -lambda times it for everything before the reversal layer."""
  config, model, params, batch = step_problem
  step = 3  # of total_steps=6: lambda = 2 / (1 + exp(-10 * 0.5)) - 1
  (value, outputs), grads = objective_grads(config, model, params, batch, step)[0]
  joint, n = domain_adaptation.joint_inputs(batch)
  lam = 2 / (1 + np.exp(-5.0)) - 1
  assert float(outputs["domain_lambda"]) == pytest.approx(lam, rel=1e-6)
  mask = optim.freeze_mask(params, config.optim)

  def parts(trainable):  # task loss on the source rows, domain loss without reversal
    out = model.apply(
      {"params": optim.combine(trainable, optim.split(params, mask)[1])}, joint, domain_grl=-1.0
    )
    task = losses.mean_of(
      *heads.get("classification").loss(domain_adaptation.source_rows(out, n), batch, config.loss)
    )
    return task, domain_adaptation.domain_classifier_loss(out["domain_logits"], n)

  trainable = optim.split(params, mask)[0]
  (task, domain) = parts(trainable)
  assert float(value) == pytest.approx(float(task + domain), rel=1e-5)
  assert outputs["logits"].shape == (8, 2)
  task_grads = jax.grad(lambda p: parts(p)[0])(trainable)
  domain_grads = jax.grad(lambda p: parts(p)[1])(trainable)
  for path, got in rules.flatten(grads).items():
    task_g, domain_g = rules.flatten(task_grads)[path], rules.flatten(domain_grads)[path]
    sign = 1.0 if path.startswith("domain_classifier/") else -lam
    np.testing.assert_allclose(got, task_g + sign * domain_g, rtol=2e-4, atol=1e-6, err_msg=path)
  reaches = [v for p, v in rules.flatten(domain_grads).items() if p.startswith("image_")]
  assert max(float(np.abs(v).max()) for v in reaches) > 1e-6  # the tower learns from it


@pytest.mark.parametrize("method", ["coral", "mmd"])
def test_coral_and_mmd_add_lambda_times_the_feature_distance(step_problem, method):
  config, model, params, batch = step_problem
  config = mlc.ConfigDict(config.to_dict())
  config.domain_adaptation.method, config.model.domain_classifier = method, 0
  config.domain_adaptation.schedule = "constant"
  config.domain_adaptation.weight = 0.7
  model = fusion.build(config.model)
  params = {k: v for k, v in params.items() if k != "domain_classifier"}
  (value, outputs), grads = objective_grads(config, model, params, batch, 3)[0]
  joint, n = domain_adaptation.joint_inputs(batch)
  out = model.apply({"params": params}, joint)
  task = losses.mean_of(
    *heads.get("classification").loss(domain_adaptation.source_rows(out, n), batch, config.loss)
  )
  fs, ft = out["features"][:n], out["features"][n:]
  distance = domain_adaptation.coral(fs, ft) if method == "coral" else domain_adaptation.mmd(fs, ft)
  assert float(distance) > 0
  assert float(outputs["domain_loss"]) == pytest.approx(0.7 * float(distance), rel=1e-4)
  assert float(value) == pytest.approx(float(task + 0.7 * distance), rel=1e-4)


@pytest.fixture(scope="module")
def dann_run(tiny_bert_dir, data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("dann") / "run"
  config = da_config(tiny_bert_dir, data_dir, evals={})
  train.train(config, str(workdir))
  return workdir


@pytest.mark.slow
def test_a_dann_run_logs_its_domain_loss_and_resumes_both_streams_exactly(
  dann_run, tiny_bert_dir, data_dir, tmp_path, monkeypatch
):
  logged = metrics.read(str(dann_run))
  lam = logged["train/domain_lambda"]
  assert lam[1] == 0.0 and lam[1] < lam[3] < lam[6] < 1.0
  assert all(0.3 < v < 1.5 for v in logged["train/domain_loss"].values())
  config = da_config(tiny_bert_dir, data_dir, evals={})
  killed_at_step_5_then_resumed(config, tmp_path / "resumed", monkeypatch)
  assert_same_run(dann_run, tmp_path / "resumed")


def test_accumulation_splits_source_and_target_rows_alike(step_problem):
  """DANN's terms are means over rows, so 2 microbatches (each with half the source and
  half the target rows) make the full batch's step."""
  config, model, params, batch = step_problem
  mask = optim.freeze_mask(params, config.optim)
  objective = train_step.make_objective(model, config, None, mask)
  tx = optax.sgd(0.5)

  def step(accum):
    fn = train_step.make_train_step(objective, tx, mask, lambda s: 0.5, seed=0, accum_steps=accum)
    state = {"step": jnp.int32(3), "params": params, "opt_state": tx.init(params)}
    new, measured = jax.jit(fn)(state, batch, None)
    return rules.flatten(new["params"]), measured

  (full, m1), (split, m2) = step(1), step(2)
  for key in ("train/loss", "train/domain_loss", "train/domain_lambda"):
    assert float(m2[key]) == pytest.approx(float(m1[key]), rel=1e-5), key
  for path, value in full.items():
    np.testing.assert_allclose(split[path], value, rtol=1e-4, atol=1e-6, err_msg=path)
  assert not np.allclose(
    full["domain_classifier/Dense_0/kernel"],
    rules.flatten(params)["domain_classifier/Dense_0/kernel"],
  )
