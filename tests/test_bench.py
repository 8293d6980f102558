"""mmtl.bench at tiny size on CPU: report structure and FLOP accounting (no timing assertions)."""

import copy
import json
import math

import jax
from jax.extend import core as jax_core
import numpy as np
import pytest

from mmtl import bench, bench_generation, hf, sharding


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
  """One in-process tiny run: mmtl full + locked and both torch peers (aot_eager: inductor's
  C++ build takes minutes on CPU), fed from host numpy batches through the device prefetch.
  cuDNN attention is asked for: CPU has none, so each mmtl run falls back to XLA's.
  fused is covered by test_fused_flops_match_xla."""
  out = tmp_path_factory.mktemp("bench")
  report = bench.main(
    [
      "--tiny",
      "--out",
      str(out),
      "--variants",
      "full,locked",
      "--compile_backend",
      "aot_eager",
      "--noisolate",
      "--xla_flags",
      "none",
      "--attention",
      "cudnn",
      "--input",
      "host",
      "--warmup",
      "1",
      "--steps",
      "1",
      "--repeats",
      "2",
    ]
  )
  return out, report


@pytest.mark.slow
def test_report_files_and_rows(tiny_report):
  out, report = tiny_report
  assert json.loads((out / "bench.json").read_text()) == json.loads(json.dumps(report))
  runs = {r["name"]: r for r in report["runs"]}
  assert list(runs) == [
    "mmtl/full",
    "mmtl/locked",
    "mmtl/image_forward",
    "torch_eager/full",
    "torch_compile/full",
    "torch_eager/locked",
    "torch_compile/locked",
  ]
  assert report["matmul"]["tflops"] > 0
  for row in runs.values():
    assert "error" not in row, row.get("error")
    assert row["pairs_per_s"] == pytest.approx(8 / row["step_s"])
    assert len(row["step_s_all"]) == 2
    assert row["tflops"] == pytest.approx(row["analytic_flops"] / row["step_s"] / 1e12)
    assert row["mfu"] == pytest.approx(row["tflops"] / report["matmul"]["tflops"])
  for name in ("mmtl/full", "mmtl/locked", "torch_eager/full", "torch_compile/locked"):
    assert np.isfinite(runs[name]["final_loss"])
  for variant in ("full", "locked"):
    assert runs[f"mmtl/{variant}"]["vs_torch_compile"] == pytest.approx(
      runs[f"mmtl/{variant}"]["pairs_per_s"] / runs[f"torch_compile/{variant}"]["pairs_per_s"]
    )
  # The inference-only image tower is the forward part of the locked step.
  flops = report["meta"]["flops_per_step"]["locked"]
  assert runs["mmtl/image_forward"]["analytic_flops"] == flops["forward_image"]
  for name in ("mmtl/full", "mmtl/locked", "mmtl/image_forward"):
    assert runs[name]["attention"] == "xla" and "cuDNN" in runs[name]["cudnn_error"]
  table = (out / "bench.md").read_text()
  assert "| mmtl/locked (attention=xla) (cuDNN attention failed" in table
  assert "| torch_compile/full |" in table
  assert table.count("\n|") == 2 + len(runs)  # header, separator, one line per run


@pytest.mark.slow
def test_frozen_tower_is_cheaper(tiny_report):
  _, report = tiny_report
  runs = {r["name"]: r for r in report["runs"]}
  full, locked = runs["mmtl/full"], runs["mmtl/locked"]
  for row in (full, locked):  # XLA's count also has norms, softmax and the optimizer.
    assert row["xla_flops_over_analytic"] == pytest.approx(row["xla_flops"] / row["analytic_flops"])
    assert row["xla_flops"] > row["analytic_flops"]
  assert locked["xla_flops"] < full["xla_flops"]
  assert locked["analytic_flops"] < full["analytic_flops"]
  # Same model, same batch: the memory XLA plans for the locked step (no image-tower
  # activations kept, no image-tower Adam moments) is smaller.
  assert locked["xla_memory_bytes"] < full["xla_memory_bytes"]


def _step_and_shapes(preset, variant, batch):
  config = bench.trainer_config(preset, variant, batch=batch, attention=None)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  example = bench.synthetic_batch(preset, batch)
  step, _, state_shapes = bench.build_mmtl_step(config, mesh)
  batch_shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in example.items()}
  return step, (state_shapes, batch_shapes, None)


def _lowered_step(preset, variant, batch):
  step, args = _step_and_shapes(preset, variant, batch)
  return step.lower(*args)


