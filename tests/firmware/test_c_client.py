"""The C firmware client: unit tests (ctest), golden vectors, and parity with the numpy trainer."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedbus import codec
from fedbus.learning.data import Dataset, load_digits
from fedbus.learning.numpy_models import logistic_regression, mlp
from fedbus.learning.trainer import FitConfig
from fedbus.learning.trainers import NumpyTrainer
from fedbus.messages import ModelBroadcast, ModelUpdate, UpdateFailure, tensors_from_arrays
from tests.firmware.firmware_helpers import (
    GOLDEN,
    assert_same,
    comparable,
    exact_vectors,
    vectors,
    write_bin,
    write_csv,
)

VECTORS = vectors()
EXACT = exact_vectors()


def run(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_ctest_unit_tests(c_build: Path) -> None:
    result = run("ctest", "--test-dir", c_build, "--output-on-failure")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "100% tests passed" in result.stdout


@pytest.mark.parametrize("vector", VECTORS, ids=[v["file"] for v in VECTORS])
def test_golden_decode(c_client: Path, vector: dict[str, Any]) -> None:
    result = run(c_client, "--dump", GOLDEN / vector["file"])
    assert result.returncode == 0, result.stderr
    assert_same(json.loads(result.stdout), comparable(vector["fields"]))


@pytest.mark.parametrize("vector", EXACT, ids=[v["file"] for v in EXACT])
def test_golden_encode_is_byte_exact(
    c_client: Path, vector: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "out.msgpack"
    result = run(c_client, "--reencode", GOLDEN / vector["file"], out)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == (GOLDEN / vector["file"]).read_bytes()


def _digits(n: int) -> Dataset:
    data = load_digits()
    return Dataset(data.x[:n], data.y[:n], data.num_classes)


def _model_payload(weights: dict[str, np.ndarray[Any, Any]], config: dict[str, Any]) -> bytes:
    msg = ModelBroadcast(
        run="parity-run", round=3, sender="server", id="model-3",
        weights=tensors_from_arrays(weights), config=config, selected=["offline"],
    )  # fmt: skip
    return codec.encode(msg)


@pytest.mark.parametrize(
    ("fmt", "epochs", "lr", "mu"),
    [("csv", 5, 0.5, 0.0), ("bin", 3, 0.2, 0.1), ("bin", 1, 0.05, 0.0)],
)
def test_train_once_matches_numpy_full_batch(
    c_client: Path, tmp_path: Path, fmt: str, epochs: int, lr: float, mu: float
) -> None:
    data = _digits(300)
    x = data.x.reshape(len(data), -1)
    net = logistic_regression(x.shape[1], data.num_classes)
    start = net.init(seed=7)
    writer = write_csv if fmt == "csv" else write_bin
    data_file = writer(tmp_path / f"data.{fmt}", x, data.y)
    model = tmp_path / "model.msgpack"
    model.write_bytes(
        _model_payload(start, {"epochs": epochs, "lr": lr, "mu": mu, "batch_size": 16})
    )
    out = tmp_path / "update.msgpack"
    result = run(c_client, "--train-once", model, out, "--data", data_file)
    assert result.returncode == 0, result.stderr
    update = codec.decode(out.read_bytes())
    assert isinstance(update, ModelUpdate)
    assert (update.run, update.round, update.reply_to) == ("parity-run", 3, "model-3")
    assert update.num_examples == len(data)
    assert update.encoding == "dense"
    assert list(update.weights) == ["dense0.w", "dense0.b"]

    expected = NumpyTrainer(net, data).fit(
        start, FitConfig(epochs=epochs, batch_size=len(data), lr=lr, mu=mu, seed=0)
    )
    diffs = {
        name: float(np.max(np.abs(update.weights[name].array - expected.weights[name])))
        for name in ("dense0.w", "dense0.b")
    }
    print(f"C parity ({fmt}, epochs={epochs}, lr={lr}, mu={mu}): max abs diff {diffs}")
    assert max(diffs.values()) < 1e-4, diffs
    # the update really moved: the comparison is not between two copies of the start
    assert float(np.max(np.abs(update.weights["dense0.w"].array - start["dense0.w"]))) > 1e-3
    assert update.metrics["train_loss"] == pytest.approx(expected.metrics["train_loss"], abs=1e-4)


def test_train_once_refuses_other_models(c_client: Path, tmp_path: Path) -> None:
    data = _digits(20)
    x = data.x.reshape(len(data), -1)
    data_file = write_bin(tmp_path / "data.bin", x, data.y)
    model = tmp_path / "model.msgpack"
    model.write_bytes(_model_payload(mlp(64, 10, (8,)).init(0), {"epochs": 1}))
    out = tmp_path / "update.msgpack"
    result = run(c_client, "--train-once", model, out, "--data", data_file)
    assert result.returncode == 0, result.stderr
    failure = codec.decode(out.read_bytes())
    assert isinstance(failure, UpdateFailure)
    assert failure.reply_to == "model-3"
    assert "logistic regression" in failure.reason


def test_evaluate_only_task(c_client: Path, tmp_path: Path) -> None:
    data = _digits(50)
    x = data.x.reshape(len(data), -1)
    net = logistic_regression(64, 10)
    start = net.init(seed=1)
    data_file = write_bin(tmp_path / "data.bin", x, data.y)
    model = tmp_path / "model.msgpack"
    model.write_bytes(_model_payload(start, {"task": "evaluate"}))
    out = tmp_path / "update.msgpack"
    assert run(c_client, "--train-once", model, out, "--data", data_file).returncode == 0
    update = codec.decode(out.read_bytes())
    assert isinstance(update, ModelUpdate)
    assert update.weights == {}
    expected = NumpyTrainer(net, data).evaluate(start)
    assert update.metrics["eval_num_examples"] == 50.0
    assert update.metrics["eval_accuracy"] == pytest.approx(expected.accuracy)
    assert update.metrics["eval_loss"] == pytest.approx(expected.loss, abs=1e-4)


def test_bad_data_file_is_a_usage_error(c_client: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,x\n", encoding="utf-8")
    result = run(c_client, "--train-once", bad, bad, "--data", bad)
    assert result.returncode == 2
    assert "cannot load data" in result.stderr
