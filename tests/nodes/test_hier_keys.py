"""The hierarchical topology keys of issues 4 and 5: per-level validators, SCAFFOLD refused."""

from __future__ import annotations

import pytest
from hier_helpers import hier, hier_text

from fedbus.launch.robustness import check_aggregator
from fedbus.topology import TopologyError, loads_topology


def problems(text: str) -> dict[str, str]:
    with pytest.raises(TopologyError) as caught:
        loads_topology(text, check_aggregator=check_aggregator)
    return {p.path: p.message for p in caught.value.problems}


def test_edges_inherit_the_protocol_validators_unless_they_give_their_own() -> None:
    topology = hier(
        protocol=", validators: [norm_outlier]",
        edges="""
    - {id: edge-a, clients: 2, validators: [{kind: cosine_outlier, sigmas: 2.5}]}
    - {id: edge-b, clients: 2}
    - {id: edge-c, clients: 2, validators: []}""",
    )
    kinds = {
        i.id: [(v.kind, dict(v.params)) for v in i.validators]
        for i in topology.node_infos()
        if i.role.value in ("server", "edge")
    }
    assert kinds == {
        "cloud": [("norm_outlier", {})],
        "edge-a": [("cosine_outlier", {"sigmas": 2.5})],
        "edge-b": [("norm_outlier", {})],
        "edge-c": [],
    }


def test_bad_edge_validators_are_reported_with_their_path() -> None:
    found = problems(
        hier_text(
            edges="""
    - {id: edge-a, clients: 2, validators: [{kind: nope}]}
    - {id: edge-b, clients: 2, validators: [validation_accuracy, validation_accuracy]}"""
        )
    )
    assert "nodes.edges[0].validators[0].kind" in found
    assert found["nodes.edges[1].validators[1]"] == "validation_accuracy may be given once"


@pytest.mark.parametrize(
    ("where", "path"),
    [
        ({"protocol": ", aggregator: scaffold"}, "protocol.aggregator"),
        ({"edge_a": ", aggregator: scaffold"}, "nodes.edges[0].aggregator"),
    ],
)
def test_scaffold_is_refused_at_every_level_of_a_hierarchy(
    where: dict[str, str], path: str
) -> None:
    found = problems(hier_text(**where))
    assert "scaffold is not supported under protocol kind 'hierarchical'" in found[path]
