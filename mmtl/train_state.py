"""The train state, created where it lives on the mesh.

One builder for the trainer, the benchmark and evaluation: `param_layout` gives
the params' shapes and shardings (from `config.sharding_rules`) without
computing anything; `init_variables` first reads the pretrained towers of
`config.model_init` on the host and checks them against those shapes (a checkpoint
that does not fit fails before anything is computed), then initializes only the
variables no checkpoint gave, with `jax.jit(init, out_shardings=...)` (every device
computes only its own shard, as big_vision's train.py; XLA drops the initializers of
the loaded ones), and places each loaded array shard by shard, so a tower larger than
one device's memory never exists whole on one device; `init_state` adds the step
counter and the optimizer state, sharded like the params.
`load_run` gives the variables of a finished run, restored into the same layout.

Variables are Flax's: {"params": ...} and, for models with BatchNorm towers (ResNet),
{"batch_stats": ...}, the running statistics, replicated (one vector per layer). The
train state holds them beside the params: {"step", "params", "batch_stats", "opt_state"}.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from mmtl import (
  adapters,
  checkpoint,
  hf,
  lora,
  low_precision,
  optim,
  peft,
  prompts,
  rules,
  sharding,
)
from mmtl import config as config_lib
from mmtl import workdir as workdir_lib
from mmtl.modalities import MODALITIES
from mmtl.models import fusion


@dataclasses.dataclass(frozen=True)
class ParamLayout:
  """Shapes (ShapeDtypeStructs) and NamedShardings of a model's params (LoRA, adapter and
  prompt leaves included), of its BatchNorm statistics ({} without BatchNorm), and the
  regexes of its params that start random (`new_layers` below)."""

  shapes: Any
  shardings: Any
  batch_stats: Any = dataclasses.field(default_factory=dict)
  batch_stats_shardings: Any = dataclasses.field(default_factory=dict)
  new_layers: tuple[str, ...] = optim.NEW_LAYERS

  def variables(self, of: str = "shapes") -> dict[str, Any]:
    """{"params": ..., "batch_stats": ...} of the shapes (`of="shapes"`) or shardings."""
    params, stats = (
      (self.shapes, self.batch_stats)
      if of == "shapes"
      else (self.shardings, self.batch_stats_shardings)
    )
    return {"params": params, **({"batch_stats": stats} if self.batch_stats else {})}


def _rngs(config: mlc.ConfigDict) -> tuple[jax.Array, jax.Array]:
  """(model init, parameter-efficient params' init) keys of `config.seed`."""
  rng_init, rng_peft = jax.random.split(jax.random.PRNGKey(config.seed))
  return rng_init, rng_peft


def _init_fn(model: fusion.FusionModel) -> Callable[[jax.Array], dict[str, Any]]:
  batch = model.dummy_batch()
  return lambda rng: dict(model.init(rng, batch))


def _extends(config: mlc.ConfigDict) -> bool:
  """Whether `_extend` changes the params."""
  return bool(
    any(config.optim.get(section) for section in peft.SECTIONS) or config.optim.get("frozen_dtype")
  )


def _extend(
  model: fusion.FusionModel,
  config: mlc.ConfigDict,
  variables: Any,
  rng: jax.Array,
  new_layers: tuple[str, ...],
) -> Callable[[Any], Any]:
  """params (initialized or loaded) -> the train state's: plus the LoRA, adapter and prompt
  params `config.optim` asks for, then the params frozen for the whole run stored in
  `config.optim.frozen_dtype` (mmtl.low_precision). `variables`: the model's variables or
  their shapes (to find the adapted modules)."""
  add = _add_peft(model, config, variables, rng)
  dtype = low_precision.check(config.optim.get("frozen_dtype") or "")
  if not dtype:
    return add
  added = jax.eval_shape(add, variables["params"])
  starts = [0, *optim.phase_boundaries(config.optim)]
  masks = [
    rules.flatten(optim.freeze_mask(added, config.optim, s, new_layers=new_layers)) for s in starts
  ]
  frozen = {p: all(mask[p] for mask in masks) for p in masks[0]}
  return lambda params: low_precision.store(add(params), frozen, dtype)


def _add_peft(
  model: fusion.FusionModel, config: mlc.ConfigDict, variables: Any, rng: jax.Array
) -> Callable[[Any], Any]:
  """params -> params + the LoRA, adapter and prompt params `config.optim` asks for."""
  cfg = config.optim
  towers = tuple(f"{m}_encoder" for m in model.modalities)
  dims = adapters.module_dims(model, variables) if cfg.get("adapters") else {}
  if cfg.get("prompts") and model.fusion_type == "bottleneck":
    raise config_lib.ConfigError(
      "config.optim.prompts cannot go with config.model.fusion='bottleneck' (its tokens are "
      "appended to the towers' top layers): use another fusion, or config.optim.adapters."
    )
  layers = {
    t: (model.tower(m).num_layers, model.tower(m).hidden_size)
    for t, m in zip(towers, model.modalities)
  }

  def add(params):
    if cfg.get("lora"):
      params = lora.init(params, cfg.lora, rng)
    if cfg.get("adapters"):
      params = adapters.init(params, cfg.adapters, jax.random.fold_in(rng, 1), dims, towers)
    if cfg.get("prompts"):
      params = prompts.init(params, cfg.prompts, jax.random.fold_in(rng, 2), layers)
    return params

  return add


def param_layout(
  model: fusion.FusionModel, config: mlc.ConfigDict, mesh: jax.sharding.Mesh
) -> ParamLayout:
  """The params' layout under `config.sharding_rules` (every rule checked against them);
  BatchNorm statistics are replicated."""
  rng_init, rng_peft = _rngs(config)
  variables = jax.eval_shape(_init_fn(model), rng_init)
  scratch = new_layers(model, config.model_init)
  extend = _extend(model, config, variables, rng_peft, scratch)
  shapes = jax.eval_shape(extend, variables["params"])
  stats = variables.get("batch_stats", {})
  return ParamLayout(
    shapes,
    sharding.param_shardings(mesh, shapes, config.sharding_rules),
    stats,
    jax.tree.map(lambda _: sharding.replicated(mesh), stats),
    scratch,
  )


def _init_spec(spec: str | Mapping[str, Any]) -> dict[str, Any]:
  """A `config.model_init` entry as dict(name=..., tower=..., dont_load=[...])."""
  return dict(name=spec) if isinstance(spec, str) else dict(spec)


def new_layers(model: fusion.FusionModel, model_init: Mapping[str, Any]) -> tuple[str, ...]:
  """Regexes of the params that start random: the model's own (`FusionModel.new_layers`),
  towers (and a decoder) that `model_init` gives no checkpoint, and each checkpoint's
  `dont_load`. mmtl.optim's parameter-efficient presets (bitfit, lora) train them in full."""
  specs = {subtree: _init_spec(spec) for subtree, spec in model_init.items()}
  subtrees = [f"{m}_encoder" for m in model.modalities]
  if getattr(model, "decoder", None) is not None:
    subtrees.append("decoder")
  scratch = [f"{s}/.*" for s in subtrees if not specs.get(s, {}).get("name")]
  # A tower whose checkpoint fills one part of it (video: the frame tower) has new layers.
  for m in model.modalities:
    if specs.get(f"{m}_encoder", {}).get("name"):
      scratch += [f"{m}_encoder/{r}" for r in getattr(model.tower(m), "new_layers", ())]
  skipped = [
    f"{subtree}/{rule}"
    for subtree, spec in specs.items()
    if spec.get("name")
    for rule in spec.get("dont_load") or ()
  ]
  return (*model.new_layers, *scratch, *skipped)


def _subtree(tree: Any, like: Any) -> Any:
  """The leaves of `tree` at the paths `like` has (e.g. shardings without the added
  parameter-efficient leaves)."""
  flat = rules.flatten(tree)
  return jax.tree.unflatten(jax.tree.structure(like), [flat[p] for p in rules.flatten(like)])


def place(tree: Any, shardings: Any) -> Any:
  """Host leaves (numpy) -> global arrays built shard by shard (each device is handed
  only its slice); leaves already on the devices are kept as they are."""

  def put(x, s):
    if isinstance(x, jax.Array):
      return x
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, s, lambda index: host[index])

  return jax.tree.map(put, tree, shardings)


