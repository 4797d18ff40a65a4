"""Gossip vocabulary: `GossipConfig`, peer events and commands, weight checks.

Shared by the synchronous Metropolis-Hastings peer (`fedbus.protocols.gossip`)
and the asynchronous push-sum peer (`fedbus.protocols.gossip_pushsum`). The
peers also reuse FedAvg's generic events and commands: `Started`, `Tick`,
`TrainingDone`, `TrainingFailed` in; `Train`, `Reject`, `Finish` out.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import numpy as np

from fedbus._types import NodeId, RunId
from fedbus.aggregation import DELTA, DENSE, Arrays
from fedbus.errors import ConfigError
from fedbus.protocols.base import Command, Event
from fedbus.protocols.fedavg_types import Reject, RejectReason, ScalarMap

__all__ = [
    "NOT_NEIGHBOUR",
    "GossipConfig",
    "NeighbourDropped",
    "NeighbourJoined",
    "NeighbourLost",
    "PeerModelReceived",
    "PeerSnapshotReceived",
    "Rejoined",
    "RoundMixed",
    "SendModel",
    "apply_training",
    "count_reject",
    "drain_rejected",
    "origin_problem",
    "weights_problem",
    "weights_verdict",
]


NOT_NEIGHBOUR: Final = "not_neighbour"
"""Reject reason: a model from a node that is not one of ours (in-neighbours for push-sum)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class GossipConfig:
    """The ``protocol:`` section of a gossip topology, as one peer needs it.

    Attributes:
        rounds: rounds (synchronous) or local steps (push-sum) each peer runs.
        mixing: "metropolis" (synchronous D-PSGD) or "push_sum" (asynchronous).
        round_timeout_s: synchronous: how long a peer waits for its neighbours'
            models of a round after sending its own; push-sum: the pause
            between two steps, during which shares are collected.
        join_timeout_s: synchronous: how long to wait for every neighbour to
            announce itself before round 1 (the round starts at once when all have).
        missed_rounds_to_drop: synchronous: consecutive round deadlines a
            neighbour may miss before it is dropped and no longer waited for.
        fanout: push-sum: out-neighbours sampled per step (None: all of them),
            which makes the graph time-varying.
        train_config: scalars passed to every `Train` (epochs, batch_size, lr...).
        lr_decay: synchronous: round ``r`` trains with ``lr * lr_decay ** (r - 1)``
            (1.0: constant). With a constant step D-PSGD keeps a consensus
            error floor of order ``lr / spectral gap`` (Lian et al. 2017;
            Koloskova et al. 2020, Theorem 2), so the peers never agree more
            closely than the step lets them; a decaying step lowers that floor
            round after round, as the decreasing step sizes of Nedic and
            Ozdaglar (2009) make the iterates of decentralized subgradient
            methods reach consensus.
        final_mixing_rounds: synchronous: mixing-only rounds after the
            ``rounds`` training rounds (no `Train`: the peer sends its current
            model and mixes). Each one multiplies the consensus distance by at
            most the second largest eigenvalue modulus of the mixing matrix
            (Xiao and Boyd 2004), leaves the network average unchanged, and
            costs one model message per directed edge, like a training round;
            the "consensus phase" that Kong et al. (2021, "Consensus control
            for decentralized deep learning") show closes the gap of the
            individual models to their average.
    """

    rounds: int = 10
    mixing: Literal["metropolis", "push_sum"] = "metropolis"
    round_timeout_s: float = 30.0
    join_timeout_s: float = 60.0
    missed_rounds_to_drop: int = 1
    fanout: int | None = None
    train_config: ScalarMap = field(default_factory=dict)
    lr_decay: float = 1.0
    final_mixing_rounds: int = 0

    @property
    def total_rounds(self) -> int:
        """Training rounds plus the final mixing-only rounds (the last round number)."""
        return self.rounds + self.final_mixing_rounds

    def round_train_config(self, round_: int) -> dict[str, bool | int | float | str]:
        """``train_config`` for round ``round_``, its ``lr`` decayed by ``lr_decay``."""
        config = dict(self.train_config)
        lr = config.get("lr")
        if self.lr_decay != 1.0 and isinstance(lr, int | float) and not isinstance(lr, bool):
            config["lr"] = float(lr) * self.lr_decay ** (round_ - 1)
        return config

    def __post_init__(self) -> None:
        for name in ("rounds", "missed_rounds_to_drop"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(
                    f"must be a positive integer, got {value!r}", path=f"protocol.{name}"
                )
        if self.mixing not in ("metropolis", "push_sum"):
            raise ConfigError(
                f"must be metropolis or push_sum, got {self.mixing!r}", path="protocol.mixing"
            )
        for name in ("round_timeout_s", "join_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not (0.0 < value < math.inf):
                raise ConfigError(
                    f"must be a positive number of seconds, got {value!r}", path=f"protocol.{name}"
                )
        if not isinstance(self.lr_decay, int | float) or not (0.0 < self.lr_decay <= 1.0):
            raise ConfigError(f"must be in (0, 1], got {self.lr_decay!r}", path="protocol.lr_decay")
        final = self.final_mixing_rounds
        if not isinstance(final, int) or isinstance(final, bool) or final < 0:
            raise ConfigError(
                f"must be a non-negative integer, got {final!r}",
                path="protocol.final_mixing_rounds",
            )
        if self.fanout is not None and (not isinstance(self.fanout, int) or self.fanout < 1):
            raise ConfigError(
                f"must be a positive integer, got {self.fanout!r}", path="protocol.fanout"
            )


# --- events -------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class NeighbourJoined(Event):
    """A neighbour announced itself (first time or after being away).

    Attributes:
        node: the neighbour.
        wants_model: it asked (a Join, not an Ack): a synchronous peer that has
            completed a round answers with a snapshot of its model (rejoin sync).
    """

    node: NodeId
    wants_model: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Rejoined(Event):
    """The runtime is back after an absence (churn): resynchronise before training again.

    Attributes:
        answered: the neighbours that answered our Joins on reconnection; a
            snapshot of the model of each is expected (`PeerSnapshotReceived`).
    """

    answered: frozenset[NodeId] = frozenset()


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerSnapshotReceived(Event):
    """A neighbour's current (mixed) model after its ``round``, sent for a rejoin sync."""

    sender: NodeId
    run: RunId
    round: int
    weights: Arrays


@dataclass(frozen=True, slots=True, kw_only=True)
class NeighbourLost(Event):
    """The runtime saw a neighbour go: its Leave message, last will or missed heartbeat."""

    node: NodeId
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class PeerModelReceived(Event):
    """A neighbour's model (synchronous) or push-sum share arrived.

    Attributes:
        sender: the neighbour (the topic already matched it).
        run: its run id; other runs are rejected.
        round: the sender's round (synchronous) or local step (push-sum).
        weights: its model, or its share of the push-sum numerator.
        degree: the sender's degree in the graph (Metropolis-Hastings weights).
        mass: its share of the push-sum mass (1.0 and unused when synchronous).
        metrics: the sender's scalars (e.g. its training loss), for the log.
    """

    sender: NodeId
    run: RunId
    round: int
    weights: Arrays
    degree: int = 0
    mass: float = 1.0
    metrics: ScalarMap = field(default_factory=dict)


# --- commands -----------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SendModel(Command):
    """Send ``weights`` (and push-sum ``mass``) of ``round`` to each node in ``to``.

    One message per addressee; they all carry the same payload. ``sync``: a
    rejoin-sync snapshot (the model after ``round``), not a model to mix.
    """

    round: int
    weights: Arrays
    to: tuple[NodeId, ...]
    degree: int
    mass: float = 1.0
    sync: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class NeighbourDropped(Command):
    """A neighbour is no longer waited for or mixed with (log it); it may come back."""

    node: NodeId
    round: int
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundMixed(Command):
    """A round (or push-sum step) ended with a new local model: log and evaluate it.

    Attributes:
        round: the round or step just finished.
        weights: the peer's model after mixing (push-sum: the de-biased ``x / w``).
        mixed_with: neighbours whose models (shares) went in, sorted.
        missing: active neighbours whose model of this round never came, sorted.
        coefficients: synchronous: the mixing weight of each model, self included.
        mass: push-sum: the peer's mass ``w`` after the step (1.0 when synchronous).
        metrics: this peer's training metrics of the round.
        rejected: reject counts by reason since the previous RoundMixed.
    """

    round: int
    weights: Arrays
    mixed_with: tuple[NodeId, ...]
    missing: tuple[NodeId, ...]
    coefficients: Mapping[str, float]
    mass: float
    metrics: ScalarMap
    rejected: Mapping[str, int]


# --- helpers ------------------------------------------------------------------


def weights_problem(reference: Arrays, weights: Arrays) -> str:
    """Why ``weights`` cannot be mixed with ``reference`` ('' if it can)."""
    if list(weights) != list(reference):
        return "tensor names differ from ours"
    for name, ours in reference.items():
        value, mine = np.asarray(weights[name]), np.asarray(ours)
        if value.shape != mine.shape:
            return f"{name}: shape {list(value.shape)} where ours is {list(mine.shape)}"
        if value.dtype.kind not in "fiub" or (
            value.dtype.kind == "f" and not np.isfinite(value).all()
        ):
            return f"{name}: not finite numbers"
    return ""


def apply_training(current: Arrays, done_weights: Arrays, encoding: str) -> dict[str, Any] | None:
    """The trained model: ``done_weights`` itself (dense) or ``current + done_weights`` (delta).

    None when the encoding is unknown or the tensors do not match ``current``.
    """
    if encoding not in (DENSE, DELTA) or weights_problem(current, done_weights):
        return None
    if encoding == DENSE:
        return {k: np.asarray(v) for k, v in done_weights.items()}
    return {
        k: (np.asarray(v, dtype=np.float64) + np.asarray(done_weights[k], dtype=np.float64)).astype(
            np.asarray(v).dtype
        )
        for k, v in current.items()
    }


def weights_verdict(reference: Arrays, weights: Arrays) -> tuple[str, str]:
    """``(reason, detail)`` for `weights_problem`: ``(INVALID, why)``, or ``("", "")`` if usable.

    The last check of both peers' ``_classify``, in the shape they return.
    """
    problem = weights_problem(reference, weights)
    return (RejectReason.INVALID, problem) if problem else ("", "")


def origin_problem(event: PeerModelReceived, *, run: RunId, senders: Collection[NodeId]) -> str:
    """The reject reason for a model of another run or from outside ``senders`` ('' if neither).

    The first checks of both peers' ``_classify``: ``senders`` is the
    neighbours (synchronous) or the in-neighbours (push-sum).
    """
    if event.run != run:
        return RejectReason.FOREIGN_RUN
    if event.sender not in senders:
        return NOT_NEIGHBOUR
    return ""


def count_reject(
    counts: Counter[str], *, sender: NodeId, round: int, reason: str, detail: str = ""
) -> Reject:
    """Count a refusal by ``reason`` (for the next `RoundMixed`) and return its `Reject`."""
    counts[reason] += 1
    return Reject(sender=sender, round=round, reason=reason, detail=detail)


def drain_rejected(counts: Counter[str]) -> dict[str, int]:
    """``counts`` sorted by reason for `RoundMixed.rejected`, then cleared: each is reported once."""
    rejected = dict(sorted(counts.items()))
    counts.clear()
    return rejected
