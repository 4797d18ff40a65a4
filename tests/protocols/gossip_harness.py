"""A gossip network of N peers (GossipPeer or PushSumPeer) with instant delivery.

A SendModel reaches each addressee as PeerModelReceived (through a FIFO
queue, so no machine is re-entered). Training stays pending until
`finish_tasks`; by default it returns the model unchanged (mixing only), or
the model plus ``bump`` when given. `kill` drops a peer's traffic (its
neighbours get NeighbourLost unless ``will=False``); `revive` lets it talk
again and announces it to its neighbours.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from fedbus._types import NodeId, RunId
from fedbus.protocols.base import Command, Event
from fedbus.protocols.fedavg import Started, Tick, Train, TrainingDone
from fedbus.protocols.gossip import GossipPeer
from fedbus.protocols.gossip_pushsum import PushSumPeer
from fedbus.protocols.gossip_types import (
    GossipConfig,
    NeighbourJoined,
    NeighbourLost,
    PeerModelReceived,
    PeerSnapshotReceived,
    Rejoined,
    RoundMixed,
    SendModel,
)
from fedbus.protocols.mixing import consensus_distance

RUN = RunId("run-g")
A, B = NodeId("a"), NodeId("b")


def model(sender: NodeId, round_: int, value: float = 1.0) -> PeerModelReceived:
    """A neighbour's model of ``round_`` (3 values of ``value``, degree 2)."""
    return PeerModelReceived(sender=sender, run=RUN, round=round_,
                             weights={"w": np.full(3, value)}, degree=2)  # fmt: skip


def snapshot(sender: NodeId, round_: int, value: float) -> PeerSnapshotReceived:
    """A neighbour's rejoin snapshot of ``round_``."""
    return PeerSnapshotReceived(sender=sender, run=RUN, round=round_,
                                weights={"w": np.full(3, value)})  # fmt: skip


def joined_peer(config: GossipConfig) -> GossipPeer:
    """'me' (neighbours a and b, degree 2), started, both neighbours joined: round 1."""
    peer = GossipPeer(config, node=NodeId("me"), run=RUN, weights={"w": np.zeros(3)},
                      neighbours={A: 2, B: 2})  # fmt: skip
    peer.handle(Started(), now=0.0)
    peer.handle(NeighbourJoined(node=A), now=0.0)
    peer.handle(NeighbourJoined(node=B), now=0.0)
    return peer


def ring(n: int) -> dict[str, tuple[str, ...]]:
    ids = [f"p{i}" for i in range(n)]
    return {ids[i]: tuple(sorted({ids[(i - 1) % n], ids[(i + 1) % n]})) for i in range(n)}


def circulant(n: int, offsets: Sequence[int]) -> dict[str, tuple[str, ...]]:
    """Undirected circulant graph: i ~ i +- k for each k (a 2k-regular graph)."""
    ids = [f"p{i}" for i in range(n)]
    adj: dict[str, set[str]] = {p: set() for p in ids}
    for i in range(n):
        for k in offsets:
            adj[ids[i]].add(ids[(i + k) % n])
            adj[ids[(i + k) % n]].add(ids[i])
    return {p: tuple(sorted(v)) for p, v in adj.items()}


Peer = GossipPeer | PushSumPeer