def load_pretrained_towers(
  variables: dict[str, Any],
  model_init: Mapping[str, Any],
  note: Callable[[str], None] = print,
  pretrained_subtrees: Mapping[str, str] | None = None,
) -> dict[str, Any]:
  """`config.model_init`: {subtree: name_or_path | dict(name=..., tower=..., dont_load=[...])}.

  A name that is an mmtl run's workdir loads that run's trained subtree (`load_from_run`).

  Subtrees are towers (`image_encoder`, ...), in a contrastive model `head`: a CLIP
  checkpoint's projections and logit_scale (zero-shot from step 0), and in a captioning
  model `decoder`: a decoder or encoder checkpoint (BERT warm-start, new cross-attention).

  `variables` may be ShapeDtypeStructs (as `init_variables` passes them): each checkpoint
  is read on the host and checked against the subtree's shapes (mmtl.hf: every name and
  shape, BatchNorm statistics included); its values replace those leaves as host arrays
  cast to their dtypes, and the leaves it does not give (`dont_load`, a decoder's new
  cross-attention) are left as they were.
  An empty name keeps the random init (a from-scratch baseline is one override
  away: `--config.model_init.text_encoder=`). `pretrained_subtrees` maps a tower to the
  part of it its checkpoint gives (`video_encoder` -> `video_encoder/frame`: an image
  checkpoint; `pretrained_subtrees(model)`). Towers left out by
  `config.model.modalities` are skipped; any other subtree must exist.
  """
  for subtree, spec in model_init.items():
    spec = _init_spec(spec)
    if not spec.get("name"):
      note(f"model_init: {subtree} from scratch (no checkpoint given).")
      continue
    params = variables["params"]
    if subtree.split("/")[0] not in params and subtree in [f"{m}_encoder" for m in MODALITIES]:
      note(f"model_init: {subtree} is not in this model (config.model.modalities); skipped.")
      continue
    if is_run(spec["name"]):  # an mmtl run's workdir: its trained subtree
      variables = load_from_run(
        variables, subtree, spec["name"], dont_load=spec.get("dont_load", ()), note=note
      )
      continue
    note(f"model_init: {subtree} <- {spec['name']}")
    variables = hf.load_into(
      variables,
      (pretrained_subtrees or {}).get(subtree, subtree),
      spec["name"],
      tower=spec.get("tower"),
      dont_load=spec.get("dont_load", ()),
      head=subtree == "head",  # FusionModel's head: a dual-encoder checkpoint's projections
      decoder=subtree == "decoder",  # CaptioningModel's text decoder (warm-start allowed)
      report=note,  # the decoder's newly initialized params, in the start-up summary
    )
  return variables


