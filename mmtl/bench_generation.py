"""Generation benchmark: `mmtl.generate.generate` vs transformers' `generate()`, same weights.

  python -m mmtl.bench --preset gpt2_generation --out bench_gen   # docs/generation.md's table
  python -m mmtl.bench --preset tiny_generation --out /tmp/gen    # CPU, tiny sizes, seconds

One process, both frameworks on the CPU (or the first local device for JAX). A random
transformers model is saved and loaded into mmtl, so both decode with the same weights;
every cell of the grid (model x search x batch x new tokens) measures:
  mmtl   the first call (compilation + one run: `compile_s`), then the median of
         `repeats` calls, each blocked on its result;
  torch  transformers' `generate()` (PyTorch, its KV cache, `torch.no_grad`), one
         untimed call, then the median of `repeats` calls;
and reports generated tokens/s (batch x new tokens / time; beams are not counted as
tokens), mmtl / transformers, and whether both produced the same tokens. No EOS is
set, so every row decodes exactly `new_tokens` steps in both.
"""

from __future__ import annotations

from collections.abc import Mapping
import itertools
import statistics
import tempfile
import time
from typing import Any

import numpy as np

# GPT-2 small (124M) and ViT-B/16 at 224px; the tiny sizes are for the tests.
_GPT2_SMALL = dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024)
_VIT_B16 = dict(
  hidden_size=768,
  num_hidden_layers=12,
  num_attention_heads=12,
  intermediate_size=3072,
  image_size=224,
  patch_size=16,
)
PRESETS: dict[str, dict[str, Any]] = {
  "gpt2_generation": dict(
    gpt2=_GPT2_SMALL,
    vit=_VIT_B16,
    models=("gpt2", "vit_gpt2"),
    searches=(1, 4),  # num_beams: greedy, beam 4
    batches=(1, 8),
    new_tokens=(32, 128),
    prompt_length=8,
  ),
  "tiny_generation": dict(
    gpt2=dict(n_embd=32, n_layer=2, n_head=2, vocab_size=97, n_positions=64),
    vit=dict(
      hidden_size=32,
      num_hidden_layers=1,
      num_attention_heads=2,
      intermediate_size=64,
      image_size=32,
      patch_size=8,
    ),
    models=("gpt2", "vit_gpt2"),
    searches=(1, 2),
    batches=(1, 2),
    new_tokens=(4,),
    prompt_length=3,
  ),
}
PAD, START = 0, 1


def save_models(preset: Mapping[str, Any], folder: str) -> dict[str, Any]:
  """{model name: torch model} of the preset, random, each saved to `folder/<name>`."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  ids = dict(bos_token_id=START, eos_token_id=None, pad_token_id=PAD)
  models = {}
  if "gpt2" in preset["models"]:
    models["gpt2"] = transformers.GPT2LMHeadModel(transformers.GPT2Config(**preset["gpt2"], **ids))
  if "vit_gpt2" in preset["models"]:
    decoder = transformers.GPT2Config(
      **preset["gpt2"], **ids, add_cross_attention=True, is_decoder=True
    )
    config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(
      transformers.ViTConfig(**preset["vit"]), decoder
    )
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = START, PAD, None
    models["vit_gpt2"] = transformers.VisionEncoderDecoderModel(config)
  for name, model in models.items():
    model.eval().save_pretrained(f"{folder}/{name}")
  return models


def inputs_for(model: str, preset: Mapping[str, Any], batch: int) -> dict[str, np.ndarray]:
  """A prompt of `prompt_length` tokens (no padding) for GPT-2; NHWC images for ViT + GPT-2."""
  rng = np.random.default_rng(0)
  if model == "gpt2":
    ids = rng.integers(2, preset["gpt2"]["vocab_size"], (batch, preset["prompt_length"]))
    return dict(input_ids=ids, attention_mask=np.ones_like(ids))
  size = preset["vit"]["image_size"]
  return dict(pixel_values=rng.normal(size=(batch, size, size, 3)).astype(np.float32))


def median_time(fn: Any, repeats: int) -> float:
  """Median seconds of `repeats` calls of `fn` (each one blocks on its result)."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure(
  name: str,
  torch_model: Any,
  mmtl_model: tuple[Any, Any],
  inputs: Mapping[str, np.ndarray],
  *,
  num_beams: int,
  new_tokens: int,
  repeats: int,
) -> dict[str, Any]:
  """One cell of the grid: tokens/s of both frameworks, compile time, same tokens."""
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  from mmtl import generate  # pylint: disable=g-import-not-at-top

  module, variables = mmtl_model
  kw = dict(max_new_tokens=new_tokens, num_beams=num_beams, pad_token_id=PAD)
  ours = lambda: jax.block_until_ready(generate.generate(module, variables, inputs, **kw))
  start = time.perf_counter()
  tokens = np.asarray(ours())
  compile_s = time.perf_counter() - start
  mmtl_s = median_time(ours, repeats)

  torch_inputs = {k: torch.tensor(v) for k, v in inputs.items()}
  if "pixel_values" in torch_inputs:
    torch_inputs["pixel_values"] = torch_inputs["pixel_values"].permute(0, 3, 1, 2)  # NCHW

  def theirs():
    with torch.no_grad():
      return torch_model.generate(**torch_inputs, **kw, do_sample=False).numpy()

  reference = theirs()  # untimed warmup
  torch_s = median_time(theirs, repeats)
  batch = next(iter(inputs.values())).shape[0]
  generated = batch * new_tokens
  return dict(
    name=name,
    batch=batch,
    num_beams=num_beams,
    new_tokens=new_tokens,
    compile_s=compile_s,
    mmtl_s=mmtl_s,
    torch_s=torch_s,
    mmtl_tokens_per_s=generated / mmtl_s,
    torch_tokens_per_s=generated / torch_s,
    speedup=torch_s / mmtl_s,
    same_tokens=bool(tokens.shape == reference.shape and (tokens == reference).all()),
  )


