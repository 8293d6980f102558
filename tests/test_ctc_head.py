"""The ctc head loaded whole from a Wav2Vec2ForCTC or HubertForCTC checkpoint is transformers'
model: the same logits and the same CTC loss on a padded batch (both reductions), its
vocabulary the checkpoint's; infeasible examples weigh nothing instead of making the loss
inf."""

import json

import jax
import ml_collections as mlc
import numpy as np
import pytest
import torch
import transformers

from mmtl import config as config_lib
from mmtl import ctc, heads, hf
from mmtl.config_keys import ConfigError
from tests.hf_fixtures import make_tiny_checkpoint, perturb_weights
from tests.test_pretrained_heads import init
from tests.xla_settings import production_jit

# A vocab.json with the blank last (as HF's fine-tuning guide builds them); the tokenizer
# adds <s> and </s> after it, so the head scores 32 classes.
TOKENS = [*"abcdefghijklmnopqrstuvwxyz'", "|", "<unk>", "<pad>"]
BLANK, VOCAB_SIZE = len(TOKENS) - 1, len(TOKENS) + 2
ATOL = 1e-5


@pytest.fixture(scope="module", params=["wav2vec2", "hubert"])
def ctc_dir(request, tmp_path_factory):
  """A tiny random Wav2Vec2ForCTC or HubertForCTC (the wav2vec2 fixture's tower, weights
  moved off their init) with its Wav2Vec2CTCTokenizer."""
  out = tmp_path_factory.mktemp(f"tiny_{request.param}_ctc")
  make_tiny_checkpoint("wav2vec2", out)
  (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(TOKENS)}))
  tokenizer = transformers.Wav2Vec2CTCTokenizer(out / "vocab.json")
  tokenizer.save_pretrained(out)
  config = transformers.Wav2Vec2Config.from_pretrained(out).to_dict()
  config.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
  if request.param == "hubert":
    config = transformers.HubertConfig(**{k: v for k, v in config.items() if k != "model_type"})
    model = transformers.HubertForCTC(config)
  else:
    model = transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(**config))
  torch.manual_seed(1)
  perturb_weights(model).save_pretrained(out)
  return str(out)


def ctc_config(path, **model):
  return config_lib.with_defaults(
    mlc.ConfigDict(
      dict(
        input=dict(
          fields=dict(image=None, text=None, waveform="waveform", label=None),
          target=dict(format="ctc", tokenizer=path),
        ),
        model=dict(
          towers=dict(waveform=dict(name=path)),
          modalities="waveform",
          head="ctc",
          vocab_size=VOCAB_SIZE,
          blank_id=BLANK,
          width=8,
          **model,
        ),
        model_init=dict(waveform_encoder=path, head=path),
      )
    )
  )


@pytest.fixture(scope="module")
def batch(ctc_dir):
  """Three clips of 1.6k-4.8k samples (4-14 frames) with transcripts; the last too long
  for its frames."""
  rng = np.random.default_rng(0)
  lengths = [4800, 3200, 1600]
  waveform = rng.normal(size=(3, 4800)).astype(np.float32)
  mask = (np.arange(4800)[None] < np.array(lengths)[:, None]).astype(np.int32)
  vocab = ctc.CTCVocab.load(ctc_dir)
  labels = vocab.labels(["one two", "seven", "eleven bees"], max_length=12)
  return dict(waveform=waveform * (mask > 0), waveform_mask=mask, ctc_labels=labels)


def torch_outputs(path, batch, reduction, rows):
  model = transformers.AutoModelForCTC.from_pretrained(path, ctc_loss_reduction=reduction).eval()
  labels = np.where(batch["ctc_labels"] < 0, -100, batch["ctc_labels"])[rows]
  with torch.no_grad():
    out = model(
      torch.tensor(batch["waveform"][rows]),
      attention_mask=torch.tensor(batch["waveform_mask"][rows]),
      labels=torch.tensor(labels, dtype=torch.long),
    )
  return out.logits.numpy(), float(out.loss)


def test_vocabulary_is_the_checkpoints(ctc_dir):
  vocab = ctc.CTCVocab.load(ctc_dir)
  assert vocab.blank == BLANK and vocab.size == VOCAB_SIZE
  vocab.check_head(VOCAB_SIZE, BLANK)
  with pytest.raises(ConfigError, match="has 32 tokens but the CTC head scores 30"):
    vocab.check_head(30, BLANK)
  with pytest.raises(ConfigError, match="blank_id=29"):
    vocab.check_head(VOCAB_SIZE, 0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_logits_and_loss_equal_transformers(ctc_dir, batch, reduction):
  config = ctc_config(ctc_dir)
  model, _, params = init(config)
  outputs = production_jit(model.apply)({"params": jax.device_get(params)}, batch)
  feasible = [0, 1]  # row 2 has 4 frames for 11 labels
  logits, want_loss = torch_outputs(ctc_dir, batch, reduction, feasible)
  frames = np.asarray(outputs["frame_mask"]).sum(1)
  assert list(frames) == [14, 9, 4]
  for i in feasible:
    np.testing.assert_allclose(outputs["logits"][i, : frames[i]], logits[i, : frames[i]], atol=ATOL)
  loss_cfg = {**config.loss, **model.head_config, "ctc_loss_reduction": reduction}
  total, weight = heads.get("ctc").loss(outputs, batch, loss_cfg)
  assert float(weight) == 2.0  # the infeasible row weighs 0: no inf, no NaN
  # transformers' "mean" is the batch mean of per-label losses; its "sum" is their sum,
  # which the trainer divides by the number of examples.
  got = float(total / weight) * (len(feasible) if reduction == "sum" else 1)
  np.testing.assert_allclose(got, want_loss, rtol=1e-5)


def test_transcribe_decodes_greedy_as_transformers(ctc_dir, batch):
  config = ctc_config(ctc_dir)
  model, mesh, params = init(config)
  transcribe = heads.get("ctc").predict_fns(model, mesh)["transcribe"]
  out = jax.device_get(transcribe({"params": params}, batch))
  logits, _ = torch_outputs(ctc_dir, batch, "mean", [0, 1, 2])
  vocab = ctc.CTCVocab.load(ctc_dir)
  want = [
    vocab.tokenizer.decode(logits[i, :f].argmax(-1)).strip() for i, f in enumerate(out["frames"])
  ]
  assert vocab.texts(out["ids"]) == want
  assert list(out["feasible"]) == [True, True, False]
  assert vocab.texts(out["references"]) == ["one two", "seven", "eleven bees"]
  beam = jax.device_get(transcribe({"params": params}, batch, beam_size=4))
  assert beam["ids"].shape == out["ids"].shape


def test_head_needs_a_tower_of_time_frames(ctc_dir, tiny_ast_dir):
  config = ctc_config(ctc_dir)
  config.model.towers = dict(log_mel=dict(name=tiny_ast_dir))
  config.model.modalities = "log_mel"
  config.model.ctc_modality = "log_mel"
  config.model_init = {}
  with pytest.raises(ValueError, match="tokens are time frames"):
    init(config)


def test_a_head_checkpoint_without_lm_head_is_named(ctc_dir, tiny_wav2vec2_dir):
  config = ctc_config(ctc_dir)
  config.model_init.head = tiny_wav2vec2_dir
  fix = r"head/bias, head/kernel. A CTC head loads a \*ForCTC checkpoint's lm_head"
  with pytest.raises(hf.CheckpointError, match=fix):
    init(config)
