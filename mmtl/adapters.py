"""Bottleneck adapters on chosen modules of the towers, with no change to model code.

For each module `M` of a tower chosen by `config.optim.adapters.targets` (regexes over
module paths, mmtl.rules syntax, e.g. `text_encoder/encoder/layer_\\d+/(attn|mlp)`),
`init` adds a bottleneck of width `size` beside M's params:

  sequential (Houlsby et al. 2019):  M(x) + up(relu(down(M(x))))       `M/adapter/...`
  parallel (He et al. 2022):         M(x) + scale * up(relu(down(x)))  `M/parallel_adapter/...`

with `down/{kernel,bias}`, `up/{kernel,bias}` (and the constant `parallel_adapter/scale`).
`up` starts at zero, so training starts exactly at the pretrained model. Houlsby's
placement is the output of each layer's attention and MLP block, before its residual add:
target `.../(attn|mlp)` in mmtl's shared layers; He et al.'s parallel adapter reads the
block's input (in a pre-LN layer, the normed hidden state).

The model applies an adapter wherever its module holds one: `applied()` installs a Flax
method interceptor (FusionModel runs its towers inside it) that, after a module's
`__call__`, looks for `adapter` / `parallel_adapter` among that module's params. The
params tree is the only record of which modules are adapted, as with mmtl.lora's leaves;
without adapters the interceptor changes nothing and the compiled step is the same.
The activation is ReLU (Pfeiffer et al. 2021; He et al. 2022).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
import contextlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmtl import config_keys, rules

SEQUENTIAL, PARALLEL = "adapter", "parallel_adapter"
KINDS = {"sequential": SEQUENTIAL, "parallel": PARALLEL}
# Rules (mmtl.rules syntax) for what the optimizer trains and never trains.
TRAINABLE = r".*/(parallel_)?adapter/(down|up)/(kernel|bias)"
CONSTANT = r".*/parallel_adapter/scale"
CONFIG_KEYS = dict(targets=config_keys.RULES, size=64, kind="sequential", scale=1.0)


def _interceptor(next_fun: Callable[..., Any], args: tuple, kwargs: dict, context: Any) -> Any:
  out = next_fun(*args, **kwargs)
  if context.method_name != "__call__":
    return out
  module = context.module
  for name in (SEQUENTIAL, PARALLEL):
    if module.has_variable("params", name):
      p = module.get_variable("params", name)
      x = out if name == SEQUENTIAL else args[0]
      dense = lambda h, q: jnp.dot(h, q["kernel"].astype(out.dtype)) + q["bias"].astype(out.dtype)  # noqa: E731
      delta = dense(jax.nn.relu(dense(x.astype(out.dtype), p["down"])), p["up"])
      if name == PARALLEL:
        delta = delta * p["scale"].astype(out.dtype)
      return out + delta
  return out


@contextlib.contextmanager
def applied() -> Iterator[None]:
  """Within it, every module whose params hold an adapter has it applied to its output."""
  with nn.intercept_methods(_interceptor):
    yield


def module_dims(model: nn.Module, variables: Any) -> dict[str, tuple[int, int]]:
  """{module path: (input width, output width)} of every module call of `model` on its
  `dummy_batch()` whose first argument and output are arrays; `variables` may be shapes
  (traced with jax.eval_shape: nothing is computed)."""
  dims: dict[str, tuple[int, int]] = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if (
      context.method_name == "__call__"
      and args
      and all(hasattr(a, "shape") and len(a.shape) >= 2 for a in (args[0], out))
    ):
      dims["/".join(context.module.path)] = (args[0].shape[-1], out.shape[-1])
    return out

  def traced(variables):
    with nn.intercept_methods(record):
      return model.apply(variables, model.dummy_batch())

  jax.eval_shape(traced, variables)
  return dims


def init(
  params: Any,
  adapters_cfg: Mapping[str, Any],
  rng: jax.Array,
  dims: Mapping[str, tuple[int, int]],
  towers: tuple[str, ...],
) -> dict[str, Any]:
  """`params` plus adapter leaves for each module in `dims` (`module_dims`) of the
  `towers` (param subtrees, e.g. `text_encoder`) that `adapters_cfg.targets` matches."""
  config_keys.check_keys(adapters_cfg, CONFIG_KEYS, "config.optim.adapters")
  cfg = {**CONFIG_KEYS, **adapters_cfg}
  if not cfg["targets"]:
    raise config_keys.ConfigError(
      "config.optim.adapters.targets is empty: give regexes of tower modules to adapt, "
      "e.g. ['.*_encoder/encoder/layer_\\\\d+/(attn|mlp)']."
    )
  if cfg["kind"] not in KINDS:
    raise config_keys.ConfigError(
      f"config.optim.adapters.kind={cfg['kind']!r}: use one of {sorted(KINDS)}."
    )
  size = int(cfg["size"])
  if size < 1:
    raise config_keys.ConfigError(f"config.optim.adapters.size={size} must be >= 1.")
  flat = rules.flatten(params)
  if any(rules.matches(TRAINABLE, p) for p in flat):
    raise ValueError("params already hold adapters: call adapters.init once, on base params.")
  targets = rules.as_list(cfg["targets"])
  in_towers = [p for p in dims if p.split("/")[0] in towers]
  for target in targets:
    outside = [p for p in dims if p not in in_towers and rules.matches(target, p)]
    if outside and not any(rules.matches(target, p) for p in in_towers):
      raise config_keys.ConfigError(
        f"config.optim.adapters.targets: {target!r} matches {outside[0]}, outside the towers "
        f"({', '.join(towers)}); adapters go into tower modules (use LoRA elsewhere)."
      )
  hits = rules.assign(in_towers, targets, default=False, what="config.optim.adapters.targets")
  name = KINDS[cfg["kind"]]
  out = dict(flat)
  for i, path in enumerate(p for p in in_towers if hits[p]):
    d_in, d_out = dims[path]
    d = d_out if name == SEQUENTIAL else d_in
    own = [x for p, x in flat.items() if p.startswith(path + "/")]
    dtype = jnp.result_type(*own) if own else jnp.float32
    bound = 1.0 / d**0.5  # as mmtl.lora's A: kaiming-uniform
    prefix = f"{path}/{name}"
    out[f"{prefix}/down/kernel"] = jax.random.uniform(
      jax.random.fold_in(rng, i), (d, size), dtype, -bound, bound
    )
    out[f"{prefix}/down/bias"] = jnp.zeros((size,), dtype)
    out[f"{prefix}/up/kernel"] = jnp.zeros((size, d_out), dtype)
    out[f"{prefix}/up/bias"] = jnp.zeros((d_out,), dtype)
    if name == PARALLEL:
      out[f"{prefix}/scale"] = jnp.asarray(cfg["scale"], jnp.float32)
  return rules.unflatten(out)
