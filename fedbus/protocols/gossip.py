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
         --Started--> FINISHED                (resumed after its last round: Finish)
    TRAINING --TrainingDone / TrainingFailed--> COLLECTING          (SendModel)
    COLLECTING --(nobody outstanding | round deadline)--> TRAINING   (RoundMixed, Train)
                                                      --> COLLECTING (mixing-only round: SendModel)
                                                      --> FINISHED   (last round: Finish)
    TRAINING | COLLECTING --Rejoined--> SYNCING                       (back from churn)
    SYNCING --(every expected snapshot | deadline)--> TRAINING | COLLECTING | FINISHED
    any state --(our own misuse)--> ERROR (terminal)

Learning-rate decay and the consensus phase. Round ``r`` trains with
``lr * lr_decay ** (r - 1)``; after the ``rounds`` training rounds come
``final_mixing_rounds`` mixing-only rounds, ordinary rounds on the wire
without `Train` (why: `GossipConfig`).

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
arrives from it: that model is used like any other. In the consensus phase
(mixing-only rounds) a neighbour that left without a clean Leave is waited
for once, up to a round deadline, so that a peer back from churn takes part
in the final mixing rather than finding it over (`GossipPeer._awaiting_return`).
A snapshot outside a sync that says its sender completed the last round is
taken as that neighbour's clean Leave, which went out while we were away.

Rejoin sync (`fedbus.protocols.gossip_sync`). A peer back from an absence
(`Rejoined`) does not train on from its stale model: it adopts the mean of
snapshots of its neighbours' current models (`SendModel` with ``sync``,
which every peer sends in answer to a Join, also before round 1 is done and
after the last round) and goes on after the newest round they completed.
A neighbour that is back gets our model of the round in progress as well.

Defenses (`fedbus.protocols.gossip_defense`): validators may reject
neighbour models before the mix, and a robust rule may replace it.
``start_round`` resumes a peer from its checkpoint (`fedbus.nodes.peer_checkpoint`).

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
in the round it names; coefficients sum to one (Metropolis: a robust rule
that is not linear reports none); every state but TRAINING, IDLE and
FINISHED has a deadline.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedbus._types import NodeId, RunId
from fedbus.aggregation import Arrays
from fedbus.errors import LocalProtocolError
from fedbus.protocols.base import Command, Event, checked_transition, legal_targets
from fedbus.protocols.fedavg_types import (
    Finish,
    RejectReason,
    ScalarMap,
    Started,
    Tick,
    Train,
    TrainingDone,
    TrainingFailed,
)
from fedbus.protocols.gossip_defense import PeerDefense
from fedbus.protocols.gossip_states import PEER_TRANSITIONS, PeerState
from fedbus.protocols.gossip_sync import RejoinSync
from fedbus.protocols.gossip_types import (
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
    count_reject,
    drain_rejected,
    origin_problem,
    weights_problem,
    weights_verdict,
)
from fedbus.protocols.mixing import metropolis_row, mix
from fedbus.protocols.timed import DeadlineFirst

__all__ = ["PEER_TRANSITIONS", "GossipPeer", "PeerState"]


