"""SCAFFOLD end to end over broker: memory: control variates on the wire, against a serial loop."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from fedbus.aggregation import Scaffold, broadcast_extras
from fedbus.aggregation.scaffold import CONTROL, client_control_update, correction
from fedbus.launch import run_federation
from fedbus.learning.partition import build_federation_data
from fedbus.learning.seeds import fit_seed, init_seed
from fedbus.learning.trainer import FitConfig
from fedbus.learning.trainers import make_trainer
from fedbus.topology import Topology, loads_topology

pytestmark = pytest.mark.timeout(120)

MODEL = {"kind": "mlp", "hidden": [16]}


def _topology(aggregator: str, *, clients: int, rounds: int, alpha: float, seed: int) -> Topology:
    return loads_topology(f"""
name: scaffold-test
seed: {seed}
broker: memory
data: {{dataset: digits, partition: {{kind: dirichlet, alpha: {alpha}}}}}
model: {{kind: mlp, hidden: [16]}}
training: {{epochs: 1, batch_size: 16, lr: 0.05}}
protocol:
  kind: centralized
  rounds: {rounds}
  round_timeout_s: 30
  join_timeout_s: 20
  aggregator: {aggregator}
nodes:
  server: {{id: server}}
  clients: {{count: {clients}}}
""")


def _scaffold_reference(
    reference: ModuleType, *, clients: int, rounds: int, alpha: float, seed: int
) -> tuple[dict[str, Any], list[float]]:
    """One-process SCAFFOLD with full participation: the same data, seeds and arithmetic."""
    ids = reference.client_ids(clients)
    data = build_federation_data(
        "digits", {}, "dirichlet", {"alpha": alpha}, ids, test_fraction=0.2, seed=seed
    )
    dims = {"num_features": data.num_features, "num_classes": data.num_classes}
    trainers = {c: make_trainer(MODEL, data.train[c], None, **dims, seed=seed) for c in ids}
    server = make_trainer(MODEL, None, data.test, **dims, seed=seed)
    weights: dict[str, Any] = server.initial_weights(init_seed(seed))
    agg = Scaffold(num_clients=clients)
    controls: dict[str, Any] = {}
    accuracy = []
    from fedbus.aggregation import ClientUpdate

    for rnd in range(1, rounds + 1):
        c = broadcast_extras(agg, weights)[CONTROL]  # what the broadcast carries (model dtype)
        updates = []
        for cid in ids:
            cfg = FitConfig(
                epochs=1, batch_size=16, lr=0.05, seed=fit_seed(seed, rnd, cid),
                correction=correction(c, controls.get(cid)),
            )  # fmt: skip
            result = trainers[cid].fit(weights, cfg)
            steps = math.ceil(result.num_examples / 16)
            controls[cid], dc = client_control_update(
                global_weights=weights, local_weights=result.weights, server_control=c,
                client_control=controls.get(cid), steps=steps, lr=0.05,
            )  # fmt: skip
            updates.append(
                ClientUpdate(
                    sender=cid, weights=result.weights, num_examples=result.num_examples,
                    extras={CONTROL: dc},
                )
            )  # fmt: skip
        weights = agg.aggregate(weights, updates, round=rnd)
        accuracy.append(server.evaluate(weights).accuracy)
    return weights, accuracy


async def test_scaffold_over_memory_matches_the_serial_loop(reference: ModuleType) -> None:
    topo = _topology("{kind: scaffold, num_clients: 4}", clients=4, rounds=3, alpha=0.5, seed=3)
    result = await run_federation(topo, out=None)
    assert result.server.success, result.server.reason
    expected, _ = _scaffold_reference(reference, clients=4, rounds=3, alpha=0.5, seed=3)
    assert list(result.weights) == list(expected)
    for name, array in expected.items():
        np.testing.assert_allclose(result.weights[name], array, rtol=0, atol=1e-6)


async def test_scaffold_learns_on_skewed_data_like_fedavg(tmp_path: Path) -> None:
    """Dirichlet(0.1), 10 clients, 15 rounds: SCAFFOLD lands near FedAvg (numbers in the log)."""
    finals = {}
    for agg in ("fedavg", "scaffold"):
        out = tmp_path / agg
        topo = _topology(agg, clients=10, rounds=15, alpha=0.1, seed=0)
        result = await run_federation(topo, out=out)
        assert result.server.success, result.server.reason
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        finals[agg] = rows[-1]["accuracy"]
        print(agg, [round(r["accuracy"], 3) for r in rows])
    assert finals["scaffold"] > 0.6
    assert finals["scaffold"] >= finals["fedavg"] - 0.05
