"""Hugging Face checkpoints <-> mmtl's Flax encoders.

transformers 5 has no Flax classes, so mmtl owns the modules (mmtl/models/):
`mmtl.models.registry.MODELS` maps config.json's `model_type` to a module class,
which lists its params' HF names and layout transforms (`hf_names()`,
mmtl.models.weights). This file does the rest: find the checkpoint (local folder or hub
id through the HF cache, with HF_HUB_OFFLINE honoured), read `config.json` + weights
(`model.safetensors`, `flax_model.msgpack`, or their sharded `*.index.json`), shape
the module to the checkpoint (optional parts it lacks are not built), apply each
transform, check every name and shape, and write checkpoints that
`transformers.AutoModel.from_pretrained` loads.

Loading never initializes a weight silently: a param missing from the
checkpoint, an extra encoder weight in it, or a shape mismatch is a
`CheckpointError`, unless a `dont_load` regex (mmtl.rules syntax, on the
encoder's own param paths) says to keep the initialized value / skip it.
Checkpoint entries outside the encoder (task heads like `cls.*`, the other CLIP
tower, old `position_ids` buffers) are skipped and logged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
import json
import logging
from pathlib import Path
import re
from typing import Any

import flax.linen as nn
import flax.serialization
import huggingface_hub
import huggingface_hub.errors
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from mmtl import rules
from mmtl.models import registry, weights

Dtype = Any

# Weight files in order of preference.
WEIGHT_FILES = (
  "model.safetensors",
  "model.safetensors.index.json",
  "flax_model.msgpack",
  "flax_model.msgpack.index.json",
)
# What to fetch from the hub: config, weights, tokenizer and processor files (no *.bin / *.h5).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.msgpack", "*.txt", "*.model"]


class CheckpointError(ValueError):
  """A checkpoint can't be found, read, or matched to the module."""


def resolve(name_or_path: str | Path, revision: str | None = None) -> Path:
  """Local checkpoint folder, or the HF-cache snapshot of a hub id (downloads unless offline)."""
  path = Path(name_or_path).expanduser()
  if path.is_dir():
    if revision is not None:
      raise CheckpointError(
        f"revision={revision!r} only applies to hub ids, but {str(path)!r} is a "
        "local folder: drop `revision` or pass the hub id."
      )
    return path
  if path.exists():
    raise CheckpointError(
      f"{str(path)!r} is a file: pass the checkpoint folder (with config.json) or a hub id."
    )
  try:
    return Path(
      huggingface_hub.snapshot_download(
        str(name_or_path), revision=revision, allow_patterns=HUB_PATTERNS
      )
    )
  except huggingface_hub.errors.HFValidationError:
    raise CheckpointError(
      f"{str(name_or_path)!r} is neither an existing folder nor a valid hub id "
      "(owner/name): check the path."
    ) from None
  except (
    huggingface_hub.errors.LocalEntryNotFoundError,
    huggingface_hub.errors.IncompleteSnapshotError,
    huggingface_hub.errors.OfflineModeIsEnabled,
  ) as e:
    raise CheckpointError(
      f"{str(name_or_path)!r} (revision {revision or 'main'}) is not in the HF cache and "
      "downloads are "
      "off (HF_HUB_OFFLINE=1 or no network): download it once with network access, or pass a "
      "local "
      f"folder. ({type(e).__name__}: {e})"
    ) from None
  except (
    huggingface_hub.errors.RepositoryNotFoundError,
    huggingface_hub.errors.RevisionNotFoundError,
  ) as e:
    raise CheckpointError(
      f"Hub checkpoint {str(name_or_path)!r} revision {revision or 'main'} not found: "
      f"check the id, the revision and your HF token. ({e})"
    ) from None


def read_config(name_or_path: str | Path, revision: str | None = None) -> dict[str, Any]:
  """The checkpoint's config.json as a dict."""
  file = resolve(name_or_path, revision) / "config.json"
  if not file.exists():
    raise CheckpointError(
      f"No config.json in {str(file.parent)!r}: mmtl reads the architecture from it. "
      "Point at a transformers checkpoint folder."
    )
  return json.loads(file.read_text())


def _hf_config(config: Mapping[str, Any] | str | Path, revision: str | None) -> dict[str, Any]:
  return dict(config) if isinstance(config, Mapping) else read_config(config, revision)


