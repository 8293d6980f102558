"""Log-mel front-end benchmark: can the pipeline feed a Whisper or AST tower?

  python -m mmtl.bench --preset log_mel --out bench_log_mel        # docs/audio.md's table
  python -m mmtl.bench --preset tiny_log_mel --out /tmp/log_mel    # tiny sizes, seconds

One process on the host CPU. For each front end of the preset (`mmtl.log_mel`, one clip at a
time, as the pipeline's `example` step calls it) it measures clips/s on one thread and on
`threads` threads (the loader runs examples in a thread pool), and the same clips through
the transformers feature extractor the front end equals (its default path: torch's STFT for
Whisper when torch is installed, numpy for AST), with the largest difference between the
two. Then the peer it must keep up with: clips/s of a training step's forward and backward
pass of the tower that reads those features (random weights, float32, jitted, on the first
JAX device). Reports are medians of `repeats` timed runs.
"""

from __future__ import annotations

from collections.abc import Mapping
import concurrent.futures
import time
from typing import Any

import numpy as np

from mmtl import bench_generation

_WHISPER_TINY = dict(  # openai/whisper-tiny's encoder (39M parameters with its decoder)
  model_type="whisper",
  d_model=384,
  encoder_layers=4,
  encoder_attention_heads=6,
  encoder_ffn_dim=1536,
  num_mel_bins=80,
  max_source_positions=1500,
)
_AST_BASE = dict(  # MIT/ast-finetuned-audioset-10-10-0.4593 (86M parameters)
  model_type="audio-spectrogram-transformer",
  hidden_size=768,
  num_hidden_layers=12,
  num_attention_heads=12,
  intermediate_size=3072,
  num_mel_bins=128,
  max_length=1024,
)
PRESETS: dict[str, dict[str, Any]] = {
  "log_mel": dict(
    # (name, front end, mel bins, clip seconds, the tower config.json, its batch)
    cases=(
      ("whisper_80", "whisper", 80, 30.0, _WHISPER_TINY, 4),
      ("whisper_128", "whisper", 128, 30.0, None, 0),  # large-v3's bins: the front end only
      ("ast_kaldi_128", "kaldi", 128, 10.24, _AST_BASE, 1),
    ),
    clips=32,
    threads=2,
  ),
  "tiny_log_mel": dict(
    cases=(
      (
        "whisper_tiny",
        "whisper",
        13,
        0.5,
        dict(
          _WHISPER_TINY,
          d_model=16,
          encoder_layers=1,
          encoder_attention_heads=2,
          encoder_ffn_dim=32,
          num_mel_bins=13,
          max_source_positions=25,
        ),
        2,
      ),
      (
        "ast_tiny",
        "kaldi",
        16,
        0.5,
        dict(
          _AST_BASE,
          hidden_size=16,
          num_hidden_layers=1,
          num_attention_heads=2,
          intermediate_size=32,
          num_mel_bins=16,
          max_length=50,
        ),
        2,
      ),
    ),
    clips=4,
    threads=2,
  ),
}


def _extractor(spec: Any) -> Any:
  """The transformers feature extractor that `spec` (an mmtl.log_mel.LogMelSpec) equals."""
  import transformers  # pylint: disable=g-import-not-at-top

  if spec.front_end == "whisper":
    return transformers.WhisperFeatureExtractor(
      feature_size=spec.num_mel_bins, chunk_length=spec.chunk_length
    )
  return transformers.ASTFeatureExtractor(
    num_mel_bins=spec.num_mel_bins, max_length=spec.max_length
  )


def front_end_row(
  name: str, front_end: str, bins: int, seconds: float, *, clips: int, threads: int, repeats: int
) -> dict[str, Any]:
  """clips/s of mmtl.log_mel (1 and `threads` threads) and of the transformers extractor."""
  from mmtl import log_mel  # pylint: disable=g-import-not-at-top

  spec = log_mel.LogMelSpec(front_end, bins, chunk_length=seconds)
  if front_end == "kaldi":  # as many 10 ms frames as the seconds hold
    spec = log_mel.LogMelSpec(front_end, bins, max_length=round(seconds * 100))
  rng = np.random.default_rng(0)
  waves = [(0.1 * rng.standard_normal(spec.samples)).astype(np.float32) for _ in range(clips)]
  extractor = _extractor(spec)
  key = "input_features" if front_end == "whisper" else "input_values"

  def theirs(w):
    out = extractor(w, sampling_rate=16_000, return_tensors="np")[key][0]
    return out.T if front_end == "whisper" else out

  ours = lambda: [log_mel.log_mel(w, spec) for w in waves]
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    pooled = lambda: list(pool.map(lambda w: log_mel.log_mel(w, spec), waves))
    pooled()  # warm the pool and the filter cache
    pooled_s = bench_generation.median_time(pooled, repeats)
  ours_s = bench_generation.median_time(ours, repeats)
  theirs_s = bench_generation.median_time(lambda: [theirs(w) for w in waves], repeats)
  diff = max(float(np.abs(log_mel.log_mel(w, spec) - theirs(w)).max()) for w in waves[:2])
  return dict(
    name=name,
    front_end=front_end,
    mel_bins=bins,
    seconds=seconds,
    frames=spec.frames,
    mmtl_clips_per_s=clips / ours_s,
    mmtl_threads_clips_per_s=clips / pooled_s,
    transformers_clips_per_s=clips / theirs_s,
    speedup=theirs_s / ours_s,
    max_abs_diff=diff,
  )


