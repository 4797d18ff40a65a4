"""Gossip communication graphs: builders and a connectivity check.

Pure Python with a numpy ``Generator`` for the random kinds, seeded by the
topology seed, so every process of a federation (the launcher and each
``fedbus node``) derives the same neighbours from the same file without any
coordination. Graphs are undirected and simple (no self loops, no repeated
edges); an adjacency maps every peer id to its sorted neighbour ids.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal, TypeVar

import numpy as np

from fedbus.errors import ConfigError
from fedbus.topology.problems import Checked

__all__ = [
    "GRAPH_KINDS",
    "Adjacency",
    "GraphConfig",
    "build_graph",
    "components",
    "edge_count",
    "is_connected",
]

GRAPH_KINDS: Final = (
    "ring",
    "grid",
    "complete",
    "random_regular",
    "erdos_renyi",
    "small_world",
    "edges",
)
_PARAMS: Final[dict[str, tuple[str, ...]]] = {
    "ring": (),
    "grid": ("rows",),
    "complete": (),
    "random_regular": ("degree",),
    "erdos_renyi": ("p",),
    "small_world": ("k", "p"),
    "edges": ("edges",),
}
_REQUIRED: Final[dict[str, tuple[str, ...]]] = {
    "random_regular": ("degree",),
    "erdos_renyi": ("p",),
    "small_world": ("k", "p"),
    "edges": ("edges",),
}
_MAX_TRIES: Final = 200
_T = TypeVar("_T")

Adjacency = dict[str, tuple[str, ...]]
"""Peer id -> sorted neighbour ids; symmetric."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GraphConfig(Checked):
    """Which graph connects the gossip peers.

    Attributes:
        kind: one of `GRAPH_KINDS`.
        rows: grid rows (grid; default: the most square factorisation).
        degree: neighbours per peer (random_regular).
        p: edge probability (erdos_renyi) or rewiring probability (small_world).
        k: ring-lattice neighbours per peer before rewiring, even (small_world).
        edges: explicit undirected edges as pairs of peer ids (edges).
    """

    kind: Literal[
        "ring", "grid", "complete", "random_regular", "erdos_renyi", "small_world", "edges"
    ] = "ring"
    rows: int | None = None
    degree: int | None = None
    p: float | None = None
    k: int | None = None
    edges: tuple[tuple[str, str], ...] | None = None

    def _problems(self) -> Iterator[tuple[str, str]]:
        if self.kind not in GRAPH_KINDS:
            yield "kind", f"must be one of {', '.join(GRAPH_KINDS)}; got {self.kind!r}"
            return
        for name in ("rows", "degree", "p", "k", "edges"):
            given = getattr(self, name) is not None
            if given and name not in _PARAMS[self.kind]:
                yield name, f"not a parameter of graph kind {self.kind!r}"
            if not given and name in _REQUIRED.get(self.kind, ()):
                yield name, f"graph kind {self.kind!r} needs {name}"
        if self.rows is not None and self.rows < 1:
            yield "rows", f"must be at least 1, got {self.rows}"
        if self.degree is not None and self.degree < 1:
            yield "degree", f"must be at least 1, got {self.degree}"
        if self.p is not None and not 0.0 <= self.p <= 1.0:
            yield "p", f"must be in [0, 1], got {self.p}"
        if self.k is not None and (self.k < 2 or self.k % 2):
            yield "k", f"must be an even number >= 2, got {self.k}"
        for i, (a, b) in enumerate(self.edges or ()):
            if a == b:
                yield f"edges[{i}]", f"self loop on {a!r}"


def build_graph(config: GraphConfig, peers: Sequence[str], *, seed: int) -> Adjacency:
    """Build the adjacency of ``peers`` (in their given order) for ``config``.

    Raises:
        ConfigError: the parameters do not fit this many peers (``path`` is
            relative to the graph: ``degree``, ``edges[2]``), or a random
            regular graph could not be drawn.
    """
    n = len(peers)
    rng = np.random.default_rng(seed)
    pairs: set[tuple[int, int]]
    match config.kind:
        case "ring":
            pairs = {(i, (i + 1) % n) for i in range(n)}
        case "grid":
            pairs = _torus(n, config.rows)
        case "complete":
            pairs = {(i, j) for i in range(n) for j in range(i + 1, n)}
        case "random_regular":
            pairs = _random_regular(n, _need(config.degree, "degree"), rng)
        case "erdos_renyi":
            p = _need(config.p, "p")
            pairs = {(i, j) for i in range(n) for j in range(i + 1, n) if rng.random() < p}
        case "small_world":
            pairs = _small_world(n, _need(config.k, "k"), _need(config.p, "p"), rng)
        case "edges":
            pairs = _explicit(_need(config.edges, "edges"), peers)
        case _:
            raise ConfigError(f"unknown graph kind {config.kind!r}", path="kind")
    adjacency: dict[str, set[str]] = {peer: set() for peer in peers}
    for i, j in pairs:
        if i != j:
            adjacency[peers[i]].add(peers[j])
            adjacency[peers[j]].add(peers[i])
    return {peer: tuple(sorted(adjacency[peer])) for peer in peers}