def build_module(
  name_or_path_or_config: str | Path | Mapping[str, Any],
  *,
  tower: str | None = None,
  dtype: Dtype = jnp.float32,
  param_dtype: Dtype = jnp.float32,
  revision: str | None = None,
  **module_kw,
) -> nn.Module:
  """The encoder module for a checkpoint or a config.json dict (architecture only, no weights).

  The class is `mmtl.models.registry.MODELS[config["model_type"]]`. `tower` picks
  one tower of a multi-tower family (CLIP: "vision" or "text"); `module_kw` sets
  module attributes such as `remat`, `attention_impl`, `add_pooling_layer` (BERT, RoBERTa,
  XLM-R, ViT, DeiT, BEiT). A checkpoint (not a config dict) shapes the module: optional
  parts it does not hold (the pooler of a ViTForImageClassification or a
  RobertaForMaskedLM) are left out unless `module_kw` asks for them (`left_out` says which).
  """
  if isinstance(name_or_path_or_config, Mapping):
    return _build(dict(name_or_path_or_config), tower, dtype, param_dtype, module_kw)
  folder = resolve(name_or_path_or_config, revision)
  module = _build(read_config(folder), tower, dtype, param_dtype, module_kw)
  return fit_to_checkpoint(module, checkpoint_keys(folder), module_kw)


def _build(
  d: dict[str, Any],
  tower: str | None,
  dtype: Dtype,
  param_dtype: Dtype,
  module_kw: Mapping[str, Any],
) -> nn.Module:
  """The module of config.json `d` with every optional part (see `build_module`)."""
  model_type = d.get("model_type")
  if model_type not in registry.MODELS:
    raise CheckpointError(
      f"Unknown model_type {model_type!r} in config.json: mmtl implements "
      f"{sorted(registry.MODELS)}. Add a module in mmtl/models/ and one line "
      "in mmtl/models/registry.py."
    )
  module_cls = registry.MODELS[model_type]
  if d.get("is_decoder") and model_type in registry.DECODERS:
    module_cls = registry.DECODERS[model_type]  # BertLMHeadModel, not the encoder
  if tower is not None:
    d, module_cls = _tower(d, module_cls, tower)
  return module_cls(
    module_cls.config_class.from_hf(d), dtype=dtype, param_dtype=param_dtype, **module_kw
  )


def fit_to_checkpoint(
  module: nn.Module, keys: Iterable[str], chosen: Iterable[str] = ()
) -> nn.Module:
  """`module` without the optional parts (its class's `optional_parts`: {attribute: param
  subtree}) of which the checkpoint, whose state-dict `keys` are given, holds no weight.
  Attributes in `chosen` (set by the user) are kept as they are: a part asked for that the
  checkpoint lacks is then reported missing when loading."""
  if not getattr(module, "optional_parts", None):
    return module
  names = variable_names(module)
  hf_keys = _keys(names)
  present = set(_match_names(dict.fromkeys(keys), module, hf_keys))
  off = {}
  for attr, part in module.optional_parts.items():
    if attr in chosen or not getattr(module, attr):
      continue
    part_keys = {
      n.key for per in names.values() for path, n in per.items() if path.startswith(f"{part}/")
    }
    if part_keys and not part_keys & present:
      off[attr] = False
  return module.clone(**off) if off else module


def left_out(module: nn.Module, chosen: Iterable[str] = ()) -> dict[str, str]:
  """{attribute: part} of the optional parts `module` was built without that `chosen` did not
  ask to leave out: those `fit_to_checkpoint` left out."""
  return {
    attr: part
    for attr, part in getattr(module, "optional_parts", {}).items()
    if attr not in chosen and not getattr(module, attr)
  }


def _towers(module_cls: type[nn.Module]) -> dict[str, tuple[str, type[nn.Module]]]:
  """{tower: (sub-config key, class)} of a multi-tower family (CLIP); {} for others."""
  return getattr(module_cls, "towers", {})


