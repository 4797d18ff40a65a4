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
the cloud's own connection), plus the per-level keys of
`fedbus.launch.hierarchical_results`; ``summary.json`` says ``protocol:
hierarchical``.

Defenses and attacks (`fedbus.launch.hierarchical_defenses`): every
aggregating node runs its level's validators and aggregator; simulated
attackers are devices. Checkpoints: the cloud writes ``checkpoint.msgpack``
after each global round (the centralized `ServerNode` does) and each edge
its restart point under ``edges/`` (`fedbus.nodes.edge_checkpoint`);
``resume`` continues from the cloud's last completed global round with
every edge restarted from its entry for that round (fresh devices: they
keep nothing across rounds).
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
from fedbus.aggregation import make_aggregator, make_validators
from fedbus.aggregation.validators import load_level_state
from fedbus.broker import ManagedBroker
from fedbus.config import BrokerConfig
from fedbus.errors import ConfigError
from fedbus.launch.build import (
    build_data,
    client_trainer,
    fault_plan,
    new_run_id,
    server_trainer,
)
from fedbus.launch.federation import Bus, mqtt_connect, open_bus
from fedbus.launch.hierarchical_defenses import LevelDefenses, level_defenses
from fedbus.launch.hierarchical_plan import Plan, cloud_config
from fedbus.launch.hierarchical_results import HierarchicalResults, LevelMonitor
from fedbus.launch.robustness import AttackPlan
from fedbus.learning.partition import FederationData
from fedbus.learning.seeds import init_seed
from fedbus.learning.trainer import Trainer
from fedbus.messages import Leave
from fedbus.nodes import Checkpoint, ClientOutcome, ServerNode, ServerObserver, ServerSettings
from fedbus.nodes.client import LocalAttack
from fedbus.nodes.device import DeviceNode, DeviceSettings
from fedbus.nodes.edge import EdgeNode, EdgeObserver, EdgeOutcome, EdgeSettings
from fedbus.nodes.edge_checkpoint import (
    EDGES_DIR,
    EdgeCheckpoint,
    EdgeCheckpoints,
    read_edge_checkpoint,
)
from fedbus.nodes.namespaces import SharedConnection
from fedbus.nodes.server import LEAVE_CHANNEL, ServerOutcome
from fedbus.protocols.fedavg import FedAvgServer, ServerCheckpoint
from fedbus.protocols.hierarchical import EdgeAggregator
from fedbus.protocols.hierarchical_rehoming import RehomeConfig, Rehoming
from fedbus.topology import BrokerSpec, NodeRole, Topology
from fedbus.transport.base import Transport, Will

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


@dataclass(slots=True)
class HierarchicalResult:
    """What a hierarchical run produced."""

    run_id: str
    server: ServerOutcome
    edges: dict[str, EdgeOutcome] = field(default_factory=dict)
    devices: dict[str, ClientOutcome] = field(default_factory=dict)
    device_nodes: dict[str, DeviceNode] = field(default_factory=dict)
    edge_nodes: dict[str, EdgeNode] = field(default_factory=dict)
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
    """Connections to an edge group's own broker (``client`` as for the top broker)."""
    if spec.config is not None:
        yield mqtt_connect(spec.config, lean=spec.lean)
        return
    broker = ManagedBroker()
    async with broker:
        managed: BrokerConfig = broker.client_config(
            max_payload_bytes=spec.max_payload_bytes, protocol="3.1.1"
        )
        yield mqtt_connect(managed, lean=spec.lean)


