"""The gossip launcher's monitor: per-round rows from every peer's mixed models.

There is no aggregating node in gossip, so the launcher's monitor is where
the results come from: every peer reports each round's mixed model
(`RoundMixed`), and once every peer still in the run has reported round r
(or moved past it), the row of round r is written (see `fedbus.launch.gossip`
for its keys), and with it the round's checkpoint when the run has a results
folder (`fedbus.launch.gossip_resume`).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedbus.aggregation import Arrays
from fedbus.launch.gossip_resume import GossipCheckpoints
from fedbus.learning.trainer import Trainer
from fedbus.nodes.peer_types import PeerObserver
from fedbus.protocols.gossip_types import RoundMixed
from fedbus.protocols.mixing import consensus_distance, mix

__all__ = ["GossipMonitor", "RowSink"]

RowSink = Callable[[dict[str, Any]], None]


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
        attackers: simulated Byzantine peers among ``peers``: they report
            rounds like the others, but the accuracy, consensus and model
            figures are over the honest peers only (an attacker's own model
            is not what the federation is judged by, as a server's is).
        sink: receives each finished row (results file, progress display).
        traffic: total (received, sent) bytes of all peers' connections so far.
        clock: monotonic seconds.
        start_rounds: rounds each peer had completed before this run (a resumed
            run); nobody waits for rows before them.
        first_round: the first row's round (a resumed run: the checkpoint's + 1).
        elapsed_before: run time a resumed run had spent (``elapsed_s`` goes on from it).
        checkpoints: writes each round's checkpoint after its row (None: none).
    """

    def __init__(
        self,
        peers: list[str],
        evaluator: Trainer,
        sink: RowSink,
        *,
        attackers: frozenset[str] = frozenset(),
        traffic: Callable[[], tuple[int, int]] = lambda: (0, 0),
        clock: Callable[[], float] = time.monotonic,
        start_rounds: Mapping[str, int] | None = None,
        first_round: int = 1,
        elapsed_before: float = 0.0,
        checkpoints: GossipCheckpoints | None = None,
    ) -> None:
        self.peers = list(peers)
        self.attackers = frozenset(attackers)
        self._evaluator = evaluator
        self._sink = sink
        self._traffic = traffic
        self._clock = clock
        self._rounds: dict[int, _Round] = {}
        self._latest: dict[str, int] = {p: n for p, n in (start_rounds or {}).items() if n}
        self._gone: set[str] = set()
        self._away: set[str] = set()
        self.last_models: dict[str, Arrays] = {}
        self._next = first_round
        self._checkpoints = checkpoints
        self._started = clock() - elapsed_before
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
        self._moved.set()  # who is running changed: `reached` looks again
        self._moved = asyncio.Event()

    def network_round(self) -> int:
        """The round the peers still running have reached (median; churn's clock)."""
        live = [self._latest.get(p, 0) for p in self.peers if p not in self._gone | self._away]
        values = sorted(live or self._latest.values() or [0])
        return values[len(values) // 2]

    def neighbourhood_round(self, peers: Collection[str]) -> int | None:
        """The newest round completed by one of ``peers`` still running (None: none is)."""
        live = [self._latest.get(p, 0) for p in peers if p not in self._gone | self._away]
        return max(live) if live else None

    async def reached(self, round_: int, peers: Collection[str] | None = None) -> None:
        """Return once the network, or one of ``peers``, has completed ``round_``.

        Without ``peers``: once `network_round` is at least ``round_``. With
        them (churn's clock: an away peer's neighbours): once one of them
        still running has completed ``round_``, or none of them is running.
        Callers bound the wait.
        """
        while True:
            if peers is None:
                if self.network_round() >= round_:
                    return
            else:
                newest = self.neighbourhood_round(peers)
                if newest is None or newest >= round_:
                    return
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
            row, models = await asyncio.to_thread(self._row, r)
            self._sink(row)
            if self._checkpoints is not None and models:
                average = self._mean(models)
                await asyncio.to_thread(self._checkpoints.record, r, models, average, row)

    def _row(self, r: int) -> tuple[dict[str, Any], dict[str, Arrays]]:
        entry = self._rounds.pop(r)
        honest = {p: m for p, m in sorted(entry.models.items()) if p not in self.attackers}
        results = [self._evaluator.evaluate(m) for m in (honest or entry.models).values()]
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
            "consensus_distance": consensus_distance(list((honest or entry.models).values())),
            "participants": len(entry.models),
            "dropped": len(self.peers) - len(entry.models),
            "rejected": dict(sorted(entry.rejected.items())),
            "bytes_up": up,
            "bytes_down": down,
        }, entry.models

    def average(self, like: Arrays) -> dict[str, Any]:
        """The average of the honest peers' last models (the run's model)."""
        return self._mean(self.last_models or {"initial": like}, like=like)

    def _mean(self, models: Mapping[str, Arrays], like: Arrays | None = None) -> dict[str, Any]:
        """The plain mean of the honest ones among ``models`` (of all, if none is honest)."""
        honest = {p: m for p, m in models.items() if p not in self.attackers} or dict(models)
        share = 1.0 / len(honest)
        return mix(honest, dict.fromkeys(honest, share), like=like or next(iter(honest.values())))
