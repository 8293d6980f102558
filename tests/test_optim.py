"""Freezing, LR rules, layer-wise decay, schedules and gradual unfreezing (mmtl.optim)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mmtl import optim, rules


class Attn(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.width, name="out")(
      nn.Dense(self.width, name="query")(x) * nn.Dense(self.width, name="value")(x)
    )


class Mlp(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.width, name="fc2")(nn.gelu(nn.Dense(2 * self.width, name="fc1")(x)))


class Layer(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x):
    x = x + Attn(self.width, name="attn")(nn.LayerNorm(name="ln1")(x))
    return x + Mlp(self.width, name="mlp")(nn.LayerNorm(name="ln2")(x))


class Encoder(nn.Module):
  width: int
  depth: int

  @nn.compact
  def __call__(self, x):
    for i in range(self.depth):
      x = Layer(self.width, name=f"layer_{i}")(x)
    return x


class Embeddings(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.width, name="projection")(x)
    return x + self.param("position_embedding", nn.initializers.normal(0.02), x.shape[1:])


class Pooler(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x):
    return jnp.tanh(nn.Dense(self.width, name="dense")(x.mean(axis=1)))


class Tower(nn.Module):
  """Paths like a real tower: embeddings/..., encoder/layer_{i}/..., post_layernorm, pooler."""

  width: int
  depth: int

  @nn.compact
  def __call__(self, x):
    x = Encoder(self.width, self.depth, name="encoder")(
      Embeddings(self.width, name="embeddings")(x)
    )
    return Pooler(self.width, name="pooler")(nn.LayerNorm(name="post_layernorm")(x))


class Fused(nn.Module):
  width: int = 16
  depth: int = 2

  @nn.compact
  def __call__(self, image, text):
    img = Tower(self.width, self.depth, name="image_encoder")(image)
    txt = Tower(self.width, self.depth, name="text_encoder")(text)
    x = nn.gelu(nn.Dense(self.width, name="fusion")(jnp.concatenate([img, txt], -1)))
    return nn.Dense(3, name="head")(x)


B, T, D = 4, 3, 8


@functools.lru_cache  # tests only read the returned trees
def setup_model(width=16, depth=2):
  model = Fused(width, depth)
  keys = jax.random.split(jax.random.key(0), 3)
  batch = dict(
    image=jax.random.normal(keys[0], (B, T, D)),
    text=jax.random.normal(keys[1], (B, T, D)),
    labels=jnp.arange(B) % 3,
  )
  params = jax.jit(model.init)(keys[2], batch["image"], batch["text"])["params"]
  return model, params, batch


def make_step(model, tx, mask, traces=None):
  """The trainer's step: grads only w.r.t. trainable params, tx.update on the full tree."""

  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch["image"], batch["text"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()

  def step(params, opt_state, batch):
    if traces is not None:
      traces.append(1)  # runs once per trace (compilation)
    trainable, frozen = optim.split(params, mask)
    grads = jax.grad(lambda t: loss_fn(optim.combine(t, frozen), batch))(trainable)
    grads = optim.combine(grads, jax.tree.map(jnp.zeros_like, frozen))
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return jax.jit(step)


def paths_of(tree, pattern):
  return {p: v for p, v in rules.flatten(tree).items() if rules.matches(pattern, p)}


CFG = dict(name="adamw", lr=1e-2, wd=1e-3, grad_clip_norm=1.0, schedule=dict(warmup_steps=1))


def test_frozen_params_bit_identical_and_stateless():
  model, params, batch = setup_model(depth=1)
  cfg = dict(CFG, preset="lit")
  mask = optim.freeze_mask(params, cfg)
  assert all(paths_of(mask, "image_encoder/.*").values())
  assert not any(paths_of(mask, "(text_encoder|fusion|head)/.*").values())
  tx, _ = optim.make(cfg, params, total_steps=10)
  opt_state = tx.init(params)
  step = make_step(model, tx, mask)
  new = params
  for _ in range(3):
    new, opt_state = step(new, opt_state, batch)
  for path, value in paths_of(params, "image_encoder/.*").items():
    np.testing.assert_array_equal(rules.flatten(new)[path], value, err_msg=path)
  changed = [
    p
    for p, v in paths_of(params, "text_encoder/.*").items()
    if not np.array_equal(rules.flatten(new)[p], v)
  ]
  assert len(changed) == len(paths_of(params, "text_encoder/.*"))
  # No Adam moments (nor any other state) for frozen params.
  state_paths = list(rules.flatten(opt_state))
  assert not [p for p in state_paths if "image_encoder" in p]
  n_trainable = sum(not f for f in jax.tree.leaves(mask))
  assert len([p for p in state_paths if "/mu/" in p]) == n_trainable
  assert len([p for p in state_paths if "/nu/" in p]) == n_trainable


def test_clipping_sees_only_trainable_grads():
  _, params, _ = setup_model()
  cfg = dict(name="sgd", lr=1.0, grad_clip_norm=1.0, preset="lit", schedule=dict(decay="constant"))
  mask = optim.freeze_mask(params, cfg)
  tx, _ = optim.make(cfg, params, total_steps=10)
  grads = jax.tree.map(lambda p, f: jnp.full_like(p, 1e3 if f else 1e-3), params, mask)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  # Trainable grads have norm < 1: unclipped, whatever the (huge) frozen grads are.
  for path, u in rules.flatten(updates).items():
    expected = 0.0 if rules.flatten(mask)[path] else -1e-3
    np.testing.assert_allclose(u, np.full(u.shape, expected), rtol=1e-6, err_msg=path)


def test_locked_image_step_has_fewer_flops():
  model, params, batch = setup_model(width=32, depth=1)

  def flops(cfg):
    mask = optim.freeze_mask(params, cfg)
    tx, _ = optim.make(cfg, params, total_steps=10)
    step = make_step(model, tx, mask)
    cost = step.lower(params, tx.init(params), batch).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]

  full, locked = flops(CFG), flops(dict(CFG, preset="lit"))
  # At least the image tower's weight gradients (2 * tokens * fan_in * fan_out per kernel) are gone.
  kernels = paths_of(params, "image_encoder/.*/kernel").values()
  weight_grad_flops = sum(2 * B * T * k.size for k in kernels)
  assert full - locked >= weight_grad_flops, (full, locked, weight_grad_flops)


