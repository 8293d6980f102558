"""The captioning head end to end, on tiny models and the small built-in dataset (8 CPU devices).

Checked here:
- `TargetTokens` (mmtl/data/transforms.py): BOS/EOS/PAD of a BERT tokenizer, the
  teacher-forcing fields with and without a prompt, truncation, a prompt that does not
  fit, `texts()` as the inverse, a GPT-2 tokenizer without a pad token.
- The trainer with head="captioning": a tiny ViT from scratch + the tiny BERT checkpoint
  warm-started as a decoder (cross-attention initialized and logged, self-attention and
  embeddings exactly the checkpoint's), loss going down, the `captioning` evaluator's
  metrics (the validation loss recomputed) and its captions file on five references per
  image, `mmtl.evaluate` reproducing them; a BertModel without
  `dont_load=['lm_head/.*']` refused.
- The "cross-attention only" freezing preset: frozen params bit-identical to init.
- Prefix conditioning with a scratch GPT-2 without cross-attention: forward logits of the
  tokens only, greedy generation that agrees with teacher forcing; the cross-attention /
  prefix mismatch refused.
- Generative VQA (`vqa` evaluator) on the yes/no ClassLabel, and missing config keys.
"""

import contextlib
import io
import json
import os
from pathlib import Path
import re
import sys

import jax
import ml_collections as mlc
import numpy as np
from PIL import Image
import pytest

from mmtl import (
  checkpoint,
  data,
  evaluate,
  export,
  generate,
  hf,
  lora,
  metrics,
  process,
  rules,
  sharding,
  text_metrics,
  train,
  train_state,
)
from mmtl import config as config_lib
from mmtl.data import transforms
from mmtl.generate import __main__ as generate_script
from mmtl.models import fusion
from tests.hf_fixtures import export_and_reload
from tests.test_accumulation import token_nll_sums
from tests.test_models_parity import jitted_apply
from tests.test_train import TINY_VIT, Preempted, patch_train_batches

CAPTION_METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "cider", "rouge_l", "sacrebleu", "loss")
# configs/captioning.py's train_only=cross_attention + a frozen image tower.
CROSS_ATTENTION_ONLY = (
  r"image_encoder/.*",
  r"decoder/(embeddings|lm_head)/.*",
  r"decoder/.*/(attn|attn_norm|mlp|mlp_norm)/.*",
)
STEPS = 16


def caption_config(bert_dir, data_dir, **overrides):
  """Tiny ViT from scratch -> the tiny BERT as a decoder (warm-started), on 32 captions."""
  config = mlc.ConfigDict(
    dict(
      seed=0,
      total_steps=STEPS,
      batch_size=16,
      log_every=1,
      ckpt_every=100,
      input=dict(
        dataset="mmtl_shapes/small",
        data_dir=data_dir,
        split="train[:32]",
        fields=dict(image="image", text=None, label=None, target="captions"),
        image=dict(size=16),
        target=dict(tokenizer=bert_dir, max_length=24),
      ),
      model=dict(
        towers=dict(image=dict(name=TINY_VIT, pool="cls")),
        head="captioning",
        decoder=dict(name=bert_dir, cross_attention=True),
        conditioning="cross_attention",
      ),
      model_init=dict(decoder=dict(name=bert_dir, dont_load=["lm_head/.*"])),
      optim=dict(name="adam", lr=3e-3, schedule=dict(decay="constant")),
      evals=dict(
        val=dict(type="captioning", max_new_tokens=8, input=dict(split="validation_iid[:32]"))
      ),
    )
  )
  for key, value in overrides.items():
    config[key] = value
  return config


def final_params(workdir):
  ckpts = os.path.join(workdir, "checkpoints")
  return rules.flatten(jax.device_get(checkpoint.restore_variables(ckpts)["params"]))


def train_losses(workdir):
  return metrics.read(str(workdir))["train/loss"]


def decoder_inputs(model):
  """Token ids (2, 6) and encoder states (2, 4, width) for the decoder of `model`."""
  rng = np.random.default_rng(0)
  ids = rng.integers(5, model.vocab_size, (2, 6))
  return ids, rng.normal(size=(2, 4, model.decoder.hidden_size)).astype(np.float32)


def assert_same_decoder_logits(model, params, torch_model):
  """The decoder of `model` with `params` and the transformers `torch_model` give the same
  logits on `decoder_inputs`; returns ours."""
  import torch  # pylint: disable=g-import-not-at-top

  ids, states = decoder_inputs(model)
  ours = model.decoder.apply({"params": params}, ids, encoder_hidden_states=states)["logits"]
  with torch.no_grad():
    ref = torch_model(
      input_ids=torch.tensor(ids), encoder_hidden_states=torch.tensor(states)
    ).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-5, rtol=0)
  return np.asarray(ours)


def read_jsonl(file):
  return [json.loads(line) for line in file.read_text().splitlines()]


# --- TargetTokens -----------------------------------------------------------------------


