"""An edge whose parent (a region) dies re-homes itself, with its devices behind it (issue 4)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from hier_helpers import hier, rows

from fedbus.launch.hierarchical import run_hierarchical

pytestmark = pytest.mark.timeout(90)

NESTED = """
    - {id: edge-a, clients: 2}
    - id: region-b
      edges:
        - {id: edge-b1, clients: 2}
        - {id: edge-b2, clients: 2}"""
CRASH = "faults: [{kind: crash, nodes: [region-b], at_round: 3}]"


async def test_edges_of_a_crashed_region_rehome_to_the_cloud_and_keep_their_devices(
    tmp_path: Path,
) -> None:
    # Execute: region-b drops uncleanly when the cloud's round 3 reaches it.
    result = await run_hierarchical(hier(rounds=6, edges=NESTED, extra=CRASH), out=tmp_path)
    # Assert
    assert result.server.success, result.server.reason
    assert result.edges["region-b"].status == "crashed"
    for edge in ("edge-a", "edge-b1", "edge-b2"):
        assert result.edges[edge].status == "finished", edge
    assert result.edge_nodes["edge-b1"].parents == ["region-b", "cloud"]
    assert result.edge_nodes["edge-b2"].parents == ["region-b", "cloud"]
    assert result.edge_nodes["edge-a"].parents == ["cloud"]
    found = rows(tmp_path)
    assert [r["round"] for r in found] == [1, 2, 3, 4, 5, 6]
    assert [r["participants"] for r in found[:2]] == [2, 2]  # edge-a and region-b
    # within two global rounds of the crash the cloud aggregates the re-homed edges
    assert found[4]["participants"] == found[5]["participants"] == 3
    assert set(found[5]["edge_participants"]) == {"edge-a", "edge-b1", "edge-b2"}
    for device, node in result.device_nodes.items():
        edge = device.rsplit("-client-", 1)[0]
        assert node.parents == [edge], device  # the devices never noticed
        per_round = Counter(top for top, _ in node.trained)
        if edge == "edge-a":
            assert per_round == dict.fromkeys(range(1, 7), 2), device
        else:
            # 2 region x 2 edge local rounds under region-b; nothing in round 3 (the
            # region died holding it); 2 edge local rounds per round directly under the
            # cloud from round 4 (or 5, if the cloud began round 4 before the edge rejoined)
            assert per_round[1] == per_round[2] == 4, (device, node.trained)
            assert per_round[3] == 0, (device, node.trained)
            assert per_round[4] in (0, 2), (device, node.trained)
            assert per_round[5] == per_round[6] == 2, (device, node.trained)