def is_run(path: str) -> bool:
  """Whether `path` is an mmtl run's workdir (its config.json and checkpoints), not a
  Hugging Face checkpoint."""
  if not workdir_lib.path(path, config_lib.CONFIG_FILE).exists():
    return False
  return bool(checkpoint.saved_steps(workdir_lib.path(path, checkpoint.CHECKPOINT_DIR)))


def load_from_run(
  variables: dict[str, Any],
  subtree: str,
  workdir: str,
  *,
  dont_load: Any = (),
  note: Callable[[str], None] = print,
) -> dict[str, Any]:
  """`variables` with `subtree` (e.g. "text_encoder") replaced by that subtree of the run
  in `workdir` at its best step (its latest without a best metric): LoRA merged and
  low-precision params read back, as the run computes with them. Every path and shape is
  checked (mmtl.hf.merge_checkpoint), `dont_load` paths keep their values. Continued
  pretraining, then fine-tuning from it, is `config.model_init.text_encoder=<workdir>`."""
  step = checkpoint_step(workdir)
  directory = workdir_lib.path(workdir, checkpoint.CHECKPOINT_DIR)
  saved = jax.device_get(checkpoint.restore_variables(directory, step=step))
  saved["params"] = jax.device_get(low_precision.model_params(saved["params"]))
  out = dict(variables)
  prefix = f"{subtree}/"

  def inside(flat: Mapping[str, Any]) -> dict[str, Any]:
    return {p[len(prefix) :]: x for p, x in flat.items() if p.startswith(prefix)}

  for c, tree in variables.items():
    flat = rules.flatten(tree)
    target = inside(flat)
    if not target:
      if c == "params":
        raise config_lib.ConfigError(f"config.model_init.{subtree}: the model has no {subtree}.")
      continue
    loaded = inside(rules.flatten(saved.get(c, {})))
    merged = hf.merge_checkpoint(
      target,
      loaded,
      dont_load=rules.as_list(dont_load),
      where=subtree,
      source=f"the run {workdir} (step {step})",
      fix=f"Give config.model_init.{subtree} a run whose model has the same {subtree}.",
    )
    flat.update({prefix + p: x for p, x in merged.items()})
    out[c] = rules.unflatten(flat)
  note(f"model_init: {subtree} <- the run {workdir}, step {step}")
  return out


