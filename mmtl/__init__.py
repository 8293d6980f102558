"""mmtl: multimodal transfer learning in JAX/Flax from Hugging Face checkpoints."""
