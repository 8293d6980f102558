"""The trainer end to end on tiny models and the small built-in dataset (8 CPU devices)."""

import json
import os
import signal

import jax
import ml_collections as mlc
import numpy as np
import pytest

from mmtl import (
  checkpoint,
  data,
  distill,
  evaluate,
  metrics,
  rules,
  sharding,
  train,
  train_state,
  train_step,
)
from mmtl import config as config_lib
from mmtl import evaluators as ev
from mmtl.models import fusion

TINY_VIT = dict(
  model_type="vit",
  image_size=16,
  patch_size=8,
  num_channels=3,
  hidden_size=16,
  num_hidden_layers=1,
  num_attention_heads=2,
  intermediate_size=32,
  hidden_dropout_prob=0.0,
  attention_probs_dropout_prob=0.0,
)
# The audio tower: a ViT over the (32 mels, 32 frames, 1) log-mel spectrogram.
TINY_AUDIO_VIT = dict(TINY_VIT, image_size=32, num_channels=1)


def tiny_config(text_dir, data_dir, **overrides):
  """Tiny ViT from scratch + the tiny pretrained BERT fixture, on 32 examples."""
  config = mlc.ConfigDict(
    dict(
      seed=0,
      total_steps=6,
      batch_size=16,
      log_every=1,
      ckpt_every=2,
      input=dict(
        dataset="mmtl_shapes/small",
        data_dir=data_dir,
        split="train[:32]",
        fields=dict(image="image", text="question", label="label"),
        image=dict(size=16),
        text=dict(tokenizer=text_dir, max_length=24),
      ),
      model=dict(
        towers=dict(image=dict(name=TINY_VIT, pool="cls"), text=dict(name=text_dir)),
        fusion="concat",
        num_classes=2,
        width=16,
      ),
      model_init=dict(text_encoder=text_dir),
      optim=dict(name="adam", lr=3e-3, schedule=dict(decay="constant")),
      evals=dict(val=dict(type="classification", input=dict(split="validation[:32]"))),
    )
  )
  for key, value in overrides.items():
    config[key] = value
  return config


def losses(workdir):
  return metrics.read(str(workdir))["train/loss"]


def final_params(workdir):
  ckpts = os.path.join(workdir, "checkpoints")
  return jax.device_get(checkpoint.restore_variables(ckpts)["params"])


@pytest.fixture(scope="module")
def finished_run(tiny_bert_dir, data_dir, tmp_path_factory):
  """(workdir, final metrics) of a complete 24-step run (also the distillation teacher)."""
  workdir = tmp_path_factory.mktemp("finished") / "run"
  config = tiny_config(tiny_bert_dir, data_dir, total_steps=24, ckpt_every=100)
  return workdir, train.train(config, str(workdir))


@pytest.mark.slow
def test_training_decreases_loss_and_writes_outputs(finished_run):
  workdir, final = finished_run
  loss = losses(workdir)
  first, last = np.mean([loss[s] for s in (1, 2, 3)]), np.mean([loss[s] for s in (22, 23, 24)])
  assert last < first - 0.05, loss
  on_disk = json.loads((workdir / "final_metrics.json").read_text())
  assert on_disk == pytest.approx(final) and set(final) >= {"val/accuracy", "val/macro_f1", "step"}
  for name in ("config.json", "metrics.jsonl", "curves.png"):
    assert (workdir / name).exists(), name
  assert os.listdir(workdir / "tb")


@pytest.mark.slow
def test_evaluate_reproduces_final_metrics(finished_run):
  workdir, final = finished_run
  config = mlc.ConfigDict(json.loads((workdir / "config.json").read_text()))
  again = evaluate.evaluate(config, str(workdir))
  assert again["val/accuracy"] == pytest.approx(final["val/accuracy"])
  assert (workdir / "eval_step24.json").exists()


class Preempted(Exception):
  pass


