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
``model.msgpack`` is the average of the peers' last models.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedbus._types import NodeId, RunId
from fedbus.aggregation import Arrays
from fedbus.launch.build import build_data, client_trainer, fault_plan, new_run_id, server_trainer
from fedbus.launch.federation import open_bus
from fedbus.learning.partition import FederationData
from fedbus.learning.seeds import derive_seed, init_seed
from fedbus.learning.trainer import Trainer
from fedbus.nodes import ResultsWriter
from fedbus.nodes.peer import PeerMachine, PeerNode, PeerObserver, PeerOutcome, PeerSettings
from fedbus.nodes.server import byte_counts
from fedbus.protocols.gossip import GossipPeer
from fedbus.protocols.gossip_pushsum import PushSumPeer
from fedbus.protocols.gossip_types import GossipConfig, RoundMixed
from fedbus.protocols.mixing import consensus_distance, mix
from fedbus.topology import NodeRole, Topology
from fedbus.transport.base import Transport, Will

__all__ = ["GossipMonitor", "GossipResult", "gossip_config", "make_peer", "run_gossip"]

RowSink = Callable[[dict[str, Any]], None]


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
    progress: Callable[[int], Awaitable[None]] | None = None,
    data_file: str | None = None,
) -> PeerNode:
    """The `PeerNode` of ``node_id`` (its partition, neighbours, faults and machine)."""
    info = topology.node(node_id)
    adjacency = topology.adjacency()
    config = gossip_config(topology)
    if trainer is None:
        trainer = client_trainer(topology, data, node_id, data_file=data_file)

    def build(run_id: RunId) -> PeerMachine:
        node = NodeId(node_id)
        if config.mixing == "push_sum":
            rng = random.Random(derive_seed(topology.seed, "push-sum", node_id))
            return PushSumPeer(
                config, node=node, run=run_id, weights=initial,
                out_neighbours=[NodeId(n) for n in info.neighbours], rng=rng,
            )  # fmt: skip
        degrees = {NodeId(n): len(adjacency.get(n, ())) for n in info.neighbours}
        return GossipPeer(config, node=node, run=run_id, weights=initial, neighbours=degrees)

    settings = PeerSettings(
        node_id=node_id, namespace=topology.name, neighbours=tuple(info.neighbours),
        seed=topology.seed, round_hint_s=min(topology.protocol.round_timeout_s, 2.0),
        round_timeout_s=topology.protocol.round_timeout_s,
        rejoin_wait_s=min(topology.protocol.round_timeout_s, 2.0),
        linger_s=2.0 * topology.protocol.round_timeout_s,
    )  # fmt: skip
    return PeerNode(
        build, trainer, connect, settings, run=run,
        faults=fault_plan(topology, node_id), observer=observer, progress=progress,
    )  # fmt: skip


@dataclass(slots=True)
class _Round:
    models: dict[str, Arrays] = field(default_factory=dict)
    rejected: Counter[str] = field(default_factory=Counter)
    last_at: float = 0.0