def traced_matmul_flops(fn, *args) -> int:
  """2 x multiply-adds of every dot_general and convolution `fn` runs (scans and
  nested jaxprs included): what the analytic formula counts, read off the program."""

  def count(jaxpr):
    total = 0
    for eqn in jaxpr.eqns:
      out = eqn.outvars[0].aval.shape if eqn.outvars else ()
      if eqn.primitive.name == "dot_general":
        (contracting, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        total += 2 * math.prod(out) * math.prod(lhs[i] for i in contracting)
      elif eqn.primitive.name == "conv_general_dilated":
        rhs = eqn.invars[1].aval.shape
        total += (
          2 * math.prod(out) * math.prod(rhs) // rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
        )
      for sub in jax_core.jaxprs_in_params(eqn.params):
        total += count(sub)
    return total

  return count(jax.make_jaxpr(fn)(*args).jaxpr)


@pytest.mark.parametrize("variant", ["full", "locked", "fused"])
def test_analytic_flops_are_the_programs_matmuls(variant):
  """`train_flops` equals the matmul FLOPs of the traced step, exactly, less the input
  gradients autodiff never computes: the pixels' (patch embedding) when the image tower
  trains, the frozen image features' (the head's image projection) when it is locked."""
  c = bench.PRESETS["tiny"]
  v = c["vision_config"]
  patch_in = v["patch_size"] ** 2 * 3
  pixels_grad = 8 * 2 * (bench.image_tokens(c) - 1) * patch_in * v["hidden_size"]
  image_features_grad = 8 * 2 * v["hidden_size"] * c["projection_dim"]
  not_computed = {"full": pixels_grad, "fused": pixels_grad, "locked": image_features_grad}
  step, args = _step_and_shapes("tiny", variant, 8)
  analytic = bench.train_flops("tiny", variant, 8)
  assert traced_matmul_flops(step, *args) == analytic["train_step"] - not_computed[variant]
  module = hf.build_module(c, tower="vision")
  forward = lambda v, x: module.apply(v, x)["pooler_output"]  # noqa: E731
  pixels = jax.ShapeDtypeStruct((8, v["image_size"], v["image_size"], 3), np.float32)
  assert (
    traced_matmul_flops(forward, hf.variable_shapes(module), pixels) == analytic["forward_image"]
  )


def test_frozen_tower_keeps_no_activations(monkeypatch):
  """XLA's planned temporary memory per extra image layer: a trained layer keeps its
  activations for backward; a frozen one (locked) frees them as in inference, so
  deepening the frozen tower costs next to nothing."""

  def temp_bytes(variant, depth):
    preset = copy.deepcopy(bench.PRESETS["tiny"])
    preset["vision_config"]["num_hidden_layers"] = depth
    monkeypatch.setitem(bench.PRESETS, "deep", preset)
    return _lowered_step("deep", variant, 16).compile().memory_analysis().temp_size_in_bytes

  per_layer = {v: (temp_bytes(v, 3) - temp_bytes(v, 1)) / 2 for v in ("full", "locked")}
  # One (16, 17, 32) float32 activation is 34.8 kB: a trained layer keeps about 20 of them,
  # a frozen one about 2 (XLA's CPU buffer reuse).
  assert per_layer["full"] > 10 * 34_816, per_layer
  assert per_layer["locked"] < 0.15 * per_layer["full"], per_layer


def test_flops_formula():
  # One layer, D=4, M=8, T=3: 2*T*(4D^2 + 2DM) + 4*T^2*D.
  assert bench.encoder_flops(4, 8, 1, 3) == 2 * 3 * (64 + 64) + 4 * 9 * 4
  flops = bench.train_flops("clip_b16", "full", 256)
  # ViT-B/16 at 224px is 17.6 GMACs (DeiT/timm tables) = 35.2 GFLOPs forward per image.
  assert flops["forward_image"] / 256 == pytest.approx(35.2e9, rel=0.03)
  locked = bench.train_flops("clip_b16", "locked", 256)
  assert locked["train_step"] == pytest.approx(flops["train_step"] - 2 * flops["forward_image"])


def test_synthetic_batch_captions_end_with_eos():
  batch = bench.synthetic_batch("tiny", 6)
  lengths = batch["attention_mask"].sum(1)
  eos = bench.PRESETS["tiny"]["text_config"]["eos_token_id"]
  assert (batch["input_ids"][np.arange(6), lengths - 1] == eos).all()
  assert (batch["input_ids"] == eos).sum() == 6
  assert batch["pixel_values"].shape == (6, 32, 32, 3)


@pytest.mark.slow
def test_isolated_worker_and_xla_flags(tmp_path):
  kept, dropped = bench.supported_xla_flags(
    (*bench.XLA_FLAGS["recommended"], "--xla_no_such_flag_mmtl=1")
  )
  assert kept == list(bench.XLA_FLAGS["recommended"])
  assert dropped == ["--xla_no_such_flag_mmtl=1"]
  # Only the matmul ceiling, in its own worker process.
  report = bench.main(
    ["--tiny", "--out", str(tmp_path), "--variants", "", "--torch", "none", "--xla_flags", "none"]
  )
  assert report["runs"] == [] and report["matmul"]["n"] == 256 and report["matmul"]["tflops"] > 0


def test_bad_variant_is_a_clear_error():
  with pytest.raises(SystemExit):
    bench.parse_args(["--variants", "full,lockd"])
  with pytest.raises(ValueError, match="variant='lockd'"):
    bench.trainer_config("tiny", "lockd", batch=8, attention=None)


@pytest.mark.slow
def test_generation_preset_measures_both_frameworks_on_the_same_weights(tmp_path):
  """`--preset tiny_generation`: every cell of the grid has both frameworks' tokens/s,
  mmtl's compile time, and mmtl's tokens equal to transformers' (greedy and beam)."""
  report = bench.main(["--preset", "tiny_generation", "--out", str(tmp_path), "--repeats", "1"])
  assert json.loads((tmp_path / "bench.json").read_text()) == json.loads(json.dumps(report))
  preset = bench_generation.PRESETS["tiny_generation"]
  cells = len(preset["models"]) * len(preset["searches"]) * len(preset["batches"])
  assert len(report["runs"]) == cells * len(preset["new_tokens"])
  for run in report["runs"]:
    assert run["same_tokens"], run["name"]
    assert run["mmtl_tokens_per_s"] > 0 and run["torch_tokens_per_s"] > 0
    assert run["speedup"] == pytest.approx(run["torch_s"] / run["mmtl_s"])
    assert run["mmtl_tokens_per_s"] == pytest.approx(
      run["batch"] * run["new_tokens"] / run["mmtl_s"]
    )
  table = (tmp_path / "bench.md").read_text()
  assert "| vit_gpt2 | beam 2 | 2 | 4 |" in table and "transformers 5." in table


@pytest.mark.slow
def test_log_mel_preset_measures_front_ends_and_towers(tmp_path):
  """`--preset tiny_log_mel`: each front end's clips/s on one and two threads, the
  transformers extractor's on the same clips (equal features), and the tower's step."""
  report = bench.main(["--preset", "tiny_log_mel", "--out", str(tmp_path), "--repeats", "1"])
  assert json.loads((tmp_path / "bench.json").read_text()) == json.loads(json.dumps(report))
  assert [r["name"] for r in report["runs"]] == ["whisper_tiny", "ast_tiny"]
  for run in report["runs"]:
    assert run["max_abs_diff"] < 1e-4, run["name"]
    assert min(run["mmtl_clips_per_s"], run["transformers_clips_per_s"]) > 0
    assert run["tower"]["tower_clips_per_s"] == pytest.approx(2 / run["tower"]["step_s"])
  table = (tmp_path / "bench.md").read_text()
  assert "| whisper_tiny | 13 | 0.5 | 50 |" in table and "| ast_tiny | 16 | 0.5 | 50 |" in table


def test_locked_variants_store_the_locked_tower_in_low_precision():
  """locked_bf16 / locked_int8: the locked variant with config.optim.frozen_dtype set; the
  image tower's params take a half / about a quarter of the locked variant's bytes."""
  from mmtl import memory, rules, sharding, train_state  # pylint: disable=g-import-not-at-top
  from mmtl.models import fusion  # pylint: disable=g-import-not-at-top

  image_bytes = {}
  for variant in ("locked", "locked_bf16", "locked_int8"):
    config = bench.trainer_config("tiny", variant, batch=2, attention=None)
    assert config.optim.frozen == ["image_encoder/.*"]
    assert config.optim.frozen_dtype == bench.LOCKED_DTYPES[variant]
    model = fusion.build(config.model)
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    flat = rules.flatten(train_state.param_layout(model, config, mesh).shapes)
    image_bytes[variant] = sum(memory.nbytes(x) for p, x in flat.items() if p.startswith("image_"))
  assert image_bytes["locked_bf16"] == image_bytes["locked"] / 2
  assert 0.25 < image_bytes["locked_int8"] / image_bytes["locked"] < 0.35
