"""Jitted text generation: greedy, beam search and top-k / top-p sampling with a KV cache.

`python -m mmtl.generate` (this package's `__main__`) captions a split or image files with a
trained captioning run; docs/generation.md describes the API.

`generate(module, params, inputs, ...)` runs one compiled `lax.while_loop` over
decoding steps. `module` is a decoder (`mmtl.models.decoder.TextDecoder`, e.g.
GPT-2; `inputs` may hold `encoder_hidden_states` / `prefix_embeds` for it to
condition on) or a model with an encoder (`encode(inputs)` -> the decoder's
conditioning, `decode`, `init_cache`: `mmtl.models.encoder_decoder.VisionEncoderDecoderModel`,
a captioning `mmtl.models.fusion.CaptioningModel`), whose other `inputs`
(pixel_values, ...) feed `encode`.

The prompt of a bare decoder is `inputs["input_ids"]` (B, T), left-padded with
`attention_mask` as transformers expects of decoder-only prompts; of a model with
an encoder it is `decoder_input_ids` / `decoder_attention_mask` (as in
transformers), and without one every row starts with `decoder_start_token_id`
(the argument, else the model config's). The search follows transformers' `generate()` (greedy,
and the vectorized beam search of transformers 5 with its length penalty and
`early_stopping` heuristics), so on the same weights both give the same tokens:
tests/test_generate.py checks it token for token. Rows are independent, so a batch
sharded over a mesh's data axis (`jax.device_put` with a `NamedSharding`) decodes
in place: jit follows the input shardings.

Returns token ids (B, T + max_new_tokens): the prompt, then the generated tokens,
`pad_token_id` after a row's EOS (transformers trims the common trailing padding).
"""

from __future__ import annotations

from collections.abc import Mapping
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

NEG = -1.0e9  # transformers' "impossible" beam score


class GenerationError(ValueError):
  """Bad generation arguments."""


def _split_inputs(module: nn.Module, inputs: Mapping[str, Any]) -> tuple[dict, dict]:
  """(prompt, the rest: encoder inputs or a bare decoder's conditioning). The prompt is
  `decoder_input_ids` / `decoder_attention_mask` for a model with an encoder (its
  `input_ids` may be a text tower's), `input_ids` / `attention_mask` for a bare decoder."""
  names = ("decoder_input_ids", "decoder_attention_mask")
  if not hasattr(module, "encode"):
    names = ("input_ids", "attention_mask")
  prompt = {
    short: inputs[k] for k, short in zip(names, ("input_ids", "attention_mask")) if k in inputs
  }
  rest = {k: v for k, v in inputs.items() if k not in names}
  return prompt, rest


def _conditioning(module: nn.Module, variables: Any, rest: dict) -> dict:
  if hasattr(module, "encode"):
    return module.apply(variables, rest, method=module.encode)
  unknown = set(rest) - {"encoder_hidden_states", "encoder_attention_mask", "prefix_embeds"}
  if unknown:
    raise GenerationError(
      f"generate() of a bare decoder takes input_ids, attention_mask and its conditioning "
      f"(encoder_hidden_states, encoder_attention_mask, prefix_embeds); got {sorted(unknown)}. "
      "Pass the whole encoder-decoder model to encode other inputs."
    )
  return dict(rest)


def _decode(module, variables, input_ids, mask, positions, cache, cond, first: bool):
  """Logits of the last position and the new cache. The prefix (ClipCap) enters at the
  first call only: it is in the cache afterwards."""
  kw = {k: v for k, v in cond.items() if k == "prefix_embeds"} if first else {}
  method = module.decode if hasattr(module, "encode") else None
  out = module.apply(
    variables,
    input_ids,
    mask,
    positions,
    cache=cache,
    **kw,
    **({"method": method} if method else {}),
  )
  return out["logits"][:, -1].astype(jnp.float32), out["cache"]


def _init_cache(module, variables, batch_size, max_length, cond):
  kw = {k: v for k, v in cond.items() if k != "prefix_embeds"}
  return module.apply(variables, batch_size, max_length, **kw, method=module.init_cache)