class Network:
    """N peers, one per adjacency key; ``out`` edges for push-sum may be directed."""

    def __init__(
        self,
        adjacency: Mapping[str, Sequence[str]],
        *,
        config: GossipConfig,
        values: Mapping[str, float] | None = None,
        in_adjacency: Mapping[str, Sequence[str]] | None = None,
        seed: int = 0,
    ) -> None:
        self.adjacency = {k: tuple(v) for k, v in adjacency.items()}
        self.values = {p: (values or {}).get(p, float(i)) for i, p in enumerate(sorted(adjacency))}
        self.peers: dict[str, Peer] = {}
        for p in sorted(adjacency):
            weights = {"w": np.full(3, self.values[p], np.float64)}
            if config.mixing == "metropolis":
                degrees = {NodeId(q): len(self.adjacency[q]) for q in self.adjacency[p]}
                self.peers[p] = GossipPeer(config, node=NodeId(p), run=RUN, weights=weights,
                                           neighbours=degrees)  # fmt: skip
            else:
                ins = None if in_adjacency is None else [NodeId(q) for q in in_adjacency[p]]
                self.peers[p] = PushSumPeer(
                    config, node=NodeId(p), run=RUN, weights=weights,
                    out_neighbours=[NodeId(q) for q in self.adjacency[p]], in_neighbours=ins,
                    rng=random.Random(f"{seed}:{p}"),
                )  # fmt: skip
        self.alive = set(self.peers)
        self.sent: dict[str, list[Command]] = {p: [] for p in self.peers}
        self.tasks: dict[str, Train] = {}
        self.queue: deque[tuple[str, Event]] = deque()
        self.in_flight_mass = 0.0

    def start(self, now: float = 0.0) -> None:
        for p in self.peers:
            self.post(p, Started())
        for p in self.peers:
            for q in self.adjacency[p]:
                self.post(q, NeighbourJoined(node=NodeId(p)))
        self.flush(now)

    def post(self, node: str, event: Event) -> None:
        self.queue.append((node, event))

    def flush(self, now: float) -> None:
        while self.queue:
            node, event = self.queue.popleft()
            if isinstance(event, PeerModelReceived):
                self.in_flight_mass -= event.mass
            if node not in self.alive:
                continue
            commands = self.peers[node].handle(event, now=now)
            self.sent[node] += commands
            for command in commands:
                if isinstance(command, Train):
                    self.tasks[node] = command
                elif isinstance(command, SendModel) and command.sync:
                    for q in command.to:
                        self.post(q, PeerSnapshotReceived(
                            sender=NodeId(node), run=RUN, round=command.round,
                            weights=command.weights,
                        ))  # fmt: skip
                elif isinstance(command, SendModel):
                    for q in command.to:
                        self.in_flight_mass += command.mass
                        self.post(q, PeerModelReceived(
                            sender=NodeId(node), run=RUN, round=command.round,
                            weights=command.weights, degree=command.degree, mass=command.mass,
                        ))  # fmt: skip

    def finish_tasks(
        self, now: float, *, only: Iterable[str] | None = None, bump: float = 0.0
    ) -> None:
        for p in sorted(self.tasks if only is None else only):
            if p not in self.alive:
                continue  # a dead peer's training resumes when it is revived
            task = self.tasks.pop(p, None)
            if task is None:
                continue
            weights = {k: np.asarray(v) + bump for k, v in task.weights.items()}
            self.post(p, TrainingDone(round=task.round, weights=weights, num_examples=1))
        self.flush(now)

    def tick(self, now: float) -> None:
        for p in sorted(self.alive):
            self.post(p, Tick())
        self.flush(now)

    def kill(self, node: str, now: float, *, will: bool = True) -> None:
        self.alive.discard(node)
        if will:
            for q in self.adjacency[node]:
                self.post(q, NeighbourLost(node=NodeId(node), reason="last will"))
        self.flush(now)

    def revive(self, node: str, now: float) -> None:
        self.alive.add(node)
        for q in self.adjacency[node]:
            self.post(q, NeighbourJoined(node=NodeId(node)))
        self.flush(now)

    def rejoin(self, node: str, now: float) -> None:
        """Back from churn as the runtime does it: Rejoined, then Joins to the neighbours."""
        self.alive.add(node)
        self.tasks.pop(node, None)  # the training it left before is dropped
        answered = frozenset(NodeId(q) for q in self.adjacency[node] if q in self.alive)
        self.post(node, Rejoined(answered=answered))
        for q in sorted(answered):
            self.post(q, NeighbourJoined(node=NodeId(node), wants_model=True))
            self.post(node, NeighbourJoined(node=NodeId(q)))
        self.flush(now)

    # --- reading ----------------------------------------------------------------

    def models(self, nodes: Iterable[str] | None = None) -> list[dict[str, Any]]:
        return [self.peers[p].weights for p in sorted(self.alive if nodes is None else nodes)]

    def distance(self, nodes: Iterable[str] | None = None) -> float:
        return consensus_distance(self.models(nodes))

    def of(self, node: str, kind: type[Any]) -> list[Any]:
        return [c for c in self.sent[node] if isinstance(c, kind)]

    def mixed_rounds(self, node: str) -> list[int]:
        return [c.round for c in self.of(node, RoundMixed)]
