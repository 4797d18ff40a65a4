"""Hierarchical federations over the in-process bus: cloud, edges, devices, re-homing."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from fedbus.launch.hierarchical import Plan, run_hierarchical
from fedbus.nodes.edge import namespace_of
from fedbus.nodes.results import ROW_KEYS
from fedbus.topology import Topology, loads_topology

pytestmark = pytest.mark.timeout(60)


def hier_topology(
    *, rounds: int = 3, rehome: str = "parent", faults: str = "", edges: str = ""
) -> Topology:
    edges = (
        edges
        or """
    - {id: edge-a, clients: 3}
    - {id: edge-b, clients: 3}"""
    )
    return loads_topology(f"""
name: hier-test
seed: 0
broker: memory
data: {{dataset: digits, partition: {{kind: dirichlet, alpha: 0.5}}}}
model: {{kind: mlp, hidden: [16]}}
training: {{epochs: 1, batch_size: 16, lr: 0.05}}
protocol: {{kind: hierarchical, rounds: {rounds}, edge_rounds: 2, rehome: {rehome},
            round_timeout_s: 10, join_timeout_s: 10}}
nodes:
  server: {{id: cloud}}
  edges:{edges}
{faults}
""")


async def test_two_edges_of_three_devices_learn_and_write_results(tmp_path: Path) -> None:
    # Execute
    result = await run_hierarchical(hier_topology(), out=tmp_path)
    # Assert
    assert result.server.success, result.server.reason
    assert {o.status for o in result.edges.values()} == {"finished"}
    assert {o.status for o in result.devices.values()} == {"finished"}
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert set(ROW_KEYS) <= set(row)
        assert row["participants"] == 2
        assert set(row["edge_accuracy"]) == {"edge-a", "edge-b"}
        assert row["edge_participants"] == {"edge-a": 3, "edge-b": 3}
        assert row["bytes_up"] > 0
    assert rows[-1]["accuracy"] > rows[0]["accuracy"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["protocol"] == "hierarchical"
    assert summary["rounds_completed"] == 3
    # Every device trained edge_rounds times per global round, through its edge.
    for device, node in result.device_nodes.items():
        edge = device.rsplit("-client-", 1)[0]
        assert node.trained == [(r, edge) for r in (1, 1, 2, 2, 3, 3)]


@pytest.mark.parametrize(("rehome", "new_parent"), [("parent", "cloud"), ("sibling", "edge-b")])
async def test_devices_of_a_crashed_edge_rehome_and_are_counted_once(
    rehome: str, new_parent: str
) -> None:
    # Prepare
    faults = "faults: [{kind: crash, nodes: [edge-a], at_round: 3}]"
    topology = hier_topology(rounds=5, rehome=rehome, faults=faults)
    # Execute
    result = await run_hierarchical(topology, out=None)
    # Assert
    assert result.server.success, result.server.reason
    assert result.edges["edge-a"].status == "crashed"
    assert result.edges["edge-b"].status == "finished"
    orphans = {d: n for d, n in result.device_nodes.items() if d.startswith("edge-a-")}
    for device, node in orphans.items():
        assert node.parents == ["edge-a", new_parent], device
        # Re-homed within two global rounds of the crash: trains again by round 4.
        assert any(top in (3, 4) and parent == new_parent for top, parent in node.trained)
    for device, node in result.device_nodes.items():
        parents_per_round: dict[int, set[str]] = {}
        for top, parent in node.trained:
            parents_per_round.setdefault(top, set()).add(parent)
        # No top-level round is answered through two parents.
        assert all(len(p) == 1 for p in parents_per_round.values()), device
        if rehome == "parent" and device in orphans:
            # Directly under the cloud a device trains once per global round.
            counts = Counter(top for top, parent in node.trained if parent == "cloud")
            assert set(counts.values()) == {1}


def test_namespaces_and_watch_topics_of_a_nested_hierarchy() -> None:
    edges = """
    - {id: edge-a, clients: 2}
    - id: region-b
      edges:
        - {id: edge-b1, clients: 2}
        - {id: edge-b2, clients: 2}"""
    plan = Plan.of(hier_topology(edges=edges))
    assert plan.namespaces["cloud"] == "hier-test"
    assert plan.namespaces["edge-b1"] == "hier-test.edge-b1"
    assert plan.watch["edge-b1"] == ("hier-test.edge-b1", "hier-test.region-b")
    assert plan.rehome("edge-b1-client-0").fallbacks == ("region-b",)
    assert namespace_of("n" * 60, "edge-" + "x" * 40, server="cloud") != "n" * 60
    assert len(namespace_of("n" * 60, "edge-" + "x" * 40, server="cloud")) <= 64


async def test_three_levels_run_to_the_end() -> None:
    edges = """
    - {id: edge-a, clients: 2}
    - id: region-b
      edges:
        - {id: edge-b1, clients: 2}
        - {id: edge-b2, clients: 2}"""
    result = await run_hierarchical(hier_topology(rounds=2, edges=edges), out=None)
    assert result.server.success, result.server.reason
    assert {o.status for o in result.edges.values()} == {"finished"}
    assert {o.status for o in result.devices.values()} == {"finished"}