class GossipPeer(DeadlineFirst):
    """A synchronous Metropolis-Hastings gossip peer (see the module docstring).

    Args:
        config: the protocol section (``mixing`` must be "metropolis").
        node: this peer's id.
        run: this run's id; models of other runs are rejected.
        weights: the initial model (all peers should start from the same one).
        neighbours: each graph neighbour's id and graph degree.
        defense: validators and a robust rule for the neighbours' models
            (`fedbus.protocols.gossip_defense`); None mixes every valid model
            with Metropolis-Hastings weights.
        start_round: rounds already completed (a resumed run: ``weights`` is
            the model after that round, and the peer goes on with the next).
    """

    def __init__(
        self,
        config: GossipConfig,
        *,
        node: NodeId,
        run: RunId,
        weights: Arrays,
        neighbours: Mapping[NodeId, int],
        defense: PeerDefense | None = None,
        start_round: int = 0,
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
        self._round = start_round
        self._completed = start_round
        self._joined: set[NodeId] = set()
        self._active: set[NodeId] = set(neighbours)
        self._gone: set[NodeId] = set()  # lost (will or Leave) and not back: not sent to
        self._ended: set[NodeId] = set()  # left cleanly after their last round
        self._waited: set[NodeId] = set()  # away ones already given a consensus-phase deadline
        self._missed: Counter[NodeId] = Counter()
        self._inbox: dict[NodeId, PeerModelReceived] = {}
        self._ahead: dict[NodeId, PeerModelReceived] = {}
        self._trained: dict[str, Any] = {}
        self._metrics: ScalarMap = {}
        self._rejected: Counter[str] = Counter()
        self._sync: RejoinSync | None = None
        self._defense = defense if defense is not None and defense.active else None

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
                if self._completed >= self.config.total_rounds:  # resumed after its last round
                    self._set_state(PeerState.FINISHED)
                    return [self._finish("(resumed)")]
                self._set_state(PeerState.WAITING_FOR_NEIGHBOURS)
                self._deadline = self._now + self.config.join_timeout_s
                return self._maybe_begin()
            case Tick():
                if self._deadline is None or self._now < self._deadline:
                    return []
                if self._state is PeerState.WAITING_FOR_NEIGHBOURS:
                    return self._start_round(self._completed + 1)
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
        self._state = checked_transition(self._allowed, self._state, state)

    # --- neighbours ------------------------------------------------------------

    def _maybe_begin(self) -> list[Command]:
        if self._state is PeerState.WAITING_FOR_NEIGHBOURS and self._joined >= set(self._degrees):
            return self._start_round(self._completed + 1)
        return []

    def _on_joined(self, event: NeighbourJoined) -> list[Command]:
        node = event.node
        if node not in self._degrees:
            return []
        self._joined.add(node)
        self._active.add(node)
        self._gone.discard(node)
        self._missed[node] = 0
        if self._sync is not None:
            if event.wants_model:  # back from an absence too: it sends us no snapshot...
                self._sync.excuse(node)
                self._sync.owed.add(node)  # ...but may wait for ours: sent once we are synced
            return self._close_sync() if self._sync.complete else []
        out: list[Command] = []
        if event.wants_model and self._state in (
            PeerState.TRAINING, PeerState.COLLECTING, PeerState.FINISHED,
        ):  # fmt: skip
            # Also before round 1 is done (the initial model, round 0): a
            # returning peer waits for every snapshot it expects.
            out.append(self._snapshot((node,)))
        if self._state is PeerState.COLLECTING and self._trained:
            # Our model of this round went out before it was back: without it
            # the neighbour, resuming at an earlier round, would wait for it
            # until its deadline instead of seeing that we moved on.
            out.append(SendModel(round=self._round, weights=self._trained, to=(node,),
                                 degree=len(self._degrees)))  # fmt: skip
        return out + self._maybe_begin()

    def _snapshot(self, to: tuple[NodeId, ...]) -> SendModel:
        """Our current model, the one after our last completed round, for a rejoin sync."""
        return SendModel(round=self._completed, weights=self._weights, to=to,
                         degree=len(self._degrees), sync=True)  # fmt: skip

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
        self._sync = RejoinSync(expected=answered)
        self._deadline = self._now + self.config.round_timeout_s
        return self._close_sync() if not answered else []

    def _on_snapshot(self, event: PeerSnapshotReceived) -> list[Command]:
        if (
            self._sync is None
            or event.run != self.run
            or event.sender not in self._degrees
            or weights_problem(self._weights, event.weights)
        ):
            if self._sync is None and self._finished_elsewhere(event):
                # Its clean Leave went out while we were away: a late answer to
                # our Join is the only sign that it will send no more models.
                return self._on_lost(NeighbourLost(node=event.sender, reason="finished"))
            return []  # unsolicited or unusable: a snapshot is only ever a hint
        self._sync.add(event)
        self._active.add(event.sender)
        self._gone.discard(event.sender)
        return self._close_sync() if self._sync.complete else []

    def _finished_elsewhere(self, event: PeerSnapshotReceived) -> bool:
        """A neighbour's snapshot, outside a sync, says it completed the last round."""
        return (
            event.run == self.run
            and event.sender in self._degrees
            and event.round >= self.config.total_rounds
            and self._state in (PeerState.TRAINING, PeerState.COLLECTING)
            and event.sender not in self._ended
        )

    def _close_sync(self) -> list[Command]:
        sync, self._sync = self._sync, None
        self._deadline = None
        newest = max((m.round for m in self._ahead.values()), default=0)
        adopted = None if sync is None else sync.adopt(self._weights, self._defense)
        if adopted is not None:
            self._weights, _, done = adopted
            self._completed = max(self._completed, done)  # in step with them: snapshots say so
        owed = () if sync is None else tuple(sorted(sync.owed - self._gone))
        out: list[Command] = [self._snapshot(owed)] if owed else []
        if adopted is None:  # nobody answered: go on from our own model
            start = min(max(self._round, newest), self.config.total_rounds)
            return out + self._start_round(start)
        assert sync is not None
        coefficients = adopted[1]
        senders = tuple(sorted(sync.snapshots))
        if done >= self.config.total_rounds:  # the neighbours finished: so do we, in step
            self._completed = done
            self._set_state(PeerState.FINISHED)
            mixed = RoundMixed(
                round=done, weights=self._weights, mixed_with=senders,
                missing=(), coefficients=coefficients, mass=1.0, metrics={"synced": 1},
                rejected=drain_rejected(self._rejected),
            )  # fmt: skip
            return [*out, mixed, self._finish("(synced)")]
        start = max(self._round, done + 1, newest)
        return out + self._start_round(min(start, self.config.total_rounds))

    def _on_lost(self, event: NeighbourLost) -> list[Command]:
        if self._state is PeerState.FINISHED:
            return []
        self._gone.add(event.node)
        if event.reason == "finished":
            self._ended.add(event.node)
        out: list[Command] = []
        if event.node in self._active:
            self._active.discard(event.node)
            out.append(NeighbourDropped(node=event.node, round=self._round,
                                        reason=event.reason or "left"))  # fmt: skip
        if self._sync is not None:  # no snapshot will come from it
            self._sync.excuse(event.node)
            return out + (self._close_sync() if self._sync.complete else [])
        if not out:
            return []
        return out + self._progress()

    def _on_model(self, event: PeerModelReceived) -> list[Command]:
        reason, detail = self._classify(event)
        if reason:
            return [count_reject(self._rejected, sender=event.sender, round=event.round,
                                 reason=reason, detail=detail)]  # fmt: skip
        self._active.add(event.sender)  # a model is as good as a NeighbourJoined
        self._gone.discard(event.sender)
        self._missed[event.sender] = 0
        if event.round == self._round and self._state is not PeerState.SYNCING:
            self._inbox[event.sender] = event
        else:
            self._ahead[event.sender] = event
        return self._progress()

    def _classify(self, event: PeerModelReceived) -> tuple[str, str]:
        origin = origin_problem(event, run=self.run, senders=self._degrees)
        if origin:
            return origin, ""
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
        return weights_verdict(self._weights, event.weights)

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
                    out.append(count_reject(self._rejected, sender=sender, round=kept.round,
                                            reason=RejectReason.STALE_ROUND,
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
            if self._awaiting_return():
                return []
            return self._close_round()
        return []

    def _away(self) -> set[NodeId]:
        """Neighbours lost without a clean Leave and not heard from since."""
        return self._gone - self._ended

    def _awaiting_return(self) -> bool:
        """In the consensus phase, an away neighbour not yet given a round deadline.

        Mixing-only rounds take no training time, so the peers that happen to
        be present can run through the whole phase before an away neighbour is
        back: measured with 20% churn on 16 peers, two adjacent peers did all
        10 rounds alone in 20 ms, and the rest, seeing their final models,
        jumped to the last round and ended 15 points apart. So the phase
        waits, once per away neighbour and at most a round deadline, for it to
        return and take part; one that does not is not waited for again.
        """
        return self._round > self.config.rounds and bool(self._away() - self._waited)

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
        if self._round > self.config.rounds:  # waited for once in the consensus phase
            self._waited |= self._away()
        models: dict[str, Arrays] = {sender: m.weights for sender, m in self._inbox.items()}
        if self._defense is not None:
            out += self._screen(models)
        weights, row = self._mix(models)
        self._weights = weights
        out.append(
            RoundMixed(
                round=self._round, weights=self._weights, mixed_with=tuple(sorted(map(NodeId, models))),
                missing=missing, coefficients=row, mass=1.0,
                metrics=self._metrics, rejected=drain_rejected(self._rejected),
            )
        )  # fmt: skip
        self._inbox.clear()
        self._completed = self._round
        if self._completed >= self.config.total_rounds:
            self._set_state(PeerState.FINISHED)
            self._deadline = None
            return [*out, self._finish()]
        newest = max((m.round for m in self._ahead.values()), default=0)
        return out + self._start_round(min(max(self._round + 1, newest), self.config.total_rounds))

    def _finish(self, how: str = "") -> Finish:
        reason = f"completed {self._completed} round(s)" + (f" {how}" if how else "")
        return Finish(success=True, reason=reason, completed_round=self._completed)

    def _screen(self, models: dict[str, Arrays]) -> list[Command]:
        """Drop the neighbour models the validators reject (a `Reject` each)."""
        assert self._defense is not None
        verdicts = self._defense.screen(self._trained, models, round=self._round)
        out: list[Command] = []
        for sender, reason in sorted(verdicts.items()):
            del models[sender]
            out.append(count_reject(self._rejected, sender=NodeId(sender), round=self._round,
                                    reason=reason))  # fmt: skip
        return out

    def _mix(self, models: Mapping[str, Arrays]) -> tuple[dict[str, Any], dict[str, float]]:
        """The new model and its coefficients: the robust rule, else Metropolis-Hastings.

        Clipped gossip clips the neighbours' models, then mixes them as usual;
        under another robust rule the mix is not linear, so no coefficients
        are reported (`fedbus.protocols.gossip_defense`).
        """
        defense = self._defense
        if defense is not None and defense.clips:
            models = {**defense.clip(self._trained, models)}
        elif defense is not None and defense.aggregator is not None:
            every = {**models, self.node: self._trained}
            combined = defense.combine(every, like=self._trained, round=self._round)
            if combined is not None:
                return combined, {}
        own = len(self._degrees)
        row: dict[str, float] = dict(
            metropolis_row(own, {NodeId(j): self._degrees[NodeId(j)] for j in models})
        )
        row[self.node] = 1.0 - sum(row.values())
        every = {**models, self.node: self._trained}
        return mix(every, row, like=self._weights), dict(sorted(row.items()))