def test_target_tokens_teacher_forcing_fields(tiny_bert_dir):
  target = transforms.TargetTokens.load(tiny_bert_dir)
  tok = target.tokenizer
  cls, sep, pad = tok.cls_token_id, tok.sep_token_id, tok.pad_token_id
  assert (target.bos, target.eos, target.pad) == (cls, sep, pad) and len({cls, sep, pad}) == 3
  assert target.prompt == (cls,)
  texts = ["a red circle", "the blue square"]
  body = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
  L = 12
  out = target.sequences(texts, max_length=L)
  assert set(out) == {
    "decoder_input_ids",
    "decoder_attention_mask",
    "decoder_target_ids",
    "decoder_loss_mask",
    "decoder_prompt_ids",
  }
  for i, ids in enumerate(body):
    n = len(ids)
    np.testing.assert_array_equal(
      out["decoder_input_ids"][i], [cls, *ids, sep] + [pad] * (L - n - 2)
    )
    np.testing.assert_array_equal(out["decoder_target_ids"][i], [*ids, sep] + [pad] * (L - n - 1))
    np.testing.assert_array_equal(out["decoder_loss_mask"][i], [1] * (n + 1) + [0] * (L - n - 1))
    np.testing.assert_array_equal(
      out["decoder_attention_mask"][i], [1] * (n + 1) + [0] * (L - n - 1)
    )
  np.testing.assert_array_equal(out["decoder_prompt_ids"], [[cls], [cls]])
  assert out["decoder_input_ids"].dtype == np.int32 and out["decoder_loss_mask"].dtype == np.float32

  # Truncated to fit: the body is cut, EOS stays the last target.
  short = target.sequences(["a red circle and a green triangle"], max_length=4)
  long_ids = tok("a red circle and a green triangle", add_special_tokens=False)["input_ids"]
  np.testing.assert_array_equal(short["decoder_input_ids"], [[cls, *long_ids[:3]]])
  np.testing.assert_array_equal(short["decoder_target_ids"], [[*long_ids[:3], sep]])
  np.testing.assert_array_equal(short["decoder_loss_mask"], [[1, 1, 1, 1]])

  # texts() inverts: the whole sequence (BOS + targets) decodes to the input texts.
  full = np.concatenate([out["decoder_input_ids"][:, :1], out["decoder_target_ids"]], 1)
  assert target.texts(full) == texts


def test_target_tokens_with_a_prompt(tiny_bert_dir):
  target = transforms.TargetTokens.load(tiny_bert_dir, prompt="a photo of")
  tok = target.tokenizer
  cls, sep, pad = tok.cls_token_id, tok.sep_token_id, tok.pad_token_id
  prompt = tok("a photo of", add_special_tokens=False)["input_ids"]
  body = tok("a red circle", add_special_tokens=False)["input_ids"]
  assert target.prompt == (cls, *prompt)
  P, n, L = len(prompt), len(body), 16
  out = target.sequences(["a red circle", "blue"], max_length=L)
  np.testing.assert_array_equal(out["decoder_prompt_ids"], [[cls, *prompt]] * 2)
  np.testing.assert_array_equal(
    out["decoder_input_ids"][0], [cls, *prompt, *body, sep] + [pad] * (L - P - n - 2)
  )
  np.testing.assert_array_equal(
    out["decoder_target_ids"][0], [*prompt, *body, sep] + [pad] * (L - P - n - 1)
  )
  # Positions that predict the prompt's tokens, and padding, are not trained on.
  np.testing.assert_array_equal(
    out["decoder_loss_mask"][0], [0] * P + [1] * (n + 1) + [0] * (L - P - n - 1)
  )
  # The prompt is attended to (it is input), only not a target.
  assert out["decoder_attention_mask"][0, : P + 1].all()

  # max_length = prompt + BOS + 1: the body is truncated away, EOS is the only target.
  tight = target.sequences(["a red circle"], max_length=P + 2)
  np.testing.assert_array_equal(tight["decoder_target_ids"], [[*prompt, body[0], sep]])
  tight = target.sequences(["a red circle"], max_length=P + 1)
  np.testing.assert_array_equal(tight["decoder_target_ids"], [[*prompt, sep]])
  np.testing.assert_array_equal(tight["decoder_loss_mask"], [[0] * P + [1]])
  with pytest.raises(config_lib.ConfigError, match=r"config\.input\.target\.prompt.*max_length"):
    target.sequences(["a red circle"], max_length=P)

  # texts(): generated ids start with the prompt; cut at EOS, specials dropped, prompt not
  # part of the text.
  blue = tok("blue", add_special_tokens=False)["input_ids"]
  ended = [cls, *prompt, *body, pad, sep, *blue, *blue]
  open_ended = [cls, *prompt, *blue * 5]  # no EOS: everything after the prompt
  width = max(len(ended), len(open_ended))
  ended += [sep] * (width - len(ended))  # after EOS: ignored
  open_ended += [pad] * (width - len(open_ended))  # padding: a special token, dropped
  assert target.texts(np.array([ended, open_ended])) == ["a red circle", "blue blue blue blue blue"]