def patch_train_batches(monkeypatch, change):
  """Routes the trainer's input through `change(n, batch)`; n = 1 is its shape probe."""
  real = data.make_train_iterator

  def make(*args, **kwargs):
    it = real(*args, **kwargs)
    calls = {"n": 0}

    class Iterator:
      get_state, set_state = it.get_state, it.set_state

      def __next__(self):
        calls["n"] += 1
        return change(calls["n"], next(it))

    return Iterator()

  monkeypatch.setattr(data, "make_train_iterator", make)
  return real


def killed_at_step_5_then_resumed(config, workdir, monkeypatch):
  """Runs `config` in `workdir` until its input fails during step 5, then runs the same
  command again, which resumes from the checkpoint of step 4."""

  def dies_at_step_5(n, batch):
    # The trainer's shape probe, then batches 1..7: with 2 batches prefetched to the
    # devices, step 5 reads batch 7. The checkpoint of step 4 must resume at batch 5.
    if n == 1 + 7:
      raise Preempted()
    return batch

  real = patch_train_batches(monkeypatch, dies_at_step_5)
  with pytest.raises(Preempted):
    train.train(config, str(workdir))
  assert not (workdir / "final_metrics.json").exists()
  monkeypatch.setattr(data, "make_train_iterator", real)
  train.train(config, str(workdir))


@pytest.fixture(scope="module")
def uninterrupted_run(tiny_bert_dir, data_dir, tmp_path_factory):
  """The workdir of 6 steps without evaluations, run in one go: what a resumed run must equal.
  The tiny BERT has dropout 0.1, so a resume must also restore the dropout RNG stream."""
  workdir = tmp_path_factory.mktemp("uninterrupted") / "run"
  train.train(tiny_config(tiny_bert_dir, data_dir, evals={}), str(workdir))
  return workdir


def assert_same_run(workdir, resumed):
  """`resumed` logged every step once and ended with `workdir`'s params, bit for bit."""
  assert sorted(losses(resumed)) == sorted(losses(workdir))
  expected, got = final_params(workdir), final_params(resumed)
  for (path, a), b in zip(rules.flatten(expected).items(), rules.flatten(got).values()):
    np.testing.assert_array_equal(a, b, err_msg=path)


@pytest.mark.slow
def test_resume_after_interruption_matches_uninterrupted(
  uninterrupted_run, tiny_bert_dir, data_dir, tmp_path, monkeypatch
):
  config = tiny_config(tiny_bert_dir, data_dir, evals={})
  killed_at_step_5_then_resumed(config, tmp_path / "resumed", monkeypatch)

  assert sorted(losses(tmp_path / "resumed")) == list(range(1, 7))
  assert_same_run(uninterrupted_run, tmp_path / "resumed")
  np.testing.assert_array_equal(
    [losses(uninterrupted_run)[s] for s in (5, 6)],
    [losses(tmp_path / "resumed")[s] for s in (5, 6)],
  )


