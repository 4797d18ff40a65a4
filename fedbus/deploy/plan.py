"""What a deployment consists of, derived from a topology: brokers, nodes, namespaces.

The plan is the one place that decides who talks to which broker in which
topic namespace; the ACL, mosquitto config and compose renderers only read it.

* **Centralized and gossip:** one broker (service ``mosquitto``), one
  namespace, the topology name (docs/running.md, "Runs, run ids and topics").
* **Hierarchical:** the cloud broker serves the server's children in
  namespace ``<name>``; every edge gets a broker of its own (service
  ``mosquitto-<edge-id>``) for its group, in namespace ``<name>.<edge-id>``
  (`fedbus.nodes.namespaces`). The edge's container connects to its own
  broker only, for both levels; its upward traffic (its topics in the
  parent's namespace) crosses to the parent's broker over a mosquitto bridge
  that logs in there as the edge, so the parent's broker applies the same
  ACL to the bridge as to a node connected directly. Devices and nested
  edges never reach beyond their edge's broker.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from fedbus.errors import ConfigError
from fedbus.topics import DEFAULT_PREFIX, validate_id
from fedbus.topology import EdgeConfig, NodeRole, Topology

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
    """An edge's link to its parent level, carried by a bridge from the edge's broker.

    Attributes:
        edge: the edge's node id (the bridge's username at the parent broker).
        parent: the parent aggregator's id (server or edge).
        namespace: the parent level's namespace.
        broker: the parent's broker service, where the bridge connects.
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
        nodes: ids of the nodes whose connections end here (the aggregator included).
        bridged: ids of child edges whose bridges log in here (members of the namespace).
        uplink: for an edge broker, the edge's link upward.
        neighbours: gossip neighbours of each peer (both directions).
    """

    service: str
    namespace: str
    aggregator: str | None
    nodes: tuple[str, ...]
    bridged: tuple[str, ...] = ()
    uplink: Uplink | None = None
    neighbours: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def users(self) -> tuple[str, ...]:
        """Usernames of this broker's password file: its nodes, then bridges from below."""
        return self.nodes + self.bridged


@dataclass(frozen=True, slots=True, kw_only=True)
class NodePlan:
    """One node: which broker it reaches and whether ``fedbus deploy`` gives it a service.

    Attributes:
        id: node id (MQTT client id and username).
        role: server, edge, client or peer.
        broker: the broker service it connects to.
        external: joins from elsewhere (credentials are generated, no service).
    """

    id: str
    role: NodeRole
    broker: str
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
            NodePlan(id=i.id, role=i.role, broker=CLOUD_BROKER, external=i.id in external)
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
                bridged=tuple(edge.id for edge in topology.nodes.edges),
            )
        ]
        for edge in topology.nodes.edges:
            _plan_edge(topology.name, edge, server, topology.name, CLOUD_BROKER, brokers)
        home: dict[str, str] = {}
        for plan in brokers:
            for node_id in plan.nodes:
                home[node_id] = plan.service
        nodes = [
            NodePlan(id=i.id, role=i.role, broker=home[i.id], external=i.id in external)
            for i in infos
        ]
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
            bridged=tuple(child.id for child in edge.edges),
            uplink=Uplink(
                edge=edge.id, parent=parent, namespace=parent_namespace, broker=parent_broker
            ),
        )
    )
    for child in edge.edges:
        _plan_edge(name, child, edge.id, namespace, service, out)