def test_layer_decay_gives_documented_lr_per_layer():
  _, params, _ = setup_model()
  cfg = dict(
    name="sgd",
    lr=2.0,
    schedule=dict(decay="constant"),
    lr_mults=[("text_encoder/.*", 0.1)],
    layer_decay=dict(rate=0.5, towers=["image_encoder/.*", ("text_encoder/.*", 0.8)]),
  )
  tx, lr_fn = optim.make(cfg, params, total_steps=10)
  assert lr_fn(5) == 2.0
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  depth = 2
  expected = {  # LR of layer i = lr * decay**(depth - i); embeddings lowest; the rest at lr.
    "image_encoder/embeddings/.*": 0.5 ** (depth + 1),
    "image_encoder/encoder/layer_0/.*": 0.5**depth,
    "image_encoder/encoder/layer_1/.*": 0.5 ** (depth - 1),
    "image_encoder/(post_layernorm|pooler)/.*": 1.0,
    "text_encoder/embeddings/.*": 0.1 * 0.8 ** (depth + 1),
    "text_encoder/encoder/layer_0/.*": 0.1 * 0.8**depth,
    "text_encoder/encoder/layer_1/.*": 0.1 * 0.8,
    "text_encoder/(post_layernorm|pooler)/.*": 0.1,
    "(fusion|head)/.*": 1.0,
  }
  flat = rules.flatten(updates)
  mults = rules.flatten(optim.lr_mults(params, cfg))
  assigned = rules.assign(flat, list(expected.items()), what="expected")
  for path, u in flat.items():
    np.testing.assert_allclose(u, np.full(u.shape, -2.0 * assigned[path]), rtol=1e-6, err_msg=path)
    np.testing.assert_allclose(mults[path], assigned[path], rtol=1e-6, err_msg=path)


def test_schedules():
  warm_cos = optim.schedule(dict(warmup_steps=2, decay="cosine"), total_steps=10)
  np.testing.assert_allclose(
    [warm_cos(s) for s in (0, 1, 2, 6, 10)], [0, 0.5, 1, 0.5, 0], atol=1e-6
  )
  linear = optim.schedule(dict(decay="linear", end_mult=0.2), total_steps=10)
  np.testing.assert_allclose([linear(s) for s in (0, 5, 10)], [1, 0.6, 0.2], atol=1e-6)
  const = optim.schedule(dict(warmup_steps=4, decay="constant"), total_steps=10)
  np.testing.assert_allclose([const(s) for s in (0, 2, 4, 9)], [0, 0.5, 1, 1], atol=1e-6)
  with pytest.raises(ValueError, match="decay='cosin'"):
    optim.schedule(dict(decay="cosin"), total_steps=10)
  # The schedule drives the update through optax's step count.
  _, params, _ = setup_model()
  tx, lr_fn = optim.make(
    dict(name="sgd", lr=3.0, schedule=dict(warmup_steps=2)), params, total_steps=10
  )
  ones = jax.tree.map(jnp.ones_like, params)
  state, update = tx.init(params), jax.jit(tx.update)
  for s in range(3):
    updates, state = update(ones, state, params)
    np.testing.assert_allclose(updates["head"]["bias"], -lr_fn(s) * np.ones(3), rtol=1e-6)


