"""Running a whole centralized federation in this process: broker, server, clients.

`run_federation` is what ``fedbus run`` does once the topology is loaded: it
opens the bus (`open_bus`: the in-process `MemoryBus`, an embedded
`ManagedBroker`, or a broker URL), starts the server node and every client
not marked external, each over its own connection, waits for the server to
finish, gives the clients a bounded grace period to see the end, and stops
whatever is left. Everything it starts is stopped on the way out, also on
failure and on cancellation (Ctrl-C): the nodes run in one TaskGroup inside
the broker's ``async with``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy.typing as npt

from fedbus._types import RunId
from fedbus.aggregation import make_aggregator
from fedbus.broker import ManagedBroker
from fedbus.config import BrokerConfig
from fedbus.errors import ConfigError
from fedbus.launch.build import (
    build_data,
    client_trainer,
    fault_plan,
    fedbuff_config,
    new_run_id,
    protocol_config,
    server_trainer,
)
from fedbus.launch.gcfreeze import FreezeWhenRunning, QuietCollector
from fedbus.launch.robustness import AttackPlan, server_defenses
from fedbus.launch.tflite import TfliteOptions, client_serving, exporter
from fedbus.launch.workers import WorkerPool, WorkerSpec, share
from fedbus.learning.partition import FederationData
from fedbus.learning.seeds import init_seed
from fedbus.learning.trainer import Trainer
from fedbus.nodes import (
    Checkpoint,
    ClientNode,
    ClientOutcome,
    ClientSettings,
    ResultsWriter,
    ServerNode,
    ServerObserver,
    ServerOutcome,
    ServerSettings,
)
from fedbus.protocols.fedavg import FedAvgServer, ServerCheckpoint
from fedbus.protocols.fedbuff import FedBuffServer
from fedbus.topology import NodeRole, Topology
from fedbus.transport.base import Transport, Will
from fedbus.transport.lean import LeanMqttTransport
from fedbus.transport.memory import MemoryBus, MemoryTransport
from fedbus.transport.mqtt import MqttTransport

__all__ = [
    "Bus",
    "FederationResult",
    "make_server",
    "open_bus",
    "raise_fd_limit",
    "run_federation",
]

log = logging.getLogger(__name__)

CLIENT_GRACE_S = 3.0
"""How long connected clients may take to notice the end of the run before they are
stopped (they see the final manifest within milliseconds; clients away on churn
are stopped at once)."""


@dataclass(slots=True)
class Bus:
    """An open bus: how to connect a node, and what the summary says about it."""

    connect: Callable[[str, Will | None], Transport]
    kind: str
    url: str
    memory: MemoryBus | None = None
    broker: ManagedBroker | None = None


@contextlib.asynccontextmanager
async def open_bus(topology: Topology) -> AsyncIterator[Bus]:
    """Open the topology's bus for the duration of the block (an embedded broker is stopped after)."""
    spec = topology.broker
    if spec.kind == "memory":
        bus = MemoryBus(max_queued_messages=100_000)

        def memory(node: str, will: Will | None) -> Transport:
            return MemoryTransport(bus, node, will=will, max_payload_bytes=spec.max_payload_bytes)

        yield Bus(memory, "memory", "memory", memory=bus)
        return
    if spec.kind == "url":
        config = spec.config
        assert config is not None  # BrokerSpec guarantees it for kind url
        yield Bus(mqtt_connect(config, lean=spec.lean), "url", config.url)
        return
    broker = ManagedBroker()
    async with broker:
        if broker.notice:
            log.warning("%s", broker.notice)
        # MQTT 3.1.1 to our own broker: fedbus uses nothing of MQTT 5, and paho
        # builds a Properties object (two dicts of 27 names) for every MQTT 5
        # PUBLISH it reads; at 1,000 clients in this process that was 12 % of
        # the CPU and 3.1.1 made a round about 30 % faster. Sizes are still
        # bounded: both ends get max_payload_bytes from the same spec.
        config = broker.client_config(max_payload_bytes=spec.max_payload_bytes, protocol="3.1.1")
        yield Bus(mqtt_connect(config, lean=spec.lean), "embedded", broker.url, broker=broker)


