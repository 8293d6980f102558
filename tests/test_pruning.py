"""Gradual magnitude pruning (mmtl.pruning) in the optimizer and the trainer."""

import contextlib
import io
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from mmtl import config as config_lib
from mmtl import export, metrics, optim, pruning, rules, train
from tests.test_train import final_params, tiny_config

PARAMS = {
  "text_encoder": {
    "layer_0": {"kernel": jnp.ones((6, 5)), "bias": jnp.ones((5,))},
    "layer_1": {"kernel": jnp.ones((4, 4))},
  },
  "head": {"kernel": jnp.ones((5, 2))},
}


def run(prune, steps, seed=0):
  """`steps` Adam updates with random gradients under `prune`; params after each."""
  cfg = dict(name="adam", lr=0.1, prune=prune, schedule=dict(decay="constant"))
  tx, _ = optim.make(cfg, PARAMS, total_steps=steps)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), PARAMS)
  state = tx.init(params)
  update = jax.jit(tx.update)
  history = []
  for _ in range(steps):
    grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
    updates, state = update(grads, state, params)
    params = jax.tree.map(jnp.add, params, updates)
    history.append(rules.flatten(jax.device_get(params)))
  return history


def test_zhu_gupta_schedule_and_pruning_steps():
  cfg = pruning.settings(dict(targets=[".*"], sparsity=0.8, start_step=2, end_step=10, every=3), 20)
  s = [float(pruning.sparsity_at(cfg, t)) for t in range(12)]
  assert s[:3] == [0.0, 0.0, 0.0] and s[10] == s[11] == pytest.approx(0.8)
  assert s[6] == pytest.approx(0.8 * (1 - 0.5**3))
  assert [t for t in range(20) if pruning.prunes_at(cfg, t)] == [2, 5, 8, 10]
  assert pruning.settings(dict(targets=[".*"], sparsity=0.5), 100)["end_step"] == 75


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_pruned_weights_are_exactly_zero_at_the_schedules_sparsity(scope):
  prune = dict(targets=["text_encoder/.*/kernel"], sparsity=0.5, scope=scope, end_step=6, every=2)
  cfg = pruning.settings(prune, 8)
  history = run(prune, 8)
  kernels = ["text_encoder/layer_0/kernel", "text_encoder/layer_1/kernel"]
  for t, params in enumerate(history):
    pruned_at = max(u for u in range(t + 1) if pruning.prunes_at(cfg, u))
    target = float(pruning.sparsity_at(cfg, pruned_at))
    zeros = {k: int(np.sum(params[k] == 0)) for k in kernels}
    if scope == "layer":
      assert zeros == {k: math.floor(target * params[k].size) for k in kernels}, t
    else:
      assert sum(zeros.values()) == math.floor(target * 46), t
    # Zeros stay zero between pruning steps and later ones keep them.
    if t:
      for k in kernels:
        assert np.all(params[k][history[t - 1][k] == 0] == 0), (t, k)
    for other in ("text_encoder/layer_0/bias", "head/kernel"):
      assert np.all(params[other] != 0)
  final = history[-1]
  if scope == "layer":  # each kernel keeps its largest magnitudes
    w = final["text_encoder/layer_0/kernel"]
    assert np.abs(w[w != 0]).min() > 0 and np.sum(w == 0) == 15


def test_bad_pruning_configs():
  for prune, match in [
    (dict(targets=[".*"], sparsity=1.0), r"sparsity=1.0 must be in \(0, 1\)"),
    (dict(targets=[".*"]), r"config.optim.prune.sparsity is missing"),
    (dict(targets=[".*"], sparsity=0.5, scope="row"), r"scope='row': use one of"),
    (dict(targets=[".*"], sparsity=0.5, start_step=9, end_step=4), r"need 0 <= start_step \(9\)"),
    (dict(targets=[".*"], sparsity=0.5, evry=3), r"config.optim.prune.evry.*Did you mean"),
    (dict(targets=["vision/.*"], sparsity=0.5), r"config.optim.prune.targets: rule.*match no"),
  ]:
    with pytest.raises((config_lib.ConfigError, rules.RuleError), match=match):
      optim.make(dict(lr=0.1, prune=prune), PARAMS, total_steps=10)
  with pytest.raises(
    config_lib.ConfigError, match=r"prune.targets matches frozen params \(head/kernel"
  ):
    optim.make(
      dict(lr=0.1, frozen=["head/.*"], prune=dict(targets=[".*kernel"], sparsity=0.5)),
      PARAMS,
      total_steps=10,
    )


@pytest.mark.slow
def test_a_pruned_run_keeps_its_zeros_through_checkpoints_and_export(
  tiny_bert_dir, data_dir, tmp_path
):
  """A run pruning its pretrained text tower's layer kernels to 0.5 by step 2, stopped at
  step 3 and resumed to 6: the pruning masks come back with the optimizer state, so exactly
  half of each kernel is still zero (Adam's moments would move unmasked zeros); the metrics
  and the start-up summary show the sparsity; the exported tower loads in transformers
  with the zeros."""
  prune = dict(targets=[r"text_encoder/encoder/.*/kernel"], sparsity=0.5, end_step=2, every=1)
  workdir = tmp_path / "run"
  config = tiny_config(tiny_bert_dir, data_dir, total_steps=3, evals={}, ckpt_every=3)
  config.optim.update(prune=prune, lr=0.01)
  with contextlib.redirect_stdout(io.StringIO()) as printed:
    train.train(config, str(workdir))
  config.total_steps = 6
  train.train(config, str(workdir), allow_config_change=True)  # resumes at step 3
  params = rules.flatten(final_params(workdir))
  kernels = [p for p in params if re.fullmatch(prune["targets"][0], p)]
  assert len(kernels) == 2 * 6
  for p in kernels:
    assert int(np.sum(params[p] == 0)) == params[p].size // 2, p
  assert np.mean(params["text_encoder/embeddings/word_embeddings/embedding"] == 0) < 0.05  # pad row
  curves = metrics.read(str(workdir))["train/sparsity_text_encoder"]
  assert curves[1] == 0 and 0.4 < curves[2] < 0.5  # s_0 = 0, s_1 = 0.5 * (1 - 0.5**3)
  assert curves[3] == curves[6] == pytest.approx(0.5, abs=1e-3)
  assert (
    "pruning to sparsity 0.5 (layer) at steps 0..2 every 1, of the params: text_encoder"
    in printed.getvalue()
  )

  out = export.export_tower(str(workdir), "text", tmp_path / "text")
  hf = transformers.AutoModel.from_pretrained(out)
  weight = hf.encoder.layer[0].attention.self.query.weight.detach().numpy()
  np.testing.assert_array_equal(weight.T, params["text_encoder/encoder/layer_0/attn/query/kernel"])
  assert int(np.sum(weight == 0)) == weight.size // 2