@pytest.mark.slow
def test_a_signal_saves_the_step_in_flight_and_the_same_command_continues(
  uninterrupted_run, tiny_bert_dir, data_dir, tmp_path, monkeypatch, capfd
):
  # No periodic checkpoint before the end: without the signal's save, nothing would be kept.
  config = tiny_config(tiny_bert_dir, data_dir, evals={}, ckpt_every=100)
  workdir = tmp_path / "signalled"

  def sigterm_at_batch_3(n, batch):
    if n == 1 + 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return batch

  real_save = checkpoint.CheckpointManager.save

  def save_signalled_again(self, *args, **kwargs):  # A second signal while the step saves.
    os.kill(os.getpid(), signal.SIGTERM)
    return real_save(self, *args, **kwargs)

  handler = signal.getsignal(signal.SIGTERM)
  real = patch_train_batches(monkeypatch, sigterm_at_batch_3)
  monkeypatch.setattr(checkpoint.CheckpointManager, "save", save_signalled_again)
  with pytest.raises(train.Stopped) as stopped:
    train.train(config, str(workdir))
  assert signal.getsignal(signal.SIGTERM) is handler  # Put back once the loop ends.
  with checkpoint.CheckpointManager(workdir / "checkpoints") as saved:
    (step,) = saved.all_steps()
    assert saved.verify(step)  # Committed and checksummed despite the second signal.
  assert 1 <= step < 6 and sorted(losses(workdir)) == list(range(1, step + 1))
  assert str(stopped.value) == (
    f"SIGTERM after step {step} of 6: saved checkpoint step {step} in "
    f"{workdir / 'checkpoints'}; rerun the same command to continue from it."
  )
  assert not (workdir / "final_metrics.json").exists()
  assert "SIGTERM again: still stopping after saving" in capfd.readouterr().err

  monkeypatch.setattr(data, "make_train_iterator", real)
  monkeypatch.setattr(checkpoint.CheckpointManager, "save", real_save)
  train.train(config, str(workdir))
  assert_same_run(uninterrupted_run, workdir)


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(
  tiny_bert_dir, data_dir, tmp_path, monkeypatch
):
  def nan_from_step_5(n, batch):
    if n >= 1 + 5:
      return dict(batch, pixel_values=np.full_like(batch["pixel_values"], np.nan))
    return batch

  patch_train_batches(monkeypatch, nan_from_step_5)
  workdir = tmp_path / "nan"
  with pytest.raises(
    train.Diverged, match=r"(?s)NaN/Inf by step 5.*last good checkpoint is step 4"
  ):
    train.train(tiny_config(tiny_bert_dir, data_dir, evals={}), str(workdir))
  assert not (workdir / "final_metrics.json").exists()
  with checkpoint.CheckpointManager(workdir / "checkpoints", read_only=True) as m:
    assert m.latest_step() == 4
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(final_params(workdir)))


@pytest.mark.slow
def test_contrastive_run_with_retrieval_zeroshot_and_probe(tiny_bert_dir, data_dir, tmp_path):
  config = tiny_config(
    tiny_bert_dir,
    data_dir,
    total_steps=3,
    ckpt_every=100,
    model=dict(
      towers=dict(image=dict(name=TINY_VIT, pool="cls"), text=dict(name=tiny_bert_dir)),
      fusion="contrastive",
      head="contrastive",
      width=8,
    ),
    optim=dict(name="adam", lr=1e-3, schedule=dict(decay="constant"), frozen=("image_encoder/.*",)),
    evals=dict(
      ret=dict(type="retrieval", input=dict(split="validation[:32]")),
      zs=dict(
        type="zeroshot",
        classnames=("no", "yes"),
        prompts=("{}", "a {}"),
        tokenizer=tiny_bert_dir,
        input=dict(split="validation[:32]"),
      ),
      probe=dict(
        type="linear_probe",
        num_train=32,
        input=dict(split="validation[:32]"),
        train_input=dict(split="train[:32]"),
      ),
    ),
  )
  config.input.fields.text = "caption"
  final = train.train(config, str(tmp_path / "lit"))
  assert {"ret/i2t_recall@1", "ret/t2i_recall@10", "zs/accuracy", "probe/accuracy"} <= set(final)
  assert 0.0 <= final["ret/i2t_recall@1"] <= final["ret/i2t_recall@5"] <= final["ret/i2t_recall@10"]
  assert "image_proj" in final_params(tmp_path / "lit")["head"]