def mqtt_connect(
    config: BrokerConfig, *, lean: bool = False
) -> Callable[[str, Will | None], Transport]:
    """Transports to an MQTT broker: `LeanMqttTransport` (``lean``) or `MqttTransport`.

    ``broker.client`` chooses (`BrokerSpec.lean`); by default the embedded
    broker gets the lean client: fedbus started it, it speaks MQTT 3.1.1, and
    with 1,000 simulated clients in this process paho and aiomqtt cost about
    80 us of CPU per packet against about 12 (docs/transport.md). A broker
    given by URL keeps `MqttTransport` (MQTT 5 with a 3.1.1 fallback, the
    client deployments use) unless ``client: lean``.
    """

    def connect(node: str, will: Will | None) -> Transport:
        if lean:
            return LeanMqttTransport(config, node, will=will)
        return MqttTransport(config, node, will=will)

    return connect


@dataclass(slots=True)
class FederationResult:
    """What a run produced: the server's outcome, each client's, the final model."""

    run_id: str
    server: ServerOutcome
    clients: dict[str, ClientOutcome] = field(default_factory=dict)
    weights: dict[str, npt.NDArray[Any]] = field(default_factory=dict)
    out: Path | None = None


def make_server(
    topology: Topology,
    data: FederationData,
    transport: Transport,
    *,
    run_id: str,
    out: Path | None,
    resume: Checkpoint | None = None,
    observer: ServerObserver | None = None,
    topology_text: str = "",
    broker: dict[str, str] | None = None,
    tflite: TfliteOptions | None = None,
) -> ServerNode:
    """The server node of ``topology`` (fresh, or continuing ``resume``).

    With ``tflite.export`` the results folder also gets ``model.tflite`` after
    each round; its template is compiled here, so an unusable model fails now.
    """
    server_id = topology.nodes.server
    if server_id is None:
        raise ConfigError("the topology has no server", path="nodes.server")
    config = protocol_config(topology)
    defenses = server_defenses(topology, data)  # cuts the validation set off the test split
    trainer = server_trainer(topology, defenses.data)
    aggregator = make_aggregator(topology.protocol.aggregator.as_dict())
    expected = len(topology.nodes.clients)
    machine: FedAvgServer | FedBuffServer
    if topology.protocol.mode == "async":
        machine = FedBuffServer(
            fedbuff_config(topology),
            run=RunId(run_id),
            weights=(
                resume.weights if resume is not None
                else trainer.initial_weights(init_seed(topology.seed))
            ),
            version=resume.round if resume is not None else 0,
            validators=defenses.validators,
        )  # fmt: skip
    elif resume is not None:
        machine = FedAvgServer.from_checkpoint(
            config,
            ServerCheckpoint(
                round=resume.round, weights=resume.weights, aggregator_state=resume.aggregator_state
            ),
            run=RunId(run_id), aggregator=aggregator, expected_nodes=expected,
            validators=defenses.validators,
        )  # fmt: skip
    else:
        weights = trainer.initial_weights(init_seed(topology.seed))
        machine = FedAvgServer(
            config,
            run=RunId(run_id),
            weights=weights,
            aggregator=aggregator,
            validators=defenses.validators,
            expected_nodes=expected,
        )
    results = None
    if out is not None:
        export = None
        if tflite is not None and tflite.export:
            export = exporter(
                topology, machine.weights, image_shape=data.test.image_shape, int8=tflite.int8
            )
        results = ResultsWriter(out, resume_round=resume.round if resume else 0, tflite=export)
        results.write_topology(topology_text)
    settings = ServerSettings(
        node_id=server_id, namespace=topology.name, name=topology.name, seed=topology.seed,
        broker=broker or {}, topology_text=topology_text, resume=resume, expected_nodes=expected,
        summary_extra=defenses.summary,
    )  # fmt: skip
    return ServerNode(
        machine,
        transport,
        settings,
        evaluator=defenses.evaluator(topology, trainer),
        results=results,
        observer=observer,
    )


