"""Running a whole gossip federation in this process: broker and every peer.

`run_gossip` is what ``fedbus run`` does for ``protocol.kind: gossip``. Each
peer (`fedbus.nodes.peer.PeerNode`) gets the partition ``fedbus run`` would
give the client of the same index (peer-i <-> client-i: the same data build
as centralized), its own connection, and the same initial model. There is no
aggregating node, so this launcher's `GossipMonitor` is where the results
come from: every peer reports each round's mixed model (`RoundMixed`), and
once every peer still in the run has reported round r (or moved past it),
the row of round r is written: ``accuracy`` and ``loss`` are the means over
the peers of each peer's model on the test split, plus ``accuracy_min``,
``accuracy_max`` and ``consensus_distance`` (DESIGN.md section 3);
``participants`` are the peers that reported the round, ``dropped`` the
peers of the run that did not (away on churn, crashed, or jumped over it);
``bytes_up`` and ``bytes_down`` are summed over every peer's connections
since the previous row (gossip has no aggregating node to count on).
``model.msgpack`` is the average of the peers' last models. Simulated
attackers (`fedbus.launch.gossip_robust`) are left out of these figures;
with a results folder each row also checkpoints the run
(`fedbus.launch.gossip_resume`, for ``--resume``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedbus._types import NodeId, RunId
from fedbus.aggregation import Arrays
from fedbus.launch.build import build_data, client_trainer, fault_plan, new_run_id, server_trainer
from fedbus.launch.federation import open_bus
from fedbus.launch.gossip_monitor import GossipMonitor, RowSink
from fedbus.launch.gossip_resume import GossipCheckpoints, resume_state
from fedbus.launch.gossip_robust import peer_attack, peer_defense, poisoned_trainer
from fedbus.launch.robustness import server_defenses
from fedbus.learning.partition import FederationData
from fedbus.learning.seeds import derive_seed, init_seed
from fedbus.learning.trainer import Trainer
from fedbus.nodes import Checkpoint, ResultsWriter
from fedbus.nodes.peer import PeerMachine, PeerNode, PeerObserver, PeerOutcome, PeerSettings
from fedbus.nodes.peer_checkpoint import PeerCheckpoint
from fedbus.nodes.server import byte_counts
from fedbus.protocols.gossip import GossipPeer
from fedbus.protocols.gossip_pushsum import PushSumPeer
from fedbus.protocols.gossip_types import GossipConfig
from fedbus.topology import NodeRole, Topology
from fedbus.transport.base import Transport, Will

__all__ = ["GossipMonitor", "GossipResult", "gossip_config", "make_peer", "run_gossip"]


def gossip_config(topology: Topology) -> GossipConfig:
    """The peers' machine config from the ``protocol:`` and ``training:`` sections."""
    p, t = topology.protocol, topology.training
    train: dict[str, bool | int | float | str] = {
        "epochs": t.epochs, "batch_size": t.batch_size, "lr": t.lr, "mu": t.mu,
    }  # fmt: skip
    return GossipConfig(
        rounds=p.rounds, mixing=p.mixing, round_timeout_s=p.round_timeout_s,
        join_timeout_s=p.join_timeout_s, train_config=train, lr_decay=p.lr_decay,
        final_mixing_rounds=p.final_mixing_rounds,
    )  # fmt: skip