def write_gpt2_tokenizer(out, pad=False, **special_tokens):
  """A tiny byte-level BPE GPT-2 tokenizer (letters, a few merges), saved to `out`;
  `special_tokens` (e.g. `eos_token=None`) replace GPT2Tokenizer's."""
  import transformers

  letters = "abcdefghijklmnopqrstuvwxyz"
  out.mkdir(parents=True)
  vocab = ["<|endoftext|>", "\u0120", *letters, *(f"\u0120{c}" for c in letters)]
  (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
  (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"\u0120 {c}\n" for c in letters))
  tok = transformers.GPT2Tokenizer(
    vocab=str(out / "vocab.json"), merges=str(out / "merges.txt"), **special_tokens
  )
  assert tok("a red")["input_ids"] == [2, vocab.index("\u0120r"), 6, 5]
  if pad:
    tok.pad_token = tok.eos_token
  tok.save_pretrained(out)
  return str(out)


def test_gpt2_tokenizer_without_pad_token(tmp_path):
  no_pad = write_gpt2_tokenizer(tmp_path / "gpt2")
  with pytest.raises(
    config_lib.ConfigError,
    match=r"no pad token.*GPT-2.*config\.input\.target\.pad_token='<\|endoftext\|>'",
  ):
    transforms.TargetTokens.load(no_pad)
  # The fix the message gives works: BOS = EOS = PAD = <|endoftext|>; so does a tokenizer
  # saved with a pad token.
  fixed = transforms.TargetTokens.load(no_pad, pad_token="<|endoftext|>")
  assert (fixed.bos, fixed.eos, fixed.pad) == (0, 0, 0)
  saved = transforms.TargetTokens.load(write_gpt2_tokenizer(tmp_path / "gpt2_pad", pad=True))
  assert (saved.bos, saved.eos, saved.pad) == (0, 0, 0)
  with pytest.raises(config_lib.ConfigError, match=r"pad_token='<pad>' is not a token of"):
    transforms.TargetTokens.load(no_pad, pad_token="<pad>")


@pytest.mark.parametrize("missing", ["bos", "eos"])
def test_tokenizer_without_bos_or_eos_names_the_fix(missing, tmp_path):
  folder = write_gpt2_tokenizer(tmp_path / "tok", pad=True, **{f"{missing}_token": None})
  other = {"bos": "cls", "eos": "sep"}[missing]
  with pytest.raises(
    config_lib.ConfigError,
    match=rf"^Tokenizer '.*' has no {missing} token \({missing}_token or {other}_token\): the "
    rf"decoder needs BOS, EOS and PAD\. Set its {missing}_token in the tokenizer's",
  ):
    transforms.TargetTokens.load(folder)


# --- The trainer ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def caption_run(tiny_bert_dir, data_dir, tmp_path_factory):
  """(workdir, final metrics, the trainer's printed lines) of a complete captioning run."""
  workdir = tmp_path_factory.mktemp("caption") / "run"
  with contextlib.redirect_stdout(io.StringIO()) as printed:
    final = train.train(caption_config(tiny_bert_dir, data_dir), str(workdir))
  return workdir, final, printed.getvalue().splitlines()


@pytest.fixture(scope="module")
def warm_start(tiny_bert_dir, data_dir):
  """The flat initial params of `caption_config`, as the trainer creates them (random init
  + the decoder from the checkpoint): what a 0-step run starts from."""
  config = config_lib.with_defaults(caption_config(tiny_bert_dir, data_dir))
  model = fusion.build(config.model)
  layout = train_state.param_layout(model, config, sharding.make_mesh(config.mesh))
  variables = train_state.init_variables(model, config, layout, note=lambda _: None)
  return rules.flatten(jax.device_get(variables["params"]))


@pytest.mark.slow
def test_captioning_run_trains_scores_and_writes_captions(caption_run):
  workdir, final, _ = caption_run
  loss = metrics.read(str(workdir))["train/loss"]
  assert sorted(loss) == list(range(1, STEPS + 1))
  first, last = np.mean([loss[s] for s in (1, 2, 3)]), np.mean([loss[s] for s in (14, 15, 16)])
  assert last < first - 0.5, loss
  assert set(final) >= {f"val/{m}" for m in CAPTION_METRICS} | {"step"}
  assert final["step"] == STEPS
  for m in ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l"):
    assert 0.0 <= final[f"val/{m}"] <= 1.0, m
  assert final["val/cider"] >= 0.0 and 0.0 <= final["val/sacrebleu"] <= 100.0
  assert json.loads((workdir / "final_metrics.json").read_text()) == pytest.approx(final)

  lines = read_jsonl(workdir / f"captions_step{STEPS}-val.jsonl")
  assert len(lines) == 32
  assert [line["id"] for line in lines] == list(range(32))
  assert all(set(line) == {"id", "hypothesis", "references"} for line in lines)
  assert all(isinstance(line["hypothesis"], str) for line in lines)
  # The references are validation_iid's five captions per image.
  assert all(len(line["references"]) == 5 for line in lines)
  assert all("left to right" in line["references"][0] for line in lines)
  assert all(line["references"][4].startswith("from top to bottom: ") for line in lines)
  # The file holds what was scored.
  scores = text_metrics.caption_scores(
    [line["hypothesis"] for line in lines], [line["references"] for line in lines]
  )
  assert {f"val/{k}": v for k, v in scores.items()} == pytest.approx(
    {k: v for k, v in final.items() if k not in ("step", "val/loss")}
  )