def client_settings(topology: Topology, node_id: str) -> ClientSettings:
    """A client's discovery settings from the topology."""
    server = topology.nodes.server
    assert server is not None
    # Issue 3, startup: all clients of a run join at once, and the server's Acks
    # come back at about 1 ms per joining client here; a first wait of 0.5 s
    # at 1,000 clients had 300-400 of them send their Join again (each
    # answered by one more Ack), slowing round 1. 0.5 s + 1 ms per client.
    backoff = 0.5 + 0.001 * len(topology.nodes.clients)
    return ClientSettings(
        node_id=node_id, namespace=topology.name, server_id=server, seed=topology.seed,
        round_hint_s=min(topology.protocol.round_timeout_s, 5.0), join_backoff_s=backoff,
    )  # fmt: skip


async def run_federation(
    topology: Topology,
    *,
    out: Path | None,
    base_dir: Path = Path(),
    topology_text: str = "",
    resume: Checkpoint | None = None,
    observer: ServerObserver | None = None,
    trainer_hook: Callable[[str, Trainer], Trainer] | None = None,
    client_grace_s: float = CLIENT_GRACE_S,
    tflite: TfliteOptions | None = None,
    workers: int = 0,
) -> FederationResult:
    """Run ``topology`` to its end in this process; see the module docstring.

    Args:
        topology: a validated centralized topology.
        out: the results folder (None: write none).
        base_dir: what relative data paths are relative to (the topology's folder).
        topology_text: the topology file, copied into the results and checkpoints.
        resume: continue this checkpoint's run (same run id, next round).
        observer: progress callbacks of the server.
        trainer_hook: replaces or wraps each started client's trainer (tests).
        client_grace_s: how long clients may take to see the end.
        tflite: export ``model.tflite`` each round, and/or serve TFLite on the clients.
        workers: host the simulated clients in this many worker processes
            (`fedbus.launch.workers`; an MQTT broker and ``topology_text`` needed);
            0 runs them in this process.

    Raises:
        ConfigError: the data, model or aggregator cannot be built, or
            ``workers`` cannot be used with this run.
    """
    if workers:
        _check_workers(topology, workers, topology_text, trainer_hook, tflite)
    data = await asyncio.to_thread(build_data, topology, base_dir)
    if topology.broker.kind != "memory":
        raise_fd_limit(len(topology.nodes.clients) + 1)
    run_id = resume.run if resume is not None else new_run_id(topology.name)
    clients: dict[str, ClientNode] = {}
    attacks = AttackPlan(topology, data)
    pool = WorkerPool()
    async with open_bus(topology) as bus:
        hosted = [
            info.id
            for info in topology.node_infos()
            if info.role is NodeRole.CLIENT and not info.external
        ]
        if workers:
            assert topology_text is not None  # _check_workers
            await pool.start(_worker_specs(topology, topology_text, base_dir, bus, hosted, workers))
            hosted = []
        for info in topology.node_infos():
            if info.id not in hosted:
                continue
            trainer = client_trainer(topology, data, info.id)
            attack = attacks.client_attack(info.id, trainer)  # simulated attackers only
            if trainer_hook is not None:
                trainer = trainer_hook(info.id, trainer)
            clients[info.id] = ClientNode(
                trainer,
                _bound(bus, info.id),
                client_settings(topology, info.id),
                faults=fault_plan(topology, info.id),
                attack=attack,
                tflite=(
                    client_serving(topology, trainer, int8=tflite.int8)
                    if tflite is not None and tflite.serve
                    else None
                ),
            )
        assert topology.nodes.server is not None
        server = make_server(
            topology, data, bus.connect(topology.nodes.server, None),
            run_id=run_id, out=out, resume=resume, observer=FreezeWhenRunning(observer),
            topology_text=topology_text, broker={"kind": bus.kind, "url": bus.url}, tflite=tflite,
        )  # fmt: skip
        # The federation's data and nodes live as long as the run: keep the cyclic
        # GC from scanning them in every collection (fedbus.launch.gcfreeze).
        collector = QuietCollector()
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = {
                    cid: tg.create_task(node.run(), name=f"fedbus[{cid}].node")
                    for cid, node in clients.items()
                }
                outcome = await tg.create_task(server.run(), name=f"fedbus[{server.id}].node")
                waiting = [t for cid, t in tasks.items() if not clients[cid].away]
                if waiting:
                    await asyncio.wait(waiting, timeout=client_grace_s)
                for task in tasks.values():
                    task.cancel()
            results = {
                cid: t.result() if not t.cancelled() else ClientOutcome(cid, "failed", "stopped")
                for cid, t in tasks.items()
            }
            for cid, (status, reason) in (await pool.finish(client_grace_s)).items():
                results[cid] = ClientOutcome(cid, status, reason)  # type: ignore[arg-type]
        finally:
            collector.close()  # collectable again (a process may run several federations)
            await pool.stop()
            pool.close()
    return FederationResult(run_id, outcome, results, dict(server.machine.weights), out)


