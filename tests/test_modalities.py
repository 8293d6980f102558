"""Modalities are components: a modality registered from outside mmtl trains beside images.

`Sensor` (a vector reading: the centres of the shapes in an mmtl_shapes image, padded to
`config.input.sensor.slots` objects) and its tower `SensorMLP` (a small residual MLP,
registered as the model family "toy_sensor_mlp") live in this test module; no mmtl file
names them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmtl import config as config_lib
from mmtl import data, modalities, train
from mmtl.data import options, transforms
from mmtl.modalities import MODALITIES
from mmtl.models import fusion, registry
from tests.test_train import TINY_AUDIO_VIT, TINY_VIT, final_params, tiny_config
from tests.test_train import losses as train_losses


@dataclasses.dataclass(frozen=True)
class SensorConfig:
  model_type: ClassVar[str] = "toy_sensor_mlp"
  input_size: int = 6
  hidden_size: int = 16
  num_hidden_layers: int = 2

  @classmethod
  def from_hf(cls, d: dict[str, Any]) -> SensorConfig:
    return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


class SensorMLP(nn.Module):
  """One token per reading; `num_hidden_layers` residual MLP layers (an mmtl Encoder)."""

  config: SensorConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: str = "none"
  config_class: ClassVar = SensorConfig
  inputs: ClassVar[tuple[str, ...]] = ("values",)

  @property
  def num_layers(self) -> int:
    return self.config.num_hidden_layers

  @property
  def hidden_size(self) -> int:
    return self.config.hidden_size

  def dummy_inputs(self) -> dict[str, jax.Array]:
    return {"values": jnp.zeros((1, self.config.input_size), jnp.float32)}

  def setup(self):
    self.embedding = nn.Dense(self.hidden_size, dtype=self.dtype)
    self.layers = [nn.Dense(self.hidden_size, dtype=self.dtype) for _ in range(self.num_layers)]

  def embed(self, values, deterministic=True):
    del deterministic
    x = self.embedding(values)[:, None]
    return x, jnp.ones(x.shape[:2], bool)

  def run_layers(self, x, mask, start, stop, *, deterministic=True):
    del mask, deterministic
    for layer in self.layers[start:stop]:
      x = x + nn.gelu(layer(x))
    return x

  def finalize(self, hidden, mask):
    del mask
    return {"last_hidden_state": hidden, "pooler_output": None}


class Sensor(modalities.Modality):
  """The (x, y) centres of up to `slots` objects, zeros past the last: a fixed-size vector."""

  inputs = {"sensor_values": "values"}
  config = dict(slots=3)

  def decode(self, value):
    slots = self.cfg.sensor.slots
    centres = np.zeros((slots, 2), np.float32)
    reading = np.asarray(value, np.float32).reshape(-1, 2)[:slots]
    centres[: len(reading)] = reading
    return centres.reshape(-1)


SENSOR_MLP = dict(model_type="toy_sensor_mlp", input_size=6, hidden_size=16, num_hidden_layers=2)


@pytest.fixture
def sensor(monkeypatch):
  monkeypatch.setitem(registry.MODELS, "toy_sensor_mlp", SensorMLP)
  yield modalities.register("sensor")(Sensor)
  del modalities.MODALITIES["sensor"]


def sensor_config(text_dir, data_dir, **overrides):
  """Image (tiny ViT) + sensor (SensorMLP) on mmtl_shapes, with modality dropout."""
  config = tiny_config(text_dir, data_dir, **overrides)
  config.input.fields = dict(image="image", text=None, sensor="objects/center", label="label")
  config.input.modality_dropout = dict(image=0.3, sensor=0.3)
  config.model.towers = dict(image=dict(name=TINY_VIT, pool="cls"), sensor=dict(name=SENSOR_MLP))
  config.model_init = {}
  return config


def test_a_registered_modality_has_config_keys_batches_and_a_tower(sensor, tiny_bert_dir, data_dir):
  assert options.defaults().fields.sensor is None
  assert options.defaults().modality_dropout.sensor == 0.0
  assert options.defaults().sensor.slots == 3
  config = config_lib.with_defaults(sensor_config(tiny_bert_dir, data_dir))
  batch = next(data.make_train_iterator(config.input, batch_size=16, seed=0))
  assert batch["sensor_values"].shape == (16, 6) and "sensor" not in batch
  present = batch["sensor_present"] > 0
  assert 0 < present.sum() < 16  # modality dropout blanked some rows: zeros there
  assert not batch["sensor_values"][~present].any() and batch["sensor_values"][present].any()
  assert ((batch["image_present"] > 0) | present).all()  # never both at once
  model = fusion.build(config.model)
  assert model.modalities == ("image", "sensor") and model.pool_of("sensor") == "mean"
  assert set(model.dummy_batch()) == {"pixel_values", "sensor_values"}
  params = jax.jit(model.init)(jax.random.key(0), model.dummy_batch())["params"]
  assert params["sensor_encoder"]["embedding"]["kernel"].shape == (6, 16)
  # The fused features move with the sensor reading of a present row, not of a blanked one.
  b = jax.tree.map(jnp.asarray, {k: v for k, v in batch.items() if k != "labels"})
  apply = jax.jit(model.apply)
  out = apply({"params": params}, b)["features"]
  moved = apply({"params": params}, {**b, "sensor_values": b["sensor_values"] + 1})
  changed = np.abs(np.asarray(moved["features"] - out)).max(-1) > 1e-6
  np.testing.assert_array_equal(changed, present)


def test_unknown_modality_names_the_registered_ones(tiny_bert_dir, data_dir):
  config = tiny_config(tiny_bert_dir, data_dir)
  config.model.towers.sensor = dict(name=SENSOR_MLP)
  with pytest.raises(config_lib.ConfigError, match=r"no modality is named 'sensor'"):
    fusion.selected_towers(config_lib.with_defaults(config).model)
  with pytest.raises(ValueError, match="registered already"):
    modalities.register("image")(Sensor)
  with pytest.raises(ValueError, match="not a modality name"):
    modalities.register("label")(Sensor)
  with pytest.raises(config_lib.ConfigError, match=r"config.input.blank has \['sensor'\]"):
    transforms.Preprocess(options.input_config(dict(blank=("sensor",))), None, train=False)


@pytest.mark.slow
def test_a_modality_registered_outside_mmtl_trains_with_dropout_and_evaluates_missing(
  sensor, tiny_bert_dir, data_dir, tmp_path
):
  config = sensor_config(tiny_bert_dir, data_dir, total_steps=4, ckpt_every=4)
  config.evals.no_sensor = dict(
    type="classification", input=dict(split="validation[:32]", blank=("sensor",))
  )
  final = train.train(config, str(tmp_path / "run"))
  assert set(final) >= {"val/accuracy", "no_sensor/accuracy"}
  by_step = train_losses(tmp_path / "run")
  assert sorted(by_step) == [1, 2, 3, 4] and np.isfinite(list(by_step.values())).all()
  params = final_params(tmp_path / "run")
  assert set(params) == {"image_encoder", "sensor_encoder", "fusion", "head"}
  assert set(params["fusion"]) == {"proj_image", "proj_sensor", "hidden"}


@pytest.mark.parametrize(
  "fusion_type",
  [
    pytest.param("gated", marks=pytest.mark.slow),  # eager cross-attention: 10-16 s each
    "bilinear",
    pytest.param("cross_attention", marks=pytest.mark.slow),
    "bottleneck",
  ],
)
def test_every_fusion_takes_a_registered_modality_beside_two_others(sensor, fusion_type):
  """Image (ViT, 1 layer), audio (ViT, 1 layer) and sensor (MLP, 2 layers) towers: each
  fusion builds for the three and runs with any of them absent."""
  model = fusion.build(
    config_lib.model_defaults()
    | dict(
      towers=dict(
        image=dict(name=TINY_VIT), audio=dict(name=TINY_AUDIO_VIT), sensor=dict(name=SENSOR_MLP)
      ),
      fusion=fusion_type,
      fusion_layer=-1,
      width=8,
      num_heads=2,
    )
  )
  assert model.modalities == ("image", "audio", "sensor")
  batch = model.dummy_batch()
  params = jax.jit(model.init)(jax.random.key(0), batch)["params"]
  assert {"image_encoder", "audio_encoder", "sensor_encoder"} <= set(params)
  apply = jax.jit(model.apply)
  for absent in (None, "sensor"):
    given = {k: v for k, v in batch.items() if k != (absent and MODALITIES[absent].primary())}
    assert apply({"params": params}, given)["logits"].shape == (1, 2)
