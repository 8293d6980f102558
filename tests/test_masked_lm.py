"""The masked_lm head (BertForMaskedLM's cls.predictions), BERT's token masking in the text
pipeline, the masked_lm evaluator, and continued pretraining then fine-tuning from its run
(`model_init` from a workdir)."""

import pathlib
import shutil

import jax
import ml_collections as mlc
import numpy as np
import pytest

from mmtl import checkpoint, data, hf, losses, rules, sharding, train, train_state
from mmtl import config as config_lib
from mmtl.models import fusion
from tests.hf_fixtures import make_tiny_checkpoint
from tests.test_train import tiny_config


@pytest.fixture(scope="module")
def tiny_mlm_dir(tmp_path_factory):
  """A tiny random BertForMaskedLM (odd widths; its MLM head's bias and LayerNorm made
  random too), with the tiny WordPiece tokenizer."""
  import torch
  import transformers as tr

  base = make_tiny_checkpoint(
    "bert", tmp_path_factory.mktemp("bert"), hidden_size=36, intermediate_size=37
  )
  out = tmp_path_factory.mktemp("bert_mlm")
  torch.manual_seed(3)
  model = tr.BertForMaskedLM(tr.BertConfig.from_pretrained(base)).eval()
  with torch.no_grad():
    for p in model.cls.predictions.parameters():
      p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(out)
  for f in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
    if (src := pathlib.Path(base) / f).exists():
      shutil.copy(src, out / f)
  return str(out)


def mlm_model(name, **model_init):
  config = config_lib.with_defaults(
    mlc.ConfigDict(
      dict(
        model=dict(towers=dict(text=dict(name=name)), head="masked_lm", width=8),
        model_init=model_init,
      )
    )
  )
  model = fusion.build(config.model)
  mesh = sharding.make_mesh(config.mesh)
  layout = train_state.param_layout(model, config, mesh)
  return model, train_state.init_variables(model, config, layout, note=lambda _: None)


def test_the_mlm_loss_equals_transformers(tiny_mlm_dir):
  import torch
  import transformers as tr

  model, variables = mlm_model(tiny_mlm_dir, text_encoder=tiny_mlm_dir, head=tiny_mlm_dir)
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 40, size=(3, 11)).astype(np.int32)
  ids[:, 0] = 2  # [CLS]
  attention = np.ones_like(ids)
  attention[1, 7:] = 0  # padding
  labels = np.where(rng.random(ids.shape) < 0.3, ids, -100).astype(np.int32)
  labels[1, 7:] = -100
  ids = np.where(labels >= 0, 4, ids)  # [MASK]
  batch = dict(input_ids=ids, attention_mask=attention, token_type_ids=np.zeros_like(ids))
  logits = np.asarray(jax.jit(model.apply)(variables, batch)["logits"])
  loss = losses.mean_of(*losses.masked_token_loss(logits, {"mlm_labels": labels}))

  reference = tr.BertForMaskedLM.from_pretrained(tiny_mlm_dir).eval()
  with torch.no_grad():
    out = reference(
      **{k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()},
      labels=torch.tensor(labels, dtype=torch.long),
    )
  real = attention.astype(bool)
  np.testing.assert_allclose(logits[real], out.logits.numpy()[real], atol=1e-5, rtol=1e-5)
  assert float(loss) == pytest.approx(out.loss.item(), rel=1e-5, abs=1e-6)
  # Not re-initialized: the head is the checkpoint's (its bias was made random).
  bias = reference.cls.predictions.bias.detach().numpy()
  np.testing.assert_allclose(np.asarray(variables["params"]["head"]["bias"]), bias, rtol=1e-6)


def test_a_checkpoint_without_an_mlm_head_names_the_fix(tiny_bert_dir):
  with pytest.raises(hf.CheckpointError, match="BertModel checkpoint, such as all-MiniLM"):
    mlm_model(tiny_bert_dir, text_encoder=tiny_bert_dir, head=tiny_bert_dir)
  model, variables = mlm_model(tiny_bert_dir, text_encoder=tiny_bert_dir)  # the head: initialized
  assert set(variables["params"]["head"]) == {"transform", "transform_norm", "bias"}


@pytest.fixture
def text_cfg(tiny_bert_dir, data_dir):
  return dict(
    dataset="mmtl_shapes/small",
    data_dir=data_dir,
    fields=dict(image=None, text="question", label=None),
    text=dict(tokenizer=tiny_bert_dir, max_length=32, mlm_probability=0.15),
    num_threads=1,
  )


