"""States, transitions, commands and task records of the edge aggregator.

Kept apart from the machine (`fedbus.protocols.hierarchical`) so the
runtime and the tests can name them without the machine's internals, and
so the machine module stays about its transitions. `EdgeTask` is the
bookkeeping of one open task (what the children contributed, and what goes
up at its end). `TaskEnded` is the edge's per-level report:
what one parent round cost and produced at this level (the ``edge_*`` keys
of ``metrics.jsonl``), and the state a resumed run restarts this edge from.
"""

from __future__ import annotations

import dataclasses
import enum
from collections import Counter
from collections.abc import Mapping
from typing import Any, Literal

import numpy.typing as npt

from fedbus._types import NodeId
from fedbus.protocols.base import Command, Event
from fedbus.protocols.fedavg_server import FedAvgServer
from fedbus.protocols.fedavg_types import (
    EvaluationDone,
    ManifestReceived,
    ModelReceived,
    NodeJoined,
    NodeLeft,
    RoundClosed,
    SenderMismatched,
    SendUpdate,
    Started,
    Tick,
    TrainingDone,
    TrainingFailed,
    UpdateFailed,
    UpdateReceived,
)
from fedbus.protocols.hierarchical_rehoming import TOP_ROUND_KEY, ParentHeard, ParentLost
from fedbus.protocols.metrics import EVAL_PREFIX, eval_metrics_entry

__all__ = [
    "EDGE_TRANSITIONS",
    "EdgeState",
    "EdgeTask",
    "TaskEnded",
    "top_round_of",
    "with_evaluation",
]


class EdgeState(enum.Enum):
    """Where an edge aggregator stands; see `fedbus.protocols.hierarchical`."""

    IDLE = "idle"
    WAITING_FOR_PARENT = "waiting"
    AGGREGATING = "aggregating"
    DONE = "done"
    ERROR = "error"


_E = EdgeState
_CHILD: tuple[type[Event], ...] = (
    NodeJoined,
    NodeLeft,
    UpdateReceived,
    UpdateFailed,
    SenderMismatched,
)
_PARENT: tuple[type[Event], ...] = (ModelReceived, ManifestReceived, ParentLost, ParentHeard)
_LIVE = frozenset({_E.WAITING_FOR_PARENT, _E.AGGREGATING, _E.DONE})
EDGE_TRANSITIONS: dict[EdgeState, dict[type[Event], frozenset[EdgeState]]] = {
    _E.IDLE: {
        **{k: frozenset({_E.IDLE}) for k in (*_CHILD, Tick)},
        Started: frozenset({_E.WAITING_FOR_PARENT}),
    },
    _E.WAITING_FOR_PARENT: {
        **{k: frozenset({_E.WAITING_FOR_PARENT}) for k in _CHILD},
        **{k: _LIVE for k in (*_PARENT, Tick)},
    },
    _E.AGGREGATING: {k: _LIVE for k in (*_CHILD, *_PARENT, Tick)},
    _E.DONE: {k: frozenset({_E.DONE}) for k in (*_CHILD, *_PARENT, Tick)},
    _E.ERROR: {},
}
"""state -> {legal event type -> states it may lead to}; a missing entry is illegal.

Parent events are illegal before Started (the runtime starts the edge once
subscribed); Started is legal only once.
"""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TaskEnded(Command):
    """The edge ended its part of parent round ``round``: per-level metrics and checkpoint.

    Emitted once per task (training or evaluation), finished or aborted,
    before the upward answer it produced, if any.

    Attributes:
        round: the parent's round the task served.
        top_round: the top-level (cloud) round it served.
        kind: ``train`` or ``evaluate`` (the final federated evaluation).
        local_rounds: local rounds closed in the task.
        participants: the distinct children whose examples the task counted
            (an evaluation task: the children that reported).
        num_examples: what the task's upward update counts.
        rejected: updates rejected in the task's local rounds, by reason
            (validators, stale or duplicate answers...).
        evaluation: the children's federated evaluation of the parent's model
            (sample-weighted means, plus ``num_examples``); empty when the
            parent did not ask for one or nobody reported.
        local_base: local rounds used up after this task (restart point).
        aggregator_state: this level's aggregator state after the task.
    """

    round: int
    top_round: int
    kind: Literal["train", "evaluate"]
    local_rounds: int
    participants: tuple[NodeId, ...]
    num_examples: int
    rejected: Mapping[str, int]
    evaluation: Mapping[str, float]
    local_base: int
    aggregator_state: Mapping[str, npt.NDArray[Any]]