def make_edge(
    plan: Plan, edge: str, run: RunId, up_connect: Connect, down_connect: Connect,
    *, observer: EdgeObserver | None = None, shared: bool, defenses: LevelDefenses | None = None,
    restart: EdgeCheckpoint | None = None, connects: Mapping[str, Connect] | None = None,
) -> tuple[EdgeNode, list[SharedConnection]]:  # fmt: skip
    """The `EdgeNode` of ``edge`` and the connections to enter around its run.

    ``defenses`` builds its level's validators (None: the level's specs,
    which must then not need a validation set); ``restart`` is its entry of
    a resumed run's checkpoint. An edge under a region re-homes when the
    region dies (``protocol.rehome``), to the fallbacks whose children's
    broker is its upward one (``connects``: each aggregator's children's
    connector; None: no re-homing).

    Raises:
        ConfigError: a ``validation_accuracy`` gate without ``defenses``.
    """
    info, p = plan.infos[edge], plan.topology.protocol
    assert info.parent is not None
    up_ns, down_ns = plan.namespaces[info.parent], plan.namespaces[edge]
    aggregator = make_aggregator((info.aggregator or p.aggregator).as_dict())
    if defenses is not None:
        validators = defenses.validators(edge)
    elif any(v.kind == "validation_accuracy" for v in info.validators):
        raise ConfigError(f"edge {edge!r}: validation_accuracy needs the data", path="nodes.edges")
    else:
        validators = make_validators([v.as_dict() for v in info.validators])
    if restart is not None:
        load_level_state(aggregator, validators, restart.aggregator_state)
    fallbacks = plan.rehome(edge).fallbacks if connects is not None else ()
    reachable = [f for f in fallbacks if connects is not None and connects[f] is up_connect]
    rehoming = None
    if reachable:
        rehoming = Rehoming(RehomeConfig(fallbacks=tuple(reachable)), parent=NodeId(info.parent))
    machine = EdgeAggregator(
        plan.edge_config(edge), node=NodeId(edge), run=run, edge_rounds=p.edge_rounds,
        aggregator=aggregator, validators=validators, rehoming=rehoming,
        local_base=restart.local_base if restart is not None else 0,
    )  # fmt: skip
    upper = SharedConnection(up_connect(edge, _will(up_ns, edge)))
    if shared:
        up, down, conns = upper.view(up_ns), upper.view(down_ns), [upper]
    else:
        lower = SharedConnection(down_connect(edge, _will(down_ns, edge)))
        up, down, conns = upper.view(up_ns), lower.view(down_ns), [upper, lower]
    settings = EdgeSettings(
        node_id=edge, parent=info.parent, up_namespace=up_ns, down_namespace=down_ns,
        children=info.children, join_timeout_s=p.join_timeout_s,
        namespaces={f: plan.namespaces[f] for f in reachable},
        watch={n: plan.watch.get(n, ()) for n in (info.parent, *reachable)},
    )  # fmt: skip
    node = EdgeNode(
        machine, up, down, settings, faults=fault_plan(plan.topology, edge), observer=observer,
        views=upper.view,
    )  # fmt: skip
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
    plan: Plan, device: str, trainer: Trainer, connects: Mapping[str, Connect], run: RunId | None,
    *, attack: LocalAttack | None = None,
) -> DeviceNode:  # fmt: skip
    """The `DeviceNode` of ``device`` with its fallbacks (and its simulated attack, if any)."""
    info, topology = plan.infos[device], plan.topology
    assert info.parent is not None
    settings = DeviceSettings(
        node_id=device, parent=info.parent, namespaces=plan.namespaces, watch=plan.watch,
        groups={p: plan.infos[p].children for p in plan.namespaces},
        seed=topology.seed, rehome=plan.rehome(device),
        round_hint_s=min(topology.protocol.round_timeout_s, 2.0),
    )  # fmt: skip

    def connect(parent: str, will: Will) -> Transport:
        return connects[parent](device, will)

    return DeviceNode(
        trainer, connect, settings, run=run, faults=fault_plan(topology, device), attack=attack
    )