def tower_row(
  name: str, config: Mapping[str, Any], frames: int, batch: int, *, repeats: int
) -> dict[str, Any]:
  """clips/s of a forward + backward pass of the tower (the bulk of a training step)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from mmtl import hf  # pylint: disable=g-import-not-at-top

  module = hf.build_module(dict(config))
  params = hf.init_variables(module, jax.random.key(0))["params"]
  x = jnp.asarray(
    np.random.default_rng(0).standard_normal((batch, frames, config["num_mel_bins"])), jnp.float32
  )

  @jax.jit
  def grads(params, x):
    loss = lambda p: jnp.mean(jnp.square(module.apply({"params": p}, x)["last_hidden_state"]))
    return jax.value_and_grad(loss)(params)

  step = lambda: jax.block_until_ready(grads(params, x))
  start = time.perf_counter()
  step()
  compile_s = time.perf_counter() - start
  step_s = bench_generation.median_time(step, repeats)
  return dict(
    name=name, batch=batch, step_s=step_s, compile_s=compile_s, tower_clips_per_s=batch / step_s
  )


def markdown(report: Mapping[str, Any]) -> str:
  meta = report["meta"]
  lines = [
    f"### mmtl.bench: {meta['preset']} ({meta['date']})",
    "",
    f"Host: {meta['cpus']} CPUs; JAX device {meta['device']}; transformers "
    f"{meta['transformers']}, torch {meta['torch']} ({meta['torch_threads']} threads). "
    f"Median of {meta['repeats']} runs over {meta['clips']} clips.",
    "",
    "| front end | mel bins | clip s | frames | mmtl clips/s (1 thread) | mmtl clips/s "
    f"({meta['threads']} threads) | transformers clips/s | mmtl / transformers | max abs diff "
    "| tower fwd+bwd clips/s | front end (threads) / tower |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in report["runs"]:
    tower = r.get("tower")
    tower_cells = "- | -"
    if tower:
      rate = tower["tower_clips_per_s"]
      tower_cells = f"{rate:.2f} | {r['mmtl_threads_clips_per_s'] / rate:.0f}"

    lines.append(
      f"| {r['name']} | {r['mel_bins']} | {r['seconds']:g} | {r['frames']} "
      f"| {r['mmtl_clips_per_s']:.1f} | {r['mmtl_threads_clips_per_s']:.1f} "
      f"| {r['transformers_clips_per_s']:.1f} | {r['speedup']:.2f} | {r['max_abs_diff']:.1e} "
      f"| {tower_cells} |"
    )
  return "\n".join(lines) + "\n"


def run(preset_name: str, out_dir: str, *, repeats: int, meta: dict[str, Any]) -> dict[str, Any]:
  """Every case of `preset_name`; `OUT/bench.json` and `OUT/bench.md` are rewritten after
  each, so a run cut short keeps what it measured."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  from mmtl import workdir  # pylint: disable=g-import-not-at-top

  preset = PRESETS[preset_name]
  meta = dict(
    meta,
    preset=preset_name,
    repeats=repeats,
    clips=preset["clips"],
    threads=preset["threads"],
    cpus=os.cpu_count(),
    device=str(jax.devices()[0].device_kind),
    torch=torch.__version__,
    torch_threads=torch.get_num_threads(),
    transformers=transformers.__version__,
  )
  report: dict[str, Any] = dict(meta=meta, runs=[])
  workdir.makedirs(out_dir)
  for name, front_end, bins, seconds, tower, batch in preset["cases"]:
    print(f"[mmtl.bench] {name} ...", flush=True)
    row = front_end_row(
      name,
      front_end,
      bins,
      seconds,
      clips=preset["clips"],
      threads=preset["threads"],
      repeats=repeats,
    )
    if tower:
      row["tower"] = tower_row(name, tower, row["frames"], batch, repeats=repeats)
    report["runs"].append(row)
    print(
      f"  mmtl {row['mmtl_clips_per_s']:.1f} clips/s ({row['mmtl_threads_clips_per_s']:.1f} on "
      f"{preset['threads']} threads), transformers {row['transformers_clips_per_s']:.1f}, "
      f"max abs diff {row['max_abs_diff']:.1e}"
      + (f"; tower {row['tower']['tower_clips_per_s']:.2f} clips/s" if tower else ""),
      flush=True,
    )
    workdir.write_text(workdir.path(out_dir, "bench.json"), json.dumps(report, indent=2))
    workdir.write_text(workdir.path(out_dir, "bench.md"), markdown(report))
  return report
