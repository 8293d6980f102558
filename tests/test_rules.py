"""The shared param-path matcher."""

import numpy as np
import pytest

from mmtl import rules

PARAMS = {
  "image_encoder": {
    "encoder": {"layer_0": {"attn": {"query": {"kernel": np.zeros((2, 2)), "bias": np.zeros(2)}}}}
  },
  "text_encoder": {"pooler": {"dense": {"kernel": np.zeros((2, 2))}}},
  "head": {"kernel": np.zeros((2, 3))},
}


def test_paths_roundtrip():
  flat = rules.flatten(PARAMS)
  assert "image_encoder/encoder/layer_0/attn/query/kernel" in flat
  assert rules.flatten(rules.unflatten(flat)).keys() == flat.keys()
  assert list(flat) == [
    "head/kernel",
    "image_encoder/encoder/layer_0/attn/query/bias",
    "image_encoder/encoder/layer_0/attn/query/kernel",
    "text_encoder/pooler/dense/kernel",
  ]


def test_first_match_wins_and_fullmatch():
  values = rules.tree_assign(PARAMS, [("image_encoder/.*", 0.1), (".*kernel", 2.0)], default=1.0)
  assert values["image_encoder"]["encoder"]["layer_0"]["attn"]["query"]["kernel"] == 0.1
  assert values["text_encoder"]["pooler"]["dense"]["kernel"] == 2.0
  assert values["image_encoder"]["encoder"]["layer_0"]["attn"]["query"]["bias"] == 0.1
  # "kernel" alone does not match "head/kernel": patterns match the whole path.
  with pytest.raises(rules.RuleError, match="'kernel'"):
    rules.tree_assign(PARAMS, ["kernel"], default=False, what="config.optim.frozen")


def test_unmatched_rule_names_rule_and_config_key():
  with pytest.raises(rules.RuleError, match=r"config.optim.frozen.*imag_encoder/\.\*"):
    rules.tree_assign(PARAMS, ["imag_encoder/.*"], default=False, what="config.optim.frozen")
  mask = rules.tree_assign(PARAMS, ["imag_encoder/.*"], default=False, require_match=False)
  assert not any(rules.flatten(mask).values())


def test_bad_rule_shapes():
  with pytest.raises(rules.RuleError, match="Invalid regex"):
    rules.tree_assign(PARAMS, ["(unclosed"])
  with pytest.raises(rules.RuleError, match="regex or a"):
    rules.tree_assign(PARAMS, [(1, 2)])
