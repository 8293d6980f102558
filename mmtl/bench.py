r"""Training-step benchmark: mmtl's trainer step vs HF transformers PyTorch, same device and batch.

  python -m mmtl.bench --preset clip_b16 --batch 256 --out bench_out   # one GPU (docs/benchmark.md)
  python -m mmtl.bench --tiny --out /tmp/bench                         # CPU, tiny sizes, seconds
  python -m mmtl.bench --preset gpt2_generation --out bench_gen        # mmtl.bench_generation
  python -m mmtl.bench --preset log_mel --out bench_log_mel            # mmtl.bench_log_mel

Measured, each in its own process by default (clean peak memory, one
framework on the GPU at a time), all on the first local device:
  matmul  the bf16 matmul ceiling: an n x n x n product timed with jnp.
  mmtl    the trainer's step (`mmtl.train_step.make_phase`) of a real trainer config (random init,
          bf16 compute, fp32 params, AdamW), jitted as the trainer does
          (shardings, donated state), for CLIP contrastive `full` fine-tuning,
          `locked` image (LiT: `frozen=["image_encoder/.*"]`) and a `fused`
          cross-attention classifier over the same two towers; with `locked`
          also `image_forward`, the image tower alone in inference mode;
          `locked_bf16` and `locked_int8` store the locked tower in bfloat16 /
          int8 (`config.optim.frozen_dtype`, mmtl.low_precision). Each row gives
          the bytes of its train state on the device (params + optimizer state).
  torch   HF transformers `CLIPModel` (its default SDPA attention), bf16
          autocast, fp32 params, AdamW (fused on CUDA), `eager` and
          `compile` (torch.compile of the model), for `full` and `locked`.

Timing: `warmup` steps (compilation included), then `repeats` runs of `steps`
steps each, dispatched back to back with one block/synchronize at the end of a
run; the reported step time is the median over runs. Batches are
device-resident synthetic data (`--input host` feeds numpy batches through a
2-deep device prefetch instead). FLOPs are analytic (`train_flops`, formula in
docs/benchmark.md); MFU = achieved FLOP/s / the measured matmul ceiling. Writes
`OUT/bench.json` and `OUT/bench.md` after every measurement, so a run cut
short keeps what it finished.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
import datetime
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

from absl import flags
import numpy as np

from mmtl import (  # etils only: importing mmtl.bench loads no JAX
  bench_generation,
  bench_log_mel,
  process,
  workdir,
)

# --- What is benchmarked ------------------------------------------------------


# HF config.json contents (model_type "clip"): the same dict builds mmtl's towers
# (mmtl.hf.build_module) and transformers.CLIPModel, so both run one architecture.
def _clip_base(patch_size: int) -> dict[str, Any]:
  """CLIP ViT-B/{patch_size} at 224px; 12-layer 512-wide causal text tower over 77 tokens."""
  return dict(
    model_type="clip",
    projection_dim=512,
    vision_config=dict(
      hidden_size=768,
      intermediate_size=3072,
      num_hidden_layers=12,
      num_attention_heads=12,
      image_size=224,
      patch_size=patch_size,
    ),
    text_config=dict(
      hidden_size=512,
      intermediate_size=2048,
      num_hidden_layers=12,
      num_attention_heads=8,
      max_position_embeddings=77,
      vocab_size=49408,
    ),
  )


PRESETS: dict[str, dict[str, Any]] = {
  "clip_b16": _clip_base(16),  # 196 patches + CLS
  "clip_b32": _clip_base(32),  # 49 patches + CLS: a cheaper image tower, same text tower
  # CPU test size: 17 image tokens, 16 text tokens, 1 layer of width 32 per tower.
  "tiny": dict(
    model_type="clip",
    projection_dim=16,
    vision_config=dict(
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=1,
      num_attention_heads=2,
      image_size=32,
      patch_size=8,
    ),
    text_config=dict(
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=1,
      num_attention_heads=2,
      max_position_embeddings=16,
      vocab_size=128,
      bos_token_id=126,
      eos_token_id=127,
      pad_token_id=1,
    ),
  ),
}
# The cross-attention fusion of the `fused` variant, per preset size.
FUSED = {"tiny": dict(width=32, num_heads=2, fusion_depth=1, num_classes=10)}
FUSED_DEFAULT = dict(width=512, num_heads=8, fusion_depth=2, num_classes=1000)

MMTL_VARIANTS = ("full", "locked", "fused", "locked_bf16", "locked_int8")
# The locked variants: the image tower frozen, stored as loaded / in bfloat16 / int8
# (config.optim.frozen_dtype, mmtl.low_precision).
LOCKED_DTYPES = {"locked": "", "locked_bf16": "bfloat16", "locked_int8": "int8"}
TORCH_VARIANTS = ("full", "locked")
TORCH_MODES = ("eager", "compile")
XLA_FLAG_CHECK_TIMEOUT_S = 120  # One `import jax` with candidate XLA flags.
LOCKED_RULE = "image_encoder/.*"  # mmtl.optim `frozen` rule of the locked-image (LiT) variant

# Recommended XLA flags for the GPU step (docs/benchmark.md, "Fast path on GPU", says why);
# unknown ones are dropped with a warning, since XLA aborts on a flag its build lacks.
XLA_FLAGS = {
  "recommended": (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_highest_priority_async_stream=true",
  ),
  "none": (),
}


def text_length(clip_cfg: Mapping[str, Any]) -> int:
  return int(clip_cfg["text_config"]["max_position_embeddings"])


def image_tokens(clip_cfg: Mapping[str, Any]) -> int:
  v = clip_cfg["vision_config"]
  return (v["image_size"] // v["patch_size"]) ** 2 + 1


def fused_cfg(preset: str) -> dict[str, int]:
  return dict(FUSED.get(preset, FUSED_DEFAULT))


def trainer_config(
  preset: str, variant: str, *, batch: int, attention: str | None, remat: str = "none"
):
  """The `mmtl.train` config of one benchmarked variant (model + optim), with defaults filled."""
  import ml_collections as mlc

  from mmtl import config as config_lib

  if variant not in MMTL_VARIANTS:
    raise ValueError(f"variant={variant!r}: use one of {MMTL_VARIANTS}.")
  clip_cfg = PRESETS[preset]
  tower_kw = dict(attention_impl=attention) if attention else {}
  config = mlc.ConfigDict()
  config.batch_size = batch
  config.total_steps = 10_000
  config.mesh = dict(data=1, fsdp=1, model=1)
  model = dict(
    towers=dict(
      image=dict(name=clip_cfg, tower="vision", pool="pooler", kwargs=tower_kw),
      text=dict(name=clip_cfg, tower="text", pool="pooler", kwargs=tower_kw),
    ),
    dtype="bfloat16",
    param_dtype="float32",
    remat=remat,
  )
  if variant == "fused":
    model.update(fusion="cross_attention", head="classification", **fused_cfg(preset))
  else:  # CLIP: projections to projection_dim, learned temperature, InfoNCE.
    model.update(fusion="contrastive", head="contrastive", width=clip_cfg["projection_dim"])
  config.model = model
  config.optim = dict(
    name="adamw",
    lr=1e-4,
    wd=1e-4,
    schedule=dict(decay="constant"),  # as the torch peers: constant LR
    frozen=[LOCKED_RULE] if variant in LOCKED_DTYPES else [],
    frozen_dtype=LOCKED_DTYPES.get(variant, ""),
  )
  return config_lib.with_defaults(config)


# --- Analytic FLOPs -----------------------------------------------------------


def encoder_flops(width: int, mlp: int, layers: int, tokens: int) -> int:
  """Forward FLOPs of `layers` transformer blocks on one sequence of `tokens` tokens.

  Matmuls: 2 FLOPs per multiply-add, 4*D^2 (q, k, v, out) + 2*D*M (MLP) weights
  per token. Attention: QK^T and PV, 2 * 2*T^2*D per layer (full T^2 also for
  causal towers, the convention of PaLM's MFU). Norms, activations, softmax and
  the optimizer are not counted (elementwise, a few % at B/16 sizes).
  """
  per_layer = 2 * tokens * (4 * width * width + 2 * width * mlp) + 4 * tokens * tokens * width
  return layers * per_layer


def train_flops(preset: str, variant: str, batch: int) -> dict[str, float]:
  """Analytic FLOPs of one training step: forward per part, and the step total.

  Trained parts cost 3x their forward (forward, input grads, weight grads);
  a frozen tower runs forward only (1x: no backward reaches it).
  """
  c = PRESETS[preset]
  v, t = c["vision_config"], c["text_config"]
  tv, tt = image_tokens(c), text_length(c)
  patch_in = v["patch_size"] ** 2 * v.get("num_channels", 3)
  image = 2 * (tv - 1) * patch_in * v["hidden_size"] + encoder_flops(
    v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"], tv
  )
  text = encoder_flops(t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"], tt)
  if variant == "fused":
    f = fused_cfg(preset)
    w = f["width"]
    head = 2 * w * (tv * v["hidden_size"] + tt * t["hidden_size"])  # token projections to width
    for tq, tk in ((tv, tt), (tt, tv)):  # each modality's queries attend to the other's tokens
      head += f["fusion_depth"] * (
        2 * tq * 2 * w * w
        + 2 * tk * 2 * w * w  # q, out; k, v
        + 4 * tq * tk * w
        + 2 * tq * 8 * w * w
      )  # attention; MLP 4x
    head += 2 * (2 * w) * w + 2 * w * f["num_classes"]  # hidden layer on the concat; classifier
  else:
    p = c["projection_dim"]
    head = 2 * p * (v["hidden_size"] + t["hidden_size"]) + 2 * batch * p  # projections; logits row
  forward = dict(image=batch * image, text=batch * text, head=batch * head)
  image_mult = 1 if variant in LOCKED_DTYPES else 3
  total = image_mult * forward["image"] + 3 * (forward["text"] + forward["head"])
  return {**{f"forward_{k}": float(x) for k, x in forward.items()}, "train_step": float(total)}


# --- Synthetic data -----------------------------------------------------------


def synthetic_batch(preset: str, batch: int, *, seed: int = 0) -> dict[str, np.ndarray]:
  """Random images and right-padded captions (EOS last), mmtl's batch layout (NHWC pixels)."""
  c = PRESETS[preset]
  v, t = c["vision_config"], c["text_config"]
  rng = np.random.default_rng(seed)
  length = text_length(c)
  eos = t.get("eos_token_id", 49407)
  ids = rng.integers(0, eos - 1, size=(batch, length), dtype=np.int32)
  lengths = rng.integers(length // 2, length + 1, size=batch)
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  ids[np.arange(batch), lengths - 1] = eos
  ids = np.where(mask == 1, ids, t.get("pad_token_id", 1)).astype(np.int32)
  size = v["image_size"]
  pixels = rng.standard_normal((batch, size, size, v.get("num_channels", 3)), dtype=np.float32)
  labels = rng.integers(0, fused_cfg(preset)["num_classes"], size=batch, dtype=np.int32)
  return dict(pixel_values=pixels, input_ids=ids, attention_mask=mask, labels=labels)


def _cycle(items: list[Any]) -> Iterator[Any]:
  while True:
    yield from items


# --- Timing -------------------------------------------------------------------


def time_steps(
  step: Callable[[], Any], sync: Callable[[Any], None], *, warmup: int, steps: int, repeats: int
) -> tuple[list[float], float]:
  """(seconds per step of each repeat, seconds of the warmup).

  Inside a repeat, steps are dispatched back to back; `sync` (block until the
  device is done) runs once at its end, so no host sync is inside the loop.
  """
  t0 = time.perf_counter()
  out = None
  for _ in range(warmup):
    out = step()
  sync(out)
  warmup_s = time.perf_counter() - t0
  per_step = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps):
      out = step()
    sync(out)
    per_step.append((time.perf_counter() - t0) / steps)
  return per_step, warmup_s


def _timing_result(per_step: list[float], warmup_s: float, batch: int) -> dict[str, Any]:
  median = statistics.median(per_step)
  return dict(step_s=median, step_s_all=per_step, pairs_per_s=batch / median, warmup_s=warmup_s)


# --- Measurements (each runs in a worker process, or in-process with --no-isolate) ---


def measure_matmul(spec: Mapping[str, Any]) -> dict[str, Any]:
  """bf16 n x n x n matmul FLOP/s with jnp: the ceiling MFU is measured against."""
  import jax
  import jax.numpy as jnp

  n = int(spec["n"])
  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  device = jax.devices()[0]
  a = jax.device_put(jax.random.normal(ka, (n, n), jnp.bfloat16), device)
  b = jax.device_put(jax.random.normal(kb, (n, n), jnp.bfloat16), device)
  matmul = jax.jit(lambda a, b: a @ b)
  per_step, warmup_s = time_steps(
    lambda: matmul(a, b),
    jax.block_until_ready,
    warmup=3,
    steps=int(spec["steps"]),
    repeats=int(spec["repeats"]),
  )
  t = statistics.median(per_step)
  return dict(
    n=n, step_s=t, tflops=2 * n**3 / t / 1e12, warmup_s=warmup_s, device=device.device_kind
  )


def _jax_peak_bytes() -> int | None:
  import jax

  stats = jax.devices()[0].memory_stats()  # None on CPU
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _memory_analysis_bytes(compiled: Any) -> int | None:
  """XLA's static estimate: arguments + outputs + temporaries - donated aliases."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  return int(
    m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  )


def build_mmtl_step(config, mesh) -> tuple[Callable[..., Any], Callable[[], Any], Any]:
  """(jitted step, init_state(), abstract state) of `config`, built as mmtl.train builds them.

  The step is the trainer's own (`mmtl.train_step.make_phase`: the jitted
  `make_train_step` over `make_objective`, trainer shardings, donated state), and
  the state comes from the trainer's builder (`mmtl.train_state`, created sharded).
  """
  from mmtl import train_state, train_step
  from mmtl.models import fusion

  model = fusion.build(config.model)
  layout = train_state.param_layout(model, config, mesh)
  objective_for = functools.partial(
    train_step.make_objective, model, config, None, batch_stats_shape=layout.batch_stats
  )
  phase = train_step.make_phase(config, objective_for, layout, mesh, 0)

  def init_state():
    variables = train_state.init_variables(model, config, layout, pretrained=False)
    return train_state.init_state(variables, phase.tx, phase.state_shardings)

  return phase.step_fn, init_state, phase.state_shapes


def lowered_flops(lowered: Any) -> float | None:
  """XLA's FLOP count of the step before optimization (platform independent; custom calls
  such as cuDNN attention count 0)."""
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) if cost and "flops" in cost else None


def measure_mmtl(spec: Mapping[str, Any]) -> dict[str, Any]:
  """Times the trainer's jitted step for one variant; also XLA's FLOP and memory estimates."""
  import jax

  from mmtl import sharding
  from mmtl.data import device as data_device

  preset, variant, batch = spec["preset"], spec["variant"], int(spec["batch"])
  config = trainer_config(
    preset, variant, batch=batch, attention=spec.get("attention"), remat=spec.get("remat", "none")
  )
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  host = synthetic_batch(preset, batch)
  step, init_state, _ = build_mmtl_step(config, mesh)
  state = init_state()
  device_batch = data_device.put_batch(host, mesh)
  t0 = time.perf_counter()
  lowered = step.lower(state, device_batch, None)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0

  if spec.get("input") == "host":
    second = synthetic_batch(preset, batch, seed=1)
    batches = data_device.DevicePrefetch(
      _cycle([host, second]), lambda b: data_device.put_batch(b, mesh)
    )
  else:
    batches = _cycle([device_batch])

  def one_step():
    nonlocal state
    state, measurements = compiled(state, next(batches), None)
    return state, measurements

  per_step, warmup_s = time_steps(
    one_step,
    jax.block_until_ready,
    warmup=int(spec["warmup"]),
    steps=int(spec["steps"]),
    repeats=int(spec["repeats"]),
  )
  loss = float(jax.device_get(one_step()[1]["train/loss"]))
  return dict(
    _timing_result(per_step, warmup_s, batch),
    compile_s=compile_s,
    xla_flops=lowered_flops(lowered),
    xla_memory_bytes=_memory_analysis_bytes(compiled),
    peak_bytes=_jax_peak_bytes(),
    state_bytes=sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state)),
    final_loss=loss,
    device=jax.devices()[0].device_kind,
    jax_version=jax.__version__,
  )


def measure_image_forward(spec: Mapping[str, Any]) -> dict[str, Any]:
  """The image tower alone in inference mode (jitted forward, no gradients): the cost
  that the frozen tower of `locked` should stay close to."""
  import jax
  import jax.numpy as jnp

  from mmtl import hf

  preset, batch = spec["preset"], int(spec["batch"])
  kw = dict(attention_impl=spec["attention"]) if spec.get("attention") else {}
  module = hf.build_module(
    PRESETS[preset], tower="vision", dtype=jnp.bfloat16, param_dtype=jnp.float32, **kw
  )
  variables = hf.init_variables(module, jax.random.PRNGKey(0))
  pixels = jax.device_put(synthetic_batch(preset, batch)["pixel_values"], jax.devices()[0])
  t0 = time.perf_counter()
  compiled = (
    jax.jit(lambda v, x: module.apply(v, x)["pooler_output"]).lower(variables, pixels).compile()
  )
  compile_s = time.perf_counter() - t0
  per_step, warmup_s = time_steps(
    lambda: compiled(variables, pixels),
    jax.block_until_ready,
    warmup=int(spec["warmup"]),
    steps=int(spec["steps"]),
    repeats=int(spec["repeats"]),
  )
  return dict(
    _timing_result(per_step, warmup_s, batch),
    compile_s=compile_s,
    peak_bytes=_jax_peak_bytes(),
    device=jax.devices()[0].device_kind,
  )


def measure_torch(spec: Mapping[str, Any]) -> dict[str, Any]:
  """Times HF transformers CLIPModel's training step (eager or torch.compile)."""
  import torch
  import transformers

  preset, variant, batch = spec["preset"], spec["variant"], int(spec["batch"])
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  torch.manual_seed(0)
  hf_config = {k: v for k, v in PRESETS[preset].items() if k != "model_type"}
  config = transformers.CLIPConfig(**hf_config)
  model = transformers.CLIPModel(config).to(device).train()
  if variant == "locked":
    model.vision_model.requires_grad_(False)
  optimizer = torch.optim.AdamW(
    [p for p in model.parameters() if p.requires_grad],
    lr=1e-4,
    weight_decay=1e-4,
    fused=device.type == "cuda",
  )
  forward = model
  if spec["mode"] == "compile":
    forward = torch.compile(model, backend=spec.get("compile_backend", "inductor"))

  def to_torch(b, pin=False):
    out = {
      "pixel_values": torch.from_numpy(b["pixel_values"].transpose(0, 3, 1, 2).copy()),
      "input_ids": torch.from_numpy(b["input_ids"]).long(),
      "attention_mask": torch.from_numpy(b["attention_mask"]).long(),
    }
    return {k: v.pin_memory() if pin else v for k, v in out.items()}

  host = synthetic_batch(preset, batch)
  if spec.get("input") == "host":
    pin = device.type == "cuda"
    pinned = [to_torch(host, pin), to_torch(synthetic_batch(preset, batch, seed=1), pin)]
    from mmtl.data import device as data_device  # the trainer's prefetch (jax stays on CPU)

    batches = data_device.DevicePrefetch(
      _cycle(pinned), lambda b: {k: v.to(device, non_blocking=True) for k, v in b.items()}
    )
  else:
    batches = _cycle([{k: v.to(device) for k, v in to_torch(host).items()}])

  def one_step():
    with torch.autocast(device.type, dtype=torch.bfloat16):
      loss = forward(**next(batches), return_loss=True).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

  sync = (lambda _: torch.cuda.synchronize()) if device.type == "cuda" else (lambda _: None)
  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
  per_step, warmup_s = time_steps(
    one_step,
    sync,
    warmup=int(spec["warmup"]),
    steps=int(spec["steps"]),
    repeats=int(spec["repeats"]),
  )
  loss = float(one_step().detach().float().cpu())
  cuda = device.type == "cuda"
  return dict(
    _timing_result(per_step, warmup_s, batch),
    final_loss=loss,
    peak_bytes=torch.cuda.max_memory_allocated() if cuda else None,
    device=torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
    attn_implementation=model.config._attn_implementation,
    torch_version=torch.__version__,
    transformers_version=transformers.__version__,
  )