def _warp(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
  """transformers' TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, in that order."""
  if temperature != 1.0:
    logits = logits / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    order = jnp.argsort(logits, axis=-1)  # ascending, as transformers sorts
    sorted_logits = jnp.take_along_axis(logits, order, -1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, -1), -1)
    remove = (cumulative <= 1 - top_p).at[..., -1].set(False)  # keep at least the best
    remove = jnp.zeros_like(remove).at[jnp.arange(logits.shape[0])[:, None], order].set(remove)
    logits = jnp.where(remove, -jnp.inf, logits)
  return logits


def _is_eos(tokens: jax.Array, eos: tuple[int, ...]) -> jax.Array:
  if not eos:
    return jnp.zeros(tokens.shape, bool)
  return jnp.isin(tokens, jnp.asarray(eos, tokens.dtype))


def _prompt(prompt: dict, batch_size: int | None, start: int | None) -> tuple[jax.Array, jax.Array]:
  if "input_ids" not in prompt:
    if start is None or batch_size is None:
      raise GenerationError(
        "generate() needs inputs['input_ids'] (the prompt), or decoder_start_token_id (an "
        "argument or the model config's) to start every row from: pass one of them."
      )
    ids = jnp.full((batch_size, 1), start, jnp.int32)
    return ids, jnp.ones_like(ids)
  ids = jnp.asarray(prompt["input_ids"], jnp.int32)
  mask = jnp.asarray(prompt.get("attention_mask", jnp.ones_like(ids)), jnp.int32)
  return ids, mask


def _expand(tree: Any, n: int) -> Any:
  """Repeat every row n times (B, ...) -> (B * n, ...), as transformers' repeat_interleave."""
  return jax.tree.map(lambda x: jnp.repeat(x, n, axis=0), tree)


# Cache entries of the encoder tokens: the same for every beam of an example.
_PER_EXAMPLE = ("cross_key", "cross_value", "encoder_mask")


def _reorder_cache(cache: Any, rows: jax.Array) -> Any:
  """The cache of the beams `rows` (each a row of the same example): self-attention keys,
  values and mask follow their beam; the encoder's cross-attention keys and values, equal
  across an example's beams, are not copied (most of the cache of an encoder-decoder)."""

  def take(path, x):
    return x if x.ndim == 0 or path[-1].key in _PER_EXAMPLE else x[rows]

  return jax.tree_util.tree_map_with_path(take, cache)


@functools.partial(
  jax.jit,
  static_argnames=(
    "module",
    "max_new_tokens",
    "num_beams",
    "length_penalty",
    "early_stopping",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "eos_token_id",
    "pad_token_id",
    "decoder_start_token_id",
  ),
)
def _generate(
  module,
  variables,
  prompt,
  rest,
  rng,
  *,
  max_new_tokens,
  num_beams,
  length_penalty,
  early_stopping,
  do_sample,
  temperature,
  top_k,
  top_p,
  eos_token_id,
  pad_token_id,
  decoder_start_token_id,
):
  cond = _conditioning(module, variables, rest)
  batch_size = next((x.shape[0] for x in jax.tree.leaves(cond)), None)
  ids, mask = _prompt(prompt, batch_size, decoder_start_token_id)
  b, t = ids.shape
  max_length = t + max_new_tokens
  positions = jnp.maximum(jnp.cumsum(mask, -1) - 1, 0)  # transformers' rule for left padding
  prefix = cond["prefix_embeds"].shape[1] if "prefix_embeds" in cond else 0
  warp = lambda lg: _warp(lg, temperature, top_k, top_p) if do_sample else lg  # noqa: E731
  if num_beams == 1:
    return _sample_loop(
      module,
      variables,
      cond,
      ids,
      mask,
      positions,
      rng,
      max_length=max_length,
      prefix=prefix,
      sample=do_sample,
      warp=warp,
      eos=eos_token_id,
      pad=pad_token_id,
    )
  return _beam_loop(
    module,
    variables,
    _expand(cond, num_beams),
    _expand(ids, num_beams),
    _expand(mask, num_beams),
    _expand(positions, num_beams),
    rng,
    batch_size=b,
    num_beams=num_beams,
    max_length=max_length,
    prefix=prefix,
    length_penalty=length_penalty,
    early_stopping=early_stopping,
    sample=do_sample,
    warp=warp,
    eos=eos_token_id,
    pad=pad_token_id,
  )


