"""`python -m mmtl.generate`: captions of a split or of image files by a trained captioning
run, or transcripts of a split or of WAV files by a trained speech recognition (ctc head) run.

Prints the first texts (and the metrics, where the split has references) and writes every
one to `<workdir>/<captions|transcripts>_step<N>-<split, images or audio>-beams<k>.jsonl`
(a ctc run's `--num_beams`: the prefix beam search's width; 1 decodes greedily).
"""

from __future__ import annotations

import functools
import json
import math
import sys
from typing import Any

from absl import app, flags
import numpy as np
from PIL import Image

from mmtl import (
  checkpoint,
  config_keys,
  ctc,
  data,
  evaluators,
  heads,
  modalities,
  sharding,
  text_metrics,
  train_state,
)
from mmtl import config as config_lib
from mmtl import metrics as metrics_lib
from mmtl import workdir as workdir_lib
from mmtl.data import device, source, transforms
from mmtl.generate import GenerationError


def _load_run(workdir: str, step: int | None, head: str, does: str) -> tuple[Any, ...]:
  """(config, mesh, model, variables) of the run in `workdir`, whose head must be `head`."""
  config = config_lib.with_defaults(
    config_lib.load_json(f"{workdir.rstrip('/')}/{config_lib.CONFIG_FILE}")
  )
  mesh = sharding.make_mesh(config.mesh)
  model, variables = train_state.load_run(workdir, mesh, step, config)
  if model.head_type != head:
    raise GenerationError(
      f"{workdir} is a {model.head_type!r} run: mmtl.generate {does} runs whose "
      f"config.model.head is {head!r}."
    )
  return config, mesh, model, variables


def _host_batches(config: Any, mesh: Any) -> Any:
  """eval_cfg -> this process's batches of the run's eval input with `eval_cfg["input"]`'s
  overrides, at the run's batch size."""
  process_index, process_count = sharding.process_data_shard(mesh)
  return lambda eval_cfg: data.make_eval_iterator(
    {**config.input.to_dict(), **eval_cfg.get("input", {})},
    batch_size=int(config.batch_size) // process_count,
    process_index=process_index,
    process_count=process_count,
  )


