"""Topologies: the YAML schema, its validation, and gossip graphs (DESIGN.md section 4).

``load_topology("topology.yaml")`` returns a frozen `Topology` tree or raises
one `TopologyError` listing every problem with its YAML path and line.
`Topology.node_infos` gives the launcher each node's role and effective
settings; `apply_overrides` applies ``--rounds``/``--seed``/``--broker``.
See docs/topology.md for every key.
"""

from __future__ import annotations

from fedbus.topology.graphs import GraphConfig, build_graph, components, edge_count, is_connected
from fedbus.topology.model import (
    AggregatorSpec,
    BrokerSpec,
    ChurnFault,
    CrashFault,
    DataConfig,
    DropoutFault,
    Fault,
    ModelConfig,
    NpzConfig,
    PartitionConfig,
    StragglerFault,
    SyntheticConfig,
    TrainingConfig,
)
from fedbus.topology.nodes import EdgeConfig, NodesConfig
from fedbus.topology.problems import Problem, TopologyError
from fedbus.topology.protocol import ProtocolConfig
from fedbus.topology.root import NodeInfo, NodeRole, Topology, apply_overrides
from fedbus.topology.schema import AggregatorCheck, load_topology, loads_topology

__all__ = [
    "AggregatorCheck",
    "AggregatorSpec",
    "BrokerSpec",
    "ChurnFault",
    "CrashFault",
    "DataConfig",
    "DropoutFault",
    "EdgeConfig",
    "Fault",
    "GraphConfig",
    "ModelConfig",
    "NodeInfo",
    "NodeRole",
    "NodesConfig",
    "NpzConfig",
    "PartitionConfig",
    "Problem",
    "ProtocolConfig",
    "StragglerFault",
    "SyntheticConfig",
    "Topology",
    "TopologyError",
    "TrainingConfig",
    "apply_overrides",
    "build_graph",
    "components",
    "edge_count",
    "is_connected",
    "load_topology",
    "loads_topology",
]
