"""Gossip federations over the in-process bus: peers, the monitor's rows, results files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from fedbus.launch.gossip import run_gossip
from fedbus.nodes import decode_model
from fedbus.nodes.results import ROW_KEYS, SUMMARY_KEYS
from fedbus.topology import Topology, loads_topology

pytestmark = pytest.mark.timeout(60)


def gossip_topology(
    *,
    peers: int = 8,
    rounds: int = 10,
    mixing: str = "metropolis",
    graph: str = "{kind: ring}",
    round_timeout_s: float = 5,
    faults: str = "",
    extra: str = "",
) -> tuple[Topology, str]:
    text = f"""
name: gossip-test
seed: 0
broker: memory
data: {{dataset: digits, partition: {{kind: dirichlet, alpha: 0.5}}}}
model: {{kind: mlp, hidden: [16]}}
training: {{epochs: 1, batch_size: 16, lr: 0.05}}
protocol: {{kind: gossip, rounds: {rounds}, mixing: {mixing}, round_timeout_s: {round_timeout_s},
            join_timeout_s: 10{extra}}}
nodes:
  peers: {{count: {peers}}}
  graph: {graph}
{faults}
"""
    return loads_topology(text), text


async def test_ring_of_eight_learns_and_reaches_consensus(tmp_path: Path) -> None:
    # Prepare
    topo, text = gossip_topology(rounds=40)
    # Execute
    result = await run_gossip(topo, out=tmp_path, topology_text=text)
    # Assert
    assert result.success, result.reason
    assert {o.status for o in result.peers.values()} == {"finished"}
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(1, 41))
    for row in rows:
        assert set(ROW_KEYS) <= set(row)
        assert row["accuracy_min"] <= row["accuracy"] <= row["accuracy_max"]
        assert row["participants"] == 8
        assert row["bytes_up"] >= 0
    assert rows[-1]["consensus_distance"] < rows[0]["consensus_distance"]
    assert rows[-1]["accuracy"] > rows[0]["accuracy"] + 0.3
    assert [r["elapsed_s"] for r in rows] == sorted(r["elapsed_s"] for r in rows)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(SUMMARY_KEYS) <= set(summary)
    assert summary["protocol"] == "gossip"
    assert summary["rounds_completed"] == 40
    assert summary["final_accuracy"] == rows[-1]["accuracy"]
    model = (tmp_path / "model.msgpack").read_bytes()
    assert summary["model_sha256"] == hashlib.sha256(model).hexdigest()
    decoded = decode_model(model)
    for name, array in result.weights.items():
        assert np.array_equal(decoded[name], array)


async def test_model_file_is_the_average_of_the_peers_last_models() -> None:
    topo, _ = gossip_topology(peers=4, rounds=3, graph="{kind: complete}")
    result = await run_gossip(topo, out=None)
    assert result.success, result.reason
    assert len(result.rows) == 3
    # On a complete graph with Metropolis weights every peer holds the same mix.
    assert result.rows[-1]["consensus_distance"] < 1e-5


async def test_push_sum_runs_to_the_end() -> None:
    topo, _ = gossip_topology(rounds=6, mixing="push_sum", round_timeout_s=0.15)
    result = await run_gossip(topo, out=None)
    assert result.success, result.reason
    assert {o.status for o in result.peers.values()} == {"finished"}
    assert [r["round"] for r in result.rows] == list(range(1, 7))
    assert result.rows[-1]["accuracy"] > result.rows[0]["accuracy"]


async def test_churn_completes_and_every_peer_finishes() -> None:
    faults = "faults: [{kind: churn, probability: 0.15, down_rounds: 1}]"
    topo, _ = gossip_topology(rounds=12, round_timeout_s=1, faults=faults)
    result = await run_gossip(topo, out=None)
    assert result.success, result.reason
    assert {o.status for o in result.peers.values()} == {"finished"}
    assert [r["round"] for r in result.rows] == list(range(1, 13))
    # Somebody was away in some round (the fault did happen).
    assert any(r["participants"] < 8 for r in result.rows)


async def test_final_mixing_rounds_bring_the_peers_together() -> None:
    topo, _ = gossip_topology(rounds=8, extra=", final_mixing_rounds: 8")
    result = await run_gossip(topo, out=None)
    assert result.success, result.reason
    assert [r["round"] for r in result.rows] == list(range(1, 17))
    trained, last = result.rows[7], result.rows[-1]
    assert last["consensus_distance"] < 0.5 * trained["consensus_distance"]
    assert last["consensus_distance"] < result.rows[0]["consensus_distance"]
    assert (
        last["accuracy_max"] - last["accuracy_min"]
        <= trained["accuracy_max"] - trained["accuracy_min"]
    )


async def test_a_crashed_peer_is_dropped_and_the_rest_finish() -> None:
    faults = "faults: [{kind: crash, nodes: [peer-3], at_round: 2}]"
    topo, _ = gossip_topology(rounds=5, round_timeout_s=2, faults=faults)
    result = await run_gossip(topo, out=None)
    assert result.peers["peer-3"].status == "crashed"
    others = {p: o.status for p, o in result.peers.items() if p != "peer-3"}
    assert set(others.values()) == {"finished"}
    assert result.success, result.reason
    assert [r["participants"] for r in result.rows] == [8, 7, 7, 7, 7]
