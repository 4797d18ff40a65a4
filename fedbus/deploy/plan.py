"""What a deployment consists of, derived from a topology: brokers, nodes, namespaces.

The plan is the one place that decides who talks to which broker in which
topic namespace; the ACL, mosquitto config and compose renderers only read it.

* **Centralized and gossip:** one broker (service ``mosquitto``), one
  namespace, the topology name (docs/running.md, "Runs, run ids and topics").
* **Hierarchical:** the cloud broker serves the server's children in
  namespace ``<name>``; every edge gets a broker of its own (service
  ``mosquitto-<edge-id>``) for its group, in namespace ``<name>.<edge-id>``
  (`fedbus.nodes.namespaces`). This is the layout the hierarchical runtime
  runs (`fedbus.launch.hierarchical`, docs/hierarchical-gossip.md), so the
  plan follows it rather than routing around it: an edge holds two
  connections with one identity, to its own broker as the server of its
  namespace and straight to its parent's broker as a member of the parent's
  namespace (no bridge: a bridge logging in as the edge would share the
  edge's client id and the two would knock each other off). A device logs
  in to its edge's broker, and also to every broker of its re-homing
  fallbacks (``protocol.rehome``: the grandparent's for ``parent``; the
  sibling edges' and then the grandparent's for ``sibling``, the runtime's
  `fallback_chain`), so it holds credentials there as a member of that
  aggregator's namespace.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Final

from fedbus._types import NodeId
from fedbus.errors import ConfigError
from fedbus.protocols.hierarchical_rehoming import fallback_chain
from fedbus.topics import DEFAULT_PREFIX, validate_id
from fedbus.topology import EdgeConfig, NodeInfo, NodeRole, Topology

__all__ = [
    "CLOUD_BROKER",
    "BrokerPlan",
    "DeploymentPlan",
    "NodePlan",
    "Uplink",
    "edge_namespace",
    "plan_deployment",
]

CLOUD_BROKER: Final = "mosquitto"
"""Compose service (and host name) of the federation's broker."""


def edge_namespace(name: str, edge_id: str) -> str:
    """The topic namespace of ``edge_id``'s group: ``<name>.<edge-id>`` (one topic level).

    The same rule as the edge runtime's ``fedbus.nodes.edge.namespace_of``
    (a test keeps them equal): hashed when it would exceed 64 characters.
    Not imported from there: a deployment is generated without the node runtimes.
    """
    full = f"{name}.{edge_id}"
    if len(full) > 64:
        full = f"{name[:47]}.{hashlib.sha256(edge_id.encode()).hexdigest()[:16]}"
    return validate_id(full, what="edge namespace")


@dataclass(frozen=True, slots=True, kw_only=True)
class Uplink:
    """An edge's second connection: straight to its parent's broker, as the edge.

    Attributes:
        edge: the edge's node id (its username and client id there too).
        parent: the parent aggregator's id (server or edge).
        namespace: the parent level's namespace.
        broker: the parent's broker service, where the edge connects.
    """

    edge: str
    parent: str
    namespace: str
    broker: str


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerPlan:
    """One mosquitto service and what its password and ACL files must hold.

    Attributes:
        service: compose service name, also its host name on the compose network.
        namespace: the namespace of the nodes served here (its home namespace).
        aggregator: the node that aggregates that namespace (None for gossip).
        nodes: ids of the nodes at home here (the aggregator first, then its clients).
        edges: ids of child edges whose upward connection logs in here (members
            of the namespace, like a client).
        guests: devices of other edges that may re-home here (members too, once
            re-homed; they hold credentials in advance because their edge is
            gone when they need them).
        uplink: for an edge broker, where the edge's upward connection goes.
        neighbours: gossip neighbours of each peer (both directions).
    """

    service: str
    namespace: str
    aggregator: str | None
    nodes: tuple[str, ...]
    edges: tuple[str, ...] = ()
    guests: tuple[str, ...] = ()
    uplink: Uplink | None = None
    neighbours: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def users(self) -> tuple[str, ...]:
        """Usernames of this broker's password file: home nodes, child edges, guests."""
        return self.nodes + self.edges + self.guests

    @property
    def devices(self) -> tuple[str, ...]:
        """Members that run a device (home clients and guests), not the aggregator or edges."""
        return tuple(n for n in self.nodes if n != self.aggregator) + self.guests


@dataclass(frozen=True, slots=True, kw_only=True)
class NodePlan:
    """One node: which broker it reaches and whether ``fedbus deploy`` gives it a service.

    Attributes:
        id: node id (MQTT client id and username).
        role: server, edge, client or peer.
        broker: its home broker service (an edge's own, a device's edge's).
        brokers: every broker it may log in to, home first (an edge's parent's
            broker; a device's re-homing fallbacks in order).
        external: joins from elsewhere (credentials are generated, no service).
    """

    id: str
    role: NodeRole
    broker: str
    brokers: tuple[str, ...] = ()
    external: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class DeploymentPlan:
    """Every broker and node of a deployment.

    Attributes:
        name: the topology name (its root namespace).
        project: the compose project name (lower case, as compose requires).
        brokers: the cloud broker first, then one per edge, depth first.
        nodes: in topology order.
        prefix: the topic prefix.
    """

    name: str
    project: str
    brokers: tuple[BrokerPlan, ...]
    nodes: tuple[NodePlan, ...]
    prefix: str = DEFAULT_PREFIX

    def broker(self, service: str) -> BrokerPlan:
        """The broker of ``service``.

        Raises:
            KeyError: no such broker.
        """
        for plan in self.brokers:
            if plan.service == service:
                return plan
        raise KeyError(service)

    def node(self, node_id: str) -> NodePlan:
        """The plan of ``node_id``.

        Raises:
            KeyError: no such node.
        """
        for plan in self.nodes:
            if plan.id == node_id:
                return plan
        raise KeyError(node_id)


