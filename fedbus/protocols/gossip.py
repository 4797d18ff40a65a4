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
                                                      --> COLLECTING (mixing-only round: SendModel)
                                                      --> FINISHED   (last round: Finish)
    TRAINING | COLLECTING --Rejoined--> SYNCING                       (back from churn)
    SYNCING --(every answered neighbour's snapshot | deadline)--> TRAINING | COLLECTING | FINISHED
    any state --(our own misuse)--> ERROR (terminal)

Learning-rate decay and the consensus phase. Round ``r`` trains with
``lr * lr_decay ** (r - 1)``, and after the ``rounds`` training rounds come
``final_mixing_rounds`` mixing-only rounds (send the current model, mix, no
training); see `GossipConfig` for why (a constant step keeps a consensus
error floor of order ``lr / spectral gap``; each mixing-only step shrinks
the distance to the average by the mixing matrix's second eigenvalue
modulus and keeps the average). A mixing-only round is an ordinary round on
the wire (one model per directed edge), so neighbours need no new rule.

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

Rejoin sync. A peer back from an absence (`Rejoined`, fed by the runtime
once its Joins were answered) does not train on from its stale model: it
waits (at most ``round_timeout_s``) for a snapshot of the current model of
each neighbour that answered, adopts their plain average, and goes on with
the round after the newest round they completed (so it neither replays
rounds nor drags stale parameters back in). Its own stale model and any
model received before it left are discarded. A neighbour that announces
itself with a Join (`NeighbourJoined` with ``wants_model``) is answered
with such a snapshot (`SendModel` with ``sync``) once at least one round is
done, also after the last round (the runtime lingers briefly for it). If the
neighbours completed the last round, the returning peer reports the adopted
model as that round's and finishes. This is the "pull the current model
from neighbours on (re)join" rule of practical gossip systems (e.g. the
bootstrapping of new nodes in Gossip Learning, Ormandi et al. 2013; Hegedus
et al. 2021); without it a returning peer would train alone from a model
``down_rounds`` rounds old and its neighbours would mix it back in.

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
from fedbus.protocols.base import Command, Event, legal_targets
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
    PeerSnapshotReceived,
    Rejoined,
    RoundMixed,
    SendModel,
    apply_training,
    weights_problem,
)
from fedbus.protocols.mixing import metropolis_row, mix
from fedbus.protocols.timed import DeadlineFirst

__all__ = ["PEER_TRANSITIONS", "GossipPeer", "PeerState"]


class PeerState(enum.Enum):
    """Where a gossip peer stands; see the module docstring."""

    IDLE = "idle"
    WAITING_FOR_NEIGHBOURS = "waiting"
    TRAINING = "training"
    COLLECTING = "collecting"
    SYNCING = "syncing"
    FINISHED = "finished"
    ERROR = "error"


_P = PeerState
_REMOTE: tuple[type[Event], ...] = (
    NeighbourJoined, NeighbourLost, PeerModelReceived, PeerSnapshotReceived, Rejoined, Tick,
)  # fmt: skip


def _row(
    state: PeerState, changes: dict[type[Event], frozenset[PeerState]]
) -> dict[type[Event], frozenset[PeerState]]:
    row = {kind: frozenset({state}) for kind in _REMOTE}
    for kind, targets in changes.items():
        row[kind] = row.get(kind, frozenset()) | targets
    return row


_NEXT = frozenset({_P.TRAINING, _P.COLLECTING, _P.FINISHED})
_SYNC = frozenset({_P.SYNCING}) | _NEXT
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
            Rejoined: _SYNC,
        },
    ),
    _P.COLLECTING: _row(
        _P.COLLECTING,
        {PeerModelReceived: _NEXT, NeighbourLost: _NEXT, Tick: _NEXT, Rejoined: _SYNC},
    ),
    _P.SYNCING: _row(_P.SYNCING, {PeerSnapshotReceived: _NEXT, NeighbourLost: _NEXT, Tick: _NEXT}),
    _P.FINISHED: _row(_P.FINISHED, {}),
    _P.ERROR: {},
}
"""state -> {legal event type -> states it may lead to}; a missing entry is illegal."""