def test_gradual_unfreezing_changes_trainable_set_and_keeps_state():
  model, params, batch = setup_model()
  cfg = dict(
    CFG,
    wd=0.0,
    frozen=[".*_encoder/.*"],
    schedule=dict(decay="linear", end_mult=0.5),
    unfreeze=[(2, ["text_encoder/encoder/layer_1/.*"]), (4, ["text_encoder/.*"])],
  )
  assert optim.phase_boundaries(cfg) == [2, 4]
  traces = []
  mask = optim.freeze_mask(params, cfg, 0)
  tx, _ = optim.make(cfg, params, total_steps=6)
  state, step_fn = tx.init(params), make_step(model, tx, mask, traces)
  history = [params]
  for s in range(6):
    if s in optim.phase_boundaries(cfg):  # what the trainer does at a phase change
      old_mask, old_state = mask, state
      mask = optim.freeze_mask(params, cfg, s)
      tx, lr_fn = optim.make(cfg, params, total_steps=6, step=s)
      state = optim.migrate_state(old_state, tx, params)
      step_fn = make_step(model, tx, mask, traces)
      old, new = rules.flatten(old_state), rules.flatten(state)
      for path, value in old.items():  # every old leaf (head moments, step counts) carried over
        np.testing.assert_array_equal(new[path], value, err_msg=path)
      newly = [p for p, f in rules.flatten(mask).items() if not f and rules.flatten(old_mask)[p]]
      fresh = [p for p in new if p not in old]
      # The newly unfrozen group: zero mu and nu per param, its own Adam count at 0.
      assert len(fresh) == 2 * len(newly) + 1 and not any(np.any(new[p]) for p in fresh)
      assert all(any(p.endswith("/" + n) for n in newly) for p in fresh if not p.endswith("/count"))
    new_params, state = step_fn(history[-1], state, batch)
    history.append(new_params)
    if s in optim.phase_boundaries(cfg):
      # First Adam step of the new group is bias-corrected: |update| = lr * schedule (no wd here).
      for p in newly:
        delta = np.abs(rules.flatten(new_params)[p] - rules.flatten(history[-2])[p])
        np.testing.assert_allclose(delta, lr_fn(s), rtol=1e-2, err_msg=p)  # eps: tiny grads
  assert len(traces) == 3  # one compilation per phase

  def changed(pattern, s):
    """Whether step s (0-based) changed every param matching `pattern`."""
    before, after = rules.flatten(history[s]), rules.flatten(history[s + 1])
    diffs = [not np.array_equal(before[p], after[p]) for p in paths_of(history[0], pattern)]
    assert all(diffs) or not any(diffs), pattern
    return all(diffs)

  assert [changed("text_encoder/encoder/layer_1/.*", s) for s in range(6)] == [0, 0, 1, 1, 1, 1]
  assert [changed("text_encoder/encoder/layer_0/.*", s) for s in range(6)] == [0, 0, 0, 0, 1, 1]
  assert [changed("image_encoder/.*", s) for s in range(6)] == [0] * 6
  assert [changed("head/.*", s) for s in range(6)] == [1] * 6


@pytest.mark.parametrize(
  "preset,trainable",
  [
    ("full", ".*"),
    ("lit", "(text_encoder|fusion|head)/.*"),
    ("linear_probe", "(fusion|head)/.*"),
    ("bitfit", ".*/bias|(fusion|head)/.*"),
  ],
)
def test_presets(preset, trainable):
  _, params, _ = setup_model()
  mask = optim.freeze_mask(params, dict(preset=preset))
  for path, frozen in rules.flatten(mask).items():
    assert frozen != rules.matches(trainable, path), path


