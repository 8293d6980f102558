"""`mmtl.generate.generate` produces transformers' `generate()` tokens, token for token.

On tiny random GPT-2 (decoder-only, left-padded prompts) and ViT + GPT-2
VisionEncoderDecoder models: greedy and beam search with their length penalty and
early-stopping variants, with an EOS id chosen among the tokens the models do produce
so that hypotheses really finish. Sampling cannot match torch's RNG, so it is checked
by its limits (top_k=1 and a tiny top_p are greedy), reproducibility per rng, and the
top-k support. A batch sharded over the 8 simulated devices decodes as unsharded; bad
arguments raise GenerationError naming the fix. Every distinct set of static arguments
compiles once, so the cases are few and share fixtures.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest
import torch

from mmtl import generate as gen
from mmtl import hf, sharding
from tests.test_models_gpt2 import BOS, N_POSITIONS, PAD, VOCAB, save_tiny_gpt2, save_tiny_ved

MAX_NEW = 10
PROMPT_LEN = 5
# (num_beams, length_penalty, early_stopping); the first is greedy.
SEARCHES = [
  (1, 1.0, False),
  (2, 1.0, False),
  (2, 0.5, "never"),
  (3, 0.5, False),
  (3, 1.0, True),
  (3, 1.0, "never"),
  (4, 1.0, False),
]


def _prompt(batch: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
  """Left-padded prompts (transformers' convention for decoder-only generation) of 5, 3, 1,
  ... real tokens."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(PAD + 1, VOCAB, (batch, PROMPT_LEN))
  mask = np.ones_like(ids)
  for row in range(batch):
    mask[row, : (2 * row) % PROMPT_LEN] = 0
  ids[mask == 0] = PAD
  return dict(input_ids=ids, attention_mask=mask)


def _torch_generate(model, inputs: dict[str, np.ndarray], **kw) -> np.ndarray:
  torch_inputs = {k: torch.tensor(v) for k, v in inputs.items()}
  if "pixel_values" in torch_inputs:
    torch_inputs["pixel_values"] = torch_inputs["pixel_values"].permute(0, 3, 1, 2)  # NCHW
  with torch.no_grad():
    return model.generate(**torch_inputs, max_new_tokens=MAX_NEW, pad_token_id=PAD, **kw).numpy()


def _normalise(tokens: np.ndarray, prompt_len: int, eos: int | None, length: int) -> np.ndarray:
  """`tokens` padded to `length` with PAD, and PAD after each row's first generated EOS
  (transformers writes EOS there when pad_token_id is 0: its `pad_token_id or eos`)."""
  out = np.full((tokens.shape[0], length), PAD, tokens.dtype)
  out[:, : tokens.shape[1]] = tokens
  for row in out:
    hits = np.flatnonzero(row[prompt_len:] == eos)
    if hits.size:
      row[prompt_len + hits[0] + 1 :] = PAD
  return out


def _assert_same_tokens(got, ref, prompt_len: int, eos: int | None):
  got = np.asarray(got)
  assert got.shape == (ref.shape[0], prompt_len + MAX_NEW)
  # mmtl already writes PAD after EOS.
  np.testing.assert_array_equal(_normalise(got, prompt_len, eos, got.shape[1]), got)
  np.testing.assert_array_equal(got, _normalise(ref, prompt_len, eos, got.shape[1]))


def _most_frequent(tokens: np.ndarray) -> int:
  values, counts = np.unique(tokens, return_counts=True)
  return int(values[np.argmax(counts)])  # the smallest id among ties


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
  """(torch GPT2LMHeadModel, mmtl module, variables, the free greedy run (B, T + MAX_NEW) of
  `_prompt()` without EOS, its most frequent generated token as EOS)."""
  folder = tmp_path_factory.mktemp("gpt2_generate")
  torch_model = save_tiny_gpt2(folder, seed=2)
  module, variables, _ = hf.load_pretrained(folder)
  free = _torch_generate(torch_model, _prompt(), eos_token_id=None)
  return torch_model, module, variables, free, _most_frequent(free[:, PROMPT_LEN:])


@pytest.mark.parametrize("num_beams, length_penalty, early_stopping", SEARCHES)
def test_gpt2_matches_transformers(num_beams, length_penalty, early_stopping, lm):
  torch_model, module, variables, _, eos = lm
  prompt = _prompt()
  search = dict(num_beams=num_beams)
  if num_beams > 1:
    search.update(length_penalty=length_penalty, early_stopping=early_stopping)
  ref = _torch_generate(torch_model, prompt, do_sample=False, eos_token_id=eos, **search)
  assert (ref[:, PROMPT_LEN:] == eos).any(), "no hypothesis finished: EOS untested"
  got = gen.generate(
    module, variables, prompt, max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=PAD, **search
  )
  _assert_same_tokens(got, ref, PROMPT_LEN, eos)


def images_and_eos(torch_model) -> tuple[np.ndarray, int]:
  """NHWC pixels of 3 images, and as EOS the most frequent token of `torch_model`'s free
  greedy run on them (so that rows finish at different steps)."""
  pixels = np.random.default_rng(1).normal(size=(3, 16, 16, 3)).astype(np.float32)
  free = _torch_generate(torch_model, dict(pixel_values=pixels), eos_token_id=None)
  return pixels, _most_frequent(free[:, 1:])


@pytest.fixture(scope="module")
def ved(tmp_path_factory):
  """(torch VisionEncoderDecoderModel, mmtl module, variables, NHWC pixels, EOS id)."""
  folder = tmp_path_factory.mktemp("ved_generate")
  torch_model = save_tiny_ved(folder, scale=0.3)
  return (torch_model, *hf.load_pretrained(folder)[:2], *images_and_eos(torch_model))


def assert_generates_transformers_tokens(
  torch_model, module, variables, pixels, eos, num_beams, start
):
  """Images in, tokens out: mmtl's tokens are transformers' `generate()`'s."""
  inputs = dict(pixel_values=pixels)
  ref = _torch_generate(torch_model, inputs, num_beams=num_beams, eos_token_id=eos)
  assert (ref[:, 0] == start).all() and (ref[:, 1:] == eos).any()
  got = gen.generate(
    module,
    variables,
    inputs,
    max_new_tokens=MAX_NEW,
    num_beams=num_beams,
    eos_token_id=eos,
    pad_token_id=PAD,
  )
  _assert_same_tokens(got, ref, 1, eos)


@pytest.mark.parametrize("num_beams", [1, 3, 4])
def test_vision_encoder_decoder_matches_transformers(num_beams, ved):
  assert_generates_transformers_tokens(*ved, num_beams, start=BOS)


# --- Sampling (no EOS: every row runs MAX_NEW steps) ------------------------------


def _sample(lm, seed: int = 0, **kw) -> np.ndarray:
  _, module, variables, _, _ = lm
  return np.asarray(
    gen.generate(
      module,
      variables,
      _prompt(),
      max_new_tokens=MAX_NEW,
      do_sample=True,
      rng=jax.random.PRNGKey(seed),
      **kw,
    )
  )


@pytest.mark.parametrize("warp", [dict(top_k=1, temperature=3.0), dict(top_p=1e-6)])
def test_sampling_limits_are_greedy(warp, lm):
  free = lm[3]
  np.testing.assert_array_equal(_sample(lm, seed=7, **warp), free)


def test_sampling_follows_rng_and_stays_in_top_k(lm):
  _, module, variables, free, _ = lm
  warp = dict(top_k=3, temperature=3.0)  # flat enough that two rngs part ways
  first, again, other = _sample(lm, 0, **warp), _sample(lm, 0, **warp), _sample(lm, 1, **warp)
  np.testing.assert_array_equal(first, again)
  assert (first != other).any()
  prompt = _prompt()
  np.testing.assert_array_equal(first[:, :PROMPT_LEN], prompt["input_ids"])
  # Recompute each step's logits from the produced prefix: the token is among their top 3.
  mask = np.concatenate([prompt["attention_mask"], np.ones((3, MAX_NEW), int)], 1)
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  for tokens in (first, other):
    logits = module.apply(variables, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(positions))
    order = np.argsort(-np.asarray(logits["logits"])[:, PROMPT_LEN - 1 : -1], -1)
    produced = tokens[:, PROMPT_LEN:, None]
    assert (produced == order[..., :3]).any(-1).all()
    assert (produced[..., 0] != order[..., 0]).any()  # not greedy: it did sample


# --- Sharding and argument checks --------------------------------------------------


def test_sharded_batch_matches_unsharded(lm):
  _, module, variables, _, eos = lm
  prompt = _prompt(batch=8, seed=3)
  kw = dict(max_new_tokens=MAX_NEW, num_beams=2, eos_token_id=eos, pad_token_id=PAD)
  mesh = sharding.make_mesh(dict(data=-1))  # mmtl's meshes: Auto axes
  sharded = jax.device_put(
    {k: jnp.asarray(v) for k, v in prompt.items()}, NamedSharding(mesh, P("data"))
  )
  assert len(sharded["input_ids"].sharding.device_set) == 8
  got = gen.generate(module, variables, sharded, **kw)
  np.testing.assert_array_equal(got, gen.generate(module, variables, prompt, **kw))


@pytest.mark.parametrize(
  "bad, fix",
  [
    (dict(num_beams=VOCAB + 1), "Lower num_beams"),
    (dict(max_new_tokens=N_POSITIONS - PROMPT_LEN + 1), "lower max_new_tokens"),
    (dict(max_new_tokens=0), "generate at least one token"),
    (dict(do_sample=True, top_p=0.0), "need 0 < top_p <= 1"),
    (dict(do_sample=True, top_p=1.5), "need 0 < top_p <= 1"),
    (dict(do_sample=True), r"do_sample=True needs rng=jax\.random\.PRNGKey\(seed\)"),
  ],
)
def test_bad_arguments(bad, fix, lm):
  _, module, variables, _, _ = lm
  with pytest.raises(gen.GenerationError, match=fix):
    gen.generate(module, variables, _prompt(), **{"max_new_tokens": MAX_NEW, **bad})


def test_token_ids_come_from_the_config_and_none_anywhere_is_an_error(tmp_path):
  """eos/pad left None are the config's (transformers' generation config); without any,
  one line names the fix."""
  torch_model = save_tiny_gpt2(tmp_path / "eos", seed=2, eos_token_id=7, pad_token_id=PAD)
  module, variables, _ = hf.load_pretrained(tmp_path / "eos")
  prompt = _prompt()
  ref = _torch_generate(torch_model, prompt, do_sample=False)  # eos 7 from its config
  _assert_same_tokens(gen.generate(module, variables, prompt, max_new_tokens=MAX_NEW), ref, 5, 7)

  save_tiny_gpt2(tmp_path / "none", eos_token_id=None, pad_token_id=None)
  module, variables, _ = hf.load_pretrained(tmp_path / "none")
  with pytest.raises(gen.GenerationError, match=r"No eos_token_id or pad_token_id.*pass"):
    gen.generate(module, variables, prompt, max_new_tokens=MAX_NEW)
  # Without EOS but with a pad id every row runs max_new_tokens steps.
  out = gen.generate(module, variables, prompt, max_new_tokens=3, pad_token_id=PAD)
  assert out.shape == (3, PROMPT_LEN + 3)


def test_decoder_start_token_id(ved):
  """The argument overrides the config's decoder_start_token_id; a model with neither and
  no prompt is refused."""
  torch_model, module, variables, pixels, eos = ved
  inputs = dict(pixel_values=pixels)
  kw = dict(max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=PAD)
  ref = _torch_generate(torch_model, inputs, eos_token_id=eos, decoder_start_token_id=5)
  got = gen.generate(module, variables, inputs, decoder_start_token_id=5, **kw)
  assert (np.asarray(got)[:, 0] == 5).all()
  _assert_same_tokens(got, ref, 1, eos)
  config = dataclasses.replace(module.config, decoder_start_token_id=None)
  with pytest.raises(gen.GenerationError, match=r"decoder_start_token_id.*pass one of them"):
    gen.generate(module.clone(config=config), variables, inputs, **kw)


def _warped_probs(logits: np.ndarray, temperature=1.0, top_k=0, top_p=1.0) -> np.ndarray:
  """The sampling distribution by its definition (numpy): softmax(logits / T) over the k
  best tokens, then over the smallest set of best tokens whose mass reaches top_p."""
  probs = np.exp((logits - logits.max()) / temperature)
  if top_k:
    probs[np.argsort(-logits)[top_k:]] = 0
  probs /= probs.sum()
  if top_p < 1:
    order = np.argsort(-probs)
    needed = np.searchsorted(np.cumsum(probs[order]), top_p) + 1
    probs[order[needed:]] = 0
    probs /= probs.sum()
  return probs


@pytest.mark.parametrize(
  "warp", [dict(temperature=1.5), dict(top_k=5), dict(top_p=0.6, temperature=0.8)]
)
def test_sampled_tokens_follow_the_warped_softmax(warp, lm):
  """4000 draws of the first new token: never outside the top k / the nucleus, and the
  counts fit the distribution (chi-square goodness of fit, p > 0.001, bins with an expected
  count under 5 pooled)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top

  _, module, variables, _, _ = lm
  n = 4000
  prompt = {k: np.repeat(v[:1], n, 0) for k, v in _prompt().items()}  # row 0: no padding
  out = gen.generate(
    module,
    variables,
    prompt,
    max_new_tokens=1,
    do_sample=True,
    rng=jax.random.PRNGKey(0),
    **warp,
  )
  counts = np.bincount(np.asarray(out)[:, -1], minlength=VOCAB)
  logits = np.asarray(module.apply(variables, **{k: v[:1] for k, v in prompt.items()})["logits"])
  probs = _warped_probs(logits[0, -1].astype(np.float64), **warp)
  assert counts[probs == 0].sum() == 0, "a token outside the top k / nucleus was sampled"
  expected = n * probs
  big = expected >= 5
  observed = np.append(counts[big], counts[~big].sum())
  expected = np.append(expected[big], expected[~big].sum())
  keep = expected > 0
  assert (probs > 0).sum() > 2  # a real distribution, not one forced token
  assert stats.chisquare(observed[keep], expected[keep]).pvalue > 1e-3