def edge_broker(edge_id: str) -> str:
    """Compose service name of ``edge_id``'s broker."""
    return f"{CLOUD_BROKER}-{edge_id}"


def _project(name: str) -> str:
    project = re.sub(r"[^a-z0-9_-]+", "-", name.lower()).strip("-_")
    return f"fedbus-{project}" if project else "fedbus"


def plan_deployment(topology: Topology) -> DeploymentPlan:
    """Plan the brokers and nodes of ``topology`` (see the module docstring).

    Raises:
        ConfigError: a node id collides with a broker service name, or an
            edge namespace is not a valid topic level.
    """
    infos = topology.node_infos()
    external = set(topology.nodes.external)
    if topology.protocol.kind == "gossip" or topology.nodes.server is None:
        adjacency = topology.adjacency()
        both: dict[str, set[str]] = {peer: set() for peer in topology.nodes.peers}
        for peer, nbrs in adjacency.items():
            for nbr in nbrs:
                both.setdefault(peer, set()).add(nbr)
                both.setdefault(nbr, set()).add(peer)
        neighbours = {peer: tuple(sorted(nbrs)) for peer, nbrs in both.items()}
        peers = tuple(info.id for info in infos)
        brokers = [
            BrokerPlan(
                service=CLOUD_BROKER,
                namespace=topology.name,
                aggregator=None,
                nodes=peers,
                neighbours=neighbours,
            )
        ]
        nodes = [
            NodePlan(
                id=i.id,
                role=i.role,
                broker=CLOUD_BROKER,
                brokers=(CLOUD_BROKER,),
                external=i.id in external,
            )
            for i in infos
        ]
    else:
        server = topology.nodes.server
        brokers = [
            BrokerPlan(
                service=CLOUD_BROKER,
                namespace=topology.name,
                aggregator=server,
                nodes=(server, *topology.nodes.clients),
                edges=tuple(edge.id for edge in topology.nodes.edges),
            )
        ]
        for edge in topology.nodes.edges:
            _plan_edge(topology.name, edge, server, topology.name, CLOUD_BROKER, brokers)
        reach = _reach(topology, infos, brokers)
        brokers = [
            replace(plan, guests=tuple(
                d for d, bs in reach.items()
                if plan.service in bs[1:] and d not in plan.nodes + plan.edges
            ))
            for plan in brokers
        ]  # fmt: skip
        nodes = [
            NodePlan(id=i.id, role=i.role, broker=reach[i.id][0], brokers=reach[i.id],
                     external=i.id in external)
            for i in infos
        ]  # fmt: skip
    services = {plan.service for plan in brokers}
    for node in nodes:
        if node.id in services:
            raise ConfigError(
                f"node id {node.id!r} collides with the broker service of the same name; "
                "rename the node",
                path="nodes",
            )
    return DeploymentPlan(
        name=topology.name, project=_project(topology.name), brokers=tuple(brokers),
        nodes=tuple(nodes),
    )  # fmt: skip


def _plan_edge(
    name: str,
    edge: EdgeConfig,
    parent: str,
    parent_namespace: str,
    parent_broker: str,
    out: list[BrokerPlan],
) -> None:
    service = edge_broker(edge.id)
    namespace = edge_namespace(name, edge.id)
    out.append(
        BrokerPlan(
            service=service,
            namespace=namespace,
            aggregator=edge.id,
            nodes=(edge.id, *edge.clients),
            edges=tuple(child.id for child in edge.edges),
            uplink=Uplink(
                edge=edge.id, parent=parent, namespace=parent_namespace, broker=parent_broker
            ),
        )
    )
    for child in edge.edges:
        _plan_edge(name, child, edge.id, namespace, service, out)


def _children_broker(node: str, server: str) -> str:
    """The broker where ``node``'s children log in (the runtime's ``child_connects``)."""
    return CLOUD_BROKER if node == server else edge_broker(node)


def _reach(
    topology: Topology, infos: Sequence[NodeInfo], brokers: Sequence[BrokerPlan]
) -> dict[str, tuple[str, ...]]:
    """Every broker each node logs in to, home first (see the module docstring).

    An edge: its own, then its parent's children's broker. A device of an
    edge: its edge's, then the brokers of its fallbacks, from the same
    `fallback_chain` the runtime uses (``fedbus.launch.hierarchical.Plan``),
    so credentials and ACLs cover exactly where it can go. The cloud's own
    clients never re-home.
    """
    server = topology.nodes.server
    assert server is not None
    by_id = {i.id: i for i in infos}
    home = {n: b.service for b in brokers for n in b.nodes}
    reach: dict[str, tuple[str, ...]] = {}
    for info in infos:
        parent = info.parent
        if info.role is NodeRole.EDGE and parent is not None:
            reach[info.id] = (home[info.id], _children_broker(parent, server))
            continue
        grandparent = None if parent is None else by_id[parent].parent
        if parent is None or grandparent is None:
            reach[info.id] = (home[info.id],)
            continue
        siblings = [c for c in by_id[grandparent].children if by_id[c].role is NodeRole.EDGE]
        chain = fallback_chain(
            topology.protocol.rehome, parent=NodeId(parent), grandparent=NodeId(grandparent),
            siblings=[NodeId(s) for s in siblings],
        )  # fmt: skip
        targets = (_children_broker(t, server) for t in chain)
        reach[info.id] = tuple(dict.fromkeys((home[info.id], *targets)))
    return reach