def test_masking_follows_bert(text_cfg, tiny_bert_dir):
  from mmtl import modalities

  it = data.make_train_iterator(text_cfg, batch_size=64, seed=0)
  got = [next(it) for _ in range(4)]
  unmasked = dict(text_cfg, text=dict(text_cfg["text"], mlm_probability=0.0))
  plain = data.make_train_iterator(unmasked, batch_size=64, seed=0)
  clean = [next(plain) for _ in range(4)]
  tok = modalities.tokenizer(tiny_bert_dir)
  special = set(tok.all_special_ids)
  chosen = eligible = masked = kept = 0
  for b, c in zip(got, clean):
    labels, ids, original = b["mlm_labels"], b["input_ids"], c["input_ids"]
    real = (c["attention_mask"] == 1) & ~np.isin(original, list(special))
    pick = labels >= 0
    assert not (pick & ~real).any()  # never a special token or padding
    np.testing.assert_array_equal(labels[pick], original[pick])
    np.testing.assert_array_equal(ids[~pick], original[~pick])
    chosen, eligible = chosen + pick.sum(), eligible + real.sum()
    masked += (ids[pick] == tok.mask_token_id).sum()
    kept += (ids[pick] == original[pick]).sum()
  assert chosen / eligible == pytest.approx(0.15, abs=0.02)
  assert masked / chosen == pytest.approx(0.8, abs=0.05)
  assert kept / chosen == pytest.approx(0.1, abs=0.04)  # 10% unchanged (+ rare random hits)
  again = data.make_train_iterator(text_cfg, batch_size=64, seed=0)
  np.testing.assert_array_equal(next(again)["input_ids"], got[0]["input_ids"])


def test_bad_mlm_settings_are_one_line_errors(text_cfg):
  with pytest.raises(config_lib.ConfigError, match="mlm_probability=1.5"):
    next(
      data.make_train_iterator(
        dict(text_cfg, text=dict(text_cfg["text"], mlm_probability=1.5)), batch_size=4, seed=0
      )
    )


@pytest.fixture(scope="module")
def mlm_run(tiny_bert_dir, data_dir, tmp_path_factory):
  """A few steps of continued pretraining of the tiny BERT on the small dataset's questions."""
  workdir = tmp_path_factory.mktemp("mlm") / "run"
  config = tiny_config(tiny_bert_dir, data_dir, total_steps=4, ckpt_every=100)
  config.input.fields = dict(image=None, text="question", label=None)
  config.input.text.mlm_probability = 0.15
  config.model = dict(towers=dict(text=dict(name=tiny_bert_dir)), head="masked_lm", width=8)
  config.evals = dict(mlm=dict(type="masked_lm", input=dict(split="validation[:32]")))
  config.optim.lr = 1e-2
  return workdir, train.train(config, str(workdir))


@pytest.mark.slow
def test_fine_tuning_starts_from_the_continued_pretraining_run(
  mlm_run, tiny_bert_dir, data_dir, tmp_path
):
  workdir, final = mlm_run
  assert {"mlm/loss", "mlm/accuracy", "mlm/perplexity"} <= set(final)
  assert final["mlm/perplexity"] == pytest.approx(np.exp(final["mlm/loss"]), rel=1e-5)
  trained = rules.flatten(
    jax.device_get(checkpoint.restore_variables(str(workdir / "checkpoints"))["params"])
  )
  config = config_lib.with_defaults(tiny_config(tiny_bert_dir, data_dir))
  config.model_init = dict(text_encoder=str(workdir))
  model = fusion.build(config.model)
  layout = train_state.param_layout(model, config, sharding.make_mesh(config.mesh))
  notes = []
  loaded = rules.flatten(
    train_state.init_variables(model, config, layout, note=notes.append)["params"]
  )
  assert any(f"the run {workdir}, step 4" in n for n in notes)
  text = [p for p in loaded if p.startswith("text_encoder/")]
  assert text and all(np.array_equal(loaded[p], trained[p]) for p in text)
  original = rules.flatten(mlm_model(tiny_bert_dir, text_encoder=tiny_bert_dir)[1]["params"])
  assert not all(np.array_equal(loaded[p], original[p]) for p in text)  # pretraining moved it
  config.model_init = dict(image_encoder=str(workdir))
  with pytest.raises(hf.CheckpointError, match="missing from the checkpoint"):
    train_state.init_variables(model, config, layout, note=notes.append)