def make_peer(
    topology: Topology,
    data: FederationData,
    node_id: str,
    connect: Callable[[Will], Transport],
    *,
    run: RunId | None,
    initial: Arrays,
    trainer: Trainer | None = None,
    observer: PeerObserver | None = None,
    progress: Callable[[int, frozenset[str]], Awaitable[None]] | None = None,
    data_file: str | None = None,
    fault_seed: int | None = None,
    restart: PeerCheckpoint | None = None,
) -> PeerNode:
    """The `PeerNode` of ``node_id`` (its partition, neighbours, faults and machine).

    ``fault_seed`` draws the simulated faults from another seed than the
    topology's (same data and initial model, other churn: the benchmark's runs);
    ``restart`` resumes the peer from its checkpoint (its model and round).
    """
    info = topology.node(node_id)
    adjacency = topology.adjacency()
    config = gossip_config(topology)
    if trainer is None:
        trainer = client_trainer(topology, data, node_id, data_file=data_file)
    trainer = poisoned_trainer(topology, data, node_id) or trainer
    defense = peer_defense(topology, data) if config.mixing == "metropolis" else None

    def build(run_id: RunId) -> PeerMachine:
        node = NodeId(node_id)
        if config.mixing == "push_sum":
            rng = random.Random(derive_seed(topology.seed, "push-sum", node_id))
            return PushSumPeer(
                config, node=node, run=run_id, weights=initial,
                out_neighbours=[NodeId(n) for n in info.neighbours], rng=rng,
            )  # fmt: skip
        degrees = {NodeId(n): len(adjacency.get(n, ())) for n in info.neighbours}
        start, weights = (0, initial) if restart is None else (restart.round, restart.weights)
        return GossipPeer(
            config, node=node, run=run_id, weights=weights, neighbours=degrees, defense=defense,
            start_round=start,
        )  # fmt: skip

    settings = PeerSettings(
        node_id=node_id, namespace=topology.name, neighbours=tuple(info.neighbours),
        seed=topology.seed, round_hint_s=min(topology.protocol.round_timeout_s, 2.0),
        round_timeout_s=topology.protocol.round_timeout_s,
        rejoin_wait_s=min(topology.protocol.round_timeout_s, 2.0),
        linger_s=2.0 * topology.protocol.round_timeout_s,
    )  # fmt: skip
    faults = fault_plan(topology, node_id)
    if fault_seed is not None:
        faults = dataclasses.replace(faults, seed=fault_seed)
    return PeerNode(
        build, trainer, connect, settings, run=run, faults=faults, observer=observer,
        progress=progress, attack=peer_attack(topology, node_id),
    )  # fmt: skip


@dataclass(slots=True)
class GossipResult:
    """What a gossip run produced."""

    run_id: str
    success: bool
    reason: str
    peers: dict[str, PeerOutcome]
    rows: list[dict[str, Any]]
    weights: dict[str, Any]
    summary: dict[str, Any] | None = None
    out: Path | None = None


