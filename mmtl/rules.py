"""The one param-path matcher behind every per-parameter policy in mmtl.

Params are addressed by their `/`-joined path in the params tree, e.g.
`image_encoder/encoder/layer_3/attn/query/kernel`. A rule is a regex that must
match the *whole* path (`re.fullmatch`). Freezing, LR and weight-decay
multipliers, LoRA targets, sharding specs and `dont_load` all go through the
functions below, so a pattern means the same thing everywhere.

Rules are ordered and the first match wins (as in big_vision). A rule that
matches no path is an error: a typo must not silently train, decay or shard
everything else.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
import functools
import re
from typing import Any, TypeVar

import jax

T = TypeVar("T")


class RuleError(ValueError):
  """A rule is malformed or matches no parameter."""


def path_str(key_path: Sequence[Any]) -> str:
  """`/`-joined string of a jax key path (DictKey, GetAttrKey, SequenceKey)."""
  parts = []
  for k in key_path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def flatten(tree: Any) -> dict[str, Any]:
  """`{path: leaf}` in tree order."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {path_str(kp): leaf for kp, leaf in leaves}


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of `flatten` for nested-dict trees."""
  tree: dict[str, Any] = {}
  for path, leaf in flat.items():
    node = tree
    *parents, name = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[name] = leaf
  return tree


@functools.lru_cache(maxsize=1024)
def _compile(pattern: str) -> re.Pattern:
  try:
    return re.compile(pattern)
  except re.error as e:
    raise RuleError(f"Invalid regex {pattern!r}: {e}") from None


def matches(pattern: str, path: str) -> bool:
  """Whether `pattern` matches the whole of `path`."""
  return _compile(pattern).fullmatch(path) is not None


def as_list(rule_or_rules: Any) -> list[Any]:
  """A config value that is one regex or a list of rules, as a list (None: [])."""
  return [rule_or_rules] if isinstance(rule_or_rules, str) else list(rule_or_rules or ())


def _normalize(rules: Iterable[Any], what: str) -> list[tuple[str, Any]]:
  out = []
  for rule in rules:
    if isinstance(rule, str):
      out.append((rule, True))
    elif isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str):
      out.append((rule[0], rule[1]))
    else:
      raise RuleError(f"{what}: a rule is a regex or a (regex, value) pair, got {rule!r}")
  return out


def assign(
  paths: Iterable[str],
  rules: Iterable[Any],
  *,
  default: T = None,
  what: str = "rules",
  require_match: bool = True,
) -> dict[str, Any]:
  """`{path: value}` from the first rule matching each path, else `default`.

  `rules` is a list of regexes (value True) or `(regex, value)` pairs. With
  `require_match`, a rule that matches no path raises `RuleError` naming the
  rule and `what` (e.g. "config.optim.frozen"). A rule that only ever loses to
  an earlier rule still counts as matching.
  """
  paths = list(paths)
  rules = _normalize(rules, what)
  patterns = [p for p, _ in rules]
  used = [False] * len(rules)
  out = {}
  for path in paths:
    hits = [j for j, pattern in enumerate(patterns) if matches(pattern, path)]
    out[path] = rules[hits[0]][1] if hits else default
    for j in hits:
      used[j] = True
  if require_match:
    unmatched = [patterns[j] for j, u in enumerate(used) if not u]
    if unmatched:
      sample = ", ".join(paths[:5]) + (", ..." if len(paths) > 5 else "")
      raise RuleError(
        f"{what}: rule(s) {unmatched} match no parameter. Patterns must match "
        f"the whole '/'-joined path (e.g. {sample}); see mmtl.rules."
      )
  return out


def tree_assign(
  tree: Any,
  rules: Iterable[Any],
  *,
  default: T = None,
  what: str = "rules",
  require_match: bool = True,
) -> Any:
  """`assign` over the leaves of `tree`: a tree of the same structure of values."""
  flat = flatten(tree)
  values = assign(flat, rules, default=default, what=what, require_match=require_match)
  treedef = jax.tree_util.tree_structure(tree)
  return jax.tree_util.tree_unflatten(treedef, list(values.values()))
