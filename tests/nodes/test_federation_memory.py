"""Whole federations over the in-process bus: learning, the reference loop, results files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from fedbus.launch import run_federation
from fedbus.nodes import decode_model, read_checkpoint
from fedbus.nodes.results import ROW_KEYS, SUMMARY_KEYS
from tests.nodes.conftest import topology

pytestmark = pytest.mark.timeout(60)


async def test_digits_federation_learns_and_writes_results(tmp_path: Path) -> None:
    # Prepare
    topo, text = topology(clients=4, rounds=4)
    # Execute
    result = await run_federation(topo, out=tmp_path, topology_text=text)
    # Assert
    assert result.server.success, result.server.reason
    assert {o.status for o in result.clients.values()} == {"finished"}
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["accuracy"] > rows[0]["accuracy"]
    assert rows[-1]["loss"] < rows[0]["loss"]
    for row in rows:
        assert set(ROW_KEYS) <= set(row)
        assert isinstance(row["wall_s"], float)
        assert isinstance(row["elapsed_s"], float)
        assert isinstance(row["accuracy"], float)
        assert isinstance(row["loss"], float)
        assert row["participants"] == 4
        assert row["dropped"] == 0
        assert row["rejected"] == {}
        assert isinstance(row["bytes_up"], int)
        assert row["bytes_up"] > 0
        assert isinstance(row["bytes_down"], int)
        assert row["bytes_down"] > 0
    assert [r["elapsed_s"] for r in rows] == sorted(r["elapsed_s"] for r in rows)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(SUMMARY_KEYS) <= set(summary)
    assert summary["name"] == "nodes-test"
    assert summary["protocol"] == "centralized"
    assert summary["rounds_completed"] == 4
    assert summary["final_accuracy"] == rows[-1]["accuracy"]
    assert summary["final_loss"] == rows[-1]["loss"]
    assert summary["broker"] == {"kind": "memory", "url": "memory"}
    assert summary["run"] == result.run_id
    assert result.run_id.startswith("nodes-test-")
    assert summary["success"] is True
    assert summary["bytes_total"] >= sum(r["bytes_up"] + r["bytes_down"] for r in rows)
    model = (tmp_path / "model.msgpack").read_bytes()
    assert summary["model_sha256"] == hashlib.sha256(model).hexdigest()
    decoded = decode_model(model)
    assert list(decoded) == list(result.weights)
    for name, array in result.weights.items():
        assert decoded[name].tobytes() == np.asarray(array).tobytes()
    assert result.run_id.encode() not in model
    checkpoint = read_checkpoint(tmp_path / "checkpoint.msgpack")
    assert (checkpoint.round, checkpoint.run) == (4, result.run_id)
    assert (tmp_path / "topology.yaml").read_text() == text


async def test_final_weights_equal_the_reference_loop(reference: ModuleType) -> None:
    """Issue 3's correctness target: fedbus over broker: memory == the serial loop, within 1e-6."""
    topo, _ = topology(clients=5, rounds=3, seed=7)
    result = await run_federation(topo, out=None)
    assert result.server.success, result.server.reason
    expected, _history = reference.run_reference(
        dataset="digits", data_params={}, partition="dirichlet",
        partition_params={"alpha": 0.5}, num_clients=5, clients_per_round=5,
        model={"kind": "mlp", "hidden": [16]}, epochs=1, batch_size=16, lr=0.05,
        rounds=3, seed=7,
    )  # fmt: skip
    assert list(result.weights) == list(expected)
    for name, array in expected.items():
        np.testing.assert_allclose(result.weights[name], array, rtol=0, atol=1e-6)


async def test_partial_selection_matches_the_reference_loop(reference: ModuleType) -> None:
    """The same, with 3 of 6 clients per round: both must select the same clients."""
    topo, _ = topology(
        clients=6, rounds=4, seed=11, extra_protocol="  clients_per_round: 3\n  min_clients: 3"
    )
    result = await run_federation(topo, out=None)
    assert result.server.success, result.server.reason
    expected, _history = reference.run_reference(
        dataset="digits", data_params={}, partition="dirichlet",
        partition_params={"alpha": 0.5}, num_clients=6, clients_per_round=3,
        model={"kind": "mlp", "hidden": [16]}, epochs=1, batch_size=16, lr=0.05,
        rounds=4, seed=11,
    )  # fmt: skip
    for name, array in expected.items():
        np.testing.assert_allclose(result.weights[name], array, rtol=0, atol=1e-6)
