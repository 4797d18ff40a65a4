"""Synchronous gossip peer: decentralized SGD with Metropolis-Hastings mixing.

Theory of operation
===================

There is no server. Every peer runs the same machine over its neighbours in
an undirected graph (the runtime passes each neighbour's graph degree). A
round ``r`` is: train locally, send the trained model to the active
neighbours, wait for their models of round ``r`` up to ``round_timeout_s``,
mix, go on to the next round (D-PSGD, Lian et al. 2017, train-then-mix).

States (`PeerState`)::

    IDLE --Started--> WAITING_FOR_NEIGHBOURS --(all joined | join deadline)--> TRAINING
    TRAINING --TrainingDone / TrainingFailed--> COLLECTING          (SendModel)
    COLLECTING --(nobody outstanding | round deadline)--> TRAINING   (RoundMixed, Train)
                                                      --> FINISHED   (last round: Finish)
    any state --(our own misuse)--> ERROR (terminal)

Mixing. With ``P`` the neighbours whose round-``r`` model arrived, the new
model is ``x_i = W_ii * x_i + sum_{j in P} W_ij * x_j`` with the
Metropolis-Hastings ``W_ij = 1 / (1 + max(d_i, d_j))`` over graph degrees and
``W_ii = 1 - sum_{j in P} W_ij``. So a missing neighbour's weight is folded
into the self weight rather than spread over the others: the row still sums
to one, and since loss is usually symmetric (when j's model does not reach i,
i's does not reach j either, or j is dropped on both sides) the mixing stays
doubly stochastic and keeps the network average. Spreading it over the
present neighbours instead would move mass between peers and bias the average.

Neighbours. All graph neighbours start active. An active neighbour is waited
for; one that misses ``missed_rounds_to_drop`` consecutive round deadlines, or
that the runtime reports gone (`NeighbourLost`), is dropped (`NeighbourDropped`)
and no longer waited for. It rejoins cleanly when it announces itself again
(`NeighbourJoined`) or when a valid model of the current or a later round
arrives from it: that model is used like any other.

Rounds. Round numbers never go backwards. Models of an earlier round, a second
model from one neighbour for one round, models of other runs, from non
neighbours, with a disagreeing degree or with unusable tensors are refused
with `Reject` (data, never an exception). A model of a later round is kept
(the newest per neighbour) and means that neighbour has moved on, so it is no
longer waited for in this round. When a round ends, the next one is
``max(r + 1, newest round kept)``: a peer that was away (churn) jumps to where
its neighbours are instead of replaying the rounds it missed.

Invariants (checked by the hypothesis tests): rounds of RoundMixed strictly
increase; each neighbour's model enters at most one mix, at most once, only
in the round it names; coefficients sum to one; every state but TRAINING,
IDLE and FINISHED has a deadline.
"""

from __future__ import annotations

import enum
import math
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedbus._types import NodeId, RunId
from fedbus.aggregation import Arrays
from fedbus.errors import LocalProtocolError
from fedbus.protocols.base import Command, Event
from fedbus.protocols.fedavg_types import (
    Finish,
    Reject,
    RejectReason,
    ScalarMap,
    Started,
    Tick,
    Train,
    TrainingDone,
    TrainingFailed,
)
from fedbus.protocols.gossip_types import (
    NOT_NEIGHBOUR,
    GossipConfig,
    NeighbourDropped,
    NeighbourJoined,
    NeighbourLost,
    PeerModelReceived,
    RoundMixed,
    SendModel,
    apply_training,
    weights_problem,
)
from fedbus.protocols.mixing import metropolis_row, mix

__all__ = ["PEER_TRANSITIONS", "GossipPeer", "PeerState"]


class PeerState(enum.Enum):
    """Where a gossip peer stands; see the module docstring."""

    IDLE = "idle"
    WAITING_FOR_NEIGHBOURS = "waiting"
    TRAINING = "training"
    COLLECTING = "collecting"
    FINISHED = "finished"
    ERROR = "error"


