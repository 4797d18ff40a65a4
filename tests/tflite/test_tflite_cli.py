"""``fedbus export``: model.msgpack in, a .tflite file (and manifest) out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedbus.cli import main
from fedbus.learning.numpy_models import DenseNetwork
from fedbus.learning.tflite import Template, TfliteModel, load_interpreter, patch
from fedbus.nodes.modelfile import encode_model
from tests.tflite.conftest import numpy_logits, random_weights

pytestmark = pytest.mark.usefixtures("litert")

QUICKSTART = Path(__file__).parents[2] / "examples" / "quickstart.yaml"


def _predict(model: bytes, x: np.ndarray) -> np.ndarray:  # type: ignore[type-arg]
    interpreter = load_interpreter(model)
    inp = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(inp, list(x.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp, x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])  # type: ignore[no-any-return]


def test_export_with_topology_and_manifest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = random_weights(DenseNetwork(64, 10, (32,)).shapes(), seed=0)
    (tmp_path / "model.msgpack").write_bytes(encode_model(weights))
    out, manifest = tmp_path / "model.tflite", tmp_path / "manifest.json"
    argv = ["export", str(tmp_path / "model.msgpack"), "--topology", str(QUICKSTART)]
    assert main([*argv, "--out", str(out), "--manifest", str(manifest)]) == 0
    assert "mlp 64-32-10, float32" in capsys.readouterr().out
    x = np.random.default_rng(0).random((8, 64), dtype=np.float32)
    assert np.abs(_predict(out.read_bytes(), x) - numpy_logits(weights, x)).max() < 1e-5
    # A board holding file and manifest patches the next round with numpy alone.
    template = Template.from_manifest(out.read_bytes(), json.loads(manifest.read_text()))
    nxt = random_weights(DenseNetwork(64, 10, (32,)).shapes(), seed=1)
    served = TfliteModel(template, nxt)
    assert np.abs(served.predict(x) - numpy_logits(nxt, x)).max() < 1e-5
    assert patch(template, weights) == out.read_bytes()


def test_export_int8_cnn_with_model_spec(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch", reason="torch is not installed")
    from fedbus.learning.torch import cnn, state_to_arrays

    torch.manual_seed(0)
    module = cnn((1, 8, 8), 10).eval()
    (tmp_path / "model.msgpack").write_bytes(encode_model(state_to_arrays(module)))
    out = tmp_path / "cnn.tflite"
    argv = ["export", str(tmp_path / "model.msgpack"), "--model-spec", "cnn", "--int8"]
    assert main([*argv, "--image-shape", "1,8,8", "--out", str(out)]) == 0
    x = np.random.default_rng(0).random((8, 64), dtype=np.float32)
    with torch.no_grad():
        ref = module(torch.from_numpy(x)).numpy()
    assert np.abs(_predict(out.read_bytes(), x) - ref).max() < 0.02  # int8 weights


def test_export_rejects_mismatches(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "model.msgpack"
    path.write_bytes(encode_model(DenseNetwork(64, 10, (16,)).init(0)))
    out = str(tmp_path / "x.tflite")
    assert main(["export", str(path), "--model-spec", "logreg", "--out", out]) == 2
    assert "not 'logreg'" in capsys.readouterr().err
    assert main(["export", str(path), "--topology", str(QUICKSTART), "--out", out]) == 2
    assert "hidden widths [16], not [32]" in capsys.readouterr().err
    path.write_bytes(b"\x01\x02")
    assert main(["export", str(path), "--out", out]) == 2
    assert main(["export", str(tmp_path / "missing.msgpack"), "--out", out]) == 1
    assert not Path(out).exists()