@pytest.mark.slow
def test_validation_loss_is_the_cross_entropy_per_target_token(caption_run):
  """`val/loss`: the teacher-forced cross-entropy of each example's first reference, a mean
  over the split's target tokens, here recomputed in numpy from the final params."""
  workdir, final, _ = caption_run
  config = config_lib.with_defaults(
    mlc.ConfigDict(json.loads((workdir / "config.json").read_text()))
  )
  model = fusion.build(config.model)
  variables = {"params": rules.unflatten(final_params(workdir))}
  eval_input = {**config.input.to_dict(), **config.evals.val.input.to_dict()}
  total = tokens = 0.0
  for batch in data.make_eval_iterator(eval_input, batch_size=16):
    batch = {k: v for k, v in batch.items() if k not in transforms.HOST_FIELDS}
    batch_sum, batch_tokens = token_nll_sums(jitted_apply(model, variables, batch)["logits"], batch)
    total, tokens = total + batch_sum, tokens + batch_tokens
  assert tokens > 32 * 5
  assert final["val/loss"] == pytest.approx(total / tokens, rel=1e-5)


@pytest.mark.slow
def test_evaluate_reproduces_captioning_metrics(caption_run, monkeypatch):
  workdir, final, _ = caption_run
  captions = workdir / f"captions_step{STEPS}-val.jsonl"
  before = captions.read_text()
  config = mlc.ConfigDict(json.loads((workdir / "config.json").read_text()))
  reads = []  # each opening of an eval split
  make_eval_iterator = data.make_eval_iterator
  monkeypatch.setattr(
    data, "make_eval_iterator", lambda *a, **k: reads.append(1) or make_eval_iterator(*a, **k)
  )
  again = evaluate.evaluate(config, str(workdir))
  assert len(reads) == 1  # one pass gives the captions and the loss
  assert set(again) == {f"val/{m}" for m in CAPTION_METRICS}
  assert again == pytest.approx({k: v for k, v in final.items() if k != "step"})
  assert captions.read_text() == before  # rewritten with the same greedy captions
  assert (workdir / f"eval_step{STEPS}.json").exists()


