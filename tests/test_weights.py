"""Weight transforms are data: each name map states how a torch tensor becomes a Flax param.

The transforms are checked against torch modules themselves (a Linear, a Conv1d, a grouped
Conv2d, a weight-normed Conv1d as wav2vec2's positional conv, GPT-2's fused Conv1D), and
every registered family's map against its params' ranks.
"""

import shutil

import flax.linen as nn
import numpy as np
import pytest
import safetensors.numpy
import torch

from mmtl import hf, rules
from mmtl.models import registry
from mmtl.models.weights import HFName, Transform, to_flax, to_torch


def _round_trip(x: np.ndarray, name: HFName) -> np.ndarray:
  flax_x = to_flax(x, name)
  back = to_torch([flax_x], name)
  np.testing.assert_array_equal(back, x)
  return flax_x


def test_linear_matches_torch():
  torch.manual_seed(0)
  linear = torch.nn.Linear(5, 3)
  x = np.random.default_rng(0).normal(size=(2, 5)).astype(np.float32)
  kernel = _round_trip(linear.weight.detach().numpy(), HFName("w", Transform.LINEAR))
  bias = _round_trip(linear.bias.detach().numpy(), HFName("b"))
  out = nn.Dense(3).apply({"params": {"kernel": kernel, "bias": bias}}, x)
  np.testing.assert_allclose(out, linear(torch.tensor(x)).detach().numpy(), atol=1e-6)


@pytest.mark.parametrize("groups", [1, 2])
def test_conv1d_matches_torch(groups):
  torch.manual_seed(0)
  conv = torch.nn.Conv1d(4, 6, kernel_size=3, groups=groups)
  x = np.random.default_rng(0).normal(size=(2, 4, 9)).astype(np.float32)  # (B, C, T)
  kernel = _round_trip(conv.weight.detach().numpy(), HFName("w", Transform.CONV1D))
  flax_conv = nn.Conv(6, (3,), padding="VALID", feature_group_count=groups)
  out = flax_conv.apply(
    {"params": {"kernel": kernel, "bias": conv.bias.detach().numpy()}}, x.transpose(0, 2, 1)
  )
  ref = conv(torch.tensor(x)).detach().numpy().transpose(0, 2, 1)
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_grouped_conv2d_matches_torch():
  torch.manual_seed(0)
  conv = torch.nn.Conv2d(4, 4, kernel_size=(3, 2), groups=4, bias=False)  # depthwise
  x = np.random.default_rng(0).normal(size=(2, 4, 7, 6)).astype(np.float32)  # NCHW
  kernel = _round_trip(conv.weight.detach().numpy(), HFName("w", Transform.CONV2D))
  flax_conv = nn.Conv(4, (3, 2), padding="VALID", feature_group_count=4, use_bias=False)
  out = flax_conv.apply({"params": {"kernel": kernel}}, x.transpose(0, 2, 3, 1))
  ref = conv(torch.tensor(x)).detach().numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_weight_normed_conv1d_g_and_v():
  """torch's weight_norm over the kernel axis (dim=2, as wav2vec2's positional conv) keeps
  g (1, 1, k) and v (out, in/groups, k): both CONV1D, g becomes (k, 1, 1) and
  w = g * v / |v| (norm over the other two axes) is the Flax kernel."""
  torch.manual_seed(0)
  conv = torch.nn.utils.parametrizations.weight_norm(
    torch.nn.Conv1d(4, 6, kernel_size=5, padding=2, groups=2), name="weight", dim=2
  )
  with torch.no_grad():
    conv.parametrizations.weight.original0.mul_(1.7)  # g away from |v|
  g = conv.parametrizations.weight.original0.detach().numpy()
  v = conv.parametrizations.weight.original1.detach().numpy()
  assert g.shape == (1, 1, 5)
  g_flax = _round_trip(g, HFName("weight_g", Transform.CONV1D))
  v_flax = _round_trip(v, HFName("weight_v", Transform.CONV1D))
  assert g_flax.shape == (5, 1, 1)
  kernel = g_flax * v_flax / np.linalg.norm(v_flax, axis=(1, 2), keepdims=True)
  x = np.random.default_rng(0).normal(size=(2, 4, 11)).astype(np.float32)
  flax_conv = nn.Conv(6, (5,), padding=2, feature_group_count=2)
  out = flax_conv.apply(
    {"params": {"kernel": kernel, "bias": conv.bias.detach().numpy()}}, x.transpose(0, 2, 1)
  )
  ref = conv(torch.tensor(x)).detach().numpy().transpose(0, 2, 1)
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_fused_in_out_slices():
  """GPT-2's c_attn: a Conv1D weight (in, 3 * out), already Flax's layout, read as three
  Dense kernels and written back fused."""
  w = np.arange(4 * 6, dtype=np.float32).reshape(4, 6)
  names = [HFName("c_attn.weight", Transform.IN_OUT, (i, 3)) for i in range(3)]
  parts = [to_flax(w, n) for n in names]
  np.testing.assert_array_equal(parts[1], w[:, 2:4])
  np.testing.assert_array_equal(to_torch(parts, names[0]), w)


def test_wrong_rank_is_an_error():
  with pytest.raises(ValueError, match=r"w has shape \(3, 4, 5\), but its linear transform"):
    to_flax(np.zeros((3, 4, 5)), HFName("w", Transform.LINEAR))


@pytest.mark.parametrize("model_type", sorted(registry.MODELS) + ["decoder"])
def test_every_family_states_transforms_that_fit_its_params(model_type):
  """Each map's transform fits its param's rank (a Linear kernel 2-d, a Conv2d kernel 4-d),
  so no weight is transposed by guess."""
  if model_type == "decoder":
    module = hf.build_module(
      {"model_type": "bert", "is_decoder": True, "add_cross_attention": True}
    )
  elif model_type == "vision-encoder-decoder":
    parts = {"encoder": {"model_type": "vit"}, "decoder": {"model_type": "gpt2", "n_embd": 96}}
    module = hf.build_module({"model_type": model_type, **parts})
  else:
    module = hf.build_module({"model_type": model_type})
  ranks = {Transform.LINEAR: 2, Transform.IN_OUT: 2, Transform.CONV1D: 3, Transform.CONV2D: 4}
  names = hf.variable_names(module)
  for collection, shapes in hf.variable_shapes(module).items():
    for path, shape in rules.flatten(shapes).items():
      name = names[collection][path]
      if name.transform in ranks:
        assert len(shape.shape) == ranks[name.transform], (path, name)
      else:
        assert not path.endswith("/kernel"), (path, name)


def test_bad_rank_in_a_checkpoint_names_the_param(tiny_bert_dir, tmp_path):
  shutil.copytree(tiny_bert_dir, tmp_path / "bad")
  file = tmp_path / "bad" / "model.safetensors"
  state = safetensors.numpy.load_file(file)
  key = "encoder.layer.0.attention.self.query.weight"
  state[key] = state[key][None]
  safetensors.numpy.save_file(state, file)
  with pytest.raises(
    hf.CheckpointError, match=rf"{key} has shape \(1, 32, 32\).*attn/query/kernel"
  ):
    hf.load_pretrained(tmp_path / "bad")