_P = PeerState
_REMOTE: tuple[type[Event], ...] = (NeighbourJoined, NeighbourLost, PeerModelReceived, Tick)


def _row(
    state: PeerState, changes: dict[type[Event], frozenset[PeerState]]
) -> dict[type[Event], frozenset[PeerState]]:
    row = {kind: frozenset({state}) for kind in _REMOTE}
    for kind, targets in changes.items():
        row[kind] = row.get(kind, frozenset()) | targets
    return row


_NEXT = frozenset({_P.TRAINING, _P.FINISHED})
PEER_TRANSITIONS: dict[PeerState, dict[type[Event], frozenset[PeerState]]] = {
    _P.IDLE: _row(_P.IDLE, {Started: frozenset({_P.WAITING_FOR_NEIGHBOURS, _P.TRAINING})}),
    _P.WAITING_FOR_NEIGHBOURS: _row(
        _P.WAITING_FOR_NEIGHBOURS,
        {NeighbourJoined: frozenset({_P.TRAINING}), Tick: frozenset({_P.TRAINING})},
    ),
    _P.TRAINING: _row(
        _P.TRAINING,
        {
            TrainingDone: frozenset({_P.COLLECTING}) | _NEXT,
            TrainingFailed: frozenset({_P.COLLECTING}) | _NEXT,
        },
    ),
    _P.COLLECTING: _row(
        _P.COLLECTING, {PeerModelReceived: _NEXT, NeighbourLost: _NEXT, Tick: _NEXT}
    ),
    _P.FINISHED: _row(_P.FINISHED, {}),
    _P.ERROR: {},
}
"""state -> {legal event type -> states it may lead to}; a missing entry is illegal."""