def _tower(
  d: dict[str, Any], module_cls: type[nn.Module], tower: str
) -> tuple[dict[str, Any], type[nn.Module]]:
  """Config dict and class of `tower` in the config `d` of a `module_cls` checkpoint: the
  sub-config of a multi-tower model, or all of `d` if it is that tower saved alone."""
  if tower in _towers(module_cls):
    sub_key, tower_cls = _towers(module_cls)[tower]
    return d.get(sub_key) or {}, tower_cls
  owners = [t for t, c in registry.MODELS.items() if tower in _towers(c)]
  if not owners:
    names = sorted({t for c in registry.MODELS.values() for t in _towers(c)})
    raise CheckpointError(f"tower={tower!r}: use one of {names} or None.")
  if all(_towers(registry.MODELS[t])[tower][1] is not module_cls for t in owners):
    raise CheckpointError(
      f"tower={tower!r} picks a tower of a {' or '.join(map(repr, owners))} "
      "checkpoint, but this checkpoint has model_type="
      f"{module_cls.config_class.model_type!r}: drop `tower`."
    )
  return d, module_cls


def _init(module: nn.Module, rng: jax.Array) -> dict[str, Any]:
  return dict(module.init(rng, **module.dummy_inputs()))


_jitted_init = jax.jit(
  _init, static_argnums=0
)  # modules are hashable: one compile per architecture


def init_variables(module: nn.Module, rng: jax.Array) -> dict[str, Any]:
  """Randomly initialized variables of an encoder built by `build_module`: {"params": ...}
  and, for BatchNorm families (ResNet), {"batch_stats": ...} (running mean and variance)."""
  return _jitted_init(module, rng)


def variable_shapes(module: nn.Module) -> dict[str, Any]:
  """`init_variables` as ShapeDtypeStructs, without computing anything."""
  return jax.eval_shape(lambda r: _init(module, r), jax.random.PRNGKey(0))


def variable_names(module: nn.Module) -> dict[str, dict[str, weights.HFName]]:
  """{collection: {path: HF name}}: `hf_names()` under "params", and a BatchNorm
  family's `hf_batch_stats_names()` (its running statistics, torch buffers) under
  "batch_stats"."""
  names = {"params": module.hf_names()}
  if hasattr(module, "hf_batch_stats_names"):
    names["batch_stats"] = module.hf_batch_stats_names()
  return names


# --- Reading weights -----------------------------------------------------------


# HF Flax leaf names -> torch's (BatchNorm running statistics are `batch_stats` mean/var).
_FLAX_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
_FLAX_STATS = {"mean": "running_mean", "var": "running_var"}


