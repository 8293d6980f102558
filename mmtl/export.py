r"""Exports one tower (or the decoder) of a trained run as a Hugging Face checkpoint folder.

  python -m mmtl.export --workdir DIR --tower image --out exported/image [--step N]
  python -m mmtl.export --workdir DIR --tower waveform --head --out exported/asr  # + CTC head

The folder holds `config.json` + `model.safetensors` that
`transformers.AutoModel.from_pretrained` loads with no missing or unexpected keys (a
Whisper encoder's folder lacks the decoder it has no weights for: transformers lists those
keys as missing) and that computes what the tower computed in the run: LoRA adapters are
merged into their kernels, params stored in low precision (`config.optim.frozen_dtype`) are
written as the float32 values the run computed with, and BatchNorm running statistics
(ResNet) are written with the weights. The step is the run's best checkpoint (its latest
when no best_metric was tracked) unless `--step` is given; a run of `total_steps=0` exports
its initial (`model_init`) weights.
With `--head`, a speech recognition run (ctc head) exports as transformers'
`Wav2Vec2ForCTC` (`HubertForCTC`): the tower, the head as its `lm_head`, the CTC
vocabulary (`vocab.json`, `Wav2Vec2CTCTokenizer`) and the feature extractor's settings
(`preprocessor_config.json`), so `transformers.pipeline("automatic-speech-recognition",
model=out)` transcribes with it.
With `--peft` (and no `--tower`), what a parameter-efficient run trained is written on its
own (mmtl.peft: its LoRA, adapter and prompt params and its new layers, e.g. the fusion and
head); a run with `config.peft_init=<out>` and the same model, `model_init` and
`config.optim` sections starts from them and computes what the exported run computed. A tower that
holds adapters or prompts does not export with `--tower`: transformers' model has no place
for them (LoRA merges into the kernels; adapters and prompts do not); export them with
`--peft` (its other weights are those of its `model_init` checkpoint).
A video tower (`--tower video`) exports its frame tower, the image model it runs on each
frame (a ViTModel, ...); its temporal model has no transformers counterpart.
`--out` must be new or empty: nothing is overwritten.
"""

from __future__ import annotations

from pathlib import Path
import sys
from typing import Any

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from mmtl import config as config_lib
from mmtl import config_keys, hf, low_precision, optim, peft, rules, sharding, train_state
from mmtl import metrics as metrics_lib
from mmtl import workdir as workdir_lib


def subtree_name(tower: str) -> str:
  """The params subtree of a tower named by modality (`image` -> `image_encoder`), or
  `decoder`."""
  return tower if tower == "decoder" else f"{tower}_encoder"


def _new_folder(out: str | Path) -> Path:
  out = Path(out)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise FileExistsError(f"{out} exists and is not an empty folder: give a new --out.")
  return out


def export_tower(
  workdir: str, tower: str, out: str | Path, step: int | None = None, head: bool = False
) -> Path:
  """Writes `tower` of the run in `workdir` at `step` (default: best, else latest) to `out`
  as a transformers checkpoint folder (with `head`, the ctc head with it: module
  docstring); returns `out`."""
  out = _new_folder(out)
  config = config_lib.with_defaults(
    config_lib.load_json(workdir_lib.path(workdir, config_lib.CONFIG_FILE))
  )
  model, variables = train_state.load_run(workdir, sharding.make_mesh(config.mesh), step, config)
  modules = {m: model.tower(m) for m in model.modalities}
  if getattr(model, "decoder", None) is not None:  # A captioning model's text decoder.
    modules["decoder"] = model.decoder
  name = subtree_name(tower)
  if tower not in modules:
    raise config_lib.ConfigError(
      f"--tower={tower}: the run in {workdir} has no {name}; its towers: {', '.join(modules)}."
    )
  params = jax.device_get(low_precision.model_params(variables["params"]))
  if config.optim.get("frozen_dtype"):  # frozen params stored in bfloat16: the model's float32 back
    params = jax.tree.map(lambda x: x.astype(np.float32) if x.dtype == jnp.bfloat16 else x, params)
  if held := sorted(p for p in peft.leaves(params) if p.startswith(f"{name}/")):
    raise config_lib.ConfigError(
      f"--tower={tower}: {name} holds adapters or prompts ({held[0]}, ...), which a "
      "transformers model cannot hold: export them with --peft instead of --tower."
    )
  exported = {"params": params[name]}
  if name in variables.get("batch_stats", {}):
    exported["batch_stats"] = jax.device_get(variables["batch_stats"][name])
  if sub := getattr(modules[tower], "pretrained_subtree", None):
    # A video tower: its image tower is the part transformers has a model for.
    print(
      f"Exporting {name}/{sub} (the image tower run on each frame); the temporal model "
      f"({name}/temporal) has no transformers counterpart and stays in the run."
    )
    modules[tower] = getattr(modules[tower], sub)
    exported = {c: t[sub] for c, t in exported.items()}
  if not head:
    return hf.save_pretrained(modules[tower], exported, out)
  if model.head_type != "ctc" or model.head_config["ctc_modality"] != tower:
    raise config_lib.ConfigError(
      f"--head exports a ctc head with the tower it reads; the run in {workdir} has a "
      f"{model.head_type!r} head"
      + (f" over {model.head_config['ctc_modality']!r}" if model.head_type == "ctc" else "")
      + ": leave --head out to export the tower alone."
    )
  _save_ctc_processor(config, tower, out)
  blank = model.head_config["blank_id"]
  head_config = dict(
    vocab_size=model.head_config["vocab_size"],
    pad_token_id=blank,
    ctc_loss_reduction=config.loss.ctc_loss_reduction,
  )
  return hf.save_pretrained(modules[tower], exported, out, params["head"], head_config)


