"""The root `Topology`, the cross-section checks, and the view the launcher needs.

`Topology.node_infos` flattens the node tree into one record per node (role,
parent, children, neighbours, whether it is external, and the effective
settings of its level), so the launcher and ``fedbus node`` never walk nested
edges or re-derive inheritance themselves.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterator
from dataclasses import dataclass, field

from fedbus.errors import ConfigError
from fedbus.topics import validate_id
from fedbus.topology.graphs import Adjacency
from fedbus.topology.model import (
    AggregatorSpec,
    BrokerSpec,
    CrashFault,
    DataConfig,
    Fault,
    ModelConfig,
    TrainingConfig,
)
from fedbus.topology.nodes import EdgeConfig, NodesConfig
from fedbus.topology.problems import Checked
from fedbus.topology.protocol import ProtocolConfig
from fedbus.topology.robustness import AttackSpec, ValidatorSpec, assign_attackers

__all__ = ["NodeInfo", "NodeRole", "Topology", "apply_overrides"]


class NodeRole(enum.Enum):
    """What a node does in the federation."""

    SERVER = "server"
    EDGE = "edge"
    CLIENT = "client"
    PEER = "peer"


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeInfo:
    """One node as the runtime sees it, with inherited settings resolved.

    Attributes:
        id: node id (MQTT client id, topic level).
        role: server, edge, client or peer.
        parent: the aggregator it reports to (None for the server and peers).
        children: ids it aggregates (server, edges).
        neighbours: gossip neighbours (peers).
        external: not started by ``fedbus run``; joins via ``fedbus node``.
        depth: 0 for the server and peers, +1 per level below.
        broker: the broker this node connects to for its parent or peers.
        child_broker: the broker its children use (server, edges); equals
            ``broker`` unless an edge brings its own.
        round_timeout_s: its level's deadline (aggregators and peers).
        min_clients: its level's quorum among its children (aggregators).
        aggregator: its level's aggregator (aggregators and peers).
        validators: its level's update checks (the server and edges of a hierarchy).
    """

    id: str
    role: NodeRole
    parent: str | None = None
    children: tuple[str, ...] = ()
    neighbours: tuple[str, ...] = ()
    external: bool = False
    depth: int = 0
    broker: BrokerSpec = field(default_factory=BrokerSpec)
    child_broker: BrokerSpec | None = None
    round_timeout_s: float | None = None
    min_clients: int | None = None
    aggregator: AggregatorSpec | None = None
    validators: tuple[ValidatorSpec, ...] = ()

    @property
    def holds_data(self) -> bool:
        """Whether the node trains on data (clients and peers)."""
        return self.role in (NodeRole.CLIENT, NodeRole.PEER)


@dataclass(frozen=True, slots=True, kw_only=True)
class Topology(Checked):
    """A whole federation, as read from a topology YAML file.

    Attributes:
        name: run name (results folder, run id); a valid topic level.
        seed: seeds partitions, selection, graphs and initial weights.
        broker: the federation's broker.
        data: dataset and partition; None means nodes bring their own data
            (``fedbus node --data``), which makes ``federated`` evaluation the default.
        model: the model family or factory.
        training: local training settings.
        protocol: protocol kind, rounds, selection, deadlines, aggregator.
        nodes: who takes part.
        faults: faults injected in simulation, in file order.
        attacks: simulated attackers among the started data-holding nodes.
    """

    name: str
    seed: int = 0
    broker: BrokerSpec = field(default_factory=BrokerSpec)
    data: DataConfig | None = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    nodes: NodesConfig = field(default_factory=NodesConfig)
    faults: tuple[Fault, ...] = ()
    attacks: tuple[AttackSpec, ...] = ()

    def _problems(self) -> Iterator[tuple[str, str]]:
        try:
            validate_id(self.name, what="name")
        except ConfigError as exc:
            yield "name", exc.message
        if self.seed < 0:
            yield "seed", f"must be >= 0, got {self.seed}"
        yield from self._shape_problems()
        yield from self._data_problems()
        yield from self._fault_problems()
        yield from self._attack_problems()

    def _shape_problems(self) -> Iterator[tuple[str, str]]:
        kind, nodes, protocol = self.protocol.kind, self.nodes, self.protocol
        if kind in ("centralized", "hierarchical") and nodes.server is None:
            yield "nodes.server", f"protocol {kind!r} needs a server"
        if kind == "centralized":
            if not nodes.clients:
                yield "nodes.clients", "protocol 'centralized' needs clients"
            for name in ("edges", "peers"):
                if getattr(nodes, name):
                    yield (
                        f"nodes.{name}",
                        "applies only to protocol kind "
                        + ("'hierarchical'" if name == "edges" else "'gossip'"),
                    )
            n = len(nodes.clients)
            if protocol.clients_per_round is not None and n and protocol.clients_per_round > n:
                yield "protocol.clients_per_round", f"exceeds the {n} clients"
            selected = protocol.selected_per_round(n)
            if n and protocol.min_clients > selected:
                yield "protocol.min_clients", f"exceeds the {selected} clients selected per round"
            if protocol.buffer_size is not None and n and protocol.buffer_size > n:
                # K updates from n < K clients would need one client twice per version.
                yield "protocol.buffer_size", f"exceeds the {n} clients"
            # Async's default K is min(10, clients) (fedbus.launch.build.fedbuff_config).
            default_k = protocol.mode == "async" and protocol.buffer_size is None
            if default_k and n > 10 and protocol.min_clients > 10:
                yield "protocol.min_clients", "exceeds the default buffer_size 10"
        elif kind == "hierarchical":
            if not nodes.edges:
                yield "nodes.edges", "protocol 'hierarchical' needs edges"
            if nodes.peers:
                yield "nodes.peers", "applies only to protocol kind 'gossip'"
            if nodes.edges and protocol.min_clients > len(nodes.edges):
                yield (
                    "protocol.min_clients",
                    (f"the cloud's quorum exceeds its {len(nodes.edges)} top-level edges"),
                )
        elif kind == "gossip" and not nodes.peers:
            yield "nodes.peers", "protocol 'gossip' needs peers"

    def _data_problems(self) -> Iterator[tuple[str, str]]:
        if self.data is not None:
            return
        if self.protocol.evaluate == "central":
            yield "protocol.evaluate", "'central' needs a data section for the held-out test split"
        external = set(self.nodes.external)
        started = [i.id for i in self.node_infos() if i.holds_data and i.id not in external]
        if started:
            shown = ", ".join(started[:3]) + (" ..." if len(started) > 3 else "")
            yield "data", f"missing, but {shown} would be started without data (mark them external)"

    def _fault_problems(self) -> Iterator[tuple[str, str]]:
        known, external = set(self.nodes.all_ids()), set(self.nodes.external)
        for i, fault in enumerate(self.faults):
            if not isinstance(fault, CrashFault):
                continue
            for j, name in enumerate(fault.nodes):
                if name not in known:
                    yield f"faults[{i}].nodes[{j}]", f"no node named {name!r}"
                elif name in external:
                    yield (
                        f"faults[{i}].nodes[{j}]",
                        f"{name!r} is external: fedbus run cannot crash it",
                    )
            if fault.at_round > self.protocol.rounds:
                yield f"faults[{i}].at_round", f"after the last round ({self.protocol.rounds})"

    def _attack_problems(self) -> Iterator[tuple[str, str]]:
        infos = {i.id: i for i in self.node_infos()}
        owner: dict[str, int] = {}
        for i, attack in enumerate(self.attacks):
            for j, name in enumerate(attack.nodes):
                info = infos.get(name)
                where = f"attacks[{i}].nodes[{j}]"
                if info is None:
                    yield where, f"no node named {name!r}"
                elif info.external:
                    yield where, f"{name!r} is external: attacks are simulated in started nodes"
                elif not info.holds_data:
                    yield (
                        where,
                        f"{name!r} is a {info.role.value}; attackers train (clients, peers)",
                    )
                elif name in owner:
                    yield where, f"{name!r} already attacks in attacks[{owner[name]}]"
                else:
                    owner[name] = i
            for j, r in enumerate(attack.rounds):
                if r > self.protocol.rounds:
                    yield (
                        f"attacks[{i}].rounds[{j}]",
                        f"after the last round ({self.protocol.rounds})",
                    )
        if not self.attacks:
            return
        pool = self.attack_pool()
        for i, (attack, chosen) in enumerate(
            zip(self.attacks, assign_attackers(self.attacks, pool, self.seed), strict=True)
        ):
            if attack.nodes or (attack.fraction is not None and attack.fraction <= 0):
                continue
            if not chosen:
                yield (
                    f"attacks[{i}].fraction",
                    f"selects no attacker among the {len(pool)} started data-holding node(s)",
                )

    def attack_pool(self) -> tuple[str, ...]:
        """The nodes attackers are drawn from: data-holding nodes that fedbus run starts."""
        return tuple(i.id for i in self.node_infos() if i.holds_data and not i.external)

    def attackers(self) -> list[tuple[str, ...]]:
        """Each attack's attacking nodes, drawn with the topology seed (`assign_attackers`)."""
        return assign_attackers(self.attacks, self.attack_pool(), self.seed)

    # -- the runtime's view -------------------------------------------------

    def node_infos(self) -> tuple[NodeInfo, ...]:
        """Every node with its role and effective settings, server first."""
        nodes, protocol, external = self.nodes, self.protocol, set(self.nodes.external)
        infos: list[NodeInfo] = []
        if nodes.server is not None:
            children = nodes.clients or tuple(e.id for e in nodes.edges)
            infos.append(
                NodeInfo(
                    id=nodes.server,
                    role=NodeRole.SERVER,
                    children=children,
                    external=nodes.server in external,
                    broker=self.broker,
                    child_broker=self.broker,
                    round_timeout_s=protocol.round_timeout_s,
                    min_clients=min(protocol.min_clients, max(len(children), 1)),
                    aggregator=protocol.aggregator,
                    validators=protocol.validators,
                )
            )
            for client in nodes.clients:
                infos.append(self._leaf(client, nodes.server, 1, self.broker, external))
            for edge in nodes.edges:
                self._edge_infos(edge, infos, parent=infos[0], external=external)
        try:
            adjacency = nodes.adjacency()
        except ConfigError:  # reported by NodesConfig; no neighbours rather than a crash here
            adjacency = {}
        for peer in nodes.peers:
            infos.append(
                NodeInfo(
                    id=peer,
                    role=NodeRole.PEER,
                    neighbours=adjacency.get(peer, ()),
                    external=peer in external,
                    broker=self.broker,
                    round_timeout_s=protocol.round_timeout_s,
                    aggregator=protocol.aggregator,
                )
            )
        return tuple(infos)

    @staticmethod
    def _leaf(
        name: str, parent: str, depth: int, broker: BrokerSpec, external: set[str]
    ) -> NodeInfo:
        return NodeInfo(
            id=name,
            role=NodeRole.CLIENT,
            parent=parent,
            external=name in external,
            depth=depth,
            broker=broker,
        )

    def _edge_infos(
        self, edge: EdgeConfig, out: list[NodeInfo], *, parent: NodeInfo, external: set[str]
    ) -> None:
        up = parent.child_broker or parent.broker
        down = edge.broker or up
        children = edge.children
        inherited = parent.min_clients or 1
        info = NodeInfo(
            id=edge.id,
            role=NodeRole.EDGE,
            parent=parent.id,
            children=children,
            external=edge.id in external,
            depth=parent.depth + 1,
            broker=up,
            child_broker=down,
            round_timeout_s=edge.round_timeout_s or parent.round_timeout_s,
            min_clients=edge.min_clients or min(inherited, max(len(children), 1)),
            aggregator=edge.aggregator or parent.aggregator,
            validators=parent.validators if edge.validators is None else edge.validators,
        )
        out.append(info)
        for client in edge.clients:
            out.append(self._leaf(client, edge.id, info.depth + 1, down, external))
        for child in edge.edges:
            self._edge_infos(child, out, parent=info, external=external)

    def node(self, node_id: str) -> NodeInfo:
        """The `NodeInfo` of ``node_id``.

        Raises:
            ConfigError: no such node (e.g. a typo in ``fedbus node --id``).
        """
        for info in self.node_infos():
            if info.id == node_id:
                return info
        raise ConfigError(f"topology {self.name!r} has no node {node_id!r}", path="--id")

    def ids(self, role: NodeRole | None = None) -> tuple[str, ...]:
        """Node ids, all or of one role, in `node_infos` order."""
        return tuple(i.id for i in self.node_infos() if role is None or i.role is role)

    def adjacency(self) -> Adjacency:
        """The gossip graph (empty for the other protocols)."""
        return self.nodes.adjacency()


