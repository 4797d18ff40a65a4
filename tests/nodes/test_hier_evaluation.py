"""Federated evaluation across levels: devices evaluate, edges and cloud report means (issue 4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hier_helpers import hier, rows

from fedbus.launch.build import build_data
from fedbus.launch.hierarchical import run_hierarchical

pytestmark = pytest.mark.timeout(90)


async def test_each_edge_and_the_cloud_report_the_sample_weighted_device_evaluation(
    tmp_path: Path,
) -> None:
    # Prepare
    topology = hier(rounds=3, protocol=", evaluate: federated")
    sizes = {k: len(v) for k, v in build_data(topology, tmp_path).train.items()}
    per_edge = {
        e: sum(n for d, n in sizes.items() if d.startswith(e + "-")) for e in ("edge-a", "edge-b")
    }
    # Execute
    result = await run_hierarchical(topology, out=tmp_path)
    # Assert
    assert result.server.success, result.server.reason
    found = rows(tmp_path)
    assert [r["round"] for r in found] == [1, 2, 3]
    for row in found:
        # every device evaluated the global model of this round on its own data
        assert row["edge_eval_num_examples"] == per_edge
        assert row["eval_num_examples"] == sum(sizes.values())
        edges = row["edge_eval_accuracy"]
        assert set(edges) == {"edge-a", "edge-b"}
        # the cloud's figure is the device-weighted mean, i.e. the edges' means weighted by size
        expected = sum(edges[e] * per_edge[e] for e in edges) / sum(per_edge.values())
        assert row["accuracy"] == pytest.approx(expected, abs=1e-9)
        assert row["loss"] >= 0.0
    # the model improves as seen by the devices themselves
    assert found[-1]["accuracy"] > found[0]["accuracy"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final_accuracy"] == found[-1]["accuracy"]


async def test_the_final_evaluation_reaches_the_devices_of_a_nested_region(tmp_path: Path) -> None:
    edges = """
    - {id: edge-a, clients: 2}
    - id: region-b
      edges:
        - {id: edge-b1, clients: 2}
        - {id: edge-b2, clients: 2}"""
    topology = hier(rounds=2, protocol=", evaluate: federated", edges=edges)
    sizes = {k: len(v) for k, v in build_data(topology, tmp_path).train.items()}
    result = await run_hierarchical(topology, out=tmp_path)
    assert result.server.success, result.server.reason
    last = rows(tmp_path)[-1]
    assert last["eval_num_examples"] == sum(sizes.values())
    region = sum(n for d, n in sizes.items() if d.startswith("edge-b"))
    assert last["edge_eval_num_examples"]["region-b"] == region
    assert set(last["edge_eval_accuracy"]) == {"edge-a", "region-b", "edge-b1", "edge-b2"}