@dataclasses.dataclass(slots=True)
class EdgeTask:
    """An edge's open task: which parent round, and what the children contributed to it.

    Local rounds ``first_local .. last_local`` are the task's (``last_local``
    is the edge's ``local_base`` after it); ``evaluate`` asks the first local
    round for a federated evaluation of the parent's model, whose result is
    ``evaluation``. ``counted`` holds each distinct child's latest accepted
    example count; ``rejected`` the closed local rounds' rejections and
    ``open_rejected`` those of the open round's failed attempts.
    """

    round: int
    top_round: int
    server: FedAvgServer
    first_local: int
    last_local: int
    kind: Literal["train", "evaluate"] = "train"
    evaluate: bool = False
    counted: dict[NodeId, int] = dataclasses.field(default_factory=dict)
    pending: dict[tuple[int, NodeId], int] = dataclasses.field(default_factory=dict)
    closed: int = 0
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    rejected: Counter[str] = dataclasses.field(default_factory=Counter)
    open_rejected: dict[str, int] = dataclasses.field(default_factory=dict)
    evaluation: dict[str, float] = dataclasses.field(default_factory=dict)

    def on_closed(self, closed: RoundClosed) -> None:
        """Account a closed local round (its participants were pending accepted updates)."""
        self.closed += 1
        self.metrics = dict(closed.client_metrics)
        self.rejected.update(closed.rejected)
        self.open_rejected = {}
        if self.evaluate and closed.round == self.first_local:
            self.evaluation = dict(closed.federated_metrics)
        for child in closed.participants:
            self.counted[child] = self.pending[(closed.round, child)]

    def result(self, failure: str) -> Event:
        """The upward client's answer: the evaluation, the task's model, or ``failure``."""
        if self.kind == "evaluate":
            found = dict(self.evaluation)
            count = int(found.pop("num_examples", 0))
            return EvaluationDone(round=self.round, num_examples=count, metrics=found)
        if not self.closed:
            return TrainingFailed(round=self.round, reason=failure)
        metrics = {
            **self.metrics,
            "edge_rounds": self.closed,
            "edge_participants": len(self.counted),
        }
        return TrainingDone(
            round=self.round, weights=self.server.weights,
            num_examples=sum(self.counted.values()), metrics=metrics,
        )  # fmt: skip

    def report(
        self, *, local_base: int, aggregator_state: Mapping[str, npt.NDArray[Any]]
    ) -> TaskEnded:
        """This task's `TaskEnded`."""
        rejected = self.rejected + Counter(self.open_rejected)
        return TaskEnded(
            round=self.round, top_round=self.top_round, kind=self.kind, local_rounds=self.closed,
            participants=tuple(sorted(self.counted)), num_examples=sum(self.counted.values()),
            rejected=dict(sorted(rejected.items())), evaluation=dict(self.evaluation),
            local_base=local_base, aggregator_state=aggregator_state,
        )  # fmt: skip


def top_round_of(config: Mapping[str, object], default: int) -> int:
    """The top-level round a model's ``config`` serves (``default`` when it names none)."""
    top = config.get(TOP_ROUND_KEY, default)
    return top if isinstance(top, int) and not isinstance(top, bool) else default


def with_evaluation(update: SendUpdate, task: EdgeTask) -> dict[str, float]:
    """The upward update's metrics with the children's evaluation as its ``eval_*`` keys."""
    found = dict(task.evaluation)
    count = int(found.pop("num_examples", 0))
    kept = {k: float(v) for k, v in update.metrics.items() if not str(k).startswith(EVAL_PREFIX)}
    return {**kept, **eval_metrics_entry(count, found)}