def _sample_loop(
  module, variables, cond, ids, mask, positions, rng, *, max_length, prefix, sample, warp, eos, pad
):
  """Greedy (argmax) or sampled decoding, as transformers' `_sample`."""
  b, t = ids.shape
  cache = _init_cache(module, variables, b, prefix + max_length, cond)
  logits, cache = _decode(module, variables, ids, mask, positions, cache, cond, first=True)
  sequences = jnp.full((b, max_length), pad, jnp.int32).at[:, :t].set(ids)

  def step(state):
    cur, sequences, logits, cache, next_pos, unfinished, rng = state
    rng, key = jax.random.split(rng)
    scores = warp(logits)
    tokens = jax.random.categorical(key, scores) if sample else jnp.argmax(scores, -1)
    tokens = jnp.where(unfinished, tokens, pad).astype(jnp.int32)
    sequences = jax.lax.dynamic_update_slice(sequences, tokens[:, None], (0, cur))
    unfinished = unfinished & ~_is_eos(tokens, eos)
    logits, cache = _decode(
      module,
      variables,
      tokens[:, None],
      jnp.ones((b, 1), jnp.int32),
      next_pos[:, None],
      cache,
      cond,
      first=False,
    )
    return cur + 1, sequences, logits, cache, next_pos + 1, unfinished, rng

  def running(state):
    cur, *_, unfinished, _ = state
    return (cur < max_length) & jnp.any(unfinished)

  state = (t, sequences, logits, cache, positions[:, -1] + 1 + prefix, jnp.ones((b,), bool), rng)
  return jax.lax.while_loop(running, step, state)[1]


