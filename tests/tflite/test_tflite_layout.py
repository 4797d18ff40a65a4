"""Architecture inference, layouts, quantization and manifests: numpy only, no runtime."""

from __future__ import annotations

import numpy as np
import pytest

from fedbus.errors import ConfigError
from fedbus.learning.numpy_models import DenseNetwork
from fedbus.learning.tflite import (
    Architecture,
    Slot,
    Template,
    architecture_of,
    dequantize,
    patch,
    quantize_per_channel,
)
from fedbus.learning.tflite.patch import to_tflite_layout


@pytest.mark.parametrize(
    ("hidden", "kind"), [((), "logreg"), ((32,), "mlp"), ((64, 32, 16), "mlp")]
)
def test_dense_architecture_is_read_from_the_weights(hidden: tuple[int, ...], kind: str) -> None:
    weights = DenseNetwork(64, 10, hidden).init(0)
    arch = architecture_of(weights, {"kind": kind, "hidden": list(hidden)} if hidden else kind)
    assert arch == Architecture(kind, 64, 10, hidden)  # type: ignore[arg-type]
    assert arch.weight_shapes() == DenseNetwork(64, 10, hidden).shapes()


def test_cnn_shapes_match_digits_cnn() -> None:
    torch = pytest.importorskip("torch", reason="torch is not installed")
    from fedbus.learning.torch import cnn

    for shape in [(1, 8, 8), (3, 9, 11)]:
        state = cnn(shape, 10).state_dict()
        arch = Architecture("cnn", int(np.prod(shape)), 10, image_shape=shape)
        assert arch.weight_shapes() == {k: tuple(v.shape) for k, v in state.items()}
        weights = {k: v.numpy() for k, v in state.items()}
        assert architecture_of(weights, "cnn", image_shape=shape) == arch
    assert torch is not None
    # Without a shape the smallest square image that fits: digits' 8x8.
    digits = {k: v.numpy() for k, v in cnn((1, 8, 8), 10).state_dict().items()}
    assert architecture_of(digits).image_shape == (1, 8, 8)


def test_mismatches_are_config_errors() -> None:
    weights = DenseNetwork(64, 10, (32,)).init(0)
    with pytest.raises(ConfigError, match="not 'logreg'"):
        architecture_of(weights, "logreg")
    with pytest.raises(ConfigError, match="hidden widths"):
        architecture_of(weights, {"kind": "mlp", "hidden": [16]})
    with pytest.raises(ConfigError, match="factory"):
        architecture_of(weights, {"factory": "pkg.mod:fn"})
    with pytest.raises(ConfigError, match="not a built-in model"):
        architecture_of({"layer.weight": np.zeros((2, 2))})
    with pytest.raises(ConfigError, match="expected shape"):
        Architecture("mlp", 64, 10, (32,)).check({**weights, "dense1.b": np.zeros(3)})


def test_layouts_are_the_tflite_ones() -> None:
    w = np.arange(6, dtype=np.float32).reshape(2, 3)  # dense [in, out]
    assert np.array_equal(to_tflite_layout(w, (2, 3), (1, 0)), w.T)
    conv = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)  # OIHW
    ohwi = to_tflite_layout(conv, conv.shape, (0, 2, 3, 1))
    assert ohwi[1, 0, 1, 2] == conv[1, 2, 0, 1]
    assert ohwi.flags.c_contiguous


def test_quantization_is_symmetric_per_channel_within_half_a_step() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((5, 7, 3)).astype(np.float32) * np.arange(1, 6)[:, None, None]
    w[2] = 0.0  # an all-zero channel must not divide by zero
    q, scales = quantize_per_channel(w)
    assert q.dtype == np.int8
    assert scales.dtype == np.float32
    assert scales.shape == (5,)
    assert np.abs(q).max() <= 127
    assert np.all(scales > 0)
    assert np.all(np.abs(q.reshape(5, -1)).max(axis=1)[[0, 1, 3, 4]] == 127)
    err = np.abs(dequantize(q, scales) - w).reshape(5, -1).max(axis=1)
    assert np.all(err <= scales / 2 + 1e-7)


def _toy_template() -> Template:
    arch = Architecture("logreg", 3, 2)
    slots = (
        Slot("dense0.w", (3, 2), (3, 2), (1, 0), "float32", 1, 16),
        Slot("dense0.b", (2,), (2,), (0,), "float32", 2, 48),
    )
    return Template(arch, bytes(64), slots)


def test_patch_writes_the_tflite_layout_at_the_offsets() -> None:
    template = _toy_template()
    w = np.arange(6, dtype=np.float32).reshape(3, 2)
    out = patch(template, {"dense0.w": w, "dense0.b": np.array([7, 8], np.float64)})
    assert np.array_equal(np.frombuffer(out, "<f4", 6, 16).reshape(2, 3), w.T)
    assert np.array_equal(np.frombuffer(out, "<f4", 2, 48), [7, 8])
    assert out[:16] == bytes(16)
    assert template.model == bytes(64)  # patched a copy; the template stays
    with pytest.raises(ConfigError, match="expected shape"):
        patch(template, {"dense0.w": w.T, "dense0.b": np.zeros(2)})
    with pytest.raises(ConfigError, match="do not fit"):
        patch(template, {"dense0.w": w})


def test_manifest_round_trips_and_is_checked() -> None:
    template = _toy_template()
    again = Template.from_manifest(template.model, template.manifest())
    assert again == template
    bad = template.manifest()
    bad["slots"][1]["offset"] = 20  # overlaps dense0.w
    with pytest.raises(ConfigError, match="overlap"):
        Template.from_manifest(template.model, bad)
    bad["slots"][1]["offset"] = 60  # runs past the end
    with pytest.raises(ConfigError, match="outside"):
        Template.from_manifest(template.model, bad)
    with pytest.raises(ConfigError, match="malformed"):
        Template.from_manifest(template.model, {"slots": []})