MEASURE = {
  "matmul": measure_matmul,
  "mmtl": measure_mmtl,
  "mmtl_forward": measure_image_forward,
  "torch": measure_torch,
}


def _resolve_attention(attention: str | None) -> str | None:
  """`auto`: cuDNN flash attention on GPU, XLA's default elsewhere."""
  if attention != "auto":
    return attention
  import jax

  return "cudnn" if jax.default_backend() == "gpu" else None


def _measure(spec: Mapping[str, Any]) -> dict[str, Any]:
  if spec["kind"] not in ("mmtl", "mmtl_forward"):
    return MEASURE[spec["kind"]](spec)
  spec = dict(spec, attention=_resolve_attention(spec.get("attention")))
  return dict(MEASURE[spec["kind"]](spec), attention=spec["attention"])


def run_measurement(
  spec: dict[str, Any], *, isolate: bool, env: Mapping[str, str], timeout: float
) -> dict[str, Any]:
  """Result of one measurement, or {"error": ...} (a failing or hung peer must not stop the
  others; an isolated one gets `timeout` seconds)."""
  if not isolate:
    try:
      return _measure(spec)
    except Exception:  # noqa: BLE001 - reported in the table, the run goes on
      return {"error": traceback.format_exc()[-2000:]}
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "result.json")
    try:
      proc = process.run(
        [sys.executable, "-m", "mmtl.bench", "--worker", json.dumps(spec), "--worker_out", out],
        timeout=timeout,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
      )
    except subprocess.TimeoutExpired as e:  # Its output is text (text=True), drained.
      printed = (e.stderr or e.stdout or "")[-2000:]
      return {"error": f"worker timed out after --worker_timeout={timeout:g}s: {printed}"}
    if proc.returncode != 0 or not os.path.exists(out):
      return {"error": f"worker exit {proc.returncode}: {(proc.stderr or proc.stdout)[-2000:]}"}
    with open(out) as f:
      return json.load(f)