def _from_flax_layout(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """HF Flax variables (flax_model.msgpack) -> the torch state-dict names and layouts.

  The file holds the params tree, or {"params": ..., "batch_stats": ...} for BatchNorm
  families (FlaxResNetModel)."""
  collections = tree if "batch_stats" in tree else {"params": tree}
  state = {}
  for collection, subtree in collections.items():
    leaves = _FLAX_STATS if collection == "batch_stats" else _FLAX_LEAVES
    for path, x in rules.flatten(subtree).items():
      *module, leaf = path.split("/")
      # HF Flax kernels are laid out as Flax's: their rank says which torch layout they had.
      transform = weights.by_rank(np.ndim(x)) if leaf == "kernel" else weights.Transform.IDENTITY
      key = ".".join([*module, leaves.get(leaf, leaf)])
      state[key] = weights.to_torch([np.asarray(x)], weights.HFName(key, transform))
  return state


def _read_file(file: Path) -> dict[str, np.ndarray]:
  if file.suffix == ".safetensors":
    return safetensors.numpy.load_file(file)
  return _from_flax_layout(flax.serialization.msgpack_restore(file.read_bytes()))


def read_weights(folder: Path) -> dict[str, np.ndarray]:
  """The checkpoint's weights as a torch-style state dict {HF key: array} (any of WEIGHT_FILES)."""
  for name in WEIGHT_FILES:
    file = folder / name
    if not file.exists():
      continue
    if not name.endswith(".index.json"):
      return _read_file(file)
    shards = sorted(set(json.loads(file.read_text())["weight_map"].values()))
    absent = [s for s in shards if not (folder / s).exists()]
    if absent:
      raise CheckpointError(
        f"{file} lists shard files that are not in {str(folder)!r}: {absent}. "
        "Re-download the checkpoint."
      )
    state = {}
    for shard in shards:
      state.update(_read_file(folder / shard))
    return state
  present = sorted(p.name for p in folder.iterdir())
  raise CheckpointError(
    f"No weights in {str(folder)!r}: expected one of {list(WEIGHT_FILES)}, found "
    f"{present}. PyTorch .bin checkpoints: re-save with safetensors "
    "(model.save_pretrained(dir, safe_serialization=True))."
  )


def checkpoint_keys(folder: Path) -> set[str]:
  """The state-dict keys of the checkpoint's weights: from the safetensors header or the
  index (no tensor read); a Flax msgpack is read whole."""
  for name in WEIGHT_FILES[:2]:
    file = folder / name
    if file.exists() and name.endswith(".index.json"):
      return set(json.loads(file.read_text())["weight_map"])
    if file.exists():
      with safetensors.safe_open(file, "numpy") as f:
        return set(f.keys())
  return set(read_weights(folder))


# --- Name and layout mapping -----------------------------------------------------


def _keys(names: Mapping[str, Mapping[str, weights.HFName]]) -> set[str]:
  """The state-dict keys of {collection: {path: HF name}}."""
  return {n.key for per_collection in names.values() for n in per_collection.values()}


def _align_prefix(
  state: dict[str, np.ndarray], hf_keys: set[str], prefix: str | None
) -> dict[str, np.ndarray]:
  """Strip or add the encoder's HF prefix (`bert.` in BertForX checkpoints; `vision_model.`
  which transformers 5 leaves out of a lone CLIPVisionModel) so names match `hf_keys`."""
  if prefix is None:
    return state
  p = prefix + "."
  candidates = [
    state,
    # Only the prefixed keys: a task head's own `layernorm` must not shadow the encoder's.
    {k[len(p) :]: v for k, v in state.items() if k.startswith(p)},
    {p + k: v for k, v in state.items()},
  ]
  return max(candidates, key=lambda s: len(hf_keys.intersection(s)))


def _match_names(state: dict[str, Any], module: nn.Module, hf_keys: set[str]) -> dict[str, Any]:
  """`state` under the names `hf_keys` uses: the family's `hf_aliases` (regex, replacement:
  names HF Flax checkpoints or older transformers used) renamed, the encoder's prefix
  stripped or added."""
  for pattern, replacement in getattr(module, "hf_aliases", ()):
    state = {k if k in hf_keys else re.sub(pattern, replacement, k): v for k, v in state.items()}
  return _align_prefix(state, hf_keys, module.hf_base_prefix)


def from_hf_state(
  state: dict[str, np.ndarray],
  module: nn.Module,
  names: Mapping[str, Mapping[str, weights.HFName]] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
  """{collection: {mmtl path: array}} for every variable of `module`'s family found in a
  torch-style state dict, each read by its name's transform (`names`: {collection: {path:
  HF name}} to read instead of `variable_names(module)`, e.g. its head's)."""
  names = variable_names(module) if names is None else names
  keys = _keys(names)
  state = _match_names(state, module, keys)
  skipped = sorted(set(state) - keys)
  if skipped:
    logging.info("Checkpoint entries outside %s, not loaded: %s", type(module).__name__, skipped)
  return {
    collection: {
      path: _read(path, np.asarray(state[name.key]), name)
      for path, name in paths.items()
      if name.key in state
    }
    for collection, paths in names.items()
  }


def _read(path: str, x: np.ndarray, name: weights.HFName) -> np.ndarray:
  try:
    return weights.to_flax(x, name)
  except ValueError as e:
    raise CheckpointError(
      f"{e} ({path}): the checkpoint is not of the family its config.json names, or its "
      "weights were re-saved in another layout. Re-save it with transformers."
    ) from None


def to_hf_state(module: nn.Module, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Torch-style state dict {HF key: array} of the encoder's `variables`."""
  names = variable_names(module)
  if "params" not in variables:
    raise CheckpointError(
      f"Export takes the encoder's variables ({{'params': ..., 'batch_stats': ...}}), got a tree "
      f"with {sorted(variables)[:5]}: pass {{'params': params}} (for a FusionModel tower, "
      "{'params': params['image_encoder']}, plus its batch_stats for BatchNorm families)."
    )
  missing = sorted(set(names) - set(variables))
  if missing:
    raise CheckpointError(
      f"{type(module).__name__} variables lack the {missing} collection(s): pass them "
      "with the params (the train state's batch_stats), or transformers gets no statistics."
    )
  tensors: dict[weights.HFName, dict[tuple[int, int], np.ndarray]] = {}  # {name: {part: x}}
  for collection, tree in variables.items():
    flat = rules.flatten(tree)
    unknown = [p for p in flat if p not in names.get(collection, {})]
    if unknown:
      raise CheckpointError(
        f"{collection} with no HF name in {type(module).__name__}: {unknown[:10]}. Export "
        "the encoder's own variables (e.g. params['image_encoder']), with LoRA merged."
      )
    for p, x in flat.items():
      name = names[collection][p]
      tensors.setdefault(name._replace(part=None), {})[(name.part or (0, 1))] = np.asarray(x)
  state = {}
  for name, parts in tensors.items():
    n = next(iter(parts))[1]
    if sorted(parts) != [(i, n) for i in range(n)]:
      raise CheckpointError(
        f"{name.key} is fused from {n} params, but the variables give slices "
        f"{sorted(i for i, _ in parts)}: export every param of the encoder."
      )
    state[name.key] = weights.to_torch([parts[i, n] for i in range(n)], name)
  # torch's BatchNorm also saves a step counter (unused with its momentum set): write one,
  # so transformers finds every buffer it expects.
  for key in [k for k in state if k.endswith(".running_mean")]:
    state[key.removesuffix("running_mean") + "num_batches_tracked"] = np.zeros((), np.int64)
  return state


def _listing(paths: list[str]) -> str:
  return ", ".join(paths[:20]) + (f", ... ({len(paths)} in all)" if len(paths) > 20 else "")


def merge_checkpoint(
  target: Mapping[str, Any],
  loaded: Mapping[str, np.ndarray],
  *,
  dont_load: Iterable[str] = (),
  where: str = "",
  source: str = "",
  fix: str = "",
) -> dict[str, Any]:
  """Checkpoint values onto a flat `target` ({path: array or ShapeDtypeStruct}).

  `dont_load` paths keep the target value (and are dropped from the checkpoint).
  Every other target path must be in `loaded` with the target's shape; loaded
  paths must all be in `target`. Values are cast to the target's dtype. `fix`
  replaces the error's advice (which fits an encoder).
  """
  dont_load = list(dont_load)
  skip = rules.assign(sorted(set(target) | set(loaded)), dont_load, default=False, what="dont_load")
  full = lambda p: f"{where}/{p}" if where else p
  missing = [full(p) for p in target if p not in loaded and not skip[p]]
  unexpected = [full(p) for p in loaded if p not in target and not skip[p]]
  mismatched = [
    f"{full(p)}: checkpoint {tuple(loaded[p].shape)} vs model {tuple(target[p].shape)}"
    for p in target
    if p in loaded and not skip[p] and not _fits(loaded[p].shape, target[p].shape)
  ]
  problems = []
  if mismatched:
    problems.append(f"shape mismatch for {len(mismatched)} param(s): {'; '.join(mismatched[:20])}")
  if missing:
    problems.append(f"{len(missing)} param(s) missing from the checkpoint: {_listing(missing)}")
  if unexpected:
    problems.append(
      f"{len(unexpected)} checkpoint param(s) the model does not have: {_listing(unexpected)}"
    )
  if problems:
    fix = fix or (
      "Build the module from the checkpoint's config.json (mmtl.hf.build_module of the folder, "
      "which leaves out optional parts the checkpoint does not hold unless an option such as "
      "add_pooling_layer=True asks for them), or list the params to leave out in dont_load "
      "(regexes on the encoder's param paths, e.g. dont_load=['pooler/.*']): those keep their "
      "initialized values."
    )
    raise CheckpointError(
      f"Checkpoint {source} does not fit the model: {'. '.join(problems)}. {fix}"
    )
  return {
    p: target[p]
    if skip[p]
    else np.asarray(loaded[p]).astype(target[p].dtype).reshape(target[p].shape)
    for p in target
  }


def _fits(loaded: tuple[int, ...], target: tuple[int, ...]) -> bool:
  """Same shape, or one value either way: SigLIP's (1,) logit_scale is a head's () one."""
  return tuple(loaded) == tuple(target) or np.prod(loaded) == np.prod(target) == 1


# --- Public entry points --------------------------------------------------------


def _merge_variables(
  target: Mapping[str, Mapping[str, Any]],
  loaded: Mapping[str, Mapping[str, np.ndarray]],
  *,
  dont_load: Iterable[str],
  where: str,
  source: str,
  fix: str = "",
) -> dict[str, dict[str, Any]]:
  """`merge_checkpoint` for each collection of the flat `target` ({collection: {path: x}}).
  `dont_load` regexes are on paths without the collection: `layer_0/.*` keeps a layer's
  params and its batch statistics."""
  merged = {}
  for collection, flat in target.items():
    if collection not in loaded:
      raise CheckpointError(
        f"The model has {collection} at {where or 'the encoder'} but {source} holds none: "
        "point model_init at a checkpoint of the same family."
      )
    at = where if collection == "params" else f"{collection}:{where}".rstrip(":")
    merged[collection] = merge_checkpoint(
      flat, loaded[collection], dont_load=dont_load, where=at, source=source, fix=fix
    )
  return merged


def load_pretrained(
  name_or_path: str | Path,
  *,
  tower: str | None = None,
  dtype: Dtype = jnp.float32,
  param_dtype: Dtype = jnp.float32,
  revision: str | None = None,
  dont_load: Iterable[str] = (),
  rng: jax.Array | None = None,
  **module_kw,
) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
  """(module, variables, config.json dict) from a local folder or a hub id.

  `variables` is what `module.apply` takes: {"params": ...} (+ "batch_stats" for BatchNorm
  families), host numpy arrays in `param_dtype`; `dtype` is the compute dtype.
  Variables matched by `dont_load` are initialized with `rng` (default PRNGKey(0)).
  """
  folder = resolve(name_or_path, revision)
  config, state = read_config(folder), read_weights(folder)
  module = fit_to_checkpoint(_build(config, tower, dtype, param_dtype, module_kw), state, module_kw)
  loaded = from_hf_state(state, module)
  return module, _load_variables(module, loaded, folder, dont_load, rng), config


def _load_variables(
  module: nn.Module,
  loaded: dict[str, dict[str, np.ndarray]],
  folder: Path,
  dont_load: Iterable[str],
  rng: jax.Array | None,
) -> dict[str, Any]:
  """`module`'s variables from the checkpoint values `loaded` (`from_hf_state` of the
  weights in `folder`); `dont_load` ones initialized."""
  dont_load = list(dont_load)
  target = {c: rules.flatten(t) for c, t in variable_shapes(module).items()}
  if any(
    any(rules.assign(flat, dont_load, default=False, require_match=False).values())
    for flat in target.values()
  ):
    # Only now are initialized values kept: pay for an init.
    init = init_variables(module, jax.random.PRNGKey(0) if rng is None else rng)
    target = {c: {p: np.asarray(x) for p, x in rules.flatten(t).items()} for c, t in init.items()}
  merged = _merge_variables(target, loaded, dont_load=dont_load, where="", source=str(folder))
  return {c: rules.unflatten(flat) for c, flat in merged.items()}


def build_decoder(
  name_or_path_or_config: str | Path | Mapping[str, Any],
  *,
  cross_attention: bool = True,
  dtype: Dtype = jnp.float32,
  param_dtype: Dtype = jnp.float32,
  revision: str | None = None,
  **module_kw,
) -> nn.Module:
  """The text decoder (`registry.DECODERS`) of a checkpoint or config.json dict, made a
  decoder (`is_decoder`) with cross-attention layers when `cross_attention`."""
  d = _hf_config(name_or_path_or_config, revision)
  model_type = d.get("model_type")
  if model_type not in registry.DECODERS:
    raise CheckpointError(
      f"model_type {model_type!r} is not a decoder family mmtl implements "
      f"({sorted(registry.DECODERS)}): point the decoder at a GPT-2 or BERT checkpoint, or add "
      "the family to mmtl.models.registry.DECODERS."
    )
  d = {**d, "is_decoder": True, "add_cross_attention": cross_attention}
  return build_module(d, dtype=dtype, param_dtype=param_dtype, **module_kw)


# Decoder params a checkpoint without cross-attention (an encoder, a plain LM) cannot hold.
CROSS_ATTENTION = r".*/cross_attn(_norm)?/.*"


def load_decoder(
  name_or_path: str | Path,
  *,
  cross_attention: bool = True,
  dtype: Dtype = jnp.float32,
  param_dtype: Dtype = jnp.float32,
  revision: str | None = None,
  dont_load: Iterable[str] = (),
  rng: jax.Array | None = None,
  **module_kw,
) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
  """(decoder, variables, config.json dict): a text decoder (`registry.DECODERS`) from a
  decoder or an encoder checkpoint, with cross-attention layers when `cross_attention`.

  Warm-starting (Rothe et al., 2020): a BERT encoder checkpoint becomes a causal
  `BertLMHeadModel`. Cross-attention params the checkpoint lacks are initialized with
  `rng` and logged as such; any other missing param is a CheckpointError, the LM head
  included (a sentence-transformers BertModel has none: `dont_load=["lm_head/.*"]`
  starts a new one, its output embedding tied to the word embeddings).
  """
  folder = resolve(name_or_path, revision)
  config = read_config(folder)
  module = build_decoder(
    config, cross_attention=cross_attention, dtype=dtype, param_dtype=param_dtype, **module_kw
  )
  loaded = from_hf_state(read_weights(folder), module)
  dont_load = _decoder_dont_load(module, loaded, config, folder, dont_load)
  return module, _load_variables(module, loaded, folder, dont_load, rng), config


def _decoder_dont_load(
  module: nn.Module,
  loaded: dict[str, dict[str, np.ndarray]],
  config: Mapping[str, Any],
  folder: Path,
  dont_load: Iterable[str],
  report: Callable[[str], None] = logging.warning,
) -> list[str]:
  """`dont_load` + the cross-attention params a checkpoint without cross-attention cannot
  hold (`loaded`: the checkpoint's values, `from_hf_state`). `report`s every param that
  will be initialized; a missing LM head is an error."""
  dont_load = list(dont_load)
  if module.cross_attention and not config.get("add_cross_attention"):
    dont_load.append(CROSS_ATTENTION)
  have = set(loaded["params"])
  params = sorted(rules.flatten(variable_shapes(module)["params"]))
  keep = rules.assign(params, dont_load, default=False, require_match=False)
  head = [p for p in params if p.startswith("lm_head/")]
  if head and not have.intersection(head) and not any(keep[p] for p in head):
    raise CheckpointError(
      f"{str(folder)!r} has no LM head (the {module.hf_architecture} weights {head[:3]} are not "
      "in it: an encoder checkpoint such as a BertModel or sentence-transformers model). Pass "
      "dont_load=['lm_head/.*'] to train a new head (the output embedding stays tied to the "
      "word embeddings), or use a checkpoint with its LM head (BertForMaskedLM, BertLMHeadModel)."
    )
  fresh = [p for p in params if keep[p] and p not in have]
  if fresh:
    report(
      f"{type(module).__name__} from {folder}: {len(fresh)} param(s) not in the checkpoint "
      f"are initialized: {_listing(fresh)}"
    )
  return dont_load


def _subtree(tree: Mapping[str, Any], keys: list[str], what: str) -> Any:
  node = tree
  for i, k in enumerate(keys):
    if not isinstance(node, Mapping) or k not in node:
      have = sorted(node) if isinstance(node, Mapping) else type(node).__name__
      raise CheckpointError(
        f"No subtree {'/'.join(keys[: i + 1])!r} in {what} (has {have}): "
        "pass the path of the encoder inside the model, e.g. 'image_encoder'."
      )
    node = node[k]
  return node


def load_into(
  variables: Mapping[str, Any],
  subtree: str,
  name_or_path: str | Path,
  *,
  tower: str | None = None,
  dont_load: Iterable[str] = (),
  revision: str | None = None,
  head: bool = False,
  decoder: bool = False,
  report: Callable[[str], None] = logging.warning,
) -> dict[str, Any]:
  """`variables` ({"params": ..., "batch_stats": ...}) with their `subtree` (e.g.
  "image_encoder") replaced by checkpoint values, in every collection the checkpoint has.

  As big_vision's `load`: the bigger model is initialized first; every shape is
  checked against that initialized subtree, and values are cast to its dtypes.
  `dont_load` regexes are on paths inside the subtree. With `head`, the subtree is
  a contrastive FusionModel's head and gets the checkpoint's dual-encoder head
  (`head_hf_names()` of its family: CLIP's projections and logit_scale). With `decoder`,
  the subtree is a captioning model's text decoder, loaded as `load_decoder` does
  (cross-attention an encoder checkpoint lacks is initialized, and `report`ed).
  Returns a new tree.
  """
  keys = subtree.split("/")
  folder = resolve(name_or_path, revision)
  config, state = read_config(folder), read_weights(folder)
  if decoder:
    target = rules.flatten(_subtree(variables["params"], keys, "params"))
    cross = any("/cross_attn/" in f"/{p}" for p in target)
    module = build_decoder(config, cross_attention=cross)
  else:
    module = build_module(config, tower=tower)
  names, fix = _head_names(module, tower) if head else (variable_names(module), "")
  loaded = from_hf_state(state, module, names)
  if decoder:
    dont_load = _decoder_dont_load(module, loaded, config, folder, dont_load, report)
  out = dict(variables)
  for c in names:  # "params" first: a checkpoint of another family fails on its params
    node = rules.flatten(_subtree(variables.get(c, {}), keys, c))
    merged = _merge_variables(
      {c: node}, loaded, dont_load=dont_load, where=subtree, source=str(folder), fix=fix
    )
    out[c] = _replace(variables[c], keys, rules.unflatten(merged[c]))
  return out


def _head_names(module: nn.Module, tower: str | None) -> tuple[dict[str, dict[str, str]], str]:
  """{"params": {head path: HF key}} of a checkpoint's task head (`head_hf_names` of its
  family), and the advice when it does not fit (`head_advice`)."""
  if tower is not None or not hasattr(module, "head_hf_names"):
    raise CheckpointError(
      "model_init.head loads a whole checkpoint's head without `tower`: a dual encoder's "
      "projections (CLIP, SigLIP) or a *ForCTC checkpoint's lm_head (wav2vec2, HuBERT); got "
      f"a {type(module).__name__} checkpoint"
      + (f" with tower={tower!r}" if tower is not None else "")
      + ". Point model_init.head at such a checkpoint, or leave the head out of model_init "
      "to train it from scratch."
    )
  return {"params": module.head_hf_names()}, module.head_advice()


def _replace(tree: Mapping[str, Any], keys: list[str], value: Any) -> dict[str, Any]:
  """Copy of `tree` with tree[keys[0]][keys[1]]... = value (copies only along the path)."""
  if not keys:
    return value
  return {**tree, keys[0]: _replace(tree[keys[0]], keys[1:], value)}


def save_pretrained(
  module: nn.Module,
  variables: Mapping[str, Any],
  out_dir: str | Path,
  head_params: Mapping[str, Any] | None = None,
  head_config: Mapping[str, Any] | None = None,
) -> Path:
  """Write `config.json` + `model.safetensors` of the encoder's `variables` ({"params": ...},
  + "batch_stats") that transformers (PyTorch) loads as-is. With `head_params` (a
  FusionModel's `head` subtree, of the names `head_hf_names` gives), the folder is the
  family's task model (`hf_head_architecture`: a CTC head as `Wav2Vec2ForCTC`'s `lm_head`),
  its config.json with `head_config`'s fields (e.g. vocab_size, pad_token_id) added."""
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  state = to_hf_state(module, variables)
  config = {"architectures": [module.hf_architecture], **module.config.to_hf()}
  if head_params is not None:
    if not hasattr(module, "hf_head_architecture"):
      raise CheckpointError(f"{type(module).__name__} has no task model to export a head into.")
    state = {f"{module.hf_base_prefix}.{k}": x for k, x in state.items()}
    names = module.head_hf_names()
    for path, x in rules.flatten(head_params).items():
      state[names[path].key] = weights.to_torch([np.asarray(x)], names[path])
    config = {**config, "architectures": [module.hf_head_architecture], **(head_config or {})}
  (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
  safetensors.numpy.save_file(state, out / "model.safetensors", metadata={"format": "pt"})
  return out