class GossipPeer(DeadlineFirst):
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
        self._gone: set[NodeId] = set()  # lost (will or Leave) and not back: not sent to
        self._ended: set[NodeId] = set()  # left cleanly after their last round
        self._missed: Counter[NodeId] = Counter()
        self._inbox: dict[NodeId, PeerModelReceived] = {}
        self._ahead: dict[NodeId, PeerModelReceived] = {}
        self._trained: dict[str, Any] = {}
        self._metrics: ScalarMap = {}
        self._rejected: Counter[str] = Counter()
        self._snapshots: dict[NodeId, PeerSnapshotReceived] = {}
        self._expected: set[NodeId] = set()

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

    def _in_error(self) -> bool:
        return self._state is PeerState.ERROR

    def _enter_error(self) -> None:
        self._state = PeerState.ERROR

    # --- dispatch ------------------------------------------------------------

    def _dispatch(self, event: Event) -> list[Command]:
        allowed = legal_targets(PEER_TRANSITIONS, self._state, event)
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
                if self._state is PeerState.SYNCING:
                    return self._close_sync()
                return self._close_round()
            case NeighbourJoined():
                return self._on_joined(event)
            case Rejoined():
                return self._on_rejoined(event)
            case PeerSnapshotReceived():
                return self._on_snapshot(event)
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

    def _on_joined(self, event: NeighbourJoined) -> list[Command]:
        node = event.node
        if node not in self._degrees:
            return []
        self._joined.add(node)
        self._active.add(node)
        self._gone.discard(node)
        self._missed[node] = 0
        out: list[Command] = []
        if event.wants_model and self._completed >= 1 and self._state is not PeerState.SYNCING:
            out.append(
                SendModel(round=self._completed, weights=self._weights, to=(node,),
                          degree=len(self._degrees), sync=True)
            )  # fmt: skip
        return out + self._maybe_begin()

    # --- rejoin sync -------------------------------------------------------------

    def _on_rejoined(self, event: Rejoined) -> list[Command]:
        if self._state not in (PeerState.TRAINING, PeerState.COLLECTING):
            return []  # not started yet, or finished: nothing to resynchronise
        self._set_state(PeerState.SYNCING)
        answered = set(event.answered) & set(self._degrees)
        self._active = set(answered)
        self._gone = set(self._degrees) - answered  # until they are heard from
        for node in answered:
            self._missed[node] = 0
        self._inbox.clear()  # models from before the absence are not mixed
        self._trained = {}
        self._snapshots.clear()
        self._expected = answered
        self._deadline = self._now + self.config.round_timeout_s
        return self._close_sync() if not answered else []

    def _on_snapshot(self, event: PeerSnapshotReceived) -> list[Command]:
        if (
            self._state is not PeerState.SYNCING
            or event.run != self.run
            or event.sender not in self._degrees
            or weights_problem(self._weights, event.weights)
        ):
            return []  # unsolicited or unusable: a snapshot is only ever a hint
        self._snapshots[event.sender] = event
        self._active.add(event.sender)
        self._gone.discard(event.sender)
        if self._expected <= set(self._snapshots):
            return self._close_sync()
        return []

    def _close_sync(self) -> list[Command]:
        snapshots = dict(sorted(self._snapshots.items()))
        self._snapshots.clear()
        self._expected = set()
        self._deadline = None
        newest = max((m.round for m in self._ahead.values()), default=0)
        if not snapshots:  # nobody answered: go on from our own model
            return self._start_round(min(max(self._round, newest), self.config.total_rounds))
        share = 1.0 / len(snapshots)
        coefficients = {str(k): share for k in snapshots}
        models: dict[str, Arrays] = {str(k): m.weights for k, m in snapshots.items()}
        self._weights = mix(models, coefficients, like=self._weights)
        done = max(m.round for m in snapshots.values())
        if done >= self.config.total_rounds:  # the neighbours finished: so do we, in step
            self._completed = done
            self._set_state(PeerState.FINISHED)
            mixed = RoundMixed(
                round=done, weights=self._weights, mixed_with=tuple(sorted(snapshots)),
                missing=(), coefficients=coefficients, mass=1.0, metrics={"synced": 1},
                rejected=dict(sorted(self._rejected.items())),
            )  # fmt: skip
            self._rejected.clear()
            finish = Finish(success=True, reason=f"completed {done} round(s) (synced)",
                            completed_round=done)  # fmt: skip
            return [mixed, finish]
        start = max(self._round, done + 1, newest)
        return self._start_round(min(start, self.config.total_rounds))

    def _on_lost(self, event: NeighbourLost) -> list[Command]:
        if self._state is PeerState.FINISHED:
            return []
        self._gone.add(event.node)
        if event.reason == "finished":
            self._ended.add(event.node)
        if event.node not in self._active:
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
        self._gone.discard(event.sender)
        self._missed[event.sender] = 0
        if event.round == self._round and self._state is not PeerState.SYNCING:
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
        open_now = self._state in (PeerState.TRAINING, PeerState.COLLECTING, PeerState.SYNCING)
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
        if round_ > self.config.rounds:  # the consensus phase: mix only
            self._metrics = {"mixing_only": 1}
            return out + self._send_and_collect(dict(self._weights))
        self._set_state(PeerState.TRAINING)
        config = self.config.round_train_config(round_)
        return [*out, Train(round=round_, weights=self._weights, config=config)]

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
        return self._send_and_collect(trained)

    def _send_and_collect(self, trained: dict[str, Any]) -> list[Command]:
        self._trained = trained
        self._set_state(PeerState.COLLECTING)
        self._deadline = self._now + self.config.round_timeout_s
        degree = len(self._degrees)
        send = SendModel(round=self._round, weights=trained, to=self._addressees(), degree=degree)
        return [send, *self._progress()]

    def _addressees(self) -> tuple[NodeId, ...]:
        """Every neighbour not known to be gone, dropped for a missed deadline included.

        A neighbour that missed a deadline is no longer waited for but still
        gets our models: its next model (of our round or a later one) brings
        it back. Sending only to the waited-for ones would let two peers that
        dropped each other at the same deadline never hear from each other again.
        """
        return tuple(sorted(set(self._degrees) - self._gone))

    def _outstanding(self) -> set[NodeId]:
        return self._active - set(self._inbox) - set(self._ahead)

    def _alone(self) -> bool:
        """No neighbour to mix with this round, and some are away (may come back)."""
        return not self._active and not self._inbox and bool(self._gone - self._ended)

    def _progress(self) -> list[Command]:
        if self._state is PeerState.COLLECTING and not self._outstanding():
            if self._alone():  # do not run ahead alone: give the away ones the deadline
                return []
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
        if self._completed >= self.config.total_rounds:
            self._set_state(PeerState.FINISHED)
            self._deadline = None
            return [*out, Finish(success=True, reason=f"completed {self._completed} round(s)",
                                 completed_round=self._completed)]  # fmt: skip
        newest = max((m.round for m in self._ahead.values()), default=0)
        return out + self._start_round(min(max(self._round + 1, newest), self.config.total_rounds))
