"""Validation of ``protocol.mode: async`` and its FedBuff keys (paths and lines)."""

from __future__ import annotations

import pytest

from fedbus.topology import TopologyError, loads_topology


def _text(protocol: str, nodes: str = "server: {id: server}\n  clients: {count: 4}") -> str:
    return f"""name: t
data: {{dataset: digits}}
protocol:
{protocol}
nodes:
  {nodes}
"""


def _problems(text: str) -> list[tuple[str, int | None, str]]:
    with pytest.raises(TopologyError) as info:
        loads_topology(text)
    return [(p.path, p.line, p.message) for p in info.value.problems]


def test_async_keys_load() -> None:
    topo = loads_topology(
        _text(
            "  mode: async\n  buffer_size: 4\n  max_staleness: 3\n  server_lr: 0.5\n"
            "  staleness_exponent: 1.0\n  rounds: 7"
        )
    )
    p = topo.protocol
    assert (p.mode, p.buffer_size, p.max_staleness, p.server_lr, p.staleness_exponent) == (
        "async", 4, 3, 0.5, 1.0,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("protocol", "path", "fragment"),
    [
        ("  mode: sideways", "protocol.mode", "must be one of sync, async"),
        ("  mode: async\n  buffer_size: 5", "protocol.buffer_size", "exceeds the 4 clients"),
        ("  mode: async\n  buffer_size: 0", "protocol.buffer_size", "at least 1"),
        ("  mode: async\n  max_staleness: -1", "protocol.max_staleness", "at least 0"),
        ("  mode: async\n  server_lr: 0", "protocol.server_lr", "positive"),
        ("  mode: async\n  staleness_exponent: -1", "protocol.staleness_exponent", ">= 0"),
        ("  mode: async\n  clients_per_round: 2", "protocol.clients_per_round", "not used"),
        ("  mode: async\n  aggregator: median", "protocol.aggregator", "not used"),
        (
            "  mode: async\n  buffer_size: 2\n  min_clients: 3",
            "protocol.min_clients",
            "exceeds buffer_size 2",
        ),
        ("  buffer_size: 2", "protocol.buffer_size", "only to mode 'async'"),
        ("  max_staleness: 2", "protocol.max_staleness", "only to mode 'async'"),
        ("  mode: async\n  bufer_size: 2", "protocol.bufer_size", "unknown key"),
    ],
)
def test_invalid_async_keys(protocol: str, path: str, fragment: str) -> None:
    found = _problems(_text(protocol))
    assert any(p == path and line is not None and fragment in m for p, line, m in found), found


def test_async_only_for_centralized() -> None:
    found = _problems(_text("  kind: gossip\n  mode: async", "peers: {count: 4}"))
    assert [(p, m) for p, _, m in found] == [
        ("protocol.mode", "'async' applies only to protocol kind 'centralized'")
    ]


def test_async_takes_validators_min_clients_and_deadlines() -> None:
    # Prepare / Execute
    topo = loads_topology(
        _text(
            "  mode: async\n  buffer_size: 4\n  min_clients: 2\n  round_timeout_s: 5\n"
            "  validators: [{kind: norm_outlier}]"
        )
    )
    # Assert
    p = topo.protocol
    assert (p.min_clients, p.round_timeout_s) == (2, 5.0)
    assert [v.kind for v in p.validators] == ["norm_outlier"]


def test_async_min_clients_above_the_default_buffer_size() -> None:
    found = _problems(
        _text("  mode: async\n  min_clients: 11", "server: {id: server}\n  clients: {count: 12}")
    )
    assert [(p, m) for p, _, m in found] == [
        ("protocol.min_clients", "exceeds the default buffer_size 10")
    ]