def _worker(spec_json: str, out: str) -> None:
  result = _measure(json.loads(spec_json))
  with open(out, "w") as f:
    json.dump(result, f)


def supported_xla_flags(flags: tuple[str, ...]) -> tuple[list[str], list[str]]:
  """(kept, dropped): XLA aborts on an unknown flag, so each is tried on this jaxlib first."""

  def parses(candidate: list[str]) -> bool:
    env = {**os.environ, "XLA_FLAGS": " ".join(candidate), "JAX_PLATFORMS": "cpu"}
    proc = process.run(
      [sys.executable, "-c", "import jax; jax.numpy.zeros(1)"],
      timeout=XLA_FLAG_CHECK_TIMEOUT_S,
      env=env,
      capture_output=True,
    )
    return proc.returncode == 0

  if not flags or parses(list(flags)):
    return list(flags), []
  kept = [f for f in flags if parses([f])]
  return kept, [f for f in flags if f not in kept]


def plan(args: flags.FlagValues) -> list[dict[str, Any]]:
  """Measurement specs in run order: the ceiling, mmtl variants, torch peers."""
  common = dict(
    preset=args.preset,
    batch=args.batch,
    warmup=args.warmup,
    steps=args.steps,
    repeats=args.repeats,
    input=args.input,
  )
  specs = [
    dict(kind="matmul", name="matmul", n=args.matmul_n, steps=args.steps, repeats=args.repeats)
  ]
  attention = None if args.attention == "default" else args.attention
  for variant in args.variants:
    specs.append(
      dict(
        kind="mmtl",
        name=f"mmtl/{variant}",
        variant=variant,
        attention=attention,
        remat=args.remat,
        **common,
      )
    )
  if "locked" in args.variants:  # the reference for "a frozen tower costs its inference only"
    specs.append(
      dict(
        kind="mmtl_forward",
        name="mmtl/image_forward",
        variant="image_forward",
        attention=attention,
        **common,
      )
    )
  for variant in [v for v in args.variants if v in TORCH_VARIANTS]:
    for mode in args.torch:
      specs.append(
        dict(
          kind="torch",
          name=f"torch_{mode}/{variant}",
          variant=variant,
          mode=mode,
          compile_backend=args.compile_backend,
          **common,
        )
      )
  return specs