def export_peft(workdir: str, out: str | Path, step: int | None = None) -> Path:
  """Writes the LoRA, adapter and prompt params of the run in `workdir` at `step` (default:
  best, else latest) to `out` with mmtl.peft.save; returns `out`."""
  out = _new_folder(out)
  config = config_lib.with_defaults(
    config_lib.load_json(workdir_lib.path(workdir, config_lib.CONFIG_FILE))
  )
  step = train_state.checkpoint_step(workdir, step)
  model, variables = train_state.load_run(workdir, sharding.make_mesh(config.mesh), step, config)
  params = jax.device_get(variables["params"])
  new_layers = train_state.new_layers(model, config.model_init)
  trained = peft.delta(params, new_layers)
  mask = rules.flatten(optim.freeze_mask(params, config.optim, step, new_layers=new_layers))
  if beyond := [p for p, frozen in mask.items() if not frozen and p not in trained]:
    raise config_lib.ConfigError(
      f"--peft: the run in {workdir} trained {beyond[0]} (and {len(beyond) - 1} more) "
      "beyond its LoRA, adapter and prompt params and new layers; export its towers "
      "with --tower instead."
    )
  return peft.save(trained, config.optim, config.model_init, out)


def _save_ctc_processor(config: Any, modality: str, out: Path) -> None:
  """The run's CTC vocabulary and, for a waveform tower, its `Wav2Vec2FeatureExtractor`
  settings (rate, normalization) in `out`, as a `Wav2Vec2ForCTC` folder holds them."""
  from transformers import Wav2Vec2FeatureExtractor  # pylint: disable=g-import-not-at-top

  from mmtl import ctc, data, modalities  # pylint: disable=g-import-not-at-top
  from mmtl.data import source  # pylint: disable=g-import-not-at-top

  input_cfg = data.input_config(config.input)
  ctc.CTCVocab.from_config(input_cfg.target).tokenizer.save_pretrained(out)
  if modality == "waveform":
    feature = source.feature_at(data.builder(input_cfg).info.features, input_cfg.fields.waveform)
    clip = modalities.Waveform(input_cfg, feature, train=False)
    Wav2Vec2FeatureExtractor(
      sampling_rate=clip.sampling_rate, do_normalize=clip.normalize, return_attention_mask=True
    ).save_pretrained(out)


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "A training workdir (holds config.json and checkpoints/).")
  flags.DEFINE_string(
    "tower", None, "Which tower: a modality of the run (image, text, audio) or decoder."
  )
  flags.DEFINE_string("out", None, "New (or empty) folder for config.json + model.safetensors.")
  flags.DEFINE_integer("step", None, "Checkpoint step; default: best (or latest).")
  flags.DEFINE_bool(
    "head", False, "With a ctc run's tower: its head too, as transformers' Wav2Vec2ForCTC."
  )
  flags.DEFINE_bool(
    "peft", False, "Instead of a tower: the run's LoRA, adapter and prompt params (mmtl.peft)."
  )


def main(argv: list[str]) -> None:
  del argv
  metrics_lib.quiet_library_logs()
  f = flags.FLAGS
  for flag, what in [
    ("workdir", "a run written by mmtl.train"),
    ("tower", "e.g. image, or --peft"),
    ("out", "the folder to write"),
  ]:
    if not f[flag].value and not (flag == "tower" and f.peft):
      sys.exit(f"--{flag} is required ({what}).")
  if f.peft and (f.tower or f.head):
    sys.exit("--peft exports the run's LoRA, adapter and prompt params: leave out --tower/--head.")
  try:
    if f.peft:
      out = export_peft(f.workdir, f.out, f.step)
      print(
        f"Wrote {out} (the LoRA, adapter and prompt params and new layers of {f.workdir}); "
        f"start a run from them with --config.peft_init={out}."
      )
      return
    out = export_tower(f.workdir, f.tower, f.out, f.step, head=f.head)
  except (*train_state.LOAD_RUN_ERRORS, FileExistsError) as e:
    sys.exit(config_keys.error_line(e))
  auto = "AutoModelForCTC" if f.head else "AutoModel"
  print(
    f"Wrote {out} ({subtree_name(f.tower)}{' and head' if f.head else ''} of {f.workdir}); "
    f"load it with transformers.{auto}.from_pretrained({str(out)!r})."
  )


if __name__ == "__main__":
  _define_flags()
  app.run(main)
