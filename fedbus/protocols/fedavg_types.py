"""FedAvg configuration, events, commands and reject reasons.

Kept apart from the two machines so that runtimes, the topology layer and
tests import the vocabulary without the logic. Everything here is a frozen,
keyword-only dataclass; weights are named numpy arrays (`Arrays`).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import numpy.typing as npt

from fedbus._types import NodeId, RunId
from fedbus.aggregation import Arrays
from fedbus.errors import ConfigError
from fedbus.protocols.base import Command, Event

__all__ = [
    "ASYNC_KEY",
    "EVALUATE_KEY",
    "TASK_EVALUATE",
    "TASK_KEY",
    "TASK_TRAIN",
    "BroadcastModel",
    "CancelTraining",
    "Evaluate",
    "EvaluationClosed",
    "EvaluationDone",
    "ExtraArrays",
    "FedAvgConfig",
    "Finish",
    "ManifestReceived",
    "ModelReceived",
    "NodeJoined",
    "NodeLeft",
    "PublishManifest",
    "Reject",
    "RejectReason",
    "RoundClosed",
    "RoundFailed",
    "ScalarMap",
    "SendFailure",
    "SendUpdate",
    "SenderMismatched",
    "ServerCheckpoint",
    "Started",
    "Stop",
    "Tick",
    "Train",
    "TrainingDone",
    "TrainingFailed",
    "UpdateFailed",
    "UpdateReceived",
]

ScalarMap = Mapping[str, bool | int | float | str]

ExtraArrays = Mapping[str, Arrays]
"""Further named tensor sets riding with a model or an update (SCAFFOLD's ``control``)."""
"""Scalar config or metrics, as ModelBroadcast.config / ModelUpdate.metrics carry them."""

TASK_KEY: Final = "task"
"""Broadcast config key: what the receiving clients must do with the model."""
TASK_TRAIN: Final = "train"
TASK_EVALUATE: Final = "evaluate"
EVALUATE_KEY: Final = "evaluate"
"""Broadcast config key, True under federated evaluation: evaluate before training."""
ASYNC_KEY: Final = "async"
"""Broadcast config key, True from an asynchronous (FedBuff) server: a newer model
does not cancel the training in progress; the client finishes it, sends it (the
server discounts it by its staleness), then trains on the newest model it has."""


class RejectReason(enum.StrEnum):
    """Why the server refused an update; the value is the metrics.jsonl key.

    Validators add their own reasons as plain strings, so `Reject.reason` is a str.
    """

    FOREIGN_RUN = "foreign_run"
    STALE_ROUND = "stale_round"
    FUTURE_ROUND = "future_round"
    UNSELECTED = "unselected"
    DUPLICATE = "duplicate"
    SENDER_MISMATCH = "sender_mismatch"
    INVALID = "invalid"


@dataclass(frozen=True, slots=True, kw_only=True)
class FedAvgConfig:
    """The ``protocol:`` section of a centralized topology.

    Attributes:
        rounds: training rounds to complete.
        clients_per_round: nodes selected per round; exclusive with ``fraction``.
        fraction: share of the live nodes selected per round (rounded up); the
            default, when neither is given, is every live node.
        min_clients: quorum: a round closes at its deadline only with at least
            this many accepted updates, and a round starts only with this many
            live nodes.
        round_timeout_s: deadline of one round attempt, from its broadcast.
        join_timeout_s: how long to wait for nodes before round 1, and whenever
            fewer than ``min_clients`` are live when a round must start.
        max_round_retries: extra attempts of a round that failed its quorum;
            after ``1 + max_round_retries`` failed attempts the run fails.
        evaluate: "central" (the runtime evaluates the global model) or
            "federated" (clients evaluate it and report metrics).
        seed: seeds client selection (see `FedAvgServer`).
        train_config: scalars sent with every model (epochs, batch_size, lr, mu...).
    """

    rounds: int = 10
    clients_per_round: int | None = None
    fraction: float | None = None
    min_clients: int = 1
    round_timeout_s: float = 60.0
    join_timeout_s: float = 60.0
    max_round_retries: int = 3
    evaluate: Literal["central", "federated"] = "central"
    seed: int = 0
    train_config: ScalarMap = field(default_factory=dict)

    def __post_init__(self) -> None:
        _positive_int("rounds", self.rounds)
        _positive_int("min_clients", self.min_clients)
        if self.clients_per_round is not None:
            _positive_int("clients_per_round", self.clients_per_round)
            if self.fraction is not None:
                raise ConfigError(
                    "give clients_per_round or fraction, not both", path="protocol.fraction"
                )
            if self.clients_per_round < self.min_clients:
                raise ConfigError(
                    f"clients_per_round ({self.clients_per_round}) is below min_clients "
                    f"({self.min_clients}); no round could reach its quorum",
                    path="protocol.clients_per_round",
                )
        if self.fraction is not None and not (
            isinstance(self.fraction, int | float) and 0.0 < self.fraction <= 1.0
        ):
            raise ConfigError(f"must be in (0, 1], got {self.fraction!r}", path="protocol.fraction")
        for name in ("round_timeout_s", "join_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not (0.0 < value < math.inf):
                raise ConfigError(
                    f"must be a positive number of seconds, got {value!r}", path=f"protocol.{name}"
                )
        if not isinstance(self.max_round_retries, int) or self.max_round_retries < 0:
            raise ConfigError(
                f"must be a non-negative integer, got {self.max_round_retries!r}",
                path="protocol.max_round_retries",
            )
        if self.evaluate not in ("central", "federated"):
            raise ConfigError(
                f"must be central or federated, got {self.evaluate!r}", path="protocol.evaluate"
            )
        if not isinstance(self.seed, int):
            raise ConfigError(f"must be an integer, got {self.seed!r}", path="protocol.seed")
        if TASK_KEY in self.train_config or EVALUATE_KEY in self.train_config:
            raise ConfigError(
                f"keys {TASK_KEY!r} and {EVALUATE_KEY!r} are reserved", path="training"
            )


def _positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"must be a positive integer, got {value!r}", path=f"protocol.{name}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerCheckpoint:
    """What the server needs to continue a run: the last completed round and its results."""

    round: int
    weights: Arrays
    aggregator_state: Mapping[str, npt.NDArray[Any]] = field(default_factory=dict)


# --- server events ------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Started(Event):
    """The runtime is up and subscribed; the join wait begins."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Tick(Event):
    """Time passed (the runtime reached `next_deadline`); carries nothing but ``now``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeJoined(Event):
    """A node announced itself (Join message), or announced itself again."""

    node: NodeId
    num_examples: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeLeft(Event):
    """A node left: a Leave message, its last will, or a missed heartbeat."""

    node: NodeId
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class UpdateReceived(Event):
    """A ModelUpdate arrived (decoded; the topic already matched ``sender``)."""

    sender: NodeId
    run: RunId
    round: int
    weights: Arrays
    num_examples: int
    encoding: str = "dense"
    metrics: ScalarMap = field(default_factory=dict)
    update_id: str = ""
    reply_to: str = ""
    extras: ExtraArrays = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class UpdateFailed(Event):
    """A selected client reports that it could not train (or evaluate) this round."""

    sender: NodeId
    run: RunId
    round: int
    reason: str = ""
    update_id: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class SenderMismatched(Event):
    """The transport saw a message whose ``sender`` differs from its topic's node id."""

    node: NodeId
    claimed: str
    run: RunId
    round: int
    update_id: str = ""


# --- server commands ----------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class BroadcastModel(Command):
    """Publish the global model once; ``selected`` (sorted) names who must answer.

    ``request_id`` is unique per (run, round, attempt); use it as the message id
    so that updates can name it in ``reply_to``.
    """

    round: int
    attempt: int
    weights: Arrays
    selected: tuple[NodeId, ...]
    config: ScalarMap
    request_id: str
    extras: ExtraArrays = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class PublishManifest(Command):
    """Publish (retained) where the run stands, for late joiners and restarted clients.

    ``state`` is "waiting", "collecting", "evaluating" or "finished".
    """

    run: RunId
    round: int
    attempt: int
    state: str
    selected: tuple[NodeId, ...]
    completed_round: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Reject(Command):
    """An update (or failure notice) was refused; count it, maybe tell its sender."""

    sender: str
    round: int
    reason: str
    detail: str = ""
    update_id: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundClosed(Command):
    """A round completed: checkpoint, evaluate centrally, write metrics.

    Attributes:
        weights: the new global model.
        participants: senders aggregated, sorted.
        dropped: selected but not aggregated (failed, left, silent, rejected), sorted.
        rejected: reject counts by reason since the previous RoundClosed.
        num_examples: total samples aggregated.
        client_metrics: sample-weighted means of the participants' training metrics.
        federated_metrics: under federated evaluation, the mean of the clients'
            ``eval_*`` metrics weighted by ``eval_num_examples``; they describe
            the model the round started from (the result of ``round - 1``).
        aggregator_state: to store in the checkpoint with ``weights``.
    """

    round: int
    attempt: int
    weights: Arrays
    participants: tuple[NodeId, ...]
    dropped: tuple[NodeId, ...]
    rejected: Mapping[str, int]
    num_examples: int
    client_metrics: Mapping[str, float]
    federated_metrics: Mapping[str, float]
    aggregator_state: Mapping[str, npt.NDArray[Any]]


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundFailed(Command):
    """A round attempt missed its quorum; it is retried or the run fails next."""

    round: int
    attempt: int
    reason: str
    answered: tuple[NodeId, ...]
    rejected: Mapping[str, int]


@dataclass(frozen=True, slots=True, kw_only=True)
class EvaluationClosed(Command):
    """Federated evaluation of the final model (after round ``round``) finished."""

    round: int
    participants: tuple[NodeId, ...]
    federated_metrics: Mapping[str, float]


@dataclass(frozen=True, slots=True, kw_only=True)
class Finish(Command):
    """The run is over; ``reason`` says why in one line. Nothing follows."""

    success: bool
    reason: str
    completed_round: int


# --- client events ------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelReceived(Event):
    """A ModelBroadcast arrived; ``selected`` is True when this node is in its list."""

    run: RunId
    round: int
    weights: Arrays
    selected: bool
    config: ScalarMap = field(default_factory=dict)
    model_id: str = ""
    extras: ExtraArrays = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class ManifestReceived(Event):
    """The server's retained manifest arrived (see `PublishManifest`)."""

    run: RunId
    round: int
    state: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainingDone(Event):
    """The trainer finished the training the machine asked for (a FitResult, flattened)."""

    round: int
    weights: Arrays
    num_examples: int
    metrics: ScalarMap = field(default_factory=dict)
    encoding: str = "dense"
    extras: ExtraArrays = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class EvaluationDone(Event):
    """The trainer evaluated the received global model on local data."""

    round: int
    num_examples: int
    metrics: ScalarMap = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainingFailed(Event):
    """The requested training or evaluation raised; ``reason`` is a one-liner."""

    round: int
    reason: str


# --- client commands ----------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Evaluate(Command):
    """Evaluate ``weights`` on local data, then report `EvaluationDone`."""

    round: int
    weights: Arrays


@dataclass(frozen=True, slots=True, kw_only=True)
class Train(Command):
    """Train locally from ``weights`` with ``config``, then report `TrainingDone`."""

    round: int
    weights: Arrays
    config: ScalarMap
    extras: ExtraArrays = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class CancelTraining(Command):
    """Abandon the task of ``round`` (a newer round arrived); its result will be dropped."""

    round: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SendUpdate(Command):
    """Publish a ModelUpdate for ``round`` (empty weights for an evaluation-only round)."""

    round: int
    weights: Arrays
    num_examples: int
    encoding: str
    metrics: ScalarMap
    reply_to: str
    extras: ExtraArrays = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class SendFailure(Command):
    """Tell the server this node cannot answer ``round``."""

    round: int
    reason: str
    reply_to: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Stop(Command):
    """The run is over (the manifest says finished); the client runtime may exit."""

    reason: str