@pytest.mark.slow
def test_distillation_from_a_finished_run(finished_run, tiny_bert_dir, data_dir, tmp_path):
  teacher, _ = finished_run
  student = tiny_config(
    tiny_bert_dir,
    data_dir,
    evals={},
    total_steps=2,
    ckpt_every=100,
    distill=dict(teacher_workdir=str(teacher), temperature=2.0, alpha=1.0),
  )
  train.train(student, str(tmp_path / "student"))
  # alpha=1: the loss is the KD term alone; the student's zero-init head gives uniform
  # predictions, so step 1's loss is the mean over the first batch of T^2 KL(teacher || uniform).
  config = config_lib.with_defaults(student)
  batch = next(data.make_train_iterator(config.input, batch_size=16, seed=config.seed))
  mesh = sharding.make_mesh(config.mesh)
  model, variables = train_state.load_run(str(teacher), mesh)
  teacher_logits = np.asarray(model.apply(variables, batch)["logits"])
  expected = distill.kd_loss_per_example(np.zeros_like(teacher_logits), teacher_logits, 2.0).mean()
  assert expected > 0.01
  assert losses(tmp_path / "student")[1] == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.slow
def test_gradual_unfreezing_changes_trainable_set_at_boundary(tiny_bert_dir, data_dir, tmp_path):
  from mmtl import hf

  config = tiny_config(
    tiny_bert_dir,
    data_dir,
    evals={},
    total_steps=4,
    keep_ckpts=2,
    optim=dict(
      name="adam",
      lr=3e-3,
      schedule=dict(decay="constant"),
      frozen=("text_encoder/.*",),
      unfreeze=((2, ("text_encoder/.*",)),),
    ),
  )
  train.train(config, str(tmp_path / "run"))
  pretrained = hf.load_pretrained(tiny_bert_dir)[1]["params"]
  ckpts = str(tmp_path / "run" / "checkpoints")
  before, after = (
    jax.device_get(checkpoint.restore_variables(ckpts, step=s)["params"]["text_encoder"])
    for s in (2, 4)
  )
  kernel = lambda p: p["encoder"]["layer_0"]["attn"]["query"]["kernel"]
  np.testing.assert_array_equal(kernel(before), kernel(pretrained))  # locked for steps 1-2
  assert not np.allclose(kernel(after), kernel(before))  # trained from step 3 on


@pytest.mark.slow
def test_three_tower_run_trains_the_audio_tower(tiny_bert_dir, data_dir, tmp_path):
  config = tiny_config(
    tiny_bert_dir,
    data_dir,
    total_steps=2,
    ckpt_every=1,
    keep_ckpts=2,
    model=dict(
      towers=dict(
        image=dict(name=TINY_VIT, pool="cls"),
        text=dict(name=tiny_bert_dir),
        audio=dict(name=TINY_AUDIO_VIT, pool="mean"),
      ),
      fusion="concat",
      fusion_layer=-1,
      bottleneck_tokens=2,
      num_classes=2,
      width=16,
    ),
  )
  config.input.fields.audio = "audio"
  final = train.train(config, str(tmp_path / "run"))
  assert {"val/accuracy", "val/loss"} <= set(final)
  assert all(np.isfinite(v) for v in losses(tmp_path / "run").values())
  ckpts = str(tmp_path / "run" / "checkpoints")
  before, after = (
    rules.flatten(jax.device_get(checkpoint.restore_variables(ckpts, step=s)["params"]))
    for s in (1, 2)
  )
  kernel = "audio_encoder/encoder/layer_0/attn/query/kernel"
  assert before[kernel].shape == (16, 16)
  assert before["audio_encoder/embeddings/patch_embeddings/kernel"].shape == (8, 8, 1, 16)
  assert "fusion/proj_audio/kernel" in before
  assert not np.allclose(after[kernel], before[kernel])  # gradients reach the audio tower

  # The token-level fusions with the same three towers (shapes only: no compile).
  batch = {
    "pixel_values": jax.ShapeDtypeStruct((4, 16, 16, 3), np.float32),
    "audio_values": jax.ShapeDtypeStruct((4, 32, 32, 1), np.float32),
    **{
      k: jax.ShapeDtypeStruct((4, 24), np.int32)
      for k in ("input_ids", "attention_mask", "token_type_ids")
    },
  }
  for fusion_type, audio_param in (
    ("bottleneck", "fusion/to_audio/kernel"),
    ("cross_attention", "fusion/cross_audio_0/attn/query/kernel"),
  ):
    model_cfg = config_lib.with_defaults(config).model
    model_cfg.fusion = fusion_type
    model = fusion.build(model_cfg)
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), batch)["params"]
    assert audio_param in rules.flatten(params), fusion_type
    assert jax.eval_shape(model.apply, {"params": params}, batch)["logits"].shape == (4, 2)