def caption_run(
  workdir: str,
  *,
  split: str | None = None,
  images: tuple[str, ...] = (),
  step: int | None = None,
  **generate_kw: Any,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
  """(one {"id", "hypothesis", "references"} or {"image", "hypothesis"} per example, metrics)
  of the captioning run in `workdir` on its eval input with `split` (default: config.input's),
  or on image files."""
  config, mesh, model, variables = _load_run(workdir, step, "captioning", "captions with")
  input_cfg = data.input_config(config.input)
  target = transforms.TargetTokens.from_config(input_cfg.target)
  # The head's generate, as evaluation runs it (LoRA merged), with the run's variables.
  run_generate = functools.partial(
    heads.get(model.head_type).predict_fns(model, mesh)["generate"], variables
  )
  if images:
    fields = {**modalities.blank_fields(), "image": "image", "label": None, "target": None}
    cfg = data.input_config({**input_cfg.to_dict(), "fields": fields})
    pre = transforms.Preprocess(cfg, source.builder(cfg).info, train=False)
    rng = np.random.default_rng(0)  # eval preprocessing draws nothing that changes the image
    rows = [pre.example({"image": np.asarray(Image.open(f).convert("RGB"))}, rng) for f in images]
    batch = pre.tokenize(pre.arrays(pre.stack(rows)))
    batch["decoder_input_ids"] = np.tile(np.asarray(target.prompt, np.int32), (len(images), 1))
    ids = run_generate(
      batch,
      max_new_tokens=generate_kw.pop("max_new_tokens", 0) or int(input_cfg.target.max_length),
      eos_token_id=target.eos,
      pad_token_id=target.pad,
      **generate_kw,
    )
    texts = target.texts(np.asarray(ids))
    return [{"image": f, "hypothesis": t} for f, t in zip(images, texts)], {}
  # The run's first generating evaluator says how it is scored and what it reads.
  eval_cfg = next(
    (dict(c) for c in config.evals.values() if c.get("type") in ("captioning", "vqa")),
    {"type": "captioning"},
  )
  eval_cfg["input"] = {**dict(eval_cfg.get("input", {})), **({"split": split} if split else {})}
  generate_texts = evaluators.make_generate_texts(config, mesh, _host_batches(config, mesh))
  predictions, references = generate_texts(run_generate, eval_cfg, **generate_kw)
  rows = evaluators.caption_rows(predictions, references)
  score = text_metrics.vqa_accuracy if eval_cfg["type"] == "vqa" else text_metrics.caption_scores
  return rows, score(predictions, references)


def transcribe_run(
  workdir: str,
  *,
  split: str | None = None,
  audio: tuple[str, ...] = (),
  step: int | None = None,
  num_beams: int = 1,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
  """(one {"id", "hypothesis", "reference"} or {"audio", "hypothesis"} per example, metrics)
  of the ctc run in `workdir` on its eval input with `split` (default: config.input's), or
  on WAV files (resampled to the run's rate); `num_beams` 1 decodes greedily, more with a
  prefix beam search of that width."""
  config, mesh, model, variables = _load_run(workdir, step, "ctc", "transcribes with")
  input_cfg = data.input_config(config.input)
  vocab = ctc.CTCVocab.from_config(input_cfg.target)
  run_transcribe = functools.partial(
    heads.get("ctc").predict_fns(model, mesh)["transcribe"], variables, beam_size=num_beams
  )
  if audio:
    batch = _audio_batch(input_cfg, model.head_config["ctc_modality"], audio)
    texts = vocab.texts(np.asarray(run_transcribe(batch)["ids"]))
    return [{"audio": f, "hypothesis": t} for f, t in zip(audio, texts)], {}
  host = _host_batches(config, mesh)({"input": {"split": split} if split else {}})
  batches = device.to_devices(host, config, mesh)
  return evaluators.transcripts(run_transcribe, batches, vocab, split or input_cfg.split)


def _audio_batch(input_cfg: Any, modality: str, files: tuple[str, ...]) -> dict[str, Any]:
  """The batch of the `modality` (waveform, log_mel) input of WAV `files`, as the run's
  eval pipeline makes it, padded to the longest (scipy reads them; each is resampled from
  its own rate to the run's)."""
  from scipy.io import wavfile  # pylint: disable=g-import-not-at-top

  clips = [wavfile.read(f) for f in files]
  seconds = math.ceil(max(len(x) / rate for rate, x in clips) * 10) / 10
  section = input_cfg[modality]
  fields = {**modalities.blank_fields(), modality: modality, "label": None, "target": None}
  rows = []
  for rate, samples in clips:
    cfg = data.input_config(
      {
        **input_cfg.to_dict(),
        "fields": fields,
        modality: {
          **section.to_dict(),
          "rate": rate,
          "sampling_rate": section.sampling_rate or section.rate,
          "resample": True,
          "downmix": True,
          "max_seconds": seconds,
        },
      }
    )
    pre = transforms.Preprocess(cfg, None, train=False)
    rows.append(pre.example(pre.decode({modality: samples}), np.random.default_rng(0)))
  return pre.tokenize(pre.arrays(pre.stack(rows)))


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  metrics_lib.quiet_library_logs()
  if not f.workdir:
    sys.exit("--workdir=DIR is required (a captioning or ctc run written by mmtl.train).")
  config_file = workdir_lib.path(f.workdir, config_lib.CONFIG_FILE)
  if not config_file.exists():
    sys.exit(f"{config_file} not found: --workdir must be a run written by mmtl.train.")
  try:
    step = train_state.checkpoint_step(f.workdir, f.step)
    head = config_lib.load_json(str(config_file)).get("model", {}).get("head")
    if head == "ctc":
      kind, what = "transcripts", "audio" if f.audio else None
      rows, scores = transcribe_run(
        f.workdir, split=f.split, audio=tuple(f.audio or ()), step=step, num_beams=f.num_beams
      )
    else:
      kind, what = "captions", "images" if f.images else None
      rows, scores = caption_run(
        f.workdir,
        split=f.split,
        images=tuple(f.images or ()),
        step=step,
        num_beams=f.num_beams,
        max_new_tokens=f.max_new_tokens,
        length_penalty=f.length_penalty,
      )
  except (GenerationError, checkpoint.CheckpointError, FileNotFoundError, ValueError) as e:
    sys.exit(config_keys.error_line(e))
  for row in rows[:10]:
    print(json.dumps(row, ensure_ascii=False))
  if scores:
    print(metrics_lib.format_table(scores, title=f"{f.workdir} step {step}, {len(rows)} examples"))
  what = what or workdir_lib.safe_name(f.split or "eval")
  out = workdir_lib.path(f.workdir, f"{kind}_step{step}-{what}-beams{f.num_beams}.jsonl")
  workdir_lib.write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
  print(f"Wrote {len(rows)} {kind} to {out}")


def _define_flags() -> None:
  flags.DEFINE_string(
    "workdir", None, "A captioning or ctc run's workdir (config.json, checkpoints/)."
  )
  flags.DEFINE_integer("step", None, "Checkpoint step; default: best (or latest).")
  flags.DEFINE_string("split", None, "TFDS split to caption; default: config.input's split.")
  flags.DEFINE_list("images", None, "Image files to caption instead of a split.")
  flags.DEFINE_list("audio", None, "WAV files to transcribe (ctc runs) instead of a split.")
  flags.DEFINE_integer("num_beams", 1, "Beam width (1: greedy; ctc: the prefix beam search's).")
  flags.DEFINE_integer(
    "max_new_tokens", 0, "Tokens to generate; 0: config.input.target.max_length."
  )
  flags.DEFINE_float("length_penalty", 1.0, "Beam scores are divided by length**length_penalty.")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
