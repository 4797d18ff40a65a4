"""Gossip graph builders: degrees, edge counts, connectivity, seeding."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedbus.errors import ConfigError
from fedbus.topology import GraphConfig, TopologyError, build_graph, edge_count, is_connected
from fedbus.topology.graphs import components

PEERS = [f"peer-{i}" for i in range(16)]


def degrees(adj: dict[str, tuple[str, ...]]) -> set[int]:
    return {len(v) for v in adj.values()}


@pytest.mark.parametrize(
    ("config", "edges", "degree"),
    [
        (GraphConfig(kind="ring"), 16, {2}),
        (GraphConfig(kind="grid"), 32, {4}),
        (GraphConfig(kind="grid", rows=2), 24, {3}),
        (GraphConfig(kind="complete"), 120, {15}),
        (GraphConfig(kind="random_regular", degree=3), 24, {3}),
        (GraphConfig(kind="random_regular", degree=8), 64, {8}),
        (GraphConfig(kind="small_world", k=4, p=0.0), 32, {4}),
        (GraphConfig(kind="erdos_renyi", p=1.0), 120, {15}),
        (GraphConfig(kind="erdos_renyi", p=0.0), 0, {0}),
    ],
)
def test_kinds(config: GraphConfig, edges: int, degree: set[int]) -> None:
    adj = build_graph(config, PEERS, seed=0)
    assert edge_count(adj) == edges
    assert degrees(adj) == degree
    assert all(p not in adj[p] for p in PEERS)
    assert all(p in adj[q] for p in PEERS for q in adj[p])
    assert is_connected(adj) == (edges > 0)


def test_small_world_keeps_edge_count() -> None:
    adj = build_graph(GraphConfig(kind="small_world", k=4, p=0.3), PEERS, seed=1)
    assert edge_count(adj) == 32


def test_explicit_edges_and_components() -> None:
    cfg = GraphConfig(kind="edges", edges=(("peer-0", "peer-1"), ("peer-2", "peer-3")))
    adj = build_graph(cfg, PEERS[:4], seed=0)
    assert components(adj) == [["peer-0", "peer-1"], ["peer-2", "peer-3"]]
    assert not is_connected(adj)


@pytest.mark.parametrize(
    ("config", "path"),
    [
        (GraphConfig(kind="random_regular", degree=16), "degree"),
        (GraphConfig(kind="random_regular", degree=3), "degree"),  # 3 * 15 is odd
        (GraphConfig(kind="small_world", k=16, p=0.1), "k"),
        (GraphConfig(kind="grid", rows=4), "rows"),
    ],
)
def test_parameters_that_do_not_fit(config: GraphConfig, path: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_graph(config, PEERS[:15], seed=0)
    assert info.value.path == path


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "mesh"},
        {"kind": "random_regular"},
        {"kind": "ring", "degree": 2},
        {"kind": "erdos_renyi", "p": 1.5},
        {"kind": "small_world", "k": 3, "p": 0.1},
        {"kind": "edges", "edges": (("a", "a"),)},
    ],
)
def test_config_problems(kwargs: dict[str, object]) -> None:
    with pytest.raises(TopologyError):
        GraphConfig(**kwargs)  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(4, 40),
    kind=st.sampled_from(["random_regular", "erdos_renyi", "small_world"]),
    seed=st.integers(0, 2**31),
)
def test_seeded_and_simple(n: int, kind: str, seed: int) -> None:
    params = {
        "random_regular": {"degree": 2},
        "erdos_renyi": {"p": 0.3},
        "small_world": {"k": 2, "p": 0.5},
    }
    cfg = GraphConfig(kind=kind, **params[kind])  # type: ignore[arg-type]
    peers = [f"p{i}" for i in range(n)]
    a, b = build_graph(cfg, peers, seed=seed), build_graph(cfg, peers, seed=seed)
    assert a == b
    assert all(p not in a[p] and len(set(a[p])) == len(a[p]) for p in peers)
    if kind == "random_regular":
        assert degrees(a) == {2}