def _need(value: _T | None, name: str) -> _T:
    if value is None:
        raise ConfigError(f"this graph kind needs {name}", path=name)
    return value


def _torus(n: int, rows: int | None) -> set[tuple[int, int]]:
    if rows is None:
        rows = max(r for r in range(1, math.isqrt(n) + 1) if n % r == 0) if n else 1
    if n % rows:
        raise ConfigError(f"rows={rows} does not divide {n} peers", path="rows")
    cols = n // rows
    pairs: set[tuple[int, int]] = set()
    for r in range(rows):
        for c in range(cols):
            here = r * cols + c
            pairs.add((here, r * cols + (c + 1) % cols))
            pairs.add((here, ((r + 1) % rows) * cols + c))
    return pairs


def _random_regular(n: int, degree: int, rng: np.random.Generator) -> set[tuple[int, int]]:
    if degree >= n:
        raise ConfigError(f"degree {degree} needs more than {degree} peers, got {n}", path="degree")
    if (n * degree) % 2:
        raise ConfigError(f"degree {degree} times {n} peers must be even", path="degree")
    # Steger-Wormald pairing: join two random free stubs of non-adjacent
    # nodes; restart on a dead end (rare for degree well below n).
    for _ in range(_MAX_TRIES):
        pairs = _try_regular(n, degree, rng)
        if pairs is not None:
            return pairs
    raise ConfigError(f"could not draw a {degree}-regular graph on {n} peers", path="degree")


def _try_regular(n: int, degree: int, rng: np.random.Generator) -> set[tuple[int, int]] | None:
    free = [node for node in range(n) for _ in range(degree)]
    pairs: set[tuple[int, int]] = set()

    def fits(ia: int, ib: int) -> bool:
        a, b = free[ia], free[ib]
        return a != b and (min(a, b), max(a, b)) not in pairs

    while free:
        pick: tuple[int, int] | None = None
        for _ in range(64):  # cheap random tries first, the full scan only when stuck
            ia, ib = (int(x) for x in rng.integers(len(free), size=2))
            if fits(ia, ib):
                pick = (ia, ib)
                break
        if pick is None:
            options = [
                (ia, ib)
                for ia in range(len(free))
                for ib in range(ia + 1, len(free))
                if fits(ia, ib)
            ]
            if not options:
                return None
            pick = options[int(rng.integers(len(options)))]
        a, b = free[pick[0]], free[pick[1]]
        for index in sorted(pick, reverse=True):
            free[index] = free[-1]
            free.pop()
        pairs.add((min(a, b), max(a, b)))
    return pairs


def _small_world(n: int, k: int, p: float, rng: np.random.Generator) -> set[tuple[int, int]]:
    if k >= n:
        raise ConfigError(f"k={k} must be less than the {n} peers", path="k")
    # Watts-Strogatz: a ring lattice, then each edge's far end rewired with probability p.
    neighbours: list[set[int]] = [set() for _ in range(n)]
    lattice = [(i, (i + j) % n) for j in range(1, k // 2 + 1) for i in range(n)]
    for a, b in lattice:
        neighbours[a].add(b)
        neighbours[b].add(a)
    for a, b in lattice:
        if rng.random() >= p:
            continue
        choices = [c for c in range(n) if c != a and c not in neighbours[a]]
        if not choices:
            continue
        c = choices[int(rng.integers(len(choices)))]
        neighbours[a].discard(b)
        neighbours[b].discard(a)
        neighbours[a].add(c)
        neighbours[c].add(a)
    return {(a, b) for a in range(n) for b in neighbours[a] if a < b}


def _explicit(edges: Sequence[tuple[str, str]], peers: Sequence[str]) -> set[tuple[int, int]]:
    index = {peer: i for i, peer in enumerate(peers)}
    pairs: set[tuple[int, int]] = set()
    for i, (a, b) in enumerate(edges):
        for end, name in ((0, a), (1, b)):
            if name not in index:
                raise ConfigError(f"{name!r} is not a peer", path=f"edges[{i}][{end}]")
        pairs.add((index[a], index[b]))
    return pairs


def components(adjacency: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """Connected components, each in first-seen order, largest first."""
    seen: set[str] = set()
    found: list[list[str]] = []
    for start in adjacency:
        if start in seen:
            continue
        seen.add(start)
        part, queue = [start], deque([start])
        while queue:
            for nxt in adjacency[queue.popleft()]:
                if nxt not in seen:
                    seen.add(nxt)
                    part.append(nxt)
                    queue.append(nxt)
        found.append(part)
    return sorted(found, key=len, reverse=True)


def is_connected(adjacency: Mapping[str, Sequence[str]]) -> bool:
    """Whether every peer can reach every other (an empty graph counts as connected)."""
    return len(components(adjacency)) <= 1


def edge_count(adjacency: Mapping[str, Sequence[str]]) -> int:
    """Number of undirected edges."""
    return sum(len(v) for v in adjacency.values()) // 2