def pretrained_subtrees(model: fusion.FusionModel) -> dict[str, str]:
  """Towers a checkpoint fills only part of (`pretrained_subtree` of a tower: the video
  tower's frame tower): {"video_encoder": "video_encoder/frame"}."""
  return {
    f"{m}_encoder": f"{m}_encoder/{model.tower(m).pretrained_subtree}"
    for m in model.modalities
    if getattr(model.tower(m), "pretrained_subtree", None)
  }


def _note_head_pools(
  model: fusion.FusionModel, model_init: Mapping[str, Any], note: Callable[[str], None]
) -> None:
  """A dual encoder's head (`model_init.head`) was trained on its towers' pooler outputs:
  towers pooled otherwise feed its projections other features, so the model at step 0 is
  not the checkpoint's zero-shot model. Said at start-up, as it is easy to miss."""
  head = model_init.get("head")
  name = head.get("name") if hasattr(head, "get") else head  # a ConfigDict or a str
  if not name:
    return
  others = [
    f"config.model.towers.{m}.pool={model.pool_of(m)!r}"
    for m in model.modalities
    if model.pool_of(m) != "pooler"
  ]
  if others:
    note(
      f"Note: model_init.head <- {name} holds projections trained on its towers' pooler "
      f"outputs, but {', '.join(others)}: the model at step 0 is not {name}'s own zero-shot "
      "model (pool='pooler' makes it so)."
    )


def _initialize_missing(
  init: Callable[[jax.Array], dict[str, Any]], rng: jax.Array, variables: Any, shardings: Any
) -> Any:
  """`variables` with each ShapeDtypeStruct leaf given its value of `init(rng)` and each
  host leaf placed, all in `shardings`. One jitted init returns only the missing leaves,
  so XLA computes (and compiles) no initializer of a loaded one; the values are those
  of a whole init."""
  leaves, treedef = jax.tree.flatten(variables)
  leaf_shardings = treedef.flatten_up_to(shardings)
  missing = [i for i, x in enumerate(leaves) if isinstance(x, jax.ShapeDtypeStruct)]
  if missing:

    def pick(rng):
      every = treedef.flatten_up_to(init(rng))
      return [every[i] for i in missing]

    fresh = jax.jit(pick, out_shardings=[leaf_shardings[i] for i in missing])(rng)
    for i, x in zip(missing, fresh, strict=True):
      leaves[i] = x
  return place(jax.tree.unflatten(treedef, leaves), shardings)


def init_variables(
  model: fusion.FusionModel,
  config: mlc.ConfigDict,
  layout: ParamLayout,
  *,
  pretrained: bool = True,
  note: Callable[[str], None] = print,
) -> dict[str, Any]:
  """`config.model_init`'s pretrained towers (when `pretrained`) + random init of the rest
  + LoRA, adapter and prompt leaves, frozen params in `config.optim.frozen_dtype`, every
  array created in its final sharding: {"params": ..., "batch_stats": ...}."""
  rng_init, rng_peft = _rngs(config)
  init = _init_fn(model)
  init_shapes = shapes = jax.eval_shape(init, rng_init)
  shardings = {
    **layout.variables("shardings"),
    "params": _subtree(layout.shardings, shapes["params"]),
  }
  if pretrained:
    _note_head_pools(model, config.model_init, note)
    shapes = load_pretrained_towers(shapes, config.model_init, note, pretrained_subtrees(model))
  variables = _initialize_missing(init, rng_init, shapes, shardings)
  if _extends(config):  # After the pretrained load: checkpoints have none of the additions.
    extend = _extend(model, config, init_shapes, rng_peft, layout.new_layers)
    variables["params"] = jax.jit(extend, out_shardings=layout.shardings, donate_argnums=0)(
      variables["params"]
    )
  if config.peft_init:  # A saved run's LoRA, adapter and prompt params (mmtl.peft).
    loaded = peft.load(config.peft_init, variables["params"], layout.new_layers)
    variables["params"] = place(loaded, layout.shardings)
    note(f"Loaded the LoRA/adapter/prompt params and new layers of {config.peft_init}.")
  return variables