def _beam_loop(
  module,
  variables,
  cond,
  ids,
  mask,
  positions,
  rng,
  *,
  batch_size,
  num_beams,
  max_length,
  prefix,
  length_penalty,
  early_stopping,
  sample,
  warp,
  eos,
  pad,
):
  """transformers 5's vectorized `_beam_search`, with the cache reordered by a gather."""
  b, k, t = batch_size, num_beams, ids.shape[1]
  keep = max(2, 1 + len(eos)) * k  # candidates per step: enough to leave k running after EOS
  top_k_mask = jnp.arange(keep) < k
  cache = _init_cache(module, variables, b * k, prefix + max_length, cond)
  logits, cache = _decode(module, variables, ids, mask, positions, cache, cond, first=True)
  fill = pad
  running_seq = jnp.full((b, k, max_length), fill, jnp.int32).at[:, :, :t].set(ids.reshape(b, k, t))
  state = dict(
    cur=jnp.asarray(t),
    logits=logits,
    cache=cache,
    next_pos=positions[:, -1] + 1 + prefix,
    running_seq=running_seq,
    running_scores=jnp.zeros((b, k)).at[:, 1:].set(NEG),
    seq=running_seq,
    scores=jnp.full((b, k), NEG),
    finished=jnp.zeros((b, k), bool),
    improvable=jnp.ones((b, 1), bool),
    all_hit=jnp.asarray(False),
    rng=rng,
  )
  gather = lambda x, idx: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), 1)

  def step(s):
    cur = s["cur"]
    rng, key = jax.random.split(s["rng"])
    log_probs = warp(jax.nn.log_softmax(s["logits"], -1))
    vocab = log_probs.shape[-1]
    log_probs = (log_probs.reshape(b, k, vocab) + s["running_scores"][:, :, None]).reshape(b, -1)
    if sample:
      # transformers: multinomial over softmax(accumulated) without replacement (Gumbel top-k).
      gumbel = jax.random.gumbel(key, log_probs.shape)
      idx = jax.lax.top_k(log_probs + gumbel, keep)[1]
      topk_lp = jnp.take_along_axis(log_probs, idx, 1)
      order = jnp.argsort(-topk_lp, axis=1)
      topk_lp, idx = jnp.take_along_axis(topk_lp, order, 1), jnp.take_along_axis(idx, order, 1)
    else:
      topk_lp, idx = jax.lax.top_k(log_probs, keep)
    parent, token = idx // vocab, (idx % vocab).astype(jnp.int32)
    topk_seq = gather(s["running_seq"], parent)
    topk_seq = jax.lax.dynamic_update_slice(topk_seq, token[:, :, None], (0, 0, cur))
    hits = _is_eos(token, eos) | (cur + 1 >= max_length)

    # Running beams for the next step: the best k candidates that did not just finish.
    running_lp = topk_lp + hits * NEG
    next_idx = jax.lax.top_k(running_lp, k)[1]
    running_seq = gather(topk_seq, next_idx)
    running_scores = gather(running_lp, next_idx)
    rows = (gather(parent, next_idx) + jnp.arange(b)[:, None] * k).reshape(-1)

    # Finished hypotheses: merge the candidates that just finished (among the top k) in.
    just_finished = hits & top_k_mask[None, :]
    final_lp = topk_lp / ((cur + 1 - t) ** length_penalty)
    full = jnp.all(s["finished"], -1, keepdims=True) & (early_stopping is True)
    final_lp = final_lp + full * NEG + (~s["improvable"]) * NEG + (~just_finished) * NEG
    merged_seq = jnp.concatenate([s["seq"], topk_seq], 1)
    merged_scores = jnp.concatenate([s["scores"], final_lp], 1)
    merged_finished = jnp.concatenate([s["finished"], just_finished], 1)
    best = jax.lax.top_k(merged_scores, k)[1]
    seq, scores = gather(merged_seq, best), gather(merged_scores, best)
    finished = gather(merged_finished, best)

    tokens = running_seq[:, :, cur].reshape(-1)
    cache = _reorder_cache(s["cache"], rows)
    next_pos = s["next_pos"][rows]
    logits, cache = _decode(
      module,
      variables,
      tokens[:, None],
      jnp.ones((b * k, 1), jnp.int32),
      next_pos[:, None],
      cache,
      cond,
      first=False,
    )
    cur = cur + 1
    # transformers' _check_early_stop_heuristic.
    if early_stopping == "never" and length_penalty > 0.0:
      best_len = max_length - t
    else:
      best_len = cur - t
    best_running = running_scores[:, :1] / (best_len**length_penalty)
    worst_finished = jnp.where(finished, jnp.min(scores, 1, keepdims=True), NEG)
    improvable = s["improvable"] & jnp.any(best_running > worst_finished, -1, keepdims=True)
    return dict(
      cur=cur,
      logits=logits,
      cache=cache,
      next_pos=next_pos + 1,
      running_seq=running_seq,
      running_scores=running_scores,
      seq=seq,
      scores=scores,
      finished=finished,
      improvable=improvable,
      rng=rng,
      all_hit=jnp.all(hits),
    )

  def running(s):
    open_beam = ~(jnp.all(s["finished"]) & (early_stopping is True))
    return (s["cur"] < max_length) & jnp.any(s["improvable"]) & open_beam & ~s["all_hit"]

  out = jax.lax.while_loop(running, step, state)
  return out["seq"][:, 0]


