"""Random valid topologies load, and loading the same text twice gives equal trees."""

from __future__ import annotations

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from fedbus.topology import NodeRole, loads_topology


@st.composite
def topologies(draw: st.DrawFn) -> dict[str, object]:
    n = draw(st.integers(1, 30))
    per_round = draw(st.integers(1, n))
    return {
        "name": draw(st.from_regex(r"[a-z][a-z0-9_-]{0,20}", fullmatch=True)),
        "seed": draw(st.integers(0, 2**32)),
        "data": {"dataset": "digits", "test_fraction": draw(st.floats(0.01, 0.99))},
        "training": {"epochs": draw(st.integers(1, 5)), "lr": draw(st.floats(1e-4, 1.0))},
        "protocol": {
            "rounds": draw(st.integers(1, 100)),
            "clients_per_round": per_round,
            "min_clients": draw(st.integers(1, per_round)),
        },
        "nodes": {"clients": {"count": n}},
    }


@settings(max_examples=60, deadline=None)
@given(doc=topologies())
def test_random_valid_topologies(doc: dict[str, object]) -> None:
    text = yaml.safe_dump(doc)
    t = loads_topology(text)
    assert t == loads_topology(text)
    assert t.name == doc["name"]
    assert len(t.ids(NodeRole.CLIENT)) == doc["nodes"]["clients"]["count"]  # type: ignore[index]
    assert t.protocol.rounds == doc["protocol"]["rounds"]  # type: ignore[index]
