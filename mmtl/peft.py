"""What a parameter-efficient run changed, apart from the model it adapts: saved to a
folder, loaded back.

A run under the lora, adapters or prompts presets (mmtl.optim) trains the params those
methods add (mmtl.lora, mmtl.adapters, mmtl.prompts) and the model's new layers (the fusion,
the head, towers without a checkpoint); every checkpoint weight stays as `model_init` gave
it. `delta` is those trained params; `save` writes them as `peft.safetensors` (each under
its param path) with `peft.json` (the `config.optim` sections that added params, the run's
`model_init`, each shape): a few hundred KiB where the towers are hundreds of MiB. `load`
puts them into the params of a model built the same way, e.g. a run started with
`config.peft_init=<folder>`: its towers come from `config.model_init` as always, the rest
from the folder, so it computes what the saved run computed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import json
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from mmtl import adapters, config_keys, lora, prompts, rules

WEIGHTS, META = "peft.safetensors", "peft.json"
SECTIONS = ("lora", "adapters", "prompts")  # the config.optim sections that add params
_LEAVES = (lora.TRAINABLE, lora.CONSTANT, adapters.TRAINABLE, adapters.CONSTANT, prompts.TRAINABLE)


def leaves(params: Any) -> dict[str, Any]:
  """{path: leaf} of the params LoRA, adapters and prompts added to `params`."""
  return {
    p: x for p, x in rules.flatten(params).items() if any(rules.matches(r, p) for r in _LEAVES)
  }


def delta(params: Any, new_layers: Sequence[str]) -> dict[str, Any]:
  """{path: leaf} of the added params and of the new layers (regexes, e.g.
  `train_state.ParamLayout.new_layers`)."""
  flat = rules.flatten(params)
  new = rules.assign(flat, list(new_layers), default=False, require_match=False)
  return {**{p: x for p, x in flat.items() if new[p]}, **leaves(params)}


def save(
  trained: Mapping[str, Any],
  optim_cfg: Mapping[str, Any],
  model_init: Mapping[str, Any],
  out: Path,
) -> Path:
  """Writes `trained` ({path: array}, `delta`'s) to the folder `out`; returns it."""
  if not any(rules.matches(r, p) for p in trained for r in _LEAVES):
    raise config_keys.ConfigError(
      "The run has no LoRA, adapter or prompt params (config.optim.lora / adapters / "
      "prompts) to export: export a tower instead (--tower)."
    )
  arrays = {p: np.asarray(x) for p, x in trained.items()}
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  safetensors.numpy.save_file(arrays, str(out / WEIGHTS))
  plain = lambda v: v.to_dict() if hasattr(v, "to_dict") else dict(v)  # noqa: E731 (ConfigDict)
  meta = dict(
    optim={k: plain(optim_cfg[k]) for k in SECTIONS if optim_cfg.get(k)},
    model_init=plain(model_init),
    shapes={p: list(x.shape) for p, x in arrays.items()},
  )
  (out / META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
  return out


def load(folder: str | Path, params: Any, new_layers: Sequence[str]) -> dict[str, Any]:
  """`params` with its `delta` read from `folder` (written by `save`): the two must have
  the same paths and shapes."""
  path = Path(folder) / WEIGHTS
  if not path.is_file():
    raise FileNotFoundError(
      f"config.peft_init={str(folder)!r} holds no {WEIGHTS}: give a folder written by "
      "`python -m mmtl.export --peft`."
    )
  saved = safetensors.numpy.load_file(str(path))
  ours = delta(params, new_layers)
  missing, unexpected = sorted(set(ours) - set(saved)), sorted(set(saved) - set(ours))
  wrong = [
    f"{p} {saved[p].shape} vs {np.shape(ours[p])}"
    for p in ours
    if p in saved and saved[p].shape != np.shape(ours[p])
  ]
  if missing or unexpected or wrong:
    raise config_keys.ConfigError(
      f"config.peft_init={str(folder)!r} does not fit this run (its model and config.optim "
      f"lora/adapters/prompts): missing {missing[:5]}, unexpected {unexpected[:5]}, shapes "
      f"(saved vs run) {wrong[:5]}; build the run as its {META} says."
    )
  flat = rules.flatten(params)
  return rules.unflatten(
    {p: saved[p].astype(x.dtype) if p in saved else x for p, x in flat.items()}
  )