def _check_workers(
    topology: Topology,
    workers: int,
    topology_text: str | None,
    trainer_hook: Callable[[str, Trainer], Trainer] | None,
    tflite: TfliteOptions | None,
) -> None:
    if workers < 0:
        raise ConfigError(f"workers must be >= 0, got {workers}", path="--workers")
    if topology.broker.kind == "memory":
        raise ConfigError(
            "worker processes need an MQTT broker (the in-process bus cannot span processes)",
            path="--workers",
        )
    if not topology_text or trainer_hook is not None or (tflite is not None and tflite.serve):
        raise ConfigError(
            "worker processes rebuild clients from the topology text alone "
            "(no trainer hook, no --serve-tflite)",
            path="--workers",
        )


def _worker_specs(
    topology: Topology, text: str, base_dir: Path, bus: Bus, clients: list[str], workers: int
) -> list[WorkerSpec]:
    spec = topology.broker
    return [
        WorkerSpec(
            topology_text=text,
            base_dir=str(base_dir),
            rounds=topology.protocol.rounds,
            seed=topology.seed,
            broker_url=bus.url,
            lean=spec.lean,
            clients=group,
            outcomes="",
        )
        for group in share(clients, workers)
    ]


FDS_PER_CONNECTION: Final = 2
"""File descriptors a node's connection may use here, counted generously: its socket,
plus the broker child's end of it when the broker is embedded (the child inherits
this process's limits)."""


def raise_fd_limit(connections: int, *, spare: int = 256) -> int:
    """Raise RLIMIT_NOFILE's soft limit (up to the hard one) for ``connections`` MQTT connections.

    Why: every started node holds its own MQTT connection, and an embedded
    mosquitto needs one descriptor per client too; at 1,000 clients the
    common default soft limit of 1,024 makes connects fail with EMFILE,
    while the hard limit is usually far higher. Returns the soft limit in
    force afterwards; logs a warning when even the hard limit is too low.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return 0
    need = connections * FDS_PER_CONNECTION + spare
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(hard, max(need, soft))
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:  # pragma: no cover - refused by the OS
            log.warning("could not raise the open-files limit to %d: %s", target, exc)
    if soft != resource.RLIM_INFINITY and soft < need:
        log.warning(
            "open-files limit %d is below the %d that %d connections may need; raise it "
            "(ulimit -n) if connections fail", soft, need, connections,
        )  # fmt: skip
    return int(soft)


def _bound(bus: Bus, node_id: str) -> Callable[[Will], Transport]:
    def connect(will: Will) -> Transport:
        return bus.connect(node_id, will)

    return connect