def init_state(
  variables: Mapping[str, Any], tx: Any, state_shardings: Mapping[str, Any]
) -> dict[str, Any]:
  """{step: 0, params, [batch_stats,] opt_state: tx.init(params)}, each sharded as
  `state_shardings` says."""
  params = variables["params"]
  return {
    "step": jax.device_put(jnp.zeros((), jnp.int32), state_shardings["step"]),
    **variables,
    "opt_state": jax.jit(tx.init, out_shardings=state_shardings["opt_state"])(params),
  }


def variables_of(state: Mapping[str, Any]) -> dict[str, Any]:
  """The model variables ({"params", "batch_stats"}) of a train state."""
  return {k: state[k] for k in ("params", "batch_stats") if k in state}


def checkpoint_step(workdir: str, step: int | None = None) -> int:
  """`step`, else the run's best step (its latest when no best_metric was tracked)."""
  if step is not None:
    return step
  directory = workdir_lib.path(workdir, checkpoint.CHECKPOINT_DIR)
  with checkpoint.CheckpointManager(directory, read_only=True) as manager:
    best = manager.best_step()
  if best is None:
    raise FileNotFoundError(f"No checkpoint in {directory}: train the run first.")
  return best


# What restoring a saved run can fail with, each error one line for the user (the
# command-line tools that read runs, mmtl.evaluate and mmtl.export, print these).
LOAD_RUN_ERRORS = (
  config_lib.ConfigError,
  rules.RuleError,
  checkpoint.CheckpointError,
  hf.CheckpointError,
  FileNotFoundError,
)


def load_run(
  workdir: str,
  mesh: jax.sharding.Mesh,
  step: int | None = None,
  config: mlc.ConfigDict | None = None,
) -> tuple[fusion.FusionModel, dict[str, Any]]:
  """(model, variables) of a saved run (default: its own config and best step), restored
  straight into their shardings on `mesh`."""
  config = config_lib.with_defaults(
    config or config_lib.load_json(workdir_lib.path(workdir, config_lib.CONFIG_FILE))
  )
  model = fusion.build(config.model)
  layout = param_layout(model, config, mesh)
  directory = workdir_lib.path(workdir, checkpoint.CHECKPOINT_DIR)
  step = checkpoint_step(workdir, step)
  check_tower_parts(model, config.model, saved_params(directory, step), directory)
  variables = checkpoint.restore_variables(
    directory, step=step, shardings=layout.variables("shardings")
  )
  return model, variables


def saved_params(directory: str, step: int) -> list[str]:
  """The param paths of checkpoint `step` in `directory` (from its metadata; none if that
  cannot be read: restoring it then says why)."""
  try:
    with checkpoint.CheckpointManager(directory, read_only=True) as manager:
      return list(rules.flatten(manager.item_metadata(step, "params")))
  except Exception:  # noqa: BLE001 - a missing or corrupt step is for the restore to report
    return []


def check_tower_parts(
  model: fusion.FusionModel, model_cfg: Mapping[str, Any], saved: list[str], source: str
) -> None:
  """A run's checkpoint that holds a tower part the tower is now built without (its HF
  checkpoint holds none, so mmtl.hf leaves it out; a run whose pooler was kept with
  dont_load has one) restores only once the tower builds it again: one line naming the
  option that does."""
  for m in model.modalities:
    tower = model_cfg["towers"][m]
    module, prefix = model.tower(m), f"{m}_encoder"
    if sub := getattr(module, "pretrained_subtree", None):  # video: its frame tower's parts
      module, prefix = getattr(module, sub), f"{prefix}/{sub}"
    for attr, part in hf.left_out(module, tower.get("kwargs") or {}).items():
      if any(p.startswith(f"{prefix}/{part}/") for p in saved):
        option = f"config.model.towers.{m}.kwargs.{attr}=True"
        raise config_lib.ConfigError(
          f"The checkpoint in {source} holds {prefix}/{part}, but the {m} tower is built "
          f"without its {part}, as {tower['name']} holds none: set {option} to build it "
          f"(mmtl.train --{option} --allow_config_change saves it in the run's config.json, "
          "which mmtl.evaluate and mmtl.export read; or edit config.json)."
        )
