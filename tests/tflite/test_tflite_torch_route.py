"""Factory torch models through litert-torch: one conversion, then patched weights per round.

litert-torch is the optional ``litert`` extra (about 1.3 GB, not in dev): the
conversion tests skip with that reason when it is missing. The refusal test
runs everywhere: it hides litert-torch if it is installed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedbus.cli import main
from fedbus.nodes.modelfile import encode_model

# litert-torch's conversion triggers torch's own deprecation chatter (pytree LeafSpec).
pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

NEEDS_LITERT_TORCH = (
    "litert-torch is not installed (the optional 'litert' extra, about 1.3 GB: "
    "pip install 'fedbus[litert]' -c constraints.txt)"
)

TOPOLOGY = """
name: factory-export
seed: 0
data: {dataset: digits, partition: {kind: iid}}
model: {factory: "tests.tflite.test_tflite_torch_route:small_net"}
protocol: {kind: centralized, rounds: 1}
nodes:
  server: {id: server}
  clients: {count: 2}
"""


def small_net(num_features: int, num_classes: int) -> Any:
    """A factory model unlike the built-in cnn: 2-channel conv, two linear layers."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.side = round(num_features**0.5)
            self.conv = nn.Conv2d(1, 6, 3, padding=1)
            self.conv2 = nn.Conv2d(6, 4, 3, padding=1)
            self.fc1 = nn.Linear(4 * (self.side // 2) ** 2, 24)
            self.fc2 = nn.Linear(24, num_classes)

        def forward(self, x: Any) -> Any:
            x = x.reshape(x.shape[0], 1, self.side, self.side)
            x = torch.relu(self.conv2(torch.relu(self.conv(x))))
            x = nn.functional.max_pool2d(x, 2)
            return self.fc2(torch.tanh(self.fc1(x.flatten(1))))

    return Net()


@pytest.fixture(scope="module")
def converted() -> Any:
    """The template of small_net for digits (one conversion for the module's tests)."""
    pytest.importorskip("torch", reason="torch is not installed")
    pytest.importorskip("litert_torch", reason=NEEDS_LITERT_TORCH)
    from fedbus.learning.tflite.torch_route import compile_torch_template

    return compile_torch_template(small_net(64, 10), (1, 64))


def _run(model: bytes, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    from fedbus.learning.tflite import load_interpreter

    interpreter = load_interpreter(model)
    out = []
    for row in x:  # litert-torch exports static shapes: batch 1
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], row[None])
        interpreter.invoke()
        out.append(interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0])
    return np.stack(out)


def test_patched_template_matches_torch_round_after_round(converted: Any) -> None:
    import torch

    from fedbus.learning.torch import state_to_arrays

    template = converted
    assert [s.name for s in template.slots] == list(small_net(64, 10).state_dict())
    # The 1-channel conv is a DEPTHWISE_CONV_2D with IHWO filters: found by value, not name.
    layouts = {s.name: s.perm for s in template.slots}
    assert layouts["conv.weight"] == (1, 2, 3, 0)
    x = np.random.default_rng(0).random((20, 64), dtype=np.float32)
    errors = []
    for round_seed in range(3):
        torch.manual_seed(round_seed)
        module = small_net(64, 10).eval()
        if round_seed == 2:  # a zero bias, which a converter would have dropped
            with torch.no_grad():
                module.fc1.bias.zero_()
        weights = state_to_arrays(module)
        with torch.no_grad():
            want = module(torch.from_numpy(x)).numpy()
        got = _run(template.patch(weights), x)
        errors.append(float(np.abs(got - want).max()))
        assert np.abs(_run(template.model, x) - want).max() > 1e-2  # the template alone is not it
    print("max |patched - torch| per round:", errors)
    assert max(errors) < 1e-5


def test_export_cli_converts_a_factory_topology(
    converted: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from fedbus.learning.torch import state_to_arrays

    topology = tmp_path / "t.yaml"
    topology.write_text(TOPOLOGY, encoding="utf-8")
    torch.manual_seed(5)
    module = small_net(64, 10).eval()
    (tmp_path / "model.msgpack").write_bytes(encode_model(state_to_arrays(module)))
    out = tmp_path / "m.tflite"
    argv = ["export", str(tmp_path / "model.msgpack"), "--topology", str(topology)]
    assert main([*argv, "--out", str(out), "--manifest", str(tmp_path / "m.json")]) == 0
    assert "via litert-torch, input [1, 64]" in capsys.readouterr().out
    x = np.random.default_rng(1).random((5, 64), dtype=np.float32)
    with torch.no_grad():
        want = module(torch.from_numpy(x)).numpy()
    assert np.abs(_run(out.read_bytes(), x) - want).max() < 1e-5
    # A board with the file and its manifest patches the next round with numpy alone.
    from fedbus.learning.tflite.torch_route import torch_template_from_manifest

    manifest = json.loads((tmp_path / "m.json").read_text())
    board = torch_template_from_manifest(out.read_bytes(), manifest)
    torch.manual_seed(6)
    nxt = small_net(64, 10).eval()
    with torch.no_grad():
        want = nxt(torch.from_numpy(x)).numpy()
    assert np.abs(_run(board.patch(state_to_arrays(nxt)), x) - want).max() < 1e-5


def test_a_folded_tensor_is_refused() -> None:
    """Batch-norm statistics are folded by the converter: no buffer to patch, so no template."""
    torch = pytest.importorskip("torch", reason="torch is not installed")
    pytest.importorskip("litert_torch", reason=NEEDS_LITERT_TORCH)
    from fedbus.learning.tflite.template import TemplateError
    from fedbus.learning.tflite.torch_route import compile_torch_template

    module = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.BatchNorm1d(6))
    with pytest.raises(TemplateError, match="no constant of the converted model"):
        compile_torch_template(module, (1, 8))


def test_without_litert_torch_export_says_what_to_install(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "litert_torch", None)  # as if not installed
    topology = tmp_path / "t.yaml"
    topology.write_text(TOPOLOGY, encoding="utf-8")
    (tmp_path / "model.msgpack").write_bytes(encode_model({"w": np.zeros((2, 2), np.float32)}))
    out = tmp_path / "m.tflite"
    argv = ["export", str(tmp_path / "model.msgpack"), "--topology", str(topology)]
    assert main([*argv, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "needs litert-torch" in err
    assert "pip install 'fedbus[litert]'" in err
    assert not out.exists()
    # A factory named by --model-spec instead of a topology: told to use --topology.
    spec = ["--model-spec", "{factory: 'a.b:c'}", "--out", str(out)]
    assert main(["export", str(tmp_path / "model.msgpack"), *spec]) == 2
    assert "--topology" in capsys.readouterr().err