@pytest.mark.slow
def test_lora_bf16_run_with_early_stopping(tiny_bert_dir, data_dir, tmp_path):
  """LoRA on the text tower's attention, bf16 compute, early stopping on val/accuracy."""
  from mmtl import hf

  config = tiny_config(
    tiny_bert_dir,
    data_dir,
    total_steps=8,
    ckpt_every=100,
    best_metric="val/accuracy",
    # No evaluation can beat the first by more than 1.0: the 2nd and 3rd count as
    # non-improvements and the run stops at step 3.
    early_stopping=dict(patience=2, min_delta=1.0),
    optim=dict(
      name="adam",
      lr=3e-3,
      schedule=dict(decay="constant"),
      preset="lora",
      lora=dict(targets=["text_encoder/.*/attn/(query|value)/kernel"], rank=2, alpha=4),
    ),
  )
  config.model.dtype = "bfloat16"
  config.evals.val.every = 1
  final = train.train(config, str(tmp_path / "run"))

  assert sorted(losses(tmp_path / "run")) == [1, 2, 3]
  assert all(np.isfinite(v) for v in losses(tmp_path / "run").values())
  # The final metrics are the best checkpoint's (by the metric itself; min_delta only
  # decides when to stop).
  accuracy = metrics.read(str(tmp_path / "run"))["val/accuracy"]
  assert sorted(accuracy) == [1, 2, 3] and final["val/accuracy"] == max(accuracy.values())
  ckpts = str(tmp_path / "run" / "checkpoints")
  with checkpoint.CheckpointManager(ckpts, read_only=True) as m:
    assert m.latest_step() == 3 and final["step"] == m.best_step()
    assert accuracy[m.best_step()] == max(accuracy.values())
  params = rules.flatten(jax.device_get(checkpoint.restore_variables(ckpts, step=3)["params"]))
  pretrained = rules.flatten(hf.load_pretrained(tiny_bert_dir)[1]["params"])
  query = "encoder/layer_0/attn/query"
  # bf16 compute keeps float32 params; LoRA trains only its adapters: the base stays exact.
  assert params[f"text_encoder/{query}/kernel"].dtype == np.float32
  np.testing.assert_array_equal(
    params[f"text_encoder/{query}/kernel"], pretrained[f"{query}/kernel"]
  )
  assert np.abs(params[f"text_encoder/{query}/lora_b"]).max() > 0
  assert "text_encoder/encoder/layer_0/attn/key/lora_b" not in params


def test_a_locked_tower_runs_in_inference_mode(tiny_bert_dir, data_dir):
  """LiT: a fully frozen tower gets no dropout in training (the tiny BERT has dropout
  0.1), unless config.model.frozen_tower_mode="train"."""
  from mmtl import optim

  config = config_lib.with_defaults(
    tiny_config(
      tiny_bert_dir, data_dir, optim=dict(name="adam", lr=1e-3, frozen=["text_encoder/.*"])
    )
  )
  model = fusion.build(config.model)
  batch = next(data.make_train_iterator(config.input, batch_size=4, seed=0))
  params = jax.jit(model.init)(jax.random.PRNGKey(0), batch)["params"]
  mask = optim.freeze_mask(params, config.optim)
  assert train_step.locked_towers(model, mask) == ("text",)
  assert train_step.locked_towers(model, optim.freeze_mask(params, {})) == ()

  def features(mode, seed):
    cfg = mlc.ConfigDict(config.to_dict())
    cfg.model.frozen_tower_mode = mode
    objective = train_step.make_objective(model, cfg, None, mask)
    forward = jax.jit(objective.forward)
    outputs, _ = forward(*optim.split(params, mask), {}, batch, jax.random.PRNGKey(seed), 0)
    return np.asarray(outputs["features"])

  np.testing.assert_array_equal(features("inference", 1), features("inference", 2))
  assert np.abs(features("train", 1) - features("train", 2)).max() > 1e-3
  with pytest.raises(config_lib.ConfigError, match="frozen_tower_mode='eval'"):
    features("eval", 1)


