"""Asynchronous push-sum gossip peer, for directed or time-varying graphs.

Theory of operation
===================

Each peer holds a float64 numerator ``x`` (named tensors) and a scalar mass
``w`` (1 at the start, ``x`` = the initial model); its model is the de-biased
estimate ``z = x / w``. Peers do not wait for each other: there are no shared
rounds, only each peer's own step counter.

States (`PushSumState`)::

    IDLE --Started--> TRAINING (step 1)
    TRAINING --TrainingDone / TrainingFailed--> PUSHED        (SendModel to the targets)
    PUSHED --(push interval over)--> TRAINING (next step)    (RoundMixed)
                                 --> FINISHED (last step)    (RoundMixed, Finish)
    any state --(our own misuse)--> ERROR (terminal)

A step: train on ``z`` (``Train``); the trainer's change moves the numerator
by ``w * (z' - z)``, so the estimate moves by exactly what the trainer did
even if shares arrived meanwhile (for ``w = 1`` this is SGP, Assran et al.
2019). Then split ``(x, w)`` into ``1 + k`` equal shares, keep one and send
one to each of ``k`` targets: every active out-neighbour, or ``fanout`` of
them sampled with the injected `random.Random` (a time-varying graph). Then
wait ``round_timeout_s`` (the push interval) and report the estimate.

Receiving. A share from an in-neighbour is added to ``x`` and ``w`` at once,
in any state (FINISHED included: mass is never thrown away on purpose). Each
``(sender, step)`` counts once: a repeat is a `Reject` (duplicate) since
adding it twice would create mass. A share older than the last
``DEDUP_WINDOW`` steps seen from its sender is refused as stale, because its
step can no longer be checked for duplicates; that share's mass is lost,
which biases but does not break the ratio (the totals of ``x`` and ``w`` lose
the same share). Shares of other runs, from non in-neighbours, with a non
positive or non finite mass or unusable tensors are refused too.

Lost peers. Mass pushed to a dead peer is lost with it, so the estimate then
converges to a weighted average of the surviving peers' values rather than
the exact average. To lose as little as possible, an out-neighbour reported
gone (`NeighbourLost`), or, in undirected use without ``fanout``, silent for
``missed_rounds_to_drop`` steps, is dropped from the targets
(`NeighbourDropped`); a share from it or a `NeighbourJoined` brings it back.

Invariants (checked by the tests): steps strictly increase; the sum of
``w`` plus the mass in flight is conserved; no ``(sender, step)`` is added twice.
"""

from __future__ import annotations

import enum
import math
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any, Final

import numpy as np

from fedbus._types import NodeId, RunId
from fedbus.aggregation import Arrays, cast_like
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
from fedbus.protocols.gossip_types import (
    GossipConfig,
    NeighbourDropped,
    NeighbourJoined,
    NeighbourLost,
    PeerModelReceived,
    RoundMixed,
    SendModel,
    apply_training,
    count_reject,
    drain_rejected,
    origin_problem,
    weights_verdict,
)
from fedbus.protocols.mixing import push_sum_share
from fedbus.protocols.timed import DeadlineFirst

__all__ = ["DEDUP_WINDOW", "PUSH_SUM_TRANSITIONS", "PushSumPeer", "PushSumState"]

DEDUP_WINDOW: Final = 64
"""Steps per sender remembered for duplicate detection."""


class PushSumState(enum.Enum):
    """Where a push-sum peer stands; see the module docstring."""

    IDLE = "idle"
    TRAINING = "training"
    PUSHED = "pushed"
    FINISHED = "finished"
    ERROR = "error"


_S = PushSumState
_REMOTE: tuple[type[Event], ...] = (NeighbourJoined, NeighbourLost, PeerModelReceived, Tick)
PUSH_SUM_TRANSITIONS: dict[PushSumState, dict[type[Event], frozenset[PushSumState]]] = {
    state: {kind: frozenset({state}) for kind in _REMOTE} for state in _S if state is not _S.ERROR
}
PUSH_SUM_TRANSITIONS[_S.IDLE][Started] = frozenset({_S.TRAINING})
PUSH_SUM_TRANSITIONS[_S.TRAINING][TrainingDone] = frozenset({_S.PUSHED})
PUSH_SUM_TRANSITIONS[_S.TRAINING][TrainingFailed] = frozenset({_S.PUSHED})
PUSH_SUM_TRANSITIONS[_S.PUSHED][Tick] = frozenset({_S.PUSHED, _S.TRAINING, _S.FINISHED})
PUSH_SUM_TRANSITIONS[_S.ERROR] = {}


