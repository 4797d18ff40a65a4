"""Hierarchical and gossip federations through a real mosquitto (and a second one for an edge)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedbus.broker import ManagedBroker
from fedbus.launch.hierarchical import run_hierarchical
from fedbus.topology import loads_topology
from tests.integration.cli_helpers import fedbus, rows, wait

pytestmark = pytest.mark.timeout(90)

EXAMPLES = Path(__file__).parents[2] / "examples"


@pytest.fixture
def edge_broker(mosquitto: ManagedBroker) -> Iterator[ManagedBroker]:
    """A second mosquitto, for an edge group of its own."""
    broker = ManagedBroker(kind="mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


def test_fedbus_run_hierarchical_example(tmp_path: Path) -> None:
    out, log = tmp_path / "out", tmp_path / "log.txt"
    code = wait(
        fedbus("run", str(EXAMPLES / "hierarchical.yaml"), "--rounds", "2", "--out", str(out), log=log),
        60, log,
    )  # fmt: skip
    assert code == 0, log.read_text()
    found = rows(out)
    assert [r["round"] for r in found] == [1, 2]
    assert all(r["participants"] == 3 for r in found)
    assert all(set(r["edge_accuracy"]) == {"edge-a", "edge-b", "edge-c"} for r in found)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protocol"] == "hierarchical"
    assert summary["broker"]["url"].startswith("mqtt://127.0.0.1:")
    assert (out / "topology.png").stat().st_size > 0
    assert "edges: edge-a" in log.read_text()


def test_fedbus_run_gossip_example(tmp_path: Path) -> None:
    out, log = tmp_path / "out", tmp_path / "log.txt"
    code = wait(
        fedbus("run", str(EXAMPLES / "gossip.yaml"), "--rounds", "3", "--out", str(out), log=log),
        60, log,
    )  # fmt: skip
    assert code == 0, log.read_text()
    found = rows(out)
    assert [r["round"] for r in found] == [1, 2, 3]
    assert all(r["participants"] == 16 for r in found)
    assert all(r["accuracy_min"] <= r["accuracy"] <= r["accuracy_max"] for r in found)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protocol"] == "gossip"
    assert (out / "topology.png").stat().st_size > 0
    assert "consensus" in log.read_text()


@pytest.mark.parametrize("client", ["paho", "lean"])
async def test_edge_group_on_its_own_broker_rehomes_across_brokers(
    mosquitto: ManagedBroker, edge_broker: ManagedBroker, client: str
) -> None:
    # Prepare: edge-b's devices live on a second broker, reached through the
    # paho or the lean client (the cloud's URL broker: paho); edge-b dies at round 3.
    topology = loads_topology(f"""
name: hier-two-brokers
broker: {mosquitto.url}
data: {{dataset: digits, partition: {{kind: dirichlet, alpha: 0.5}}}}
model: {{kind: mlp, hidden: [16]}}
protocol: {{kind: hierarchical, rounds: 6, edge_rounds: 2, rehome: parent,
            round_timeout_s: 20, join_timeout_s: 20}}
nodes:
  server: {{id: cloud}}
  edges:
    - {{id: edge-a, clients: 2}}
    - {{id: edge-b, clients: 2, broker: {{url: "{edge_broker.url}", client: {client}}}}}
faults: [{{kind: crash, nodes: [edge-b], at_round: 3}}]
""")
    # Execute
    result = await run_hierarchical(topology, out=None)
    # Assert
    assert result.server.success, result.server.reason
    assert result.edges["edge-b"].status == "crashed"
    assert {o.status for o in result.devices.values()} == {"finished"}
    for device in ("edge-b-client-0", "edge-b-client-1"):
        node = result.device_nodes[device]
        assert node.parents == ["edge-b", "cloud"]
        assert [p for top, p in node.trained if top <= 2] == ["edge-b"] * 4
        assert any(p == "cloud" for top, p in node.trained if top in (3, 4, 5)), node.trained


async def test_edge_and_device_agents_join_a_hierarchical_run(
    mosquitto: ManagedBroker, tmp_path: Path
) -> None:
    # Prepare: edge-b and one device of edge-a run as `fedbus node` agents.
    path = tmp_path / "hier-agents.yaml"
    path.write_text(f"""
name: hier-agents
broker: {mosquitto.url}
data: {{dataset: digits, partition: {{kind: dirichlet, alpha: 0.5}}}}
model: {{kind: mlp, hidden: [16]}}
protocol: {{kind: hierarchical, rounds: 2, edge_rounds: 2, round_timeout_s: 20, join_timeout_s: 30}}
nodes:
  server: {{id: cloud}}
  edges:
    - {{id: edge-a, clients: 2}}
    - {{id: edge-b, clients: 2}}
  external: [edge-b, edge-a-client-1]
""")
    logs = {node: tmp_path / f"{node}.log" for node in ("edge-b", "edge-a-client-1")}
    agents = {node: fedbus("node", str(path), "--id", node, log=log) for node, log in logs.items()}
    try:
        # Execute
        result = await run_hierarchical(loads_topology(path.read_text()), out=None)
        # Assert
        assert result.server.success, result.server.reason
        for node, proc in agents.items():
            assert wait(proc, 30, logs[node]) == 0, logs[node].read_text()
    finally:
        for proc in agents.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


async def test_a_peer_agent_joins_a_gossip_run(mosquitto: ManagedBroker, tmp_path: Path) -> None:
    from fedbus.launch.gossip import run_gossip

    path = tmp_path / "gossip-agents.yaml"
    path.write_text(f"""
name: gossip-agents
broker: {mosquitto.url}
data: {{dataset: digits, partition: {{kind: dirichlet, alpha: 0.5}}}}
model: {{kind: mlp, hidden: [16]}}
protocol: {{kind: gossip, rounds: 3, round_timeout_s: 20, join_timeout_s: 30}}
nodes:
  peers: {{count: 4}}
  graph: {{kind: ring}}
  external: [peer-2]
""")
    log = tmp_path / "peer-2.log"
    agent = fedbus("node", str(path), "--id", "peer-2", log=log)
    try:
        result = await run_gossip(loads_topology(path.read_text()), out=None)
        assert result.success, result.reason
        assert wait(agent, 30, log) == 0, log.read_text()
        # The local peers mixed with the agent: their neighbours included peer-2.
        assert [r["participants"] for r in result.rows] == [3, 3, 3]
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