def test_activation_estimate_counts_what_backward_keeps(tiny_bert_dir, data_dir):
  """The memory line's activations: traced residuals of one microbatch. A frozen text
  tower keeps none of its own, and accumulation divides the batch that is kept."""
  from mmtl import optim

  config = config_lib.with_defaults(tiny_config(tiny_bert_dir, data_dir))
  model = fusion.build(config.model)
  batch = next(data.make_train_iterator(config.input, batch_size=16, seed=0))
  shapes = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in batch.items()}
  layout = train_state.param_layout(model, config, sharding.make_mesh(config.mesh))

  def estimate(frozen, accum):
    mask = optim.freeze_mask(layout.shapes, dict(frozen=frozen))
    return train_step.activation_bytes(
      train_step.make_objective(model, config, None, mask), mask, layout, shapes, accum_steps=accum
    )

  full, locked = estimate([], 1), estimate(["text_encoder/.*"], 1)
  # At least one (16, 24, 32) float32 activation per text layer is kept when the tower trains.
  assert full - locked >= 16 * 24 * 32 * 4
  assert 0 < locked < full
  assert estimate([], 4) == pytest.approx(full / 4, rel=0.05)


@pytest.mark.slow
def test_few_shot_and_classification_files_during_training(tiny_bert_dir, small_data_dir, tmp_path):
  """The few_shot evaluator on the fused features of another label of the same split, and
  the classification report files, from a real run."""
  config = tiny_config(tiny_bert_dir, small_data_dir, total_steps=2)
  config.evals.few = dict(
    type="few_shot",
    input=dict(split="validation[:64]", fields=dict(label="question_type")),
    ways=3,
    shots=(1, 2),
    queries=2,
    episodes=10,
  )
  final = train.train(config, str(tmp_path))
  for k in (1, 2):
    assert (
      0.0 <= final[f"few/logistic_{k}shot"] <= 1.0 and final[f"few/prototype_{k}shot_ci95"] >= 0
    )
  report = json.loads((tmp_path / "classification_step2-val.json").read_text())
  assert report["classes"] == ["no", "yes"] and np.sum(report["confusion_matrix"]) == 32
  assert (tmp_path / "reliability_step2-val.png").exists()


@pytest.mark.slow
def test_multilabel_head_trains_on_a_list_of_classes(tiny_bert_dir, small_data_dir, tmp_path):
  config = tiny_config(tiny_bert_dir, small_data_dir, total_steps=8)
  config.input.fields.label = "objects/colour"
  config.model.head = "multilabel"
  config.model.num_classes = 4
  config.evals.val.type = "multilabel"
  final = train.train(config, str(tmp_path))
  assert set(final) == {f"val/{m}" for m in ev.MultiLabel.METRICS} | {"step"}
  assert all(np.isfinite(final[f"val/{m}"]) for m in ev.MultiLabel.METRICS)
  assert losses(tmp_path)[8] < losses(tmp_path)[1]
  with pytest.raises(config_lib.ConfigError, match="needs a 'classification' head"):
    config.evals.val.type = "classification"
    train.train(config, str(tmp_path / "wrong"))