class PushSumPeer(DeadlineFirst):
    """An asynchronous push-sum gossip peer (see the module docstring).

    Args:
        config: the protocol section (``mixing`` must be "push_sum").
        node: this peer's id.
        run: this run's id.
        weights: the initial model.
        out_neighbours: who this peer pushes to.
        in_neighbours: who may push to it; the out-neighbours when None (undirected).
        rng: samples ``fanout`` targets per step; inject a seeded one.
    """

    def __init__(
        self,
        config: GossipConfig,
        *,
        node: NodeId,
        run: RunId,
        weights: Arrays,
        out_neighbours: Sequence[NodeId],
        in_neighbours: Sequence[NodeId] | None = None,
        rng: random.Random,
    ) -> None:
        if config.mixing != "push_sum":
            raise ValueError("PushSumPeer needs mixing push_sum; use GossipPeer for metropolis")
        if node in out_neighbours or (in_neighbours is not None and node in in_neighbours):
            raise ValueError(f"{node!r} cannot be its own neighbour")
        self.config = config
        self.node = node
        self.run = run
        self._like = {k: np.asarray(v) for k, v in weights.items()}
        self._x: dict[str, Any] = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
        self._w = 1.0
        self._out = tuple(sorted(set(out_neighbours)))
        self._in = frozenset(self._out if in_neighbours is None else in_neighbours)
        self._undirected = in_neighbours is None or frozenset(in_neighbours) == frozenset(self._out)
        self._rng = rng
        self._state = PushSumState.IDLE
        self._allowed: frozenset[PushSumState] = frozenset()
        self._now = -math.inf
        self._deadline: float | None = None
        self._step = 0
        self._z_sent: dict[str, Any] = {}
        self._active: set[NodeId] = set(self._out)
        self._silent: Counter[NodeId] = Counter()
        self._seen: dict[NodeId, set[int]] = {}
        self._heard: set[NodeId] = set()
        self._metrics: ScalarMap = {}
        self._rejected: Counter[str] = Counter()

    @property
    def state(self) -> PushSumState:
        """The current state."""
        return self._state

    @property
    def mass(self) -> float:
        """The push-sum mass ``w``."""
        return self._w

    @property
    def numerator(self) -> dict[str, Any]:
        """The push-sum numerator ``x`` (float64)."""
        return self._x

    @property
    def weights(self) -> dict[str, Any]:
        """The de-biased estimate ``x / w``, in the model's dtypes."""
        return {k: cast_like(v / self._w, self._like[k]) for k, v in self._x.items()}

    @property
    def current_round(self) -> int:
        """The local step in progress (0 before the first)."""
        return self._step

    def next_deadline(self) -> float | None:
        """The end of the current push interval, if any."""
        return self._deadline

    def _in_error(self) -> bool:
        return self._state is PushSumState.ERROR

    def _enter_error(self) -> None:
        self._state = PushSumState.ERROR

    def _dispatch(self, event: Event) -> list[Command]:
        allowed = legal_targets(PUSH_SUM_TRANSITIONS, self._state, event)
        self._allowed = allowed
        match event:
            case Started():
                return self._start_step()
            case Tick():
                expired = self._deadline is not None and self._now >= self._deadline
                return self._end_step() if expired else []
            case NeighbourJoined():
                if event.node in self._out:
                    self._active.add(event.node)
                    self._silent[event.node] = 0
                return []
            case NeighbourLost():
                return self._drop(event.node, event.reason or "left")
            case PeerModelReceived():
                return self._on_share(event)
            case TrainingDone() | TrainingFailed():
                return self._on_trained(event)
        raise LocalProtocolError(f"unknown event {event!r}")  # pragma: no cover

    def _set_state(self, state: PushSumState) -> None:
        self._state = checked_transition(self._allowed, self._state, state)

    def _drop(self, node: NodeId, reason: str) -> list[Command]:
        if node not in self._active or self._state is PushSumState.FINISHED:
            return []
        self._active.discard(node)
        return [NeighbourDropped(node=node, round=self._step, reason=reason)]

    # --- shares in --------------------------------------------------------------

    def _on_share(self, event: PeerModelReceived) -> list[Command]:
        reason, detail = self._classify(event)
        if reason:
            return [count_reject(self._rejected, sender=event.sender, round=event.round,
                                 reason=reason, detail=detail)]  # fmt: skip
        seen = self._seen.setdefault(event.sender, set())
        seen.add(event.round)
        newest = max(seen)
        seen.difference_update({s for s in seen if s <= newest - DEDUP_WINDOW})
        for name in self._x:
            self._x[name] = self._x[name] + np.asarray(event.weights[name], dtype=np.float64)
        self._w += event.mass
        self._heard.add(event.sender)
        if event.sender in self._out:
            self._active.add(event.sender)
            self._silent[event.sender] = 0
        return []

    def _classify(self, event: PeerModelReceived) -> tuple[str, str]:
        origin = origin_problem(event, run=self.run, senders=self._in)
        if origin:
            return origin, ""
        seen = self._seen.get(event.sender, set())
        if event.round in seen:
            return RejectReason.DUPLICATE, ""
        if event.round < 1 or (seen and event.round <= max(seen) - DEDUP_WINDOW):
            return RejectReason.STALE_ROUND, "older than the duplicate window"
        if not (math.isfinite(event.mass) and event.mass > 0.0):
            return RejectReason.INVALID, f"mass {event.mass!r}"
        return weights_verdict(self._like, event.weights)

    # --- steps -----------------------------------------------------------------

    def _start_step(self) -> list[Command]:
        self._set_state(PushSumState.TRAINING)
        self._deadline = None
        self._step += 1
        self._z_sent = {k: v / self._w for k, v in self._x.items()}
        model = {k: cast_like(v, self._like[k]) for k, v in self._z_sent.items()}
        return [Train(round=self._step, weights=model, config=dict(self.config.train_config))]

    def _on_trained(self, event: TrainingDone | TrainingFailed) -> list[Command]:
        if event.round != self._step:
            raise LocalProtocolError(
                f"training result for step {event.round} during step {self._step}"
            )
        self._metrics = {"training_failed": 1}
        if isinstance(event, TrainingDone):
            like = {k: cast_like(v, self._like[k]) for k, v in self._z_sent.items()}
            trained = apply_training(like, event.weights, event.encoding)
            if trained is not None:
                self._metrics = dict(event.metrics)
                for name, value in trained.items():
                    change = np.asarray(value, dtype=np.float64) - self._z_sent[name]
                    self._x[name] = self._x[name] + self._w * change
        self._set_state(PushSumState.PUSHED)
        self._deadline = self._now + self.config.round_timeout_s
        targets = sorted(self._active)
        if self.config.fanout is not None and self.config.fanout < len(targets):
            targets = sorted(self._rng.sample(targets, self.config.fanout))
        if not targets:
            return []
        share, mass = push_sum_share(self._x, self._w, 1 + len(targets))
        self._x, self._w = {k: v.copy() for k, v in share.items()}, mass
        return [
            SendModel(
                round=self._step, weights=share, to=tuple(targets), degree=len(self._out), mass=mass
            )
        ]

    def _end_step(self) -> list[Command]:
        out: list[Command] = []
        if self._undirected and self.config.fanout is None:
            for node in sorted(self._active - self._heard):
                self._silent[node] += 1
                if self._silent[node] >= self.config.missed_rounds_to_drop:
                    out += self._drop(node, "silent for the push interval")
        out.append(
            RoundMixed(
                round=self._step, weights=self.weights, mixed_with=tuple(sorted(self._heard)),
                missing=(), coefficients={}, mass=self._w, metrics=self._metrics,
                rejected=drain_rejected(self._rejected),
            )
        )  # fmt: skip
        self._heard.clear()
        if self._step >= self.config.rounds:
            self._set_state(PushSumState.FINISHED)
            self._deadline = None
            return [*out, Finish(success=True, reason=f"completed {self._step} step(s)",
                                 completed_round=self._step)]  # fmt: skip
        return out + self._start_step()
