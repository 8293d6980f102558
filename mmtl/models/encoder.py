"""The encoder protocol: what a fusion model needs of a tower.

Fusion runs a tower in three steps, `embed` -> `run_layers(start, stop)` (any
contiguous range, so towers can be interleaved, as bottleneck fusion does) ->
`finalize`, and feeds it the batch fields named by its declared `inputs`. Every
mmtl encoder (`mmtl.models.layers.EncoderTower`: BERT, ViT, the CLIP towers)
implements it; any other module with these members can be a tower too. An encoder whose
tokens are frames in time order (wav2vec2, HuBERT, the Whisper encoder) also sets the
class attribute `time_frames = True`: a CTC head (mmtl.heads) reads only such towers.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

import jax


@runtime_checkable
class Encoder(Protocol):
  """A tower fusion can drive (structural: implementations need not subclass it)."""

  # Keyword names `embed` takes, the primary input (whose presence means "this
  # modality was given") first, e.g. ("input_ids", "attention_mask", "token_type_ids").
  inputs: ClassVar[tuple[str, ...]]

  @property
  def num_layers(self) -> int:
    """Layers `run_layers` can run: ranges are within [0, num_layers]."""

  @property
  def hidden_size(self) -> int:
    """Width D of the hidden states."""

  def dummy_inputs(self) -> dict[str, jax.Array]:
    """Smallest valid value (batch size 1) of each of `inputs`, for `init` and shape evaluation."""

  # (*args: Any, **kwargs: Any) stands for any signature: encoders name their own inputs.
  def embed(self, *args: Any, **kwargs: Any) -> tuple[jax.Array, jax.Array]:
    """Tokens (B, T, D) and their mask (B, T) bool (True = real).

    Called as `embed(**arrays, deterministic=...)`, `arrays` keyed by names of
    `inputs` and holding at least the primary one.
    """

  def run_layers(
    self, x: jax.Array, mask: jax.Array, start: int, stop: int, *, deterministic: bool = True
  ) -> jax.Array:
    """Hidden states after layers [start, stop) of the (B, T, D) states `x`."""

  def finalize(self, hidden: jax.Array, mask: jax.Array) -> dict[str, jax.Array | None]:
    """`last_hidden_state` (B, T, D) and `pooler_output` (B, D) (None without a pooler)."""