def apply_overrides(
    topology: Topology,
    *,
    rounds: int | None = None,
    seed: int | None = None,
    broker_url: str | None = None,
) -> Topology:
    """Apply the ``--rounds``, ``--seed`` and ``--broker`` command-line overrides.

    ``broker_url`` replaces only where the federation's broker is: credentials,
    certificates and ``max_payload_bytes`` from the file stay. It may also be
    ``embedded`` or ``memory``. Edge brokers are left alone.

    Raises:
        TopologyError: the result is invalid (e.g. a crash fault after the new last round).
        ConfigError: ``broker_url`` is not a usable URL.
    """
    changes: dict[str, object] = {}
    if rounds is not None:
        changes["protocol"] = dataclasses.replace(topology.protocol, rounds=rounds)
    if seed is not None:
        changes["seed"] = seed
        changes["nodes"] = dataclasses.replace(topology.nodes, graph_seed=seed)
    if broker_url is not None:
        changes["broker"] = _replace_broker(topology.broker, broker_url)
    return dataclasses.replace(topology, **changes)  # type: ignore[arg-type]


def _replace_broker(current: BrokerSpec, url: str) -> BrokerSpec:
    size, client = current.max_payload_bytes, current.client
    if url in ("embedded", "memory"):
        return BrokerSpec(kind=url, max_payload_bytes=size, client=client)  # type: ignore[arg-type]
    if current.config is None:
        spec = BrokerSpec.from_url(url, max_payload_bytes=size)
        return dataclasses.replace(spec, client=client)
    keep = {
        f.name: getattr(current.config, f.name)
        for f in dataclasses.fields(current.config)
        if f.name not in ("host", "port", "tls")
    }
    if "@" in url.partition("://")[2]:
        keep.pop("username")  # the URL names its own user
    return dataclasses.replace(BrokerSpec.from_url(url, **keep), client=client)
