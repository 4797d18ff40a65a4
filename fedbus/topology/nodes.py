"""The ``nodes:`` section: who takes part, and how they are arranged.

Three shapes, one per protocol kind: a server with clients (centralized), a
server over nested edges that hold the devices (hierarchical), or peers on a
graph (gossip). Generated ids follow DESIGN.md: ``client-<i>``,
``<edge-id>-client-<i>``, ``peer-<i>``. Every id must be a valid topic level
(`fedbus.topics.validate_id`) and unique in the federation, because it is
both the MQTT client id and the sender level of its topics.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from fedbus.errors import ConfigError
from fedbus.topics import validate_id
from fedbus.topology.graphs import Adjacency, GraphConfig, build_graph, components
from fedbus.topology.model import AggregatorSpec, BrokerSpec
from fedbus.topology.problems import Checked, join_path
from fedbus.topology.robustness import ValidatorSpec

__all__ = ["SCAFFOLD_REFUSAL", "EdgeConfig", "NodesConfig", "client_ids"]

SCAFFOLD_REFUSAL = (
    "scaffold is not supported under protocol kind 'hierarchical' yet: its control "
    "variates do not cross edge aggregators (use it with 'centralized')"
)
"""Why SCAFFOLD is refused at every level of a hierarchy (issue 5; a documented limit)."""


def client_ids(count: int, owner: str | None = None) -> tuple[str, ...]:
    """The generated ids of ``count`` clients: ``client-<i>`` or ``<owner>-client-<i>``."""
    prefix = f"{owner}-client-" if owner else "client-"
    return tuple(f"{prefix}{i}" for i in range(count))


def _id_problem(path: str, value: str) -> Iterator[tuple[str, str]]:
    try:
        validate_id(value)
    except ConfigError as exc:
        yield path, exc.message


@dataclass(frozen=True, slots=True, kw_only=True)
class EdgeConfig(Checked):
    """An edge aggregator: a server toward its children, a client toward its parent.

    Attributes:
        id: the edge's node id.
        clients: ids of the devices it serves directly.
        edges: edges below it (any depth).
        broker: the broker its children use; None shares the parent's.
        round_timeout_s: this level's deadline; None inherits the parent's.
        min_clients: this level's quorum among its children (devices and
            edges); None inherits the parent's, capped at the child count.
        aggregator: this level's aggregator; None inherits the parent's.
        validators: this level's update checks; None inherits the parent's
            (``[]`` runs none here).
    """

    id: str
    clients: tuple[str, ...] = ()
    edges: tuple[EdgeConfig, ...] = ()
    broker: BrokerSpec | None = None
    round_timeout_s: float | None = None
    min_clients: int | None = None
    aggregator: AggregatorSpec | None = None
    validators: tuple[ValidatorSpec, ...] | None = None

    def _problems(self) -> Iterator[tuple[str, str]]:
        yield from _id_problem("id", self.id)
        if self.aggregator is not None and self.aggregator.kind == "scaffold":
            yield "aggregator", SCAFFOLD_REFUSAL
        gates = [i for i, v in enumerate(self.validators or ()) if v.kind == "validation_accuracy"]
        if len(gates) > 1:
            yield f"validators[{gates[1]}]", "validation_accuracy may be given once"
        for i, client in enumerate(self.clients):
            yield from _id_problem(f"clients[{i}]", client)
        if not self.clients and not self.edges:
            yield "", f"edge {self.id!r} needs clients or edges below it"
        if self.round_timeout_s is not None and not (
            self.round_timeout_s > 0 and math.isfinite(self.round_timeout_s)
        ):
            yield "round_timeout_s", f"must be a positive number, got {self.round_timeout_s}"
        children = len(self.clients) + len(self.edges)
        if self.min_clients is not None and not 1 <= self.min_clients <= max(children, 1):
            yield (
                "min_clients",
                f"must be in 1..{children} (the children of {self.id!r}), got {self.min_clients}",
            )
        if self.broker is not None and self.broker.kind == "memory":
            yield (
                "broker",
                "an edge broker is a URL or 'embedded'; 'memory' applies to the whole federation",
            )

    @property
    def children(self) -> tuple[str, ...]:
        """Ids directly below this edge: its devices, then its edges."""
        return self.clients + tuple(edge.id for edge in self.edges)

    def walk(self, path: str = "") -> Iterator[tuple[str, EdgeConfig]]:
        """This edge and every edge below it, depth first, with relative paths."""
        yield path, self
        for i, edge in enumerate(self.edges):
            yield from edge.walk(join_path(path, f"edges[{i}]"))


@dataclass(frozen=True, slots=True, kw_only=True)
class NodesConfig(Checked):
    """Every node of the federation and how they connect.

    Attributes:
        server: the server (cloud) id; None for gossip.
        clients: client ids directly under the server (centralized).
        edges: the top-level edges (hierarchical).
        peers: peer ids (gossip).
        graph: how peers connect (gossip); None with no peers.
        allow_disconnected: accept a graph with more than one component.
        external: ids that ``fedbus run`` does not start (``fedbus node`` joins them).
        graph_seed: seed of random graphs; the loader sets the topology seed.
    """

    server: str | None = None
    clients: tuple[str, ...] = ()
    edges: tuple[EdgeConfig, ...] = ()
    peers: tuple[str, ...] = ()
    graph: GraphConfig | None = None
    allow_disconnected: bool = False
    external: tuple[str, ...] = ()
    graph_seed: int = 0

    def _problems(self) -> Iterator[tuple[str, str]]:
        if self.server is not None:
            yield from _id_problem("server.id", self.server)
        for i, client in enumerate(self.clients):
            yield from _id_problem(f"clients[{i}]", client)
        for i, peer in enumerate(self.peers):
            yield from _id_problem(f"peers[{i}]", peer)
        yield from self._shape_problems()
        yield from self._unique_problems()
        known = set(self.all_ids())
        for i, name in enumerate(self.external):
            if name not in known:
                yield f"external[{i}]", f"no node named {name!r}"
        yield from self._graph_problems()

    def _shape_problems(self) -> Iterator[tuple[str, str]]:
        if self.clients and self.edges:
            yield "clients", "with edges, clients belong to the edges (edges[i].clients)"
        if self.peers:
            for name in ("server", "clients", "edges"):
                if getattr(self, name):
                    yield name, "gossip peers have no server, clients or edges"
        if (self.graph is not None) != bool(self.peers):
            yield "graph", "a graph goes with peers and only with them"

    def _unique_problems(self) -> Iterator[tuple[str, str]]:
        counts = Counter(self.all_ids())
        seen: set[str] = set()
        for path, name in self._paths_of_ids():
            if counts[name] > 1 and name in seen:
                yield path, f"node id {name!r} is used more than once"
            seen.add(name)
        for name, n in Counter(self.external).items():
            if n > 1:
                yield "external", f"{name!r} is listed more than once"

    def _graph_problems(self) -> Iterator[tuple[str, str]]:
        if self.graph is None or not self.peers:
            return
        try:
            adjacency = self.adjacency()
        except ConfigError as exc:
            yield join_path("graph", exc.path or ""), exc.message
            return
        parts = components(adjacency)
        if len(parts) > 1 and not self.allow_disconnected:
            smallest = ", ".join(parts[-1][:5]) + (" ..." if len(parts[-1]) > 5 else "")
            yield (
                "graph",
                (
                    f"the graph is disconnected ({len(parts)} components; e.g. {smallest} "
                    "cannot reach the rest); set allow_disconnected: true to accept it"
                ),
            )

    def _paths_of_ids(self) -> Iterator[tuple[str, str]]:
        if self.server is not None:
            yield "server.id", self.server
        for i, client in enumerate(self.clients):
            yield f"clients[{i}]", client
        for i, top in enumerate(self.edges):
            for path, edge in top.walk(f"edges[{i}]"):
                yield f"{path}.id", edge.id
                for j, client in enumerate(edge.clients):
                    yield f"{path}.clients[{j}]", client
        for i, peer in enumerate(self.peers):
            yield f"peers[{i}]", peer

    def all_ids(self) -> tuple[str, ...]:
        """Every node id: server, then clients and edges depth first, then peers."""
        return tuple(name for _, name in self._paths_of_ids())

    def all_edges(self) -> tuple[EdgeConfig, ...]:
        """Every edge at every depth, depth first."""
        return tuple(edge for top in self.edges for _, edge in top.walk())

    def adjacency(self) -> Adjacency:
        """The gossip graph over the peers (empty without peers).

        Raises:
            ConfigError: the graph parameters do not fit the peers.
        """
        if self.graph is None or not self.peers:
            return {}
        return build_graph(self.graph, self.peers, seed=self.graph_seed)