class GossipPeer:
    """A synchronous Metropolis-Hastings gossip peer (see the module docstring).

    Args:
        config: the protocol section (``mixing`` must be "metropolis").
        node: this peer's id.
        run: this run's id; models of other runs are rejected.
        weights: the initial model (all peers should start from the same one).
        neighbours: each graph neighbour's id and graph degree.
    """

    def __init__(
        self,
        config: GossipConfig,
        *,
        node: NodeId,
        run: RunId,
        weights: Arrays,
        neighbours: Mapping[NodeId, int],
    ) -> None:
        if config.mixing != "metropolis":
            raise ValueError("GossipPeer mixes with metropolis; use PushSumPeer for push_sum")
        if node in neighbours:
            raise ValueError(f"{node!r} cannot be its own neighbour")
        self.config = config
        self.node = node
        self.run = run
        self._weights: dict[str, Any] = {k: np.asarray(v) for k, v in weights.items()}
        self._degrees = dict(neighbours)
        self._state = PeerState.IDLE
        self._allowed: frozenset[PeerState] = frozenset()
        self._now = -math.inf
        self._deadline: float | None = None
        self._round = 0
        self._completed = 0
        self._joined: set[NodeId] = set()
        self._active: set[NodeId] = set(neighbours)
        self._missed: Counter[NodeId] = Counter()
        self._inbox: dict[NodeId, PeerModelReceived] = {}
        self._ahead: dict[NodeId, PeerModelReceived] = {}
        self._trained: dict[str, Any] = {}
        self._metrics: ScalarMap = {}
        self._rejected: Counter[str] = Counter()

    # --- the Machine surface ----------------------------------------------

    @property
    def state(self) -> PeerState:
        """The current state."""
        return self._state

    @property
    def weights(self) -> dict[str, Any]:
        """The peer's current model."""
        return self._weights

    @property
    def current_round(self) -> int:
        """The round in progress (0 before round 1)."""
        return self._round

    @property
    def completed_round(self) -> int:
        """The last round mixed."""
        return self._completed

    @property
    def active_neighbours(self) -> frozenset[NodeId]:
        """Neighbours currently waited for and mixed with."""
        return frozenset(self._active)

    def next_deadline(self) -> float | None:
        """The join or round deadline in force, if any."""
        return self._deadline

    def handle(self, event: Event, *, now: float) -> list[Command]:
        """Handle one event at time ``now``; an expired deadline is handled first.

        Raises:
            LocalProtocolError: illegal event for the state, a training result
                for another round, time went backwards, or the machine is in ERROR.
        """
        if self._state is PeerState.ERROR:
            raise LocalProtocolError("the gossip peer is in ERROR and accepts nothing")
        try:
            if now < self._now:
                raise LocalProtocolError(f"time went backwards: {now} < {self._now}")
            self._now = now
            out: list[Command] = []
            if self._deadline is not None and now >= self._deadline:
                out += self._dispatch(Tick())
            return out + self._dispatch(event)
        except LocalProtocolError:
            self._state = PeerState.ERROR
            self._deadline = None
            raise

    # --- dispatch ------------------------------------------------------------

    def _dispatch(self, event: Event) -> list[Command]:
        allowed = PEER_TRANSITIONS[self._state].get(type(event))
        if allowed is None:
            raise LocalProtocolError(
                f"{type(event).__name__} is illegal in state {self._state.name}"
            )
        self._allowed = allowed
        match event:
            case Started():
                self._set_state(PeerState.WAITING_FOR_NEIGHBOURS)
                self._deadline = self._now + self.config.join_timeout_s
                return self._maybe_begin()
            case Tick():
                if self._deadline is None or self._now < self._deadline:
                    return []
                if self._state is PeerState.WAITING_FOR_NEIGHBOURS:
                    return self._start_round(1)
                return self._close_round()
            case NeighbourJoined():
                return self._on_joined(event.node)
            case NeighbourLost():
                return self._on_lost(event)
            case PeerModelReceived():
                return self._on_model(event)
            case TrainingDone() | TrainingFailed():
                return self._on_trained(event)
        raise LocalProtocolError(f"unknown event {event!r}")  # pragma: no cover

    def _set_state(self, state: PeerState) -> None:
        if state not in self._allowed:  # pragma: no cover - a bug in this module
            raise LocalProtocolError(f"internal: {self._state.name} -> {state.name} not allowed")
        self._state = state

    # --- neighbours ------------------------------------------------------------

    def _maybe_begin(self) -> list[Command]:
        if self._state is PeerState.WAITING_FOR_NEIGHBOURS and self._joined >= set(self._degrees):
            return self._start_round(1)
        return []

    def _on_joined(self, node: NodeId) -> list[Command]:
        if node not in self._degrees:
            return []
        self._joined.add(node)
        self._active.add(node)
        self._missed[node] = 0
        return self._maybe_begin()

    def _on_lost(self, event: NeighbourLost) -> list[Command]:
        if event.node not in self._active or self._state is PeerState.FINISHED:
            return []
        self._active.discard(event.node)
        dropped = NeighbourDropped(
            node=event.node, round=self._round, reason=event.reason or "left"
        )
        return [dropped, *self._progress()]

    def _on_model(self, event: PeerModelReceived) -> list[Command]:
        reason, detail = self._classify(event)
        if reason:
            self._rejected[reason] += 1
            return [Reject(sender=event.sender, round=event.round, reason=reason, detail=detail)]
        self._active.add(event.sender)  # a model is as good as a NeighbourJoined
        self._missed[event.sender] = 0
        if event.round == self._round:
            self._inbox[event.sender] = event
        else:
            self._ahead[event.sender] = event
        return self._progress()

    def _classify(self, event: PeerModelReceived) -> tuple[str, str]:
        if event.run != self.run:
            return RejectReason.FOREIGN_RUN, ""
        if event.sender not in self._degrees:
            return NOT_NEIGHBOUR, ""
        if self._state is PeerState.FINISHED:
            return RejectReason.STALE_ROUND, f"finished after round {self._completed}"
        open_now = self._state in (PeerState.TRAINING, PeerState.COLLECTING)
        if event.round < self._round or (event.round == self._round and not open_now):
            return RejectReason.STALE_ROUND, f"at round {self._round}"
        if event.round == self._round and event.sender in self._inbox:
            return RejectReason.DUPLICATE, ""
        kept = self._ahead.get(event.sender)
        if kept is not None and kept.round >= event.round:
            return (
                RejectReason.DUPLICATE if kept.round == event.round else RejectReason.STALE_ROUND,
                "",
            )
        if event.degree and event.degree != self._degrees[event.sender]:
            return (
                RejectReason.INVALID,
                f"degree {event.degree}, graph says {self._degrees[event.sender]}",
            )
        problem = weights_problem(self._weights, event.weights)
        return (RejectReason.INVALID, problem) if problem else ("", "")

    # --- rounds ---------------------------------------------------------------------

    def _start_round(self, round_: int) -> list[Command]:
        self._set_state(PeerState.TRAINING)
        self._deadline = None
        self._round = round_
        out: list[Command] = []
        for sender, kept in sorted(self._ahead.items()):
            if kept.round <= round_:
                del self._ahead[sender]
                if kept.round == round_:
                    self._inbox[sender] = kept
                else:  # kept for a round we jumped over
                    self._rejected[RejectReason.STALE_ROUND] += 1
                    out.append(Reject(sender=sender, round=kept.round, reason=RejectReason.STALE_ROUND,
                                      detail=f"jumped to round {round_}"))  # fmt: skip
        return [
            *out,
            Train(round=round_, weights=self._weights, config=dict(self.config.train_config)),
        ]

    def _on_trained(self, event: TrainingDone | TrainingFailed) -> list[Command]:
        if event.round != self._round:
            raise LocalProtocolError(
                f"training result for round {event.round} during round {self._round}"
            )
        trained = None
        if isinstance(event, TrainingDone):
            trained = apply_training(self._weights, event.weights, event.encoding)
            self._metrics = dict(event.metrics)
        if trained is None:  # failed or unusable: mix the untrained model, keep the graph whole
            trained, self._metrics = dict(self._weights), {"training_failed": 1}
        self._trained = trained
        self._set_state(PeerState.COLLECTING)
        self._deadline = self._now + self.config.round_timeout_s
        degree = len(self._degrees)
        send = SendModel(
            round=self._round, weights=trained, to=tuple(sorted(self._active)), degree=degree
        )
        return [send, *self._progress()]

    def _outstanding(self) -> set[NodeId]:
        return self._active - set(self._inbox) - set(self._ahead)

    def _progress(self) -> list[Command]:
        if self._state is PeerState.COLLECTING and not self._outstanding():
            return self._close_round()
        return []

    def _close_round(self) -> list[Command]:
        out: list[Command] = []
        missing = tuple(sorted(self._outstanding()))
        for node in missing:
            self._missed[node] += 1
            if self._missed[node] >= self.config.missed_rounds_to_drop:
                self._active.discard(node)
                out.append(
                    NeighbourDropped(
                        node=node, round=self._round, reason="missed the round deadline"
                    )
                )
        own = len(self._degrees)
        row: dict[str, float] = dict(
            metropolis_row(own, {j: self._degrees[j] for j in self._inbox})
        )
        row[self.node] = 1.0 - sum(row.values())
        models: dict[str, Arrays] = {sender: m.weights for sender, m in self._inbox.items()}
        models[self.node] = self._trained
        self._weights = mix(models, row, like=self._weights)
        out.append(
            RoundMixed(
                round=self._round, weights=self._weights, mixed_with=tuple(sorted(self._inbox)),
                missing=missing, coefficients=dict(sorted(row.items())), mass=1.0,
                metrics=self._metrics, rejected=dict(sorted(self._rejected.items())),
            )
        )  # fmt: skip
        self._rejected.clear()
        self._inbox.clear()
        self._completed = self._round
        if self._completed >= self.config.rounds:
            self._set_state(PeerState.FINISHED)
            self._deadline = None
            return [*out, Finish(success=True, reason=f"completed {self._completed} round(s)",
                                 completed_round=self._completed)]  # fmt: skip
        newest = max((m.round for m in self._ahead.values()), default=0)
        return out + self._start_round(min(max(self._round + 1, newest), self.config.rounds))
