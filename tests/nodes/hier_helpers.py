"""A small hierarchical digits topology for the runtime tests (cloud, two edges of five)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedbus.topology import Topology, loads_topology


def hier_text(
    *,
    rounds: int = 4,
    edge_a: str = "",
    protocol: str = "",
    extra: str = "",
    broker: str = "memory",
    name: str = "hier-levels",
    edges: str = "",
) -> str:
    """The YAML: ``edge_a`` adds keys to edge-a, ``protocol`` to the protocol, ``extra`` sections.

    ``edges`` replaces the two edges of five devices (YAML list items, indented by 4).
    """
    edges = (
        edges
        or f"""
    - {{id: edge-a, clients: 5{edge_a}}}
    - {{id: edge-b, clients: 5}}"""
    )
    return f"""
name: {name}
seed: 0
broker: {broker}
data: {{dataset: digits, partition: {{kind: dirichlet, alpha: 0.5}}}}
model: {{kind: mlp, hidden: [16]}}
training: {{epochs: 1, batch_size: 16, lr: 0.05}}
protocol: {{kind: hierarchical, rounds: {rounds}, edge_rounds: 2, round_timeout_s: 20,
            join_timeout_s: 20{protocol}}}
nodes:
  server: {{id: cloud}}
  edges:{edges}
{extra}
"""


def hier(**kwargs: Any) -> Topology:
    """`hier_text`, loaded."""
    return loads_topology(hier_text(**kwargs))


def rows(out: Path) -> list[dict[str, Any]]:
    """The metrics rows of a results folder."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