class GossipMonitor(PeerObserver):
    """Collects every peer's mixed models and turns each completed round into a row.

    Args:
        peers: the peers this process runs (external ones report nothing).
        evaluator: scores a model on the test split.
        sink: receives each finished row (results file, progress display).
        traffic: total (received, sent) bytes of all peers' connections so far.
        clock: monotonic seconds.
    """

    def __init__(
        self,
        peers: list[str],
        evaluator: Trainer,
        sink: RowSink,
        *,
        traffic: Callable[[], tuple[int, int]] = lambda: (0, 0),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.peers = list(peers)
        self._evaluator = evaluator
        self._sink = sink
        self._traffic = traffic
        self._clock = clock
        self._rounds: dict[int, _Round] = {}
        self._latest: dict[str, int] = {}
        self._gone: set[str] = set()
        self._away: set[str] = set()
        self.last_models: dict[str, Arrays] = {}
        self._next = 1
        self._started = clock()
        self._previous_at = self._started
        self._bytes_mark = (0, 0)
        self._queue: asyncio.Queue[int | None] = asyncio.Queue()
        self._moved = asyncio.Event()

    def on_mixed(self, peer: str, mixed: RoundMixed) -> None:
        """Record ``peer``'s model of ``mixed.round``; emit the rounds now complete."""
        entry = self._rounds.setdefault(mixed.round, _Round())
        entry.models[peer] = {k: np.array(v, copy=True) for k, v in mixed.weights.items()}
        entry.rejected.update({str(getattr(k, "value", k)): n for k, n in mixed.rejected.items()})
        entry.last_at = self._clock()
        self._latest[peer] = max(self._latest.get(peer, 0), mixed.round)
        self.last_models[peer] = entry.models[peer]
        self._away.discard(peer)
        self._advance()
        self._moved.set()
        self._moved = asyncio.Event()

    def on_gone(self, peer: str, status: str) -> None:
        """A peer finished or failed (it reports no more); an away peer is waited for."""
        if status == "away":
            self._away.add(peer)
        else:
            self._gone.add(peer)
            self._advance()

    def network_round(self) -> int:
        """The round the peers still running have reached (median; churn's clock)."""
        live = [self._latest.get(p, 0) for p in self.peers if p not in self._gone | self._away]
        values = sorted(live or self._latest.values() or [0])
        return values[len(values) // 2]

    async def reached(self, round_: int) -> None:
        """Return once `network_round` is at least ``round_`` (callers bound the wait)."""
        while self.network_round() < round_:
            await self._moved.wait()

    def _advance(self) -> None:
        while self._next in self._rounds and all(
            p in self._gone or self._latest.get(p, 0) >= self._next for p in self.peers
        ):
            self._queue.put_nowait(self._next)
            self._next += 1

    def close(self) -> None:
        """Emit what is left (the run is over) and end `work`."""
        for r in sorted(self._rounds):
            if r >= self._next:
                self._queue.put_nowait(r)
                self._next = r + 1
        self._queue.put_nowait(None)

    async def work(self) -> None:
        """Evaluate and emit rows as rounds complete, until `close` (in a worker thread each)."""
        while (r := await self._queue.get()) is not None:
            row = await asyncio.to_thread(self._row, r)
            self._sink(row)

    def _row(self, r: int) -> dict[str, Any]:
        entry = self._rounds.pop(r)
        results = [self._evaluator.evaluate(m) for _, m in sorted(entry.models.items())]
        accuracy = [float(x.accuracy) for x in results]
        loss = [float(x.loss) for x in results]
        now = self._clock()
        bytes_in, bytes_out = self._traffic()
        up, down = bytes_in - self._bytes_mark[0], bytes_out - self._bytes_mark[1]
        self._bytes_mark = (bytes_in, bytes_out)
        # Rows are written in round order; a round completed late (a peer away
        # on churn) is stamped when its row is made, so elapsed_s never decreases.
        at = max(entry.last_at or now, self._previous_at)
        wall, self._previous_at = at - self._previous_at, at
        return {
            "round": r,
            "wall_s": round(wall, 6),
            "elapsed_s": round(at - self._started, 6),
            "accuracy": float(np.mean(accuracy)),
            "loss": float(np.mean(loss)),
            "accuracy_min": min(accuracy),
            "accuracy_max": max(accuracy),
            "consensus_distance": consensus_distance(list(entry.models.values())),
            "participants": len(entry.models),
            "dropped": len(self.peers) - len(entry.models),
            "rejected": dict(sorted(entry.rejected.items())),
            "bytes_up": up,
            "bytes_down": down,
        }

    def average(self, like: Arrays) -> dict[str, Any]:
        """The average of the peers' last models (the run's model)."""
        models = self.last_models or {"initial": like}
        share = 1.0 / len(models)
        return mix(models, dict.fromkeys(models, share), like=like)


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
) -> GossipResult:
    """Run a gossip ``topology`` to its end in this process (see the module docstring).

    Args:
        topology: a validated gossip topology.
        out: the results folder (None: write none).
        base_dir: what relative data paths are relative to.
        topology_text: the topology file, copied into the results.
        on_row: called with each round's row (the progress display).
        trainer_hook: replaces or wraps each started peer's trainer (tests).

    Raises:
        ConfigError: the data or model cannot be built.
    """
    data = await asyncio.to_thread(build_data, topology, base_dir)
    evaluator = server_trainer(topology, data)
    initial = evaluator.initial_weights(init_seed(topology.seed))
    run_id = RunId(new_run_id(topology.name))
    results = ResultsWriter(out) if out is not None else None
    if results is not None:
        results.write_topology(topology_text)
    rows: list[dict[str, Any]] = []

    def sink(row: dict[str, Any]) -> None:
        rows.append(row)
        if results is not None:
            results.append(row)
        if on_row is not None:
            on_row(row)

    started = time.monotonic()
    transports: list[Transport] = []
    local = [i.id for i in topology.node_infos() if i.role is NodeRole.PEER and not i.external]

    def traffic() -> tuple[int, int]:
        counts = [byte_counts(t) for t in transports]
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    async with open_bus(topology) as bus:
        if bus.memory is not None:
            memory = bus.memory

            def traffic() -> tuple[int, int]:  # the bus keeps counts across reconnects
                stats = [memory.stats.client(p) for p in local]
                return sum(s.bytes_in for s in stats), sum(s.bytes_out for s in stats)

        monitor = GossipMonitor(local, evaluator, sink, traffic=traffic)

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
                trainer=trainer, observer=monitor, progress=monitor.reached,
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
            },
            title=f"{topology.name} ({run_id})",
        )  # fmt: skip
    return GossipResult(run_id, success, reason, outcomes, rows, weights, summary, out)


def peer_rows(rows: list[Mapping[str, Any]]) -> list[float]:
    """Consensus distances of ``rows`` in order (a helper for tests and the benchmark)."""
    return [float(r["consensus_distance"]) for r in rows]