@pytest.mark.slow
def test_generate_script_captions_a_split_and_image_files(caption_run, tmp_path):
  """`python -m mmtl.generate` on a split (metrics printed, every caption written), and
  `caption_run` on image files."""
  workdir, _, _ = caption_run
  repo = Path(__file__).resolve().parents[1]
  args = ["--workdir", str(workdir), "--split", "validation_iid[:8]", "--num_beams", "2"]
  result = process.run(
    [sys.executable, "-m", "mmtl.generate", *args, "--max_new_tokens", "4"],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=repo,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  out = workdir / f"captions_step{STEPS}-validation_iid_8_-beams2.jsonl"
  assert f"Wrote 8 captions to {out}" in result.stdout
  lines = read_jsonl(out)
  assert len(lines) == 8 and all(set(line) == {"id", "hypothesis", "references"} for line in lines)
  assert "bleu_4" in result.stdout and "cider" in result.stdout
  assert json.loads(result.stdout.splitlines()[0]) == lines[0]

  images = []
  for i, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
    images.append(str(tmp_path / f"{i}.png"))
    Image.new("RGB", (16, 16), colour).save(images[-1])
  rows, scores = generate_script.caption_run(str(workdir), images=tuple(images), max_new_tokens=4)
  assert scores == {} and [row["image"] for row in rows] == images
  assert all(isinstance(row["hypothesis"], str) for row in rows)

  bad = process.run(
    [sys.executable, "-m", "mmtl.generate", "--workdir", str(tmp_path / "none")],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=repo,
  )
  assert bad.returncode != 0 and bad.stderr.strip().splitlines() == [
    f"{tmp_path / 'none' / 'config.json'} not found: --workdir must be a run written by mmtl.train."
  ]


@pytest.mark.slow
def test_fine_tuned_decoder_exports_to_transformers(caption_run, tiny_bert_dir, tmp_path):
  """The trained decoder of a captioning run, cross-attention included, is a folder that
  transformers loads as BertLMHeadModel (no missing or unexpected keys), same logits."""
  import transformers  # pylint: disable=g-import-not-at-top

  workdir, _, _ = caption_run
  config = config_lib.with_defaults(
    mlc.ConfigDict(json.loads((workdir / "config.json").read_text()))
  )
  model = fusion.build(config.model)
  params = rules.unflatten(
    {p[len("decoder/") :]: x for p, x in final_params(workdir).items() if p.startswith("decoder/")}
  )
  torch_model = export_and_reload(
    model.decoder, {"params": params}, tmp_path, transformers.BertLMHeadModel
  )
  assert torch_model.config.is_decoder and torch_model.config.add_cross_attention
  assert_same_decoder_logits(model, params, torch_model)


@pytest.mark.slow
def test_decoder_warm_start_loads_self_attention_and_logs_cross_attention(
  caption_run, warm_start, tiny_bert_dir
):
  _, _, printed = caption_run
  # The start-up summary names the decoder's source and lists what it initializes.
  assert f"  decoder: {tiny_bert_dir} with cross-attention (weights from {tiny_bert_dir})" in (
    printed
  )
  messages = [line for line in printed if "not in the checkpoint are initialized" in line]
  assert len(messages) == 1, messages
  assert printed.index(messages[0]) == printed.index(f"model_init: decoder <- {tiny_bert_dir}") + 1
  listed = messages[0].split("initialized: ", 1)[1].split(", ")
  assert "decoder/layer_0/cross_attn/query/kernel" in listed
  assert "decoder/layer_1/cross_attn_norm/scale" in listed
  # Only new params are listed: cross-attention and the LM head (dont_load), no self-attention.
  for path in listed:
    if not path.startswith("..."):
      assert re.match(r"decoder/(layer_\d+/cross_attn(_norm)?|lm_head)/", path), path

  # At init the decoder's self-attention, MLP and embeddings are the checkpoint's values.
  state = hf.read_weights(hf.resolve(tiny_bert_dir))
  for layer in (0, 1):
    ours = f"decoder/decoder/layer_{layer}"
    theirs = f"encoder.layer.{layer}"
    pairs = {
      "attn/query": "attention.self.query",
      "attn/key": "attention.self.key",
      "attn/value": "attention.self.value",
      "attn/out": "attention.output.dense",
      "mlp/fc1": "intermediate.dense",
    }
    for a, b in pairs.items():
      np.testing.assert_array_equal(
        warm_start[f"{ours}/{a}/kernel"], state[f"{theirs}.{b}.weight"].T, err_msg=a
      )
      np.testing.assert_array_equal(warm_start[f"{ours}/{a}/bias"], state[f"{theirs}.{b}.bias"])
    np.testing.assert_array_equal(
      warm_start[f"{ours}/attn_norm/scale"], state[f"{theirs}.attention.output.LayerNorm.weight"]
    )
  np.testing.assert_array_equal(
    warm_start["decoder/embeddings/word_embeddings/embedding"],
    state["embeddings.word_embeddings.weight"],
  )
  # The new cross-attention is not a copy of the self-attention.
  assert not np.allclose(
    warm_start["decoder/decoder/layer_0/cross_attn/query/kernel"],
    warm_start["decoder/decoder/layer_0/attn/query/kernel"],
  )


def test_bert_model_decoder_without_dont_load_names_the_fix(tiny_bert_dir, data_dir, tmp_path):
  config = caption_config(
    tiny_bert_dir, data_dir, evals={}, model_init=dict(decoder=dict(name=tiny_bert_dir))
  )
  with pytest.raises(
    (config_lib.ConfigError, hf.CheckpointError),
    match=r"no LM head.*dont_load=\['lm_head/\.\*'\]",
  ):
    train.train(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.slow
def test_cross_attention_only_preset_trains_only_cross_attention(
  warm_start, tiny_bert_dir, data_dir, tmp_path
):
  config = caption_config(
    tiny_bert_dir,
    data_dir,
    total_steps=2,
    evals={},
    optim=dict(name="adam", lr=3e-3, schedule=dict(decay="constant"), frozen=CROSS_ATTENTION_ONLY),
  )
  train.train(config, str(tmp_path / "run"))
  after = final_params(tmp_path / "run")
  assert set(after) == set(warm_start)
  frozen = [p for p in after if any(re.fullmatch(r, p) for r in CROSS_ATTENTION_ONLY)]
  assert len(frozen) > 50 and not any("/cross_attn" in p or "enc_to_dec" in p for p in frozen)
  for p in frozen:
    np.testing.assert_array_equal(after[p], warm_start[p], err_msg=p)
  trained = [
    p
    for p in after
    if p.endswith("kernel") and ("/cross_attn/" in p or p.startswith("enc_to_dec_proj/"))
  ]
  assert len(trained) == 2 * 4 + 1
  for p in trained:
    assert not np.allclose(after[p], warm_start[p]), p


@pytest.mark.slow
def test_lora_preset_trains_adapters_and_new_layers_and_exports_merged(
  warm_start, tiny_bert_dir, data_dir, tmp_path
):
  """preset='lora' on a captioning model: LoRA on the decoder's self-attention, and the
  layers that start random (the scratch ViT, projections, cross-attention, the dont_load
  LM head) train in full; every checkpoint weight stays bit-identical; the exported decoder
  (LoRA merged) loads in transformers and computes what the run's decoder computes."""
  import transformers  # pylint: disable=g-import-not-at-top

  targets = [r"decoder/.*/attn/(query|value)/kernel"]
  config = caption_config(
    tiny_bert_dir,
    data_dir,
    total_steps=3,
    evals={},
    optim=dict(
      name="adam",
      lr=3e-3,
      schedule=dict(decay="constant"),
      preset="lora",
      lora=dict(targets=targets, rank=2, alpha=4),
    ),
  )
  with contextlib.redirect_stdout(io.StringIO()) as printed:
    train.train(config, str(tmp_path / "run"))
  after = final_params(tmp_path / "run")
  # The run's initial params: warm_start's values, plus the LoRA leaves.
  full = config_lib.with_defaults(config)
  model = fusion.build(full.model)
  layout = train_state.param_layout(model, full, sharding.make_mesh(full.mesh))
  init = train_state.init_variables(model, full, layout, note=lambda _: None)["params"]
  init = rules.flatten(jax.device_get(init))
  adapters = sorted(set(init) - set(warm_start))
  assert len(adapters) == 2 * 2 * 3 and all("/lora_" in p for p in adapters)
  assert set(after) == set(init)
  # New: the ViT (no checkpoint), the projections, cross-attention, the dont_load LM head.
  assert layout.new_layers == (
    "enc_to_dec_proj/.*",
    "decoder/.*/cross_attn(_norm)?/.*",
    "image_encoder/.*",
    "decoder/lm_head/.*",
  )
  new = r"(image_encoder|enc_to_dec_proj)/.*|decoder/(.*/cross_attn(_norm)?|lm_head)/.*"
  trained = [
    p
    for p in init
    if re.fullmatch(new + r"|.*/lora_(a|b)", p) and "/pooler/" not in p  # no gradient: unused
  ]
  assert len(trained) > 40
  for p, before in init.items():
    if p in trained:
      assert not np.allclose(after[p], before), p
    else:  # the decoder checkpoint's weights, lora_scale, the unused pooler
      np.testing.assert_array_equal(after[p], before, err_msg=p)
      if p in warm_start:
        np.testing.assert_array_equal(after[p], warm_start[p], err_msg=p)
  assert any("preset=lora" in line for line in printed.getvalue().splitlines())
  assert (
    "new layers (the preset trains them in full): enc_to_dec_proj/.*, "
    "decoder/.*/cross_attn(_norm)?/.*, image_encoder/.*, decoder/lm_head/.*"
  ) in printed.getvalue().splitlines()

  out = export.export_tower(str(tmp_path / "run"), "decoder", tmp_path / "decoder")
  torch_model = transformers.BertLMHeadModel.from_pretrained(out).eval()
  merged = lora.merge(rules.unflatten(after))["decoder"]
  ours = assert_same_decoder_logits(model, merged, torch_model)
  unmerged = rules.unflatten({p: x for p, x in after.items() if "lora_" not in p})["decoder"]
  ids, states = decoder_inputs(model)
  base = model.decoder.apply({"params": unmerged}, ids, encoder_hidden_states=states)["logits"]
  assert not np.allclose(ours, base, atol=1e-4)  # the adapters matter


@pytest.mark.slow
def test_sharded_captioning_matches_data_parallel(tiny_bert_dir, data_dir, tmp_path):
  """The captioning model under FSDP + Megatron tensor parallelism (data=2, fsdp=2,
  model=2): the decoder's self- and cross-attention kernels are split over `model` (its
  odd-sized MLP falls back to fsdp), and the run's losses and params are the
  data-parallel run's."""
  runs = {}
  for name, mesh, rule_set in (
    ("dp", dict(data=8), "replicate"),
    ("tp", dict(data=2, fsdp=2, model=2), "fsdp_tp"),
  ):
    config = caption_config(
      tiny_bert_dir, data_dir, total_steps=3, evals={}, mesh=mesh, sharding_rules=rule_set
    )
    train.train(config, str(tmp_path / name))
    runs[name] = (train_losses(tmp_path / name), final_params(tmp_path / name))
  config = config_lib.with_defaults(config)
  layout = train_state.param_layout(
    fusion.build(config.model), config, sharding.make_mesh(config.mesh)
  )
  specs = {p: s.spec for p, s in rules.flatten(layout.shardings).items()}
  layer = "decoder/decoder/layer_0"
  assert specs[f"{layer}/cross_attn/query/kernel"] == jax.sharding.PartitionSpec("fsdp", "model")
  assert specs[f"{layer}/cross_attn/out/kernel"] == jax.sharding.PartitionSpec("model", "fsdp")
  assert specs[f"{layer}/attn/value/kernel"] == jax.sharding.PartitionSpec("fsdp", "model")
  assert specs[f"{layer}/attn/out/kernel"] == jax.sharding.PartitionSpec("model", "fsdp")
  (dp_losses, dp_params), (tp_losses, tp_params) = runs["dp"], runs["tp"]
  assert sorted(dp_losses) == sorted(tp_losses) == [1, 2, 3]
  np.testing.assert_allclose(list(tp_losses.values()), list(dp_losses.values()), rtol=1e-5)
  for p, x in dp_params.items():
    if not p.endswith("/key/bias"):  # its exact gradient is 0: Adam scales up rounding noise
      np.testing.assert_allclose(tp_params[p], x, rtol=1e-4, atol=1e-6, err_msg=p)


@pytest.mark.slow
def test_an_interrupted_captioning_run_resumes_bit_for_bit(
  tiny_bert_dir, data_dir, tmp_path, monkeypatch
):
  """Killed after its step-2 checkpoint, the same command resumes: the same losses and
  final params as the run that was never stopped (the random reference each example
  trains on is drawn again the same way)."""
  config = caption_config(tiny_bert_dir, data_dir, total_steps=4, ckpt_every=2, evals={})
  train.train(config, str(tmp_path / "whole"))

  def dies_at_step_3(n, batch):  # n = 1 is the shape probe; 2 batches are prefetched
    if n == 1 + 5:
      raise Preempted()
    return batch

  real = patch_train_batches(monkeypatch, dies_at_step_3)
  with pytest.raises(Preempted):
    train.train(config, str(tmp_path / "resumed"))
  assert sorted(train_losses(tmp_path / "resumed")) == [1, 2]
  assert checkpoint.saved_steps(str(tmp_path / "resumed" / "checkpoints")) == [2]
  monkeypatch.setattr(data, "make_train_iterator", real)
  train.train(config, str(tmp_path / "resumed"))
  assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "whole")
  whole, resumed = final_params(tmp_path / "whole"), final_params(tmp_path / "resumed")
  assert set(whole) == set(resumed)
  for p, x in whole.items():
    np.testing.assert_array_equal(resumed[p], x, err_msg=p)


# --- Prefix conditioning ------------------------------------------------------------------


def prefix_model_config(tiny_bert_dir, data_dir, cross_attention, conditioning):
  vocab = len(transforms.TargetTokens.load(tiny_bert_dir).tokenizer)
  gpt2 = dict(model_type="gpt2", vocab_size=vocab, n_embd=16, n_layer=1, n_head=2, n_positions=64)
  config = caption_config(tiny_bert_dir, data_dir)
  config.model.decoder = dict(name=gpt2, cross_attention=cross_attention)
  config.model.conditioning = conditioning
  return config_lib.with_defaults(config).model, vocab


def test_prefix_conditioning_with_a_decoder_without_cross_attention(tiny_bert_dir, data_dir):
  model_cfg, vocab = prefix_model_config(tiny_bert_dir, data_dir, False, "prefix")
  model = fusion.build(model_cfg)
  assert isinstance(model, fusion.CaptioningModel) and not model.decoder.cross_attention
  B, T = 2, 5
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(B, 16, 16, 3)).astype(np.float32)
  ids = np.tile(rng.integers(5, vocab, size=(1, T)).astype(np.int32), (B, 1))
  batch = dict(pixel_values=pixels, decoder_input_ids=ids, decoder_attention_mask=np.ones_like(ids))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), batch)
  assert not any("cross_attn" in p for p in rules.flatten(variables["params"]))
  logits = np.asarray(jitted_apply(model, variables, batch)["logits"])
  assert logits.shape == (B, T, vocab)
  # The prefix is the images' tokens: same text, different images, different predictions.
  assert np.abs(logits[0] - logits[1]).max() > 1e-4

  bos = transforms.TargetTokens.load(tiny_bert_dir).bos
  new = 4
  prompt = np.full((B, 1), bos, np.int32)
  out = np.asarray(
    generate.generate(
      model, variables, dict(pixel_values=pixels, decoder_input_ids=prompt), max_new_tokens=new
    )
  )
  assert out.shape == (B, 1 + new) and (out[:, 0] == bos).all()
  # Greedy decoding with the cache agrees with teacher forcing on what it generated: the
  # prefix is seen once, at the first step, and stays in the cache.
  forced = dict(
    pixel_values=pixels,
    decoder_input_ids=out[:, :-1],
    decoder_attention_mask=np.ones_like(out[:, :-1]),
  )
  np.testing.assert_array_equal(
    np.asarray(jitted_apply(model, variables, forced)["logits"]).argmax(-1), out[:, 1:]
  )


