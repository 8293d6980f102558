"""The modalities mmtl fuses, and the batch field that carries each one.

Data (which fields a batch has, which ones `blank` may drop) and models (which
towers a batch feeds) read these names from here, so a new modality is one entry.
"""

from __future__ import annotations

MODALITIES: tuple[str, ...] = ("image", "text", "audio")
# Batch field whose presence means "this modality was given".
PRIMARY_INPUT: dict[str, str] = {
  "image": "pixel_values",
  "text": "input_ids",
  "audio": "audio_values",
}
