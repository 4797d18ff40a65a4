"""Per-level defenses and federated evaluation of a hierarchy through a real mosquitto.

The in-process runs (tests/nodes/test_hier_*.py) measure the effect; this one
checks the same wiring over MQTT: an attacking device's forged updates cross
the broker, edge-a's validator rejects them, and the devices' evaluations
travel up through the edges to the cloud's rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedbus.broker import ManagedBroker
from fedbus.launch.build import build_data
from fedbus.launch.hierarchical import run_hierarchical
from fedbus.topology import loads_topology

pytestmark = pytest.mark.timeout(90)


async def test_edge_validator_and_federated_evaluation_over_mosquitto(
    mosquitto: ManagedBroker, tmp_path: Path
) -> None:
    # Prepare
    topology = loads_topology(f"""
name: hier-levels-mqtt
broker: {mosquitto.url}
data: {{dataset: digits, partition: {{kind: dirichlet, alpha: 0.5}}}}
model: {{kind: mlp, hidden: [16]}}
protocol: {{kind: hierarchical, rounds: 3, edge_rounds: 2, evaluate: federated,
            round_timeout_s: 20, join_timeout_s: 20}}
nodes:
  server: {{id: cloud}}
  edges:
    - {{id: edge-a, clients: 5, validators: [norm_outlier]}}
    - {{id: edge-b, clients: 3}}
attacks: [{{kind: sign_flip, nodes: [edge-a-client-1]}}]
""")
    sizes = {k: len(v) for k, v in build_data(topology, tmp_path).train.items()}
    # Execute
    result = await run_hierarchical(topology, out=tmp_path)
    # Assert
    assert result.server.success, result.server.reason
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    total = sum(sizes.values())
    for row in rows:
        assert row["edge_rejected"] == {"edge-a": {"norm_outlier": 2}, "edge-b": {}}
        assert set(row["edge_eval_accuracy"]) == {"edge-a", "edge-b"}
    # An evaluation rides on its training update: the rejected attacker's is not
    # counted; the final evaluation-only round has no update to reject.
    assert [r["eval_num_examples"] for r in rows] == [
        total - sizes["edge-a-client-1"],
        total - sizes["edge-a-client-1"],
        total,
    ]
    assert rows[-1]["accuracy"] > rows[0]["accuracy"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["attacks"][0]["nodes"] == ["edge-a-client-1"]


async def test_edges_of_a_crashed_region_rehome_over_mosquitto(mosquitto: ManagedBroker) -> None:
    # Prepare: region-b's will (a real MQTT last will) is what its edges react to.
    topology = loads_topology(f"""
name: hier-region-mqtt
broker: {mosquitto.url}
data: {{dataset: digits, partition: {{kind: dirichlet, alpha: 0.5}}}}
model: {{kind: mlp, hidden: [16]}}
protocol: {{kind: hierarchical, rounds: 5, edge_rounds: 2, round_timeout_s: 20,
            join_timeout_s: 20}}
nodes:
  server: {{id: cloud}}
  edges:
    - {{id: edge-a, clients: 2}}
    - id: region-b
      edges:
        - {{id: edge-b1, clients: 2}}
        - {{id: edge-b2, clients: 2}}
faults: [{{kind: crash, nodes: [region-b], at_round: 2}}]
""")
    # Execute
    result = await run_hierarchical(topology, out=None)
    # Assert
    assert result.server.success, result.server.reason
    assert result.edges["region-b"].status == "crashed"
    for edge in ("edge-b1", "edge-b2"):
        assert result.edges[edge].status == "finished"
        assert result.edge_nodes[edge].parents == ["region-b", "cloud"]
    for device in ("edge-b1-client-0", "edge-b2-client-1"):
        trained = result.device_nodes[device].trained
        assert {top for top, _ in trained if top >= 4} == {4, 5}, trained
