"""A tiny transformer and sharded train loop for the sharding, checkpoint and
multi-host tests. Param names follow the real encoders
(`image_encoder/encoder/layer_0/attn/query/kernel`, `.../mlp/fc1/kernel`), and
the loop uses mmtl.sharding the way the trainer does: init straight into the
target shardings, a jitted step with in/out NamedShardings and donated state,
per-process batch slices through `mmtl.data.device.put_batch`.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmtl import sharding
from mmtl.data import device

GLOBAL_BATCH, TOKENS, FEATURES, WIDTH, CLASSES = 16, 4, 8, 16, 3


class Attention(nn.Module):
  heads: int = 2

  @nn.compact
  def __call__(self, x):
    split = lambda y: y.reshape(*y.shape[:-1], self.heads, -1)  # noqa: E731
    q, k, v = (split(nn.Dense(WIDTH, name=n)(x)) for n in ("query", "key", "value"))
    out = jax.nn.dot_product_attention(q, k, v)
    return nn.Dense(WIDTH, name="out")(out.reshape(x.shape))


class Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(WIDTH, name="fc2")(nn.gelu(nn.Dense(2 * WIDTH, name="fc1")(x)))


class Layer(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x + Attention(name="attn")(nn.LayerNorm(name="attn_norm")(x))
    return x + Mlp(name="mlp")(nn.LayerNorm(name="mlp_norm")(x))


class Encoder(nn.Module):
  num_layers: int = 1
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    layer = nn.remat(Layer) if self.remat else Layer
    for i in range(self.num_layers):
      x = layer(name=f"layer_{i}")(x)
    return x


class Tower(nn.Module):
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(WIDTH, name="embed")(x)
    return Encoder(remat=self.remat, name="encoder")(x).mean(axis=1)


class ToyModel(nn.Module):
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    return nn.Dense(CLASSES, name="head")(Tower(self.remat, name="image_encoder")(x))


MODEL = ToyModel()
# eps well above float32 noise: the key bias has an exactly-zero true gradient
# (softmax ignores a per-query constant), so Adam must not amplify its noise.
TX = optax.adamw(1e-2, eps=1e-3)


def init(rng: jax.Array) -> dict:
  params = MODEL.init(rng, jnp.zeros((1, TOKENS, FEATURES)))["params"]
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": TX.init(params)}


def loss_fn(params, batch, model=MODEL):
  logits = model.apply({"params": params}, batch["x"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()


def train_step(state, batch):
  loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch)
  updates, opt_state = TX.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, loss


def state_shardings(mesh, rules):
  shapes = jax.eval_shape(init, jax.random.key(0))
  return shapes, sharding.state_shardings(
    mesh, shapes, sharding.param_shardings(mesh, shapes["params"], rules)
  )


@functools.cache  # compile once per (mesh, rules) in a test session: CPU time is scarce
def _jitted(mesh, rules):
  _, shardings = state_shardings(mesh, rules)
  init_fn = jax.jit(init, out_shardings=shardings)
  step_fn = jax.jit(
    train_step,
    in_shardings=(shardings, sharding.batch_sharding(mesh)),
    out_shardings=(shardings, sharding.replicated(mesh)),
    donate_argnums=0,
  )
  return init_fn, step_fn


def init_state(mesh, rules):
  return _jitted(mesh, rules)[0](jax.random.key(0))


def compiled_step(mesh, rules):
  """The train step jitted with in/out NamedShardings, the state donated."""
  return _jitted(mesh, rules)[1]


def global_batch(step: int) -> dict[str, np.ndarray]:
  """The same deterministic global batch for a step on every process and mesh."""
  rng = np.random.default_rng(step)
  x = rng.normal(size=(GLOBAL_BATCH, TOKENS, FEATURES)).astype(np.float32)
  labels = (x[:, 0, :CLASSES].argmax(-1)).astype(np.int32)
  return {"x": x, "labels": labels}


def local_batch(step: int, mesh) -> dict[str, np.ndarray]:
  """This process's rows of the global batch, as a data loader would give them."""
  index, count = sharding.process_data_shard(mesh)
  rows = GLOBAL_BATCH // count
  return {k: v[index * rows : (index + 1) * rows] for k, v in global_batch(step).items()}


def run(mesh, rules, num_steps: int, state=None) -> tuple[dict, list[float]]:
  """Trains `num_steps` from `state` (fresh init if None); returns (state, losses)."""
  state = init_state(mesh, rules) if state is None else state
  step_fn = compiled_step(mesh, rules)
  losses = []
  start = int(jax.device_get(state["step"]))
  for step in range(start, start + num_steps):
    state, loss = step_fn(state, device.put_batch(local_batch(step, mesh), mesh))
    losses.append(float(loss))
  return state, losses


@functools.cache
def reference_run(
  mesh_items: tuple, rules: str, num_steps: int, num_devices: int | None = None
) -> tuple[dict, list[float]]:
  """`run` from a fresh state on the first `num_devices` devices, fetched to
  host numpy; cached so the test files share it."""
  mesh = sharding.make_mesh(dict(mesh_items), devices=jax.devices()[:num_devices])
  state, losses = run(mesh, rules, num_steps)
  return jax.device_get(state), losses