def make_cloud(
    plan: Plan, data: FederationData, transport: Transport, *, run: RunId, out: Path | None,
    monitor: LevelMonitor, observer: ServerObserver | None, topology_text: str,
    broker: dict[str, str], defenses: LevelDefenses | None = None,
    resume: Checkpoint | None = None,
) -> ServerNode:  # fmt: skip
    """The cloud's `ServerNode` (a FedAvg server over its top-level children).

    ``defenses`` (default: built here from ``data``) gives its validators and
    cuts their validation set off the test split; ``resume`` continues a run
    after its checkpoint's round.
    """
    topology = plan.topology
    server = topology.nodes.server
    assert server is not None
    defenses = defenses or level_defenses(topology, data)
    trainer = server_trainer(topology, defenses.data)
    children = plan.infos[server].children
    config = cloud_config(topology, plan)
    aggregator = make_aggregator(topology.protocol.aggregator.as_dict())
    expected = len(children) or None
    validators = defenses.validators(server)
    machine: FedAvgServer
    if resume is not None:
        state = ServerCheckpoint(
            round=resume.round, weights=resume.weights, aggregator_state=resume.aggregator_state
        )
        machine = FedAvgServer.from_checkpoint(
            config, state, run=run, aggregator=aggregator, validators=validators,
            expected_nodes=expected,
        )  # fmt: skip
    else:
        machine = FedAvgServer(
            config, run=run, weights=trainer.initial_weights(init_seed(topology.seed)),
            aggregator=aggregator, validators=validators, expected_nodes=expected,
        )  # fmt: skip
    results = None
    if out is not None:
        results = HierarchicalResults(
            out, monitor, trainer, federated=config.evaluate == "federated",
            resume_round=resume.round if resume is not None else 0,
        )  # fmt: skip
        results.write_topology(topology_text)
    settings = ServerSettings(
        node_id=server, namespace=plan.namespaces[server], name=topology.name, seed=topology.seed,
        broker=broker, topology_text=topology_text, expected_nodes=len(children), resume=resume,
        summary_extra=defenses.summary,
    )  # fmt: skip
    evaluator = defenses.server().evaluator(topology, trainer)  # + backdoor_accuracy
    return ServerNode(
        machine, transport, settings, evaluator=evaluator, results=results, observer=observer
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
    resume: Checkpoint | None = None,
) -> HierarchicalResult:
    """Run a hierarchical ``topology`` to its end in this process (module docstring).

    ``resume`` continues the run of that checkpoint (its run id, the round
    after it); ``out`` must then be the folder it came from (the edges'
    checkpoints are read from there).

    Raises:
        ConfigError: the data, model, aggregator or validators cannot be built.
        DecodeError: an edge checkpoint is unreadable.
    """
    plan = Plan.of(topology)
    data = await asyncio.to_thread(build_data, topology, base_dir)
    defenses = level_defenses(topology, data)
    attacks = AttackPlan(topology, defenses.data)
    run_id = RunId(resume.run if resume is not None else new_run_id(topology.name))
    if monitor is None:
        saver = EdgeCheckpoints(out / EDGES_DIR, run_id) if out is not None else None
        monitor = LevelMonitor(saver)
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
                restart = None
                if resume is not None and out is not None:
                    restart = read_edge_checkpoint(
                        out / EDGES_DIR, info.id, run=run_id, top_round=resume.round
                    )
                edges[info.id] = make_edge(
                    plan, info.id, run_id, up, down, observer=monitor, shared=up is down,
                    defenses=defenses, restart=restart, connects=connects,
                )  # fmt: skip
            elif info.role is NodeRole.CLIENT:
                trainer = client_trainer(topology, data, info.id)
                attack = attacks.client_attack(info.id, trainer)  # simulated attackers only
                if trainer_hook is not None:
                    trainer = trainer_hook(info.id, trainer)
                devices[info.id] = make_device(
                    plan, info.id, trainer, connects, run_id, attack=attack
                )
        cloud = make_cloud(
            plan, data, bus.connect(server_id, None), run=run_id, out=out, monitor=monitor,
            observer=observer, topology_text=topology_text,
            broker={"kind": bus.kind, "url": bus.url}, defenses=defenses, resume=resume,
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
        devices, {e: n for e, (n, _) in edges.items()}, dict(cloud.machine.weights), out,
    )  # fmt: skip