async def run_gossip(
    topology: Topology,
    *,
    out: Path | None,
    base_dir: Path = Path(),
    topology_text: str = "",
    on_row: RowSink | None = None,
    trainer_hook: Callable[[str, Trainer], Trainer] | None = None,
    fault_seed: int | None = None,
    resume: Checkpoint | None = None,
) -> GossipResult:
    """Run a gossip ``topology`` to its end in this process (see the module docstring).

    Args:
        topology: a validated gossip topology.
        out: the results folder (None: write none).
        base_dir: what relative data paths are relative to.
        topology_text: the topology file, copied into the results.
        on_row: called with each round's row (the progress display).
        trainer_hook: replaces or wraps each started peer's trainer (tests).
        fault_seed: draw the simulated faults from this seed instead of the topology's.
        resume: continue the run of this checkpoint, read from ``out``
            (`fedbus.launch.gossip_resume`: every peer from its own file).

    Raises:
        ConfigError: the data or model cannot be built.
    """
    data = await asyncio.to_thread(build_data, topology, base_dir)
    defenses = server_defenses(topology, data)  # the test split less any validation share
    evaluator = server_trainer(topology, defenses.data)
    initial = evaluator.initial_weights(init_seed(topology.seed))
    local = [i.id for i in topology.node_infos() if i.role is NodeRole.PEER and not i.external]
    run_id = RunId(resume.run if resume is not None else new_run_id(topology.name))
    restart = await asyncio.to_thread(resume_state, topology, out, resume, local)
    results = ResultsWriter(out, resume_round=restart.round) if out is not None else None
    checkpoints = None
    if results is not None:
        results.write_topology(topology_text)
        checkpoints = GossipCheckpoints(results, topology, run=run_id, text=topology_text)
    rows: list[dict[str, Any]] = []

    def sink(row: dict[str, Any]) -> None:
        rows.append(row)
        if results is not None:
            results.append(row)
        if on_row is not None:
            on_row(row)

    started = time.monotonic()
    transports: list[Transport] = []

    def traffic() -> tuple[int, int]:
        counts = [byte_counts(t) for t in transports]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    async with open_bus(topology) as bus:
        if bus.memory is not None:
            memory = bus.memory

            def traffic() -> tuple[int, int]:  # the bus keeps counts across reconnects
                stats = [memory.stats.client(p) for p in local]
                return sum(s.bytes_in for s in stats), sum(s.bytes_out for s in stats)

        attackers = frozenset(p for nodes in topology.attackers() for p in nodes)
        monitor = GossipMonitor(
            local, evaluator, sink, attackers=attackers, traffic=traffic,
            start_rounds={p: restart.start_round(p) for p in local},
            first_round=restart.round + 1, elapsed_before=restart.elapsed_s,
            checkpoints=checkpoints,
        )  # fmt: skip

        def connector(node: str) -> Callable[[Will], Transport]:
            def connect(will: Will) -> Transport:
                transport = bus.connect(node, will)
                transports.append(transport)
                return transport

            return connect

        nodes: dict[str, PeerNode] = {}
        for peer in local:
            trainer = client_trainer(topology, data, peer)
            if trainer_hook is not None:
                trainer = trainer_hook(peer, trainer)
            nodes[peer] = make_peer(
                topology, data, peer, connector(peer), run=run_id, initial=initial,
                trainer=trainer, observer=monitor, progress=monitor.reached, fault_seed=fault_seed,
                restart=restart.peers.get(peer),
            )  # fmt: skip
        async with asyncio.TaskGroup() as tg:
            worker = tg.create_task(monitor.work(), name="fedbus[gossip].results")
            tasks = {p: tg.create_task(n.run(), name=f"fedbus[{p}].node") for p, n in nodes.items()}
            await asyncio.gather(*tasks.values())
            monitor.close()
            await worker
        outcomes = {p: t.result() for p, t in tasks.items()}
        broker = {"kind": bus.kind, "url": bus.url}
        bytes_total = sum(traffic())
    failed = [o for o in outcomes.values() if o.status == "failed"]
    finished = [o for o in outcomes.values() if o.status == "finished"]
    success = bool(finished) and not failed
    reason = (
        f"{len(finished)} of {len(outcomes)} peers completed {topology.protocol.rounds} rounds"
        if success
        else "; ".join(f"{o.node_id}: {o.reason}" for o in failed) or "no peer finished"
    )
    weights = monitor.average(initial)
    summary = None
    if results is not None:
        last = rows[-1] if rows else {}
        summary = results.finish(
            weights,
            {
                "name": topology.name, "protocol": "gossip", "mixing": topology.protocol.mixing,
                "peers": len(topology.nodes.peers), "wall_s": round(time.monotonic() - started, 6),
                "bytes_total": bytes_total, "broker": broker, "run": run_id,
                "seed": topology.seed, "success": success, "reason": reason,
                "final_accuracy_min": last.get("accuracy_min"),
                "final_accuracy_max": last.get("accuracy_max"),
                "final_consensus_distance": last.get("consensus_distance"),
                "peer_outcomes": dict(Counter(o.status for o in outcomes.values())),
                **defenses.summary,
            },
            title=f"{topology.name} ({run_id})",
        )  # fmt: skip
    return GossipResult(run_id, success, reason, outcomes, rows, weights, summary, out)


def peer_rows(rows: list[Mapping[str, Any]]) -> list[float]:
    """Consensus distances of ``rows`` in order (a helper for tests and the benchmark)."""
    return [float(r["consensus_distance"]) for r in rows]