def markdown(report: Mapping[str, Any]) -> str:
  meta = report["meta"]
  lines = [
    f"### mmtl.bench: {meta['preset']} ({meta['date']})",
    "",
    f"Device: {meta['device']}; torch {meta['torch']} ({meta['torch_threads']} threads), "
    f"transformers {meta['transformers']}, jax {meta['jax']}. Median of {meta['repeats']} "
    "calls; generated tokens/s = batch x new tokens / time.",
    "",
    "| model | search | batch | new tokens | mmtl tokens/s | transformers tokens/s "
    "| mmtl / transformers | mmtl compile s | same tokens |",
    "|---|---|---:|---:|---:|---:|---:|---:|---|",
  ]
  for r in report["runs"]:
    search = "greedy" if r["num_beams"] == 1 else f"beam {r['num_beams']}"
    lines.append(
      f"| {r['model']} | {search} | {r['batch']} | {r['new_tokens']} "
      f"| {r['mmtl_tokens_per_s']:.1f} | {r['torch_tokens_per_s']:.1f} | {r['speedup']:.2f} "
      f"| {r['compile_s']:.1f} | {'yes' if r['same_tokens'] else 'no'} |"
    )
  return "\n".join(lines) + "\n"


def run(preset_name: str, out_dir: str, *, repeats: int, meta: dict[str, Any]) -> dict[str, Any]:
  """The whole grid of `preset_name`; `OUT/bench.json` and `OUT/bench.md` are rewritten
  after every cell, so a run cut short keeps what it measured."""
  import json  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  from mmtl import (
    hf,  # pylint: disable=g-import-not-at-top
    workdir,  # pylint: disable=g-import-not-at-top
  )

  preset = PRESETS[preset_name]
  meta = dict(
    meta,
    preset=preset_name,
    repeats=repeats,
    device=str(jax.devices()[0].device_kind),
    torch=torch.__version__,
    torch_threads=torch.get_num_threads(),
    transformers=transformers.__version__,
    jax=jax.__version__,
  )
  report: dict[str, Any] = dict(meta=meta, runs=[])
  workdir.makedirs(out_dir)
  with tempfile.TemporaryDirectory() as folder:
    torch_models = save_models(preset, folder)
    mmtl_models = {m: hf.load_pretrained(f"{folder}/{m}")[:2] for m in torch_models}
    for model, num_beams, batch, new_tokens in itertools.product(
      preset["models"], preset["searches"], preset["batches"], preset["new_tokens"]
    ):
      name = f"{model}/beams{num_beams}/b{batch}/t{new_tokens}"
      print(f"[mmtl.bench] {name} ...", flush=True)
      row = measure(
        name,
        torch_models[model],
        mmtl_models[model],
        inputs_for(model, preset, batch),
        num_beams=num_beams,
        new_tokens=new_tokens,
        repeats=repeats,
      )
      report["runs"].append(dict(row, model=model))
      print(
        f"  mmtl {row['mmtl_tokens_per_s']:.1f} tokens/s, transformers "
        f"{row['torch_tokens_per_s']:.1f} ({row['speedup']:.2f}x), compile "
        f"{row['compile_s']:.1f} s, same tokens: {row['same_tokens']}",
        flush=True,
      )
      workdir.write_text(workdir.path(out_dir, "bench.json"), json.dumps(report, indent=2))
      workdir.write_text(workdir.path(out_dir, "bench.md"), markdown(report))
  return report