def summarize(
  results: Mapping[str, dict[str, Any]], specs: list[dict[str, Any]], meta: dict[str, Any]
) -> dict[str, Any]:
  """Report: FLOP/s and MFU from analytic FLOPs, and mmtl / torch.compile per variant."""
  ceiling = results.get("matmul", {}).get("tflops")
  rows = []
  for spec in specs:
    if spec["kind"] == "matmul" or spec["name"] not in results:
      continue
    r = dict(results[spec["name"]])
    if spec["kind"] == "mmtl_forward":
      flops = train_flops(spec["preset"], "locked", spec["batch"])["forward_image"]
    else:
      flops = train_flops(spec["preset"], spec["variant"], spec["batch"])["train_step"]
    row = dict(
      name=spec["name"],
      framework=spec["kind"],
      variant=spec["variant"],
      mode=spec.get("mode", "jit"),
      analytic_flops=flops,
      **r,
    )
    if "step_s" in r:
      row["tflops"] = flops / r["step_s"] / 1e12
      row["mfu"] = row["tflops"] / ceiling if ceiling else None
      if r.get("xla_flops"):
        row["xla_flops_over_analytic"] = r["xla_flops"] / flops
    rows.append(row)
  for row in rows:
    peer = results.get(f"torch_compile/{row['variant']}", {})
    if row["framework"] == "mmtl" and "pairs_per_s" in row and "pairs_per_s" in peer:
      row["vs_torch_compile"] = row["pairs_per_s"] / peer["pairs_per_s"]
      if row.get("peak_bytes") and peer.get("peak_bytes"):
        row["memory_vs_torch_compile"] = row["peak_bytes"] / peer["peak_bytes"]
  return dict(meta=meta, matmul=results.get("matmul"), runs=rows)