def test_cross_attention_conditioning_needs_cross_attention_layers(tiny_bert_dir, data_dir):
  model_cfg, _ = prefix_model_config(tiny_bert_dir, data_dir, False, "cross_attention")
  with pytest.raises(config_lib.ConfigError, match=r"config\.model\.conditioning='prefix'"):
    fusion.build(model_cfg)


# --- Generative VQA and config errors -----------------------------------------------------


@pytest.mark.slow
def test_recipe_config_runs_short(tiny_bert_dir, data_dir, tmp_path):
  """configs/captioning.py as its table runs it (MiniLM warm start, frozen image tower, the
  five references, LR multipliers), on the small dataset with the tiny BERT in MiniLM's
  place: 3 steps and its evaluation."""
  from configs import captioning  # pylint: disable=g-import-not-at-top

  assert {"arg.decoder": "minilm", "arg.image": "frozen", "seed": 2} in captioning.get_sweep()
  config = captioning.get_config("decoder=minilm,image=frozen,steps=3,train=48")
  config.batch_size = 16
  config.input.update(dataset="mmtl_shapes/small", data_dir=data_dir)
  config.input.target.tokenizer = tiny_bert_dir
  config.model.decoder.name = config.model_init.decoder.name = tiny_bert_dir
  config.evals.val.update(batch_size=16, max_new_tokens=6)
  config.evals.val.input.split = "validation_iid[:16]"
  with contextlib.redirect_stdout(io.StringIO()) as printed:
    final = train.train(config, str(tmp_path / "run"))
  assert set(final) == {f"val/{m}" for m in CAPTION_METRICS} | {"step"}
  assert re.search(r"image_encoder +0 \(0 B\) +[\d,]+ ", printed.getvalue())  # frozen
  lines = read_jsonl(tmp_path / "run" / "captions_step3-val.jsonl")
  assert len(lines) == 16 and all(len(line["references"]) == 5 for line in lines)


