"""Params-level LoRA (mmtl.lora) and its training under mmtl.optim."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmtl import lora, optim, rules

HIGHEST = jax.lax.Precision.HIGHEST


class Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    dense = lambda n, name: nn.Dense(n, precision=HIGHEST, name=name)
    return dense(8, "fc2")(nn.gelu(dense(16, "fc1")(x)))


class Layer(nn.Module):
  @nn.compact
  def __call__(self, x):
    return Mlp(name="mlp")(x)


class Encoder(nn.Module):
  @nn.compact
  def __call__(self, x):
    return Layer(name="layer_0")(x)


class Tower(nn.Module):
  @nn.compact
  def __call__(self, x):
    return Encoder(name="encoder")(x)


class Model(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, precision=HIGHEST, name="head")(Tower(name="image_encoder")(x))


def reference_lora_model(params, x):
  """The LoRA model written out: every adapted dense is x @ W + b + scale * (x @ A) @ B."""

  def dense(p, x):
    y = jnp.matmul(x, p["kernel"], precision=HIGHEST) + p["bias"]
    if "lora_a" in p:
      y += p["lora_scale"] * jnp.matmul(
        jnp.matmul(x, p["lora_a"], precision=HIGHEST), p["lora_b"], precision=HIGHEST
      )
    return y

  mlp = params["image_encoder"]["encoder"]["layer_0"]["mlp"]
  return dense(params["head"], dense(mlp["fc2"], nn.gelu(dense(mlp["fc1"], x))))


LORA = dict(targets=[".*/mlp/fc(1|2)/kernel"], rank=2, alpha=4)


@functools.lru_cache  # tests only read the returned trees
def setup():
  model = Model()
  x = jax.random.normal(jax.random.key(0), (6, 8))
  labels = jnp.arange(6) % 3
  base = jax.jit(model.init)(jax.random.key(1), x)["params"]
  return model, x, labels, base


def test_init_adds_adapters_and_starts_at_the_base():
  _, _, _, base = setup()
  params = lora.init(base, LORA, jax.random.key(2))
  flat = rules.flatten(params)
  added = sorted(set(flat) - set(rules.flatten(base)))
  prefix = "image_encoder/encoder/layer_0/mlp/"
  assert added == [prefix + f"fc{i}/lora_{n}" for i in (1, 2) for n in ("a", "b", "scale")]
  assert flat[prefix + "fc1/lora_a"].shape == (8, 2) and flat[prefix + "fc1/lora_b"].shape == (
    2,
    16,
  )
  assert float(flat[prefix + "fc2/lora_scale"]) == 2.0  # alpha / rank
  assert np.any(flat[prefix + "fc1/lora_a"]) and not np.any(flat[prefix + "fc1/lora_b"])
  merged = lora.merge(params)
  assert jax.tree.structure(merged) == jax.tree.structure(base)
  jax.tree.map(np.testing.assert_array_equal, merged, base)
  assert lora.merge(base) is base


def test_lora_training_keeps_base_and_merged_export_matches():
  model, x, labels, base = setup()
  params = lora.init(base, LORA, jax.random.key(2))
  cfg = dict(name="adamw", lr=0.05, preset="lora", lora=LORA, schedule=dict(decay="constant"))
  mask = optim.freeze_mask(params, cfg)
  trainable = {p for p, f in rules.flatten(mask).items() if not f}
  assert trainable == {
    p for p in rules.flatten(params) if rules.matches(r".*/lora_(a|b)|head/.*", p)
  }
  tx, _ = optim.make(cfg, params, total_steps=10)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    trainable, frozen = optim.split(params, mask)

    def loss_fn(t):
      logits = model.apply({"params": lora.merge(optim.combine(t, frozen))}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    grads = optim.combine(jax.grad(loss_fn)(trainable), jax.tree.map(jnp.zeros_like, frozen))
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  trained = params
  for _ in range(3):
    trained, opt_state = step(trained, opt_state)
  before, after = rules.flatten(params), rules.flatten(trained)
  for path in before:
    same = np.array_equal(before[path], after[path])
    assert same == (path not in trainable), path  # base and lora_scale untouched, the rest trained
  assert not [
    p
    for p in rules.flatten(opt_state)
    if p.endswith(("/kernel", "/lora_scale")) and "head" not in p
  ]  # no optimizer state for frozen base weights

  exported = lora.merge(trained)
  assert jax.tree.structure(exported) == jax.tree.structure(base)  # loads into the plain model
  out = model.apply({"params": exported}, x)
  np.testing.assert_allclose(out, reference_lora_model(trained, x), rtol=1e-5, atol=1e-6)
  assert not np.allclose(
    out, model.apply({"params": dict(base, head=trained["head"])}, x), atol=1e-4
  )


def test_lora_scale_is_always_frozen():
  _, _, _, base = setup()
  params = lora.init(base, LORA, jax.random.key(2))
  frozen = {p for p, f in rules.flatten(optim.freeze_mask(params, {})).items() if f}
  assert frozen == {p for p in rules.flatten(params) if p.endswith("/lora_scale")}


def test_bad_lora_configs():
  _, _, _, base = setup()
  key = jax.random.key(0)
  with pytest.raises(rules.RuleError, match=r"config.optim.lora.targets.*\.\*/mlp/fc3/kernel"):
    lora.init(base, dict(LORA, targets=[".*/mlp/fc3/kernel"]), key)
  with pytest.raises(rules.RuleError, match="2-D dense kernels"):
    lora.init(base, dict(LORA, targets=[".*/fc1/bias"]), key)
  with pytest.raises(ValueError, match="rank=9"):
    lora.init(base, dict(LORA, rank=9), key)
  with pytest.raises(ValueError, match=r"Unknown config key config\.optim\.lora\.rnak"):
    lora.init(base, dict(LORA, rnak=4), key)
  with pytest.raises(ValueError, match="call lora.init once"):
    lora.init(lora.init(base, LORA, key), LORA, key)
  with pytest.raises(rules.RuleError, match=r"preset=.lora. \(params need mmtl.lora.init\)"):
    optim.freeze_mask(base, dict(preset="lora", lora=LORA))  # forgot lora.init
