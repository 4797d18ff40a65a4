"""Written and patched .tflite files compute the framework's forward pass within 1e-5."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from fedbus.errors import ConfigError
from fedbus.learning.data import Dataset
from fedbus.learning.numpy_models import DenseNetwork
from fedbus.learning.tflite import (
    Architecture,
    TemplateError,
    TfliteModel,
    compile_template,
    export_model,
    load_interpreter,
    validate_template,
)
from fedbus.learning.tflite.template import template_weights
from fedbus.learning.tflite.writer import schema
from tests.tflite.conftest import numpy_logits, random_weights

pytestmark = pytest.mark.usefixtures("litert")

TOL = 1e-5
DENSE = [
    Architecture("logreg", 64, 10),
    Architecture("mlp", 64, 10, (32,)),
    Architecture("mlp", 64, 10, (48, 24, 16)),
]
CNNS = [
    Architecture("cnn", 64, 10, image_shape=(1, 8, 8)),
    Architecture("cnn", 2 * 9 * 11, 5, image_shape=(2, 9, 11)),
]


def _reference(
    arch: Architecture, weights: dict[str, Any], x: np.ndarray[Any, Any]
) -> np.ndarray[Any, Any]:
    """The framework's forward pass: DenseNetwork.logits, or TorchTrainer's DigitsCNN."""
    if arch.image_shape is None:
        return numpy_logits(weights, x)
    torch = pytest.importorskip("torch", reason="torch is not installed")
    from fedbus.learning.torch import cnn

    module = cnn(arch.image_shape, arch.num_classes).eval()
    module.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
    with torch.no_grad():
        return module(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy()  # type: ignore[no-any-return]


def _inputs(arch: Architecture, digits: Dataset, n: int = 64) -> np.ndarray[Any, Any]:
    if arch.num_features == digits.num_features:
        return digits.x[:n]
    return np.random.default_rng(1).random((n, arch.num_features), dtype=np.float32)


def _run_batch1(model: bytes, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Invoke a file one sample at a time, as a board serving requests does."""
    interpreter = load_interpreter(model)
    inp = interpreter.get_input_details()[0]["index"]
    out = interpreter.get_output_details()[0]["index"]
    rows = []
    for row in x:
        interpreter.set_tensor(inp, row[None])
        interpreter.invoke()
        rows.append(interpreter.get_tensor(out)[0])
    return np.stack(rows)


@pytest.mark.parametrize(
    "arch", DENSE + CNNS, ids=lambda a: f"{a.kind}-{a.hidden or a.image_shape}"
)
def test_fresh_export_matches_the_framework(
    arch: Architecture, digits_split: tuple[Dataset, Dataset]
) -> None:
    weights = random_weights(arch.weight_shapes(), seed=3)
    x = _inputs(arch, digits_split[1])
    model = export_model(weights, image_shape=arch.image_shape)
    assert model[4:8] == b"TFL3"
    assert np.abs(_run_batch1(model, x) - _reference(arch, weights, x)).max() < TOL


@pytest.mark.parametrize(
    "arch", DENSE + CNNS, ids=lambda a: f"{a.kind}-{a.hidden or a.image_shape}"
)
def test_patched_template_matches_over_three_rounds(
    arch: Architecture, digits_split: tuple[Dataset, Dataset]
) -> None:
    x = _inputs(arch, digits_split[1])
    template = compile_template(arch)
    served = TfliteModel(template, template_weights(arch))
    assert served.num_threads == 1
    for round_ in range(3):
        weights = random_weights(arch.weight_shapes(), seed=10 + round_)
        ref = _reference(arch, weights, x)
        stale = served.predict(x)
        served.update(weights)
        assert np.abs(served.predict(x) - ref).max() < TOL  # a batch (resized input)
        assert np.abs(served.predict(x[:1]) - ref[:1]).max() < TOL  # back to batch 1
        assert np.abs(stale - ref).max() > 1e-2  # the update really changed the model
    assert compile_template(arch) is template  # compiled once per architecture


def test_zero_biases_are_kept_and_buffers_never_shared() -> None:
    net = DenseNetwork(64, 10, (16, 16))
    weights = net.init(0)  # every bias zero; dense0.b and dense1.b equal: both converter traps
    model = export_model(weights)
    s = schema()
    root = s.Model.GetRootAs(model, 0)
    graph = root.Subgraphs(0)
    buffers = [graph.Tensors(i).Buffer() for i in range(graph.TensorsLength())]
    const = [b for b in buffers if b and root.Buffers(b).DataLength()]
    assert len(const) == len(set(const)) == len(weights)
    for i in range(graph.OperatorsLength()):
        bias = int(graph.Operators(i).InputsAsNumpy()[2])
        assert bias >= 0
        width = 10 if i == graph.OperatorsLength() - 1 else 16
        assert root.Buffers(graph.Tensors(bias).Buffer()).DataLength() == 4 * width
    x = np.random.default_rng(0).random((4, 64), dtype=np.float32)
    assert np.abs(_run_batch1(model, x) - numpy_logits(weights, x)).max() < TOL


def test_validation_catches_a_misplaced_slot() -> None:
    arch = Architecture("mlp", 64, 10, (32,))
    template = compile_template(arch)
    slots = list(template.slots)
    slots[0] = dataclasses.replace(slots[0], offset=slots[0].offset + 4)
    with pytest.raises(TemplateError, match=r"dense0\.w"):
        validate_template(dataclasses.replace(template, slots=tuple(slots)), template_weights(arch))


def test_a_bad_update_keeps_serving_the_previous_model(
    digits_split: tuple[Dataset, Dataset],
) -> None:
    weights = random_weights(Architecture("mlp", 64, 10, (32,)).weight_shapes(), seed=5)
    served = TfliteModel.from_weights({"kind": "mlp", "hidden": [32]}, weights)
    before = served.predict(digits_split[1].x)
    with pytest.raises(ConfigError):
        served.update({**weights, "dense1.b": np.zeros(3, np.float32)})
    assert np.array_equal(served.predict(digits_split[1].x), before)
    assert served.predict(np.zeros((0, 64))).shape == (0, 10)
    labels = np.argmax(numpy_logits(weights, digits_split[1].x), axis=1)
    assert served.accuracy(digits_split[1].x, labels) == 1.0


def test_the_caller_template_bytes_are_never_handed_to_the_runtime() -> None:
    arch = Architecture("logreg", 64, 10)
    template = compile_template(arch)
    snapshot = bytes(bytearray(template.model))
    served = TfliteModel(template, random_weights(arch.weight_shapes(), seed=1))
    served.predict(np.ones((1, 64), np.float32))
    assert template.model == snapshot
    assert served.model_bytes is not template.model
