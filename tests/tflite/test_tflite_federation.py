"""TFLite in a run: model.tflite after each round, clients serving TFLite, the fallback.

A small federation over ``broker: memory`` (digits, 3 clients, 2 rounds)
with ``--export-tflite`` and ``--serve-tflite``'s options: the exported file
must compute the final global model's forward pass, and the clients'
``tflite_accuracy`` must be the numpy evaluation of the very weights they
received. Without a runtime, serving turns off with one warning and the run
trains on.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedbus.errors import ConfigError
from fedbus.launch.federation import run_federation
from fedbus.launch.tflite import TfliteOptions, model_spec
from fedbus.learning.data import load_digits
from fedbus.learning.tflite import interpreter_class, load_interpreter
from fedbus.learning.trainer import FitConfig, FitResult, Trainer
from fedbus.learning.trainers import NumpyTrainer
from fedbus.nodes.results import MODEL_TFLITE_FILE
from fedbus.topology import loads_topology

TOPOLOGY = """
name: tfl
seed: 0
broker: memory
data: {dataset: digits, partition: iid}
model: {kind: mlp, hidden: [32]}
training: {epochs: 1, batch_size: 16, lr: 0.05}
protocol: {kind: centralized, rounds: 2}
nodes:
  server: server
  clients: {count: 3}
"""


class Recording(Trainer):
    """A numpy trainer that keeps the global weights each fit started from."""

    def __init__(self, inner: NumpyTrainer) -> None:
        self.inner = inner
        self.train = inner.train  # the local data, which serving evaluates on
        self.received: list[dict[str, Any]] = []

    def initial_weights(self, seed: int) -> Any:
        return self.inner.initial_weights(seed)

    def fit(self, weights: Mapping[str, Any], config: FitConfig) -> FitResult:
        self.received.append({k: np.array(v) for k, v in weights.items()})
        return self.inner.fit(weights, config)

    def evaluate(self, weights: Mapping[str, Any]) -> Any:
        return self.inner.evaluate(weights)


def _run(tmp_path: Path, options: TfliteOptions) -> tuple[Any, dict[str, Recording]]:
    recorded: dict[str, Recording] = {}

    def hook(node_id: str, trainer: Trainer) -> Trainer:
        assert isinstance(trainer, NumpyTrainer)
        recorded[node_id] = Recording(trainer)
        return recorded[node_id]

    result = asyncio.run(
        run_federation(loads_topology(TOPOLOGY), out=tmp_path, trainer_hook=hook, tflite=options)
    )
    assert result.server.success, result.server.reason
    return result, recorded


def _rows(out: Path) -> list[dict[str, Any]]:
    import json

    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line]


def test_export_and_serving_match_the_framework(litert: None, tmp_path: Path) -> None:
    result, recorded = _run(tmp_path, TfliteOptions(export=True, serve=True))

    # model.tflite (rewritten each round) is the final global model.
    x = load_digits().x.reshape(-1, 64).astype(np.float32)
    interpreter = load_interpreter((tmp_path / MODEL_TFLITE_FILE).read_bytes())
    inp = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(inp, [len(x), 64])
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp, x)
    interpreter.invoke()
    got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    w = result.weights
    want = np.maximum(x @ w["dense0.w"] + w["dense0.b"], 0) @ w["dense1.w"] + w["dense1.b"]
    assert np.max(np.abs(got - want)) < 1e-5

    # Each round's tflite_accuracy is the sample-weighted numpy accuracy of the model received.
    rows = _rows(tmp_path)
    assert [r["round"] for r in rows] == [1, 2]
    for r, row in enumerate(rows):
        total = sum(len(t.train) for t in recorded.values())  # type: ignore[arg-type]
        want_acc = sum(
            len(t.train) * t.inner.evaluate(t.received[r]).accuracy  # type: ignore[arg-type]
            for t in recorded.values()
        )
        assert abs(row["tflite_accuracy"] - want_acc / total) < 1e-6


def test_serving_without_a_runtime_warns_and_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for module in ("ai_edge_litert.interpreter", "tflite_runtime.interpreter"):
        monkeypatch.setitem(sys.modules, module, None)  # `import` raises ImportError
    interpreter_class.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            _run(tmp_path, TfliteOptions(serve=True))
    finally:
        interpreter_class.cache_clear()
    warnings = [r.getMessage() for r in caplog.records if "TFLite serving off" in r.getMessage()]
    assert len(warnings) == 3  # one line per client
    assert "training continues" in warnings[0]
    assert "fedbus[tflite]" in warnings[0]
    rows = _rows(tmp_path)
    assert len(rows) == 2
    assert all("tflite_accuracy" not in row for row in rows)


def test_factory_models_are_refused_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedbus.cli import main

    text = TOPOLOGY.replace("{kind: mlp, hidden: [32]}", "{factory: 'x.y:z'}")
    with pytest.raises(ConfigError, match="litert-torch"):
        model_spec(loads_topology(text))
    path = tmp_path / "f.yaml"
    path.write_text(text)
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--export-tflite"]) == 2
    assert "not supported yet" in capsys.readouterr().err


def test_predict_command_runs_the_exported_file(
    litert: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedbus.cli import main

    _run(tmp_path, TfliteOptions(export=True))
    digits = load_digits()
    np.savez(tmp_path / "local.npz", x=digits.x[:50], y=digits.y[:50])
    code = main(
        [
            "predict", str(tmp_path / MODEL_TFLITE_FILE), "--data", str(tmp_path / "local.npz"),
            "--out", str(tmp_path / "logits.npy"),
        ]
    )  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "50 examples; predicted classes:" in out
    assert "accuracy " in out
    assert np.load(tmp_path / "logits.npy").shape == (50, 10)


def test_agent_flags_are_checked_against_the_role(tmp_path: Path) -> None:
    from fedbus.cli import main

    path = tmp_path / "t.yaml"
    path.write_text(TOPOLOGY.replace("broker: memory", "broker: mqtt://127.0.0.1:1"))
    assert main(["node", str(path), "--id", "server", "--serve-tflite"]) == 2
    assert main(["node", str(path), "--id", "client-1", "--export-tflite"]) == 2
