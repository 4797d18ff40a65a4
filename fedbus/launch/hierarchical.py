"""Running a whole hierarchical federation in this process: brokers, cloud, edges, devices.

`run_hierarchical` is what ``fedbus run`` does for ``protocol.kind:
hierarchical``. The cloud is the centralized `ServerNode` over a
`FedAvgServer` whose clients are the top-level edges (and any device that
re-homes to it); every edge is an `EdgeNode` (`fedbus.nodes.edge`); every
device a `DeviceNode` (`fedbus.nodes.device`) with the partition of the
client of the same index (the same data build as centralized).

Namespaces and brokers. The cloud's children use the topology name as
namespace, an edge's children ``<name>.<edge-id>`` (`namespace_of`). All
namespaces share the federation's broker unless an edge names its own
(``broker:`` URL, or ``embedded``: this launcher starts one more broker);
that edge connects to both, and its children only to its broker. With
``broker: memory`` everything runs on the one in-process bus (edge brokers
are then ignored: they name real brokers).

Results: the cloud's (`HierarchicalResults`): ``metrics.jsonl`` per global
round with the keys of DESIGN.md section 3 (``bytes_up``/``bytes_down`` on
the cloud's own connection), plus ``edge_accuracy`` (each edge's uploaded
model on the test split) and ``edge_participants`` (distinct children in
its task); ``summary.json`` says ``protocol: hierarchical``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedbus import codec, topics
from fedbus._types import NodeId, RunId
from fedbus.aggregation import make_aggregator
from fedbus.broker import ManagedBroker
from fedbus.config import BrokerConfig
from fedbus.launch.build import (
    build_data,
    client_trainer,
    fault_plan,
    new_run_id,
    protocol_config,
    server_trainer,
)
from fedbus.launch.federation import Bus, open_bus
from fedbus.learning.partition import FederationData
from fedbus.learning.seeds import derive_seed, init_seed
from fedbus.learning.trainer import Trainer
from fedbus.messages import Leave
from fedbus.nodes import ClientOutcome, ResultsWriter, ServerNode, ServerObserver, ServerSettings
from fedbus.nodes.device import DeviceNode, DeviceSettings
from fedbus.nodes.edge import EdgeNode, EdgeObserver, EdgeOutcome, EdgeSettings, namespace_of
from fedbus.nodes.namespaces import SharedConnection
from fedbus.nodes.server import LEAVE_CHANNEL, ServerOutcome
from fedbus.protocols.fedavg import FedAvgConfig, FedAvgServer, RoundClosed, SendUpdate
from fedbus.protocols.hierarchical import EdgeAggregator
from fedbus.protocols.hierarchical_rehoming import RehomeConfig, fallback_chain
from fedbus.topology import BrokerSpec, NodeInfo, NodeRole, Topology
from fedbus.transport.base import Transport, Will
from fedbus.transport.mqtt import MqttTransport

__all__ = [
    "HierarchicalResult",
    "HierarchicalResults",
    "LevelMonitor",
    "Plan",
    "make_device",
    "make_edge",
    "run_hierarchical",
]

log = logging.getLogger(__name__)

Connect = Callable[[str, Will | None], Transport]


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

    def rehome(self, device: str) -> RehomeConfig:
        """The fallbacks of ``device`` (``protocol.rehome``)."""
        parent = self.infos[device].parent
        assert parent is not None
        grandparent = self.infos[parent].parent
        if grandparent is None:  # a device of the cloud itself never re-homes
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


class LevelMonitor(EdgeObserver):
    """Keeps each edge's uploaded model per cloud round, for the per-level metrics."""

    def __init__(self) -> None:
        self.uploads: dict[int, dict[str, SendUpdate]] = {}
        self.local_rounds: dict[str, int] = {}

    def on_local_round(self, edge: str, closed: RoundClosed) -> None:
        """Count the edge's local rounds (the display shows them)."""
        self.local_rounds[edge] = self.local_rounds.get(edge, 0) + 1

    def on_task_done(self, edge: str, top_round: int, update: SendUpdate) -> None:
        """Keep what ``edge`` sent up for ``top_round``."""
        self.uploads.setdefault(top_round, {})[edge] = update


class HierarchicalResults(ResultsWriter):
    """The cloud's results folder, with per-edge metrics merged into each row."""

    def __init__(self, out: Path, monitor: LevelMonitor, evaluator: Trainer, **kwargs: Any) -> None:
        super().__init__(out, **kwargs)
        self._monitor = monitor
        self._evaluator = evaluator

    def append(self, row: Mapping[str, Any]) -> None:
        """Add ``edge_accuracy`` and ``edge_participants`` (in place: the display sees them)."""
        uploads = self._monitor.uploads.pop(int(row["round"]), {})
        if isinstance(row, dict) and uploads:
            row["edge_accuracy"] = {
                edge: float(self._evaluator.evaluate(u.weights).accuracy)
                for edge, u in sorted(uploads.items())
            }
            row["edge_participants"] = {
                edge: int(u.metrics.get("edge_participants", 0))
                for edge, u in sorted(uploads.items())
            }
        super().append(row)

    def finish(
        self, weights: Mapping[str, Any], summary: Mapping[str, Any], *, title: str
    ) -> dict[str, Any]:
        """The summary says ``protocol: hierarchical``."""
        return super().finish(weights, {**summary, "protocol": "hierarchical"}, title=title)


