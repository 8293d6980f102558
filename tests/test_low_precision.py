"""Frozen params stored in bfloat16 or int8 (mmtl.low_precision) through the trainer."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix

from mmtl import config as config_lib
from mmtl import (
  data,
  distill,
  heads,
  lora,
  low_precision,
  memory,
  metrics,
  optim,
  rules,
  sharding,
  train,
  train_state,
)
from mmtl.models import fusion
from tests.test_train import final_params, tiny_config


def test_store_and_read_back_through_qwix():
  rng = np.random.default_rng(0)
  params = {
    "enc": {
      "attn": {
        "kernel": rng.normal(size=(6, 5)).astype(np.float32),
        "bias": np.ones(5, np.float32),
      },
      "embeddings": {"embedding": rng.normal(size=(7, 3)).astype(np.float32)},
    },
    "head": {"kernel": rng.normal(size=(5, 2)).astype(np.float32)},
  }
  frozen = {p: p.startswith("enc/") for p in rules.flatten(params)}
  stored = rules.flatten(jax.jit(lambda p: low_precision.store(p, frozen, "int8"))(params))
  assert {p: (x.dtype.name, x.shape) for p, x in stored.items()} == {
    "enc/attn/bias": ("bfloat16", (5,)),
    "enc/attn/kernel": ("int8", (6, 5)),
    "enc/attn/kernel_qscale": ("float32", (1, 5)),  # per output channel
    "enc/embeddings/embedding": ("int8", (7, 3)),
    "enc/embeddings/embedding_qscale": ("float32", (7, 1)),  # per row
    "head/kernel": ("float32", (5, 2)),  # trains: as it was
  }
  back = rules.flatten(low_precision.model_params(rules.unflatten(stored)))
  assert set(back) == set(rules.flatten(params))
  kernel = params["enc"]["attn"]["kernel"]
  expected = qwix.dequantize(qwix.quantize(kernel, jnp.int8, channelwise_axes=(1,)))
  np.testing.assert_array_equal(back["enc/attn/kernel"], expected)
  assert np.all(np.abs(back["enc/attn/kernel"] - kernel) <= np.abs(kernel).max(0) / 127 / 2 + 1e-7)
  np.testing.assert_array_equal(back["head/kernel"], params["head"]["kernel"])
  bf16 = rules.flatten(low_precision.store(params, frozen, "bfloat16"))
  assert (
    bf16["enc/embeddings/embedding"].dtype == jnp.bfloat16 and "enc/attn/kernel_qscale" not in bf16
  )
  # The scales never train, whatever the rules say.
  mask = rules.flatten(optim.freeze_mask(rules.unflatten(stored), dict(lr=1.0, trainable=[".*"])))
  assert mask["enc/attn/kernel_qscale"] and not mask["enc/attn/kernel"]
  with pytest.raises(config_lib.ConfigError, match=r"frozen_dtype='fp8': use one of"):
    low_precision.store(params, frozen, "fp8")


def test_lora_on_a_bfloat16_base_merges_in_float32():
  kernel = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.bfloat16)
  a, b = jnp.full((4, 1), 1e-3), jnp.full((1, 3), 1e-3)
  merged = lora.merge({"x": {"kernel": kernel, "lora_a": a, "lora_b": b, "lora_scale": 1.0}})
  assert merged["x"]["kernel"].dtype == jnp.float32
  np.testing.assert_allclose(merged["x"]["kernel"], kernel.astype(jnp.float32) + 1e-6, rtol=1e-6)


def layout_of(config):
  config = config_lib.with_defaults(config)
  model = fusion.build(config.model)
  return train_state.param_layout(model, config, sharding.make_mesh(config.mesh))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_a_locked_tower_in_low_precision_trains_like_the_float32_one(
  dtype, tiny_bert_dir, data_dir, tmp_path, float32_lit_run
):
  """LiT with the pretrained text tower stored in `dtype`: the text tower's params are
  `dtype` in the layout, the checkpoint and the restored run, at a half (a quarter plus
  scales) of the bytes; everything that trains stays float32; the losses and validation
  metrics follow the float32 run closely."""
  config = tiny_config(tiny_bert_dir, data_dir, total_steps=3)
  config.optim.update(frozen=["text_encoder/.*"], frozen_dtype=dtype)
  reference_config, reference_dir = float32_lit_run
  layout, reference = layout_of(config), layout_of(reference_config)
  text = lambda lay: {
    p: x for p, x in rules.flatten(lay.shapes).items() if p.startswith("text_encoder/")
  }  # noqa: E731
  kinds = {x.dtype.name for x in text(layout).values()}
  assert kinds == ({"bfloat16"} if dtype == "bfloat16" else {"int8", "bfloat16", "float32"})
  ratio = sum(map(memory.nbytes, text(layout).values())) / sum(
    map(memory.nbytes, text(reference).values())
  )
  assert ratio == pytest.approx(0.5) if dtype == "bfloat16" else 0.25 < ratio < 0.4
  others = {
    p: x.dtype for p, x in rules.flatten(layout.shapes).items() if not p.startswith("text_encoder/")
  }
  assert set(others.values()) == {np.dtype("float32")}

  final = train.train(config, str(tmp_path / dtype))
  saved = rules.flatten(final_params(tmp_path / dtype))
  assert {p: x.dtype for p, x in saved.items()} == {
    p: x.dtype for p, x in rules.flatten(layout.shapes).items()
  }
  _, restored = train_state.load_run(
    str(tmp_path / dtype), sharding.make_mesh(config_lib.with_defaults(config).mesh)
  )
  assert (
    restored["params"]["text_encoder"]["encoder"]["layer_0"]["attn"]["query"]["kernel"].dtype
    == dtype
  )
  expected = json.loads((reference_dir / "final_metrics.json").read_text())
  assert final["val/loss"] == pytest.approx(
    expected["val/loss"], abs=0.02 if dtype == "int8" else 0.01
  )


@pytest.fixture(scope="module")
def float32_lit_run(tiny_bert_dir, data_dir, tmp_path_factory):
  config = tiny_config(tiny_bert_dir, data_dir, total_steps=3)
  config.optim.frozen = ["text_encoder/.*"]
  workdir = tmp_path_factory.mktemp("float32") / "run"
  train.train(config, str(workdir))
  return config, workdir


@pytest.mark.slow
def test_a_teacher_with_an_int8_tower_distills_what_it_computes(tiny_bert_dir, data_dir, tmp_path):
  """The distillation teacher's stored int8 params are read back (heads.merged) before it
  runs: the student's first KD loss is the one of the teacher's dequantized model."""
  teacher = tiny_config(tiny_bert_dir, data_dir, total_steps=2, evals={})
  teacher.optim.update(frozen=["text_encoder/.*"], frozen_dtype="int8")
  train.train(teacher, str(tmp_path / "teacher"))
  student = tiny_config(
    tiny_bert_dir,
    data_dir,
    evals={},
    total_steps=1,
    distill=dict(teacher_workdir=str(tmp_path / "teacher"), temperature=2.0, alpha=1.0),
  )
  train.train(student, str(tmp_path / "student"))
  config = config_lib.with_defaults(student)
  batch = next(data.make_train_iterator(config.input, batch_size=16, seed=config.seed))
  model, variables = train_state.load_run(
    str(tmp_path / "teacher"), sharding.make_mesh(config.mesh)
  )
  logits = np.asarray(model.apply(heads.merged(variables), batch)["logits"])
  expected = distill.kd_loss_per_example(np.zeros_like(logits), logits, 2.0).mean()
  assert metrics.read(str(tmp_path / "student"))["train/loss"][1] == pytest.approx(
    float(expected), rel=1e-5
  )
