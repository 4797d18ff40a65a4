"""int8 weight quantization: what it computes exactly, and what it costs on digits."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedbus.learning.data import Dataset
from fedbus.learning.tflite import (
    TfliteModel,
    dequantize,
    export_model,
    load_interpreter,
    quantize_per_channel,
)
from fedbus.learning.trainer import FitConfig
from tests.tflite.conftest import numpy_logits, train_numpy

pytestmark = pytest.mark.usefixtures("litert")

MAX_DROP = 0.03  # "within a few points"; measured 0.0 to 0.3 points (docs/tflite.md)


def _dequantized(weights: dict[str, Any]) -> dict[str, Any]:
    """The weights an int8 file holds, back in the framework layout ([in, out])."""
    out = {}
    for name, w in weights.items():
        if name.endswith(".w"):
            q, scales = quantize_per_channel(np.ascontiguousarray(w.T))
            out[name] = dequantize(q, scales).T
        else:
            out[name] = w
    return out


@pytest.mark.parametrize("hidden", [(), (32,)], ids=["logreg", "mlp"])
def test_int8_mlp_costs_little_accuracy(
    hidden: tuple[int, ...], digits_split: tuple[Dataset, Dataset]
) -> None:
    train, test = digits_split
    weights = train_numpy(hidden, train)
    float_model = TfliteModel.from_weights(None, weights)
    int8_model = TfliteModel.from_weights(None, weights, int8=True)
    # The int8 file computes exactly the float forward pass of its dequantized weights.
    expected = numpy_logits(_dequantized(weights), test.x)
    assert np.abs(int8_model.predict(test.x) - expected).max() < 1e-5
    float_acc = float_model.accuracy(test.x, test.y)
    assert float_acc > 0.9
    assert float_acc - int8_model.accuracy(test.x, test.y) <= MAX_DROP
    assert len(int8_model.model_bytes) < 0.55 * len(float_model.model_bytes)


def test_int8_cnn_costs_little_accuracy(digits_split: tuple[Dataset, Dataset]) -> None:
    pytest.importorskip("torch", reason="torch is not installed")
    from fedbus.learning.trainers import make_trainer

    train, test = digits_split
    trainer = make_trainer("cnn", train, test, num_features=64, num_classes=10)
    weights = trainer.initial_weights(0)
    for epoch in range(8):
        weights = trainer.fit(
            weights, FitConfig(epochs=1, batch_size=32, lr=0.1, seed=epoch)
        ).weights
    torch_acc = trainer.evaluate(weights).accuracy
    float_model = TfliteModel.from_weights("cnn", weights)
    int8_model = TfliteModel.from_weights("cnn", weights, int8=True)
    assert float_model.accuracy(test.x, test.y) == pytest.approx(torch_acc, abs=1 / len(test))
    assert torch_acc > 0.85
    assert torch_acc - int8_model.accuracy(test.x, test.y) <= MAX_DROP
    assert len(int8_model.model_bytes) < 0.55 * len(float_model.model_bytes)
    # Patching an int8 template requantizes (data and scales): the next round's model
    # computes what a freshly written int8 file of those weights computes.
    weights = trainer.fit(weights, FitConfig(epochs=1, batch_size=32, lr=0.1, seed=99)).weights
    int8_model.update(weights)
    fresh = load_interpreter(export_model(weights, int8=True))
    fresh.resize_tensor_input(fresh.get_input_details()[0]["index"], [len(test), 64])
    fresh.allocate_tensors()
    fresh.set_tensor(fresh.get_input_details()[0]["index"], test.x)
    fresh.invoke()
    expected = fresh.get_tensor(fresh.get_output_details()[0]["index"])
    assert np.abs(int8_model.predict(test.x) - expected).max() < 1e-5