@pytest.mark.slow
def test_coco_captioning_recipe_on_mock_coco_captions(mock_real_datasets, tiny_vit_dir, tmp_path):
  """configs/coco_captioning.py as written (`captions/text` targets, GPT-2 padding with
  <|endoftext|>, the ViT's own image stats and size, beam-4 evaluation), its checkpoints
  swapped for tiny ones: 4 steps and the evaluation, on mock `coco_captions`."""
  from configs import coco_captioning  # pylint: disable=g-import-not-at-top
  from tests.test_models_gpt2 import save_tiny_gpt2  # pylint: disable=g-import-not-at-top

  save_tiny_gpt2(tmp_path / "gpt2")
  config = coco_captioning.get_config(
    f"encoder={tiny_vit_dir},decoder={tmp_path / 'gpt2'},"
    f"tokenizer={write_gpt2_tokenizer(tmp_path / 'tokenizer')},"
    "batch=8,epochs=0.0003,eval_examples=12"
  )
  assert config.total_steps == 4 and config.evals.val.num_beams == 4
  config.evals.val.max_new_tokens = 6
  config.input.update(num_threads=1, prefetch=2, download=True)  # mock_data: a no-op
  with contextlib.redirect_stdout(io.StringIO()):
    final = train.train(config, str(tmp_path / "run"))
  assert final["step"] == 4 and set(final) == {f"val/{m}" for m in CAPTION_METRICS} | {"step"}
  assert np.isfinite(final["val/loss"])
  lines = read_jsonl(tmp_path / "run" / "captions_step4-val.jsonl")
  # Every caption of an image is a reference (mock sequences hold 5 to 49).
  assert len(lines) == 12 and all(len(line["references"]) >= 5 for line in lines)