def _fmt(x: Any, spec: str) -> str:
  return "-" if x is None else format(x, spec)


def markdown(report: Mapping[str, Any]) -> str:
  meta, mm = report["meta"], report.get("matmul") or {}
  lines = [
    f"### mmtl.bench: {meta['preset']}, batch {meta['batch']} ({meta['date']})",
    "",
    f"Device: {meta.get('device') or '?'}. Matmul ceiling (bf16 {mm.get('n', '?')}^3, jnp): "
    f"{_fmt(mm.get('tflops'), '.1f')} TFLOP/s. "
    f"XLA_FLAGS: `{meta['xla_flags'] or '(none)'}`. "
    f"Input: {meta['input']}-resident. Timing: median of {meta['repeats']} x "
    f"{meta['steps']} steps after {meta['warmup']} warmup.",
    "",
    "| run | pairs/s | step ms | TFLOP/s | MFU | peak mem GiB | train state MiB "
    "| compile+warmup s | vs torch.compile | mem vs torch.compile |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in report["runs"]:
    if "error" in r:
      first = r["error"].strip().splitlines()[-1][:120].replace("|", "/")
      lines.append(f"| {r['name']} | failed: {first} | | | | | | | | |")
      continue
    name = r["name"] + (f" (attention={r['attention']})" if r.get("attention") else "")
    name += " (cuDNN attention failed: cudnn_error in bench.json)" if r.get("cudnn_error") else ""
    peak = r["peak_bytes"] / 2**30 if r.get("peak_bytes") else None
    startup = r.get("compile_s", 0.0) + r["warmup_s"]
    lines.append(
      f"| {name} | {r['pairs_per_s']:.1f} | {r['step_s'] * 1e3:.2f} "
      f"| {_fmt(r.get('tflops'), '.2f')} "
      f"| {_fmt(r.get('mfu'), '.1%')} | {_fmt(peak, '.2f')} "
      f"| {_fmt(r['state_bytes'] / 2**20 if r.get('state_bytes') else None, '.1f')} "
      f"| {startup:.1f} "
      f"| {_fmt(r.get('vs_torch_compile'), '.2f')} "
      f"| {_fmt(r.get('memory_vs_torch_compile'), '.2f')} |"
    )
  return "\n".join(lines) + "\n"


def write_report(out_dir: str, report: Mapping[str, Any]) -> None:
  """Rewritten after every measurement, atomically: a run killed mid-write keeps the
  previous report."""
  workdir.makedirs(out_dir)
  workdir.write_text(workdir.path(out_dir, "bench.json"), json.dumps(report, indent=2))
  workdir.write_text(workdir.path(out_dir, "bench.md"), markdown(report))


def _torch_importable() -> bool:
  import importlib.util

  return importlib.util.find_spec("torch") is not None and (
    importlib.util.find_spec("transformers") is not None
  )


_TINY = dict(preset="tiny", batch=8, warmup=1, steps=2, repeats=2, matmul_n=256)


def _define_flags() -> flags.FlagValues:
  """The command line, as absl flags like mmtl.train's, in a FlagValues of its own so
  that `main(argv)` can be called (and re-parsed) in-process, e.g. by the tests."""
  fv = flags.FlagValues()
  kw = dict(flag_values=fv)
  flags.DEFINE_enum(
    "preset",
    "clip_b16",
    sorted(PRESETS) + sorted(bench_generation.PRESETS) + sorted(bench_log_mel.PRESETS),
    "Model size (PRESETS: the training step), a generation grid "
    "(mmtl.bench_generation.PRESETS: mmtl.generate vs transformers' generate()), or log-mel "
    "front ends vs their towers (mmtl.bench_log_mel.PRESETS).",
    **kw,
  )
  flags.DEFINE_integer("batch", 256, "Global batch (image-text pairs).", **kw)
  flags.DEFINE_bool(
    "tiny",
    False,
    "CPU test size: "
    + ", ".join(f"--{k}={v}" for k, v in _TINY.items())
    + " (flags given explicitly win).",
    **kw,
  )
  flags.DEFINE_string("out", "bench_out", "Directory for bench.json and bench.md.", **kw)
  flags.DEFINE_list(
    "variants",
    list(MMTL_VARIANTS),
    f"Subset of {MMTL_VARIANTS}; torch runs full/locked of these.",
    **kw,
  )
  flags.DEFINE_list(
    "torch", ["eager", "compile"], f"torch peers: subset of {TORCH_MODES}, or 'none'.", **kw
  )
  flags.DEFINE_string(
    "compile_backend",
    "inductor",
    "torch.compile backend (the CPU test uses "
    "aot_eager: inductor's C++ build takes minutes there).",
    **kw,
  )
  flags.DEFINE_enum(
    "attention",
    "auto",
    ["auto", "cudnn", "xla", "default"],
    "mmtl attention_impl: auto = cudnn on GPU, XLA elsewhere.",
    **kw,
  )
  flags.DEFINE_string("remat", "none", "mmtl per-layer remat policy (config.model.remat).", **kw)
  flags.DEFINE_enum(
    "input",
    "device",
    ["device", "host"],
    "device: one resident batch; host: numpy batches through a 2-deep prefetch.",
    **kw,
  )
  flags.DEFINE_integer("warmup", 3, "Untimed steps first (compilation included).", **kw)
  flags.DEFINE_integer("steps", 10, "Steps per timed repeat.", **kw)
  flags.DEFINE_integer("repeats", 5, "Timed repeats; the median is reported.", **kw)
  flags.DEFINE_integer("matmul_n", 8192, "Size of the matmul ceiling's n x n x n product.", **kw)
  flags.DEFINE_string(
    "xla_flags",
    "recommended",
    f"{sorted(XLA_FLAGS)} or a literal flag string, added to $XLA_FLAGS.",
    **kw,
  )
  flags.DEFINE_bool(
    "isolate",
    True,
    "One process per measurement (clean peak memory; one framework on the GPU at a time).",
    **kw,
  )
  flags.DEFINE_float(
    "worker_timeout",
    1800,
    "Seconds one isolated measurement may take; a hung one is killed (its process group) and "
    "reported as an error, and the others go on.",
    lower_bound=1,
    **kw,
  )
  flags.DEFINE_string("worker", None, "Internal: run one measurement spec (JSON).", **kw)
  flags.DEFINE_string("worker_out", None, "Internal: where the worker writes its result.", **kw)
  return fv


def parse_args(argv: list[str] | None = None) -> flags.FlagValues:
  """Parsed flags of `argv` (default: sys.argv[1:]); a bad value exits with one line."""
  fv = _define_flags()
  argv = sys.argv[1:] if argv is None else argv
  if {"-h", "--help"} & set(argv):
    print(__doc__ + "\nFlags:\n" + fv.get_help())
    sys.exit(0)
  try:
    fv(["mmtl.bench", *argv])
  except flags.Error as e:
    sys.exit(f"python -m mmtl.bench: {e}")
  if fv.tiny:
    for name, value in _TINY.items():
      if not fv[name].present:
        fv[name].value = value
  unknown = [v for v in fv.variants if v not in MMTL_VARIANTS]
  if unknown:
    sys.exit(
      f"python -m mmtl.bench: --variants has unknown {unknown}; use a subset of {MMTL_VARIANTS}."
    )
  fv.torch = [] if fv.torch == ["none"] else fv.torch
  if any(m not in TORCH_MODES for m in fv.torch):
    sys.exit(
      f"python -m mmtl.bench: --torch={','.join(fv.torch)}: use a subset of "
      f"{TORCH_MODES} or 'none'."
    )
  return fv


def main(argv: list[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.worker:
    _worker(args.worker, args.worker_out)
    return {}
  other = [m for m in (bench_generation, bench_log_mel) if args.preset in m.PRESETS]
  if other:
    return other[0].run(
      args.preset,
      args.out,
      repeats=args.repeats,
      meta=dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        host=platform.node(),
        python=platform.python_version(),
        argv=argv if argv is not None else sys.argv[1:],
      ),
    )
  if args.torch and not _torch_importable():
    print("torch/transformers not importable: skipping the PyTorch peers.", flush=True)
    args.torch = []
  flags = XLA_FLAGS.get(args.xla_flags, tuple(args.xla_flags.split()))
  kept, dropped = supported_xla_flags(tuple(flags))
  if dropped:
    print(f"This jaxlib does not know {dropped}: running without them.", flush=True)
  xla_flags = " ".join([os.environ.get("XLA_FLAGS", ""), *kept]).strip()
  jax_env = {"XLA_FLAGS": xla_flags}
  # The torch workers never need JAX; keep it off the GPU if anything imports it.
  torch_env = {"JAX_PLATFORMS": "cpu"}
  if not args.isolate:
    os.environ["XLA_FLAGS"] = xla_flags  # effective only if JAX's backend is not up yet
    # Both frameworks share the GPU in one process: no JAX preallocation of 75% of it.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  specs = plan(args)
  now = datetime.datetime.now(datetime.timezone.utc)
  meta = dict(
    preset=args.preset,
    batch=args.batch,
    date=now.strftime("%Y-%m-%d %H:%M UTC"),
    xla_flags=xla_flags,
    xla_flags_dropped=dropped,
    input=args.input,
    warmup=args.warmup,
    steps=args.steps,
    repeats=args.repeats,
    isolate=args.isolate,
    host=platform.node(),
    python=platform.python_version(),
    argv=argv if argv is not None else sys.argv[1:],
    flops_per_step={v: train_flops(args.preset, v, args.batch) for v in MMTL_VARIANTS},
  )
  results: dict[str, dict[str, Any]] = {}
  report: dict[str, Any] = {}
  for spec in specs:
    print(f"[mmtl.bench] {spec['name']} ...", flush=True)
    env = torch_env if spec["kind"] == "torch" else jax_env
    result = run_measurement(spec, isolate=args.isolate, env=env, timeout=args.worker_timeout)
    if "cudnn" in result.get("error", "").lower() and spec["kind"] != "torch":
      print(
        f"[mmtl.bench] {spec['name']} failed with cuDNN attention; retrying with XLA's.\n"
        f"{result['error'][-600:]}",
        flush=True,
      )
      retry = run_measurement(
        dict(spec, attention="xla"), isolate=args.isolate, env=env, timeout=args.worker_timeout
      )
      result = dict(retry, cudnn_error=result["error"][-600:])
    results[spec["name"]] = result
    if "device" in result:
      meta.setdefault("device", result["device"])
    report = summarize(results, specs, meta)
    write_report(args.out, report)
    print(
      "  "
      + (
        f"failed: {result['error'][-400:]}"
        if "error" in result
        else ", ".join(
          f"{k}={v:.4g}"
          for k, v in result.items()
          if isinstance(v, float) and k in ("pairs_per_s", "step_s", "tflops", "compile_s")
        )
      ),
      flush=True,
    )
  print(markdown(report), flush=True)
  print(f"Wrote {os.path.join(args.out, 'bench.json')} and bench.md.", flush=True)
  return report


if __name__ == "__main__":
  main()
