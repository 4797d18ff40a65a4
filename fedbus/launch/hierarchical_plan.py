"""The plan of a hierarchy: namespaces, parents, fallbacks and each level's FedAvg settings.

Derived deterministically from the topology, so `fedbus run` and every
``fedbus node`` agent (on other hosts) agree on who talks where.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedbus._types import NodeId
from fedbus.launch.build import protocol_config
from fedbus.learning.seeds import derive_seed
from fedbus.nodes.edge import namespace_of
from fedbus.protocols.fedavg import FedAvgConfig
from fedbus.protocols.hierarchical_rehoming import RehomeConfig, fallback_chain
from fedbus.topology import NodeInfo, NodeRole, Topology

__all__ = ["Plan", "cloud_config"]


@dataclass(frozen=True, slots=True)
class Plan:
    """The hierarchy as the runtimes need it: namespaces, parents, fallbacks."""

    topology: Topology
    infos: dict[str, NodeInfo]
    namespaces: dict[str, str]
    watch: dict[str, tuple[str, ...]]

    @classmethod
    def of(cls, topology: Topology) -> Plan:
        """Derive the plan of ``topology`` (deterministic: every process agrees)."""
        infos = {i.id: i for i in topology.node_infos()}
        server = topology.nodes.server
        namespaces = {
            i.id: namespace_of(topology.name, i.id, server=server)
            for i in infos.values()
            if i.role in (NodeRole.SERVER, NodeRole.EDGE)
        }
        watch: dict[str, tuple[str, ...]] = {
            i.id: (namespaces[i.id], namespaces[i.parent])
            for i in infos.values()
            if i.role is NodeRole.EDGE and i.parent is not None
        }
        return cls(topology, infos, namespaces, watch)

    def rehome(self, node: str) -> RehomeConfig:
        """The fallbacks of ``node``, a device or an edge (``protocol.rehome``)."""
        parent = self.infos[node].parent
        assert parent is not None
        grandparent = self.infos[parent].parent
        if grandparent is None:  # a child of the cloud itself never re-homes
            return RehomeConfig()
        siblings = [
            c for c in self.infos[grandparent].children if self.infos[c].role is NodeRole.EDGE
        ]
        chain = fallback_chain(
            self.topology.protocol.rehome, parent=NodeId(parent),
            grandparent=NodeId(grandparent), siblings=[NodeId(s) for s in siblings],
        )  # fmt: skip
        return RehomeConfig(fallbacks=chain)

    def edge_config(self, edge: str) -> FedAvgConfig:
        """This level's FedAvg settings (quorum, deadline) for ``edge``'s local rounds."""
        info, p = self.infos[edge], self.topology.protocol
        return FedAvgConfig(
            rounds=1, fraction=p.fraction, min_clients=info.min_clients or 1,
            round_timeout_s=info.round_timeout_s or p.round_timeout_s,
            join_timeout_s=p.join_timeout_s, seed=derive_seed(self.topology.seed, "edge", edge),
        )  # fmt: skip


def cloud_config(topology: Topology, plan: Plan) -> FedAvgConfig:
    """The cloud's FedAvg settings: all its children every round, its level's quorum."""
    base = protocol_config(topology)
    server = topology.nodes.server
    assert server is not None
    info = plan.infos[server]
    return FedAvgConfig(
        rounds=base.rounds, min_clients=info.min_clients or 1,
        round_timeout_s=base.round_timeout_s, join_timeout_s=base.join_timeout_s,
        evaluate=base.evaluate, seed=base.seed, train_config=base.train_config,
    )  # fmt: skip