@pytest.mark.slow
def test_generative_vqa_run(tiny_bert_dir, data_dir, tmp_path):
  config = caption_config(
    tiny_bert_dir,
    data_dir,
    total_steps=3,
    model_init={},
    evals=dict(val=dict(type="vqa", max_new_tokens=4, input=dict(split="validation[:32]"))),
  )
  config.input.fields = dict(image="image", text="question", label=None, target="label")
  config.input.text = dict(tokenizer=tiny_bert_dir, max_length=24)
  config.input.target.max_length = 6  # [CLS] y ##e ##s [SEP]
  config.model.towers = dict(image=dict(name=TINY_VIT, pool="cls"), text=dict(name=tiny_bert_dir))
  final = train.train(config, str(tmp_path / "run"))
  assert set(final) == {"val/exact_match", "val/vqa_accuracy", "val/loss", "step"}
  assert 0.0 <= final["val/exact_match"] <= 1.0 and 0.0 <= final["val/vqa_accuracy"] <= 1.0
  lines = read_jsonl(tmp_path / "run" / "captions_step3-val.jsonl")
  assert len(lines) == 32
  # The ClassLabel's names are the answers.
  assert {tuple(line["references"]) for line in lines} == {("no",), ("yes",)}
  # One answer per question: VQA accuracy is exact match.
  exact = np.mean([line["hypothesis"] == line["references"][0] for line in lines])
  assert final["val/exact_match"] == pytest.approx(exact)
  assert final["val/vqa_accuracy"] == pytest.approx(exact)


def test_missing_decoder_name_and_target_tokenizer(tiny_bert_dir, data_dir, tmp_path):
  config = caption_config(tiny_bert_dir, data_dir)
  config.model.decoder = dict(cross_attention=True)
  with pytest.raises(config_lib.ConfigError, match=r"config\.model\.decoder\.name"):
    fusion.build(config_lib.with_defaults(config).model)

  config = caption_config(tiny_bert_dir, data_dir, evals={})
  config.input.target = dict(max_length=24)
  with pytest.raises(config_lib.ConfigError, match=r"config\.input\.target\.tokenizer"):
    train.train(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "config.json").exists()


def test_target_tokenizer_larger_than_the_decoder_vocabulary(tiny_bert_dir, data_dir, tmp_path):
  config = caption_config(tiny_bert_dir, data_dir, evals={}, model_init={})
  small = dict(model_type="gpt2", vocab_size=40, n_positions=32, n_embd=16, n_layer=1, n_head=2)
  config.model.decoder = dict(name=small, cross_attention=True)
  vocab = len(transforms.TargetTokens.load(tiny_bert_dir).tokenizer)
  with pytest.raises(
    config_lib.ConfigError,
    match=rf"has {vocab} tokens but the decoder's embeddings have 40 rows.*own tokenizer",
  ):
    train.train(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "config.json").exists()


def test_missing_references_field_names_the_fix(tiny_bert_dir, data_dir, tmp_path):
  config = caption_config(tiny_bert_dir, data_dir)
  config.input.fields.target = "descriptions"  # mmtl_shapes has `caption`, `captions`
  with pytest.raises(
    config_lib.ConfigError,
    match=r"Feature 'descriptions' not in the dataset \(available here: \[.*'captions'.*\]\)\. "
    r"Fix config\.input\.fields",
  ):
    train.train(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "config.json").exists()