def generate(
  module: nn.Module,
  params: Mapping[str, Any],
  inputs: Mapping[str, Any],
  *,
  max_new_tokens: int,
  num_beams: int = 1,
  length_penalty: float = 1.0,
  early_stopping: bool | str = False,
  do_sample: bool = False,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  eos_token_id: int | tuple[int, ...] | None = None,
  pad_token_id: int | None = None,
  decoder_start_token_id: int | None = None,
  rng: jax.Array | None = None,
) -> jax.Array:
  """Token ids (B, T + max_new_tokens): the prompt and what `module` generates after it.

  `params`: the model's variables ({"params": ...}) or its params tree. Arguments
  mean what they mean in transformers' `generate()`. Token ids left None come from the
  model's config (its decoder's for an encoder-decoder), as transformers' generation
  config does; `pad_token_id` then defaults to the first EOS id. Without any EOS every
  row runs `max_new_tokens` steps. Sampling needs `rng`.
  """
  variables = params if "params" in params else {"params": params}
  if eos_token_id is None:
    eos_token_id = _config_token_id(module, "eos_token_id")
  eos = () if eos_token_id is None else tuple(jnp.atleast_1d(jnp.asarray(eos_token_id)).tolist())
  if pad_token_id is None:
    pad_token_id = _config_token_id(module, "pad_token_id")
  if pad_token_id is None:
    if not eos:
      raise GenerationError(
        "No eos_token_id or pad_token_id in the arguments or the model's config: pass "
        "eos_token_id= and pad_token_id= (the tokenizer's eos_token_id / pad_token_id)."
      )
    pad_token_id = eos[0]
  if decoder_start_token_id is None:
    decoder_start_token_id = _config_token_id(module, "decoder_start_token_id")
  if max_new_tokens < 1:
    raise GenerationError(f"max_new_tokens={max_new_tokens}: generate at least one token.")
  vocab = module.vocab_size
  if not 1 <= num_beams <= vocab:
    raise GenerationError(
      f"num_beams={num_beams} must be in [1, vocab size {vocab}]: a beam needs a distinct "
      "token per step. Lower num_beams."
    )
  if not 0.0 < top_p <= 1.0 or top_k < 0 or temperature <= 0:
    raise GenerationError(
      f"top_p={top_p}, top_k={top_k}, temperature={temperature}: need 0 < top_p <= 1, "
      "top_k >= 0 (0: off) and temperature > 0."
    )
  if early_stopping not in (True, False, "never"):
    raise GenerationError(f"early_stopping={early_stopping!r}: use True, False or 'never'.")
  if do_sample and rng is None:
    raise GenerationError("do_sample=True needs rng=jax.random.PRNGKey(seed): pass one.")
  prompt, rest = _split_inputs(module, inputs)
  _check_length(module, prompt, max_new_tokens)
  return _generate(
    module,
    variables,
    prompt,
    rest,
    jax.random.PRNGKey(0) if rng is None else rng,
    max_new_tokens=max_new_tokens,
    num_beams=num_beams,
    length_penalty=float(length_penalty),
    early_stopping=early_stopping,
    do_sample=do_sample,
    temperature=float(temperature),
    top_k=int(top_k),
    top_p=float(top_p),
    eos_token_id=eos,
    pad_token_id=int(pad_token_id),
    decoder_start_token_id=decoder_start_token_id,
  )


def _config_token_id(module: nn.Module, name: str) -> int | None:
  """A special token id (`eos_token_id`, ...) from the config of `module`, else of its
  decoder (a VisionEncoderDecoder's decoder config, a captioning model's decoder)."""
  for part in (module, getattr(module, "decoder", None)):
    config = getattr(part, "config", None)
    for c in (config, getattr(config, "decoder", None)):
      value = getattr(c, name, None)
      if value is not None:
        return value
  return None


def _check_length(module: nn.Module, prompt: Mapping[str, Any], max_new_tokens: int) -> None:
  limit = getattr(module, "max_length", None)
  t = prompt["input_ids"].shape[1] if "input_ids" in prompt else 1
  if limit is not None and t + max_new_tokens > limit:
    raise GenerationError(
      f"The prompt ({t} tokens) + max_new_tokens ({max_new_tokens}) = {t + max_new_tokens} "
      f"> {limit}, the decoder's max_length (its position table): shorten the prompt or "
      "lower max_new_tokens."
    )