@dataclass(slots=True)
class HierarchicalResult:
    """What a hierarchical run produced."""

    run_id: str
    server: ServerOutcome
    edges: dict[str, EdgeOutcome] = field(default_factory=dict)
    devices: dict[str, ClientOutcome] = field(default_factory=dict)
    device_nodes: dict[str, DeviceNode] = field(default_factory=dict)
    weights: dict[str, Any] = field(default_factory=dict)
    out: Path | None = None


def _will(namespace: str, node: str) -> Will:
    leave = Leave(run=namespace, sender=node, reason="connection lost")
    return Will(topic=topics.broadcast(namespace, node, LEAVE_CHANNEL), payload=codec.encode(leave))


@contextlib.asynccontextmanager
async def child_buses(plan: Plan, bus: Bus) -> AsyncIterator[dict[str, Connect]]:
    """How to reach each aggregator's children: the main bus, or the edge's own broker."""
    connects: dict[str, Connect] = {}
    async with contextlib.AsyncExitStack() as stack:
        for node, info in plan.infos.items():
            if info.role is NodeRole.SERVER or bus.memory is not None:
                if info.role in (NodeRole.SERVER, NodeRole.EDGE):
                    connects[node] = bus.connect
                continue
            if info.role is not NodeRole.EDGE:
                continue
            spec = info.child_broker or info.broker
            if spec == info.broker:
                continue  # filled below from the parent's
            connects[node] = await stack.enter_async_context(_broker_connect(spec))
        for info in plan.infos.values():  # edges sharing their parent's broker, top down
            if info.role is NodeRole.EDGE and info.id not in connects and info.parent:
                connects[info.id] = connects[info.parent]
        yield connects


@contextlib.asynccontextmanager
async def _broker_connect(spec: BrokerSpec) -> AsyncIterator[Connect]:
    if spec.config is not None:
        config = spec.config
        yield lambda node, will: MqttTransport(config, node, will=will)
        return
    broker = ManagedBroker()
    async with broker:
        managed: BrokerConfig = broker.client_config(max_payload_bytes=spec.max_payload_bytes)
        yield lambda node, will: MqttTransport(managed, node, will=will)


def make_edge(
    plan: Plan, edge: str, run: RunId, up_connect: Connect, down_connect: Connect,
    *, observer: EdgeObserver | None = None, shared: bool,
) -> tuple[EdgeNode, list[SharedConnection]]:  # fmt: skip
    """The `EdgeNode` of ``edge`` and the connections to enter around its run."""
    info, p = plan.infos[edge], plan.topology.protocol
    assert info.parent is not None
    up_ns, down_ns = plan.namespaces[info.parent], plan.namespaces[edge]
    aggregator = make_aggregator((info.aggregator or p.aggregator).as_dict())
    machine = EdgeAggregator(
        plan.edge_config(edge), node=NodeId(edge), run=run, edge_rounds=p.edge_rounds,
        aggregator=aggregator,
    )  # fmt: skip
    if shared:
        one = SharedConnection(up_connect(edge, _will(up_ns, edge)))
        up, down, conns = one.view(up_ns), one.view(down_ns), [one]
    else:
        upper = SharedConnection(up_connect(edge, _will(up_ns, edge)))
        lower = SharedConnection(down_connect(edge, _will(down_ns, edge)))
        up, down, conns = upper.view(up_ns), lower.view(down_ns), [upper, lower]
    settings = EdgeSettings(
        node_id=edge, parent=info.parent, up_namespace=up_ns, down_namespace=down_ns,
        children=info.children, join_timeout_s=p.join_timeout_s,
    )  # fmt: skip
    node = EdgeNode(
        machine, up, down, settings, faults=fault_plan(plan.topology, edge), observer=observer
    )
    return node, conns


async def run_edge(node: EdgeNode, conns: list[SharedConnection]) -> EdgeOutcome:
    """Run ``node`` inside its connections; a simulated crash drops them uncleanly (wills)."""
    async with contextlib.AsyncExitStack() as stack:
        for conn in conns:
            await stack.enter_async_context(conn)
        outcome = await node.run()
        if outcome.status != "finished":
            for conn in conns:
                await conn.abort()
        return outcome