def test_a_preset_trains_the_new_layers_it_is_given():
  """A preset with `trainable` rules keeps the model's new layers trainable (the trainer's
  `ParamLayout.new_layers`) with their optimizer state; new layers that match nothing are
  no error, and they do not loosen `frozen` or the config's own `trainable`."""
  _, params, _ = setup_model()
  new = ("text_encoder/encoder/layer_1/.*", "decoder/.*")  # the second matches nothing here
  cfg = dict(lr=0.1, preset="bitfit")
  mask = rules.flatten(optim.freeze_mask(params, cfg, new_layers=new))
  for path, frozen in mask.items():
    assert frozen != rules.matches(r".*/bias|text_encoder/encoder/layer_1/.*", path), path
  tx, _ = optim.make(cfg, params, total_steps=10, new_layers=new)
  moments = [p for p in rules.flatten(tx.init(params)) if "/mu/" in p]
  assert len(moments) == sum(not f for f in mask.values())
  assert any("text_encoder/encoder/layer_1/attn/query/kernel" in p for p in moments)
  table = optim.summary(params, cfg, new_layers=new)
  assert "\ntext_encoder " in table
  assert table.endswith(
    "\nnew layers (the preset trains them in full): text_encoder/encoder/layer_1/.*, decoder/.*"
  )
  assert "new layers" not in optim.summary(params, dict(lr=0.1), new_layers=new)
  for extra in (dict(frozen=["text_encoder/.*"]), dict(trainable=[".*/bias"])):
    mask = rules.flatten(optim.freeze_mask(params, dict(cfg, **extra), new_layers=new))
    assert mask["text_encoder/encoder/layer_1/attn/query/kernel"], extra


def test_rules_that_match_nothing_are_errors():
  _, params, _ = setup_model()
  cases = [
    (dict(frozen=["imag_encoder/.*"]), r"config.optim.frozen.*imag_encoder"),
    (dict(trainable=["head"]), r"config.optim.trainable.*'head'"),
    (dict(lr_mults=[("text_encoder/layer_0/.*", 0.1)]), r"config.optim.lr_mults"),
    (dict(wd=1e-4, wd_mults=[(".*/weight", 1.0)]), r"config.optim.wd_mults"),
    (dict(unfreeze=[(5, ["text_encoder/layer_1/.*"])]), r"config.optim.unfreeze\[0\]"),
    (dict(layer_decay=dict(rate=0.7, towers=["vision/.*"])), r"config.optim.layer_decay.towers"),
    (dict(layer_decay=dict(rate=0.7, towers=["head/.*"])), r"tower 'head' has no `layer_\{i\}`"),
  ]
  for extra, message in cases:
    with pytest.raises(rules.RuleError, match=message):
      optim.make(dict(lr=0.1, **extra), params, total_steps=10)
  with pytest.raises(ValueError, match=r"Did you mean config\.optim\.frozen"):
    optim.freeze_mask(params, dict(lr=0.1, frozn=["head/.*"]))
  with pytest.raises(ValueError, match="preset='lora' needs config.optim.lora"):
    optim.freeze_mask(params, dict(preset="lora"))
  with pytest.raises(ValueError, match="Every parameter is frozen"):
    optim.make(dict(lr=0.1, frozen=[".*"]), params, total_steps=10)
  with pytest.raises(ValueError, match="lr_mults must be > 0"):
    optim.make(dict(lr=0.1, lr_mults=[("head/.*", 0.0)]), params, total_steps=10)
  with pytest.raises(ValueError, match="config.optim.kwargs"):
    optim.make(dict(lr=0.1, name="sgd", kwargs=dict(b1=0.9)), params, total_steps=10)


def test_summary_counts_and_configdict():
  _, params, _ = setup_model()
  cfg = ml_collections.ConfigDict(dict(CFG, preset="lit", lr_mults=[("text_encoder/.*", 0.1)]))
  tx, _ = optim.make(cfg, params, total_steps=10)
  opt_state = tx.init(params)
  text = optim.summary(params, cfg, opt_state)
  count = lambda pattern: sum(v.size for v in paths_of(params, pattern).values())
  lines = {line.split()[0]: line for line in text.splitlines()[2:]}
  assert f"{count('image_encoder/.*'):,} (" in lines["image_encoder"].split(")")[1]  # frozen column
  assert lines["image_encoder"].split()[1] == "0"
  assert lines["text_encoder"].split()[1] == f"{count('text_encoder/.*'):,}"
  assert lines["text_encoder"].endswith("0.1..0.1")
  # Adam: two float32 moments per trainable param, plus the step counts.
  trainable_bytes = 4 * count("(text_encoder|fusion|head)/.*")
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(opt_state))
  assert 2 * trainable_bytes <= state_bytes < 2 * trainable_bytes + 64
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  assert text == optim.summary(abstract, cfg)  # same numbers from shapes only