def make_device(
    plan: Plan, device: str, trainer: Trainer, connects: Mapping[str, Connect], run: RunId | None
) -> DeviceNode:
    """The `DeviceNode` of ``device`` with its fallbacks."""
    info, topology = plan.infos[device], plan.topology
    assert info.parent is not None
    settings = DeviceSettings(
        node_id=device, parent=info.parent, namespaces=plan.namespaces, watch=plan.watch,
        seed=topology.seed, rehome=plan.rehome(device),
        round_hint_s=min(topology.protocol.round_timeout_s, 2.0),
    )  # fmt: skip

    def connect(parent: str, will: Will) -> Transport:
        return connects[parent](device, will)

    return DeviceNode(trainer, connect, settings, run=run, faults=fault_plan(topology, device))


def make_cloud(
    plan: Plan, data: FederationData, transport: Transport, *, run: RunId, out: Path | None,
    monitor: LevelMonitor, observer: ServerObserver | None, topology_text: str,
    broker: dict[str, str],
) -> ServerNode:  # fmt: skip
    """The cloud's `ServerNode` (a FedAvg server over its top-level children)."""
    topology = plan.topology
    server = topology.nodes.server
    assert server is not None
    trainer = server_trainer(topology, data)
    children = plan.infos[server].children
    machine = FedAvgServer(
        cloud_config(topology, plan), run=run, weights=trainer.initial_weights(init_seed(topology.seed)),
        aggregator=make_aggregator(topology.protocol.aggregator.as_dict()),
        expected_nodes=len(children) or None,
    )  # fmt: skip
    results = None
    if out is not None:
        results = HierarchicalResults(out, monitor, trainer)
        results.write_topology(topology_text)
    settings = ServerSettings(
        node_id=server, namespace=plan.namespaces[server], name=topology.name, seed=topology.seed,
        broker=broker, topology_text=topology_text, expected_nodes=len(children),
    )  # fmt: skip
    return ServerNode(
        machine, transport, settings, evaluator=trainer, results=results, observer=observer
    )


async def run_hierarchical(
    topology: Topology,
    *,
    out: Path | None,
    base_dir: Path = Path(),
    topology_text: str = "",
    observer: ServerObserver | None = None,
    monitor: LevelMonitor | None = None,
    trainer_hook: Callable[[str, Trainer], Trainer] | None = None,
    grace_s: float = 3.0,
) -> HierarchicalResult:
    """Run a hierarchical ``topology`` to its end in this process (module docstring).

    Raises:
        ConfigError: the data, model or aggregator cannot be built.
    """
    plan = Plan.of(topology)
    data = await asyncio.to_thread(build_data, topology, base_dir)
    run_id = RunId(new_run_id(topology.name))
    monitor = monitor or LevelMonitor()
    server_id = topology.nodes.server
    assert server_id is not None
    async with open_bus(topology) as bus, child_buses(plan, bus) as connects:
        edges: dict[str, tuple[EdgeNode, list[SharedConnection]]] = {}
        devices: dict[str, DeviceNode] = {}
        for info in plan.infos.values():
            if info.external or info.parent is None:
                continue
            if info.role is NodeRole.EDGE:
                up, down = connects[info.parent], connects[info.id]
                edges[info.id] = make_edge(
                    plan, info.id, run_id, up, down, observer=monitor, shared=up is down
                )
            elif info.role is NodeRole.CLIENT:
                trainer = client_trainer(topology, data, info.id)
                if trainer_hook is not None:
                    trainer = trainer_hook(info.id, trainer)
                devices[info.id] = make_device(plan, info.id, trainer, connects, run_id)
        cloud = make_cloud(
            plan, data, bus.connect(server_id, None), run=run_id, out=out, monitor=monitor,
            observer=observer, topology_text=topology_text,
            broker={"kind": bus.kind, "url": bus.url},
        )  # fmt: skip
        async with asyncio.TaskGroup() as tg:
            edge_tasks = {
                e: tg.create_task(run_edge(n, c), name=f"fedbus[{e}].node")
                for e, (n, c) in edges.items()
            }
            device_tasks = {
                d: tg.create_task(n.run(), name=f"fedbus[{d}].node") for d, n in devices.items()
            }
            outcome = await tg.create_task(cloud.run(), name=f"fedbus[{server_id}].node")
            rest = [*edge_tasks.values(), *device_tasks.values()]
            await asyncio.wait(rest, timeout=grace_s)
            for task in rest:
                task.cancel()
    return HierarchicalResult(
        run_id, outcome,
        {e: t.result() if not t.cancelled() else EdgeOutcome(e, "failed", "stopped")
         for e, t in edge_tasks.items()},
        {d: t.result() if not t.cancelled() else ClientOutcome(d, "failed", "stopped")
         for d, t in device_tasks.items()},
        devices, dict(cloud.machine.weights), out,
    )  # fmt: skip
