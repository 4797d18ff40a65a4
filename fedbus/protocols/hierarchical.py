"""Edge aggregator: a FedAvg server toward its children, a FedAvg client toward its parent.

Theory of operation
===================

HierFAVG (Liu et al. 2020) at any depth (cloud - region - edge - device). The
cloud is a plain `FedAvgServer`; every level below it is an `EdgeAggregator`
composed of two existing machines, whose rules it does not re-implement:

- upward, an `Upstream` (a `FedAvgClient` plus optional re-homing): the
  parent's model arrives as ``ModelReceived``; the client's ``Train`` is this
  edge's task for that parent round, answered with ``TrainingDone`` once the
  children have done their part;
- downward, one `FedAvgServer` per task, run for ``edge_rounds`` local rounds
  from the parent's model with this level's quorum, deadlines, retries and
  aggregator (the aggregator object lives across tasks, keeping its state).

States (`EdgeState`)::

    IDLE --Started--> WAITING_FOR_PARENT --(Train from the upward client)--> AGGREGATING
    AGGREGATING --(inner server finished | parent moved on | re-homed)--> WAITING_FOR_PARENT
    WAITING_FOR_PARENT | AGGREGATING --(parent finished: Stop)--> DONE (terminal)
    any --(our own misuse)--> ERROR (terminal)

Translation of inner commands. Upward client: ``Train`` starts a task;
``Evaluate`` is answered at once with ``EvaluationDone(num_examples=0)``
(edges do not run federated evaluation; see below); ``CancelTraining`` aborts
the task; ``Stop`` ends the edge and tells the children (a "finished"
manifest); ``SendUpdate``, ``SendFailure``, `SwitchParent` and `Stranded` go
out as they are. Inner server: ``BroadcastModel`` goes out with this edge's
id prefixed to its ``request_id``; ``PublishManifest`` goes out with
"finished" rewritten to "waiting" (the task ended, not the run: a child that
read "finished" would stop for good); ``Reject``, ``RoundClosed`` and
``RoundFailed`` go out (per-level metrics); its ``Finish`` ends the task.

Round numbering. Children see one monotone local round sequence: task ``t``
runs local rounds ``base + 1 .. base + edge_rounds`` and ``base`` grows by
``edge_rounds`` after every task, finished or aborted, so no child's client
ever sees a round number go backwards, even across re-homing of this edge.
Every local model carries ``TOP_ROUND_KEY`` (the cloud round served) for the
children's accounting gates.

Accounting. The update sent upward carries the inner server's final weights
and, as ``num_examples``, the sum over the distinct children aggregated in any
local round of the task of each one's latest accepted count: a child in all
``edge_rounds`` rounds counts once, not ``edge_rounds`` times. Its metrics are
the last local round's sample-weighted training metrics plus ``edge_rounds``
(local rounds closed) and ``edge_participants``. If the task ends with only
some local rounds closed (a later one missed its quorum), the partial model
goes up; with none closed the edge sends ``SendFailure``.

Not supported (documented limits): federated evaluation across levels (the
cloud's federated metrics then count no edge examples), and FedAvgServer
checkpoints at the edge (an edge restarted mid-run simply re-joins).

Invariants (hypothesis tests): local rounds never go backwards; at most one
task is open; the upward round answered is the one the task was started for;
no child's examples are counted twice in one upward update.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Sequence

from fedbus._types import NodeId, RunId
from fedbus.aggregation import Aggregator, FedAvg, Validator
from fedbus.errors import LocalProtocolError
from fedbus.protocols.base import Command, Event, legal_targets
from fedbus.protocols.fedavg_server import FedAvgServer
from fedbus.protocols.fedavg_types import (
    BroadcastModel,
    CancelTraining,
    Evaluate,
    EvaluationDone,
    FedAvgConfig,
    Finish,
    ManifestReceived,
    ModelReceived,
    NodeJoined,
    NodeLeft,
    PublishManifest,
    Reject,
    RejectReason,
    RoundClosed,
    SenderMismatched,
    Started,
    Stop,
    Tick,
    Train,
    TrainingDone,
    TrainingFailed,
    UpdateFailed,
    UpdateReceived,
)
from fedbus.protocols.hierarchical_client import Upstream
from fedbus.protocols.hierarchical_rehoming import TOP_ROUND_KEY, ParentHeard, ParentLost, Rehoming

__all__ = ["EDGE_TRANSITIONS", "EdgeAggregator", "EdgeState"]


class EdgeState(enum.Enum):
    """Where an edge aggregator stands; see the module docstring."""

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


@dataclasses.dataclass(slots=True)
class _Task:
    """The open task: which parent round, and what the children contributed to it."""

    round: int
    top_round: int
    server: FedAvgServer
    counted: dict[NodeId, int] = dataclasses.field(default_factory=dict)
    pending: dict[tuple[int, NodeId], int] = dataclasses.field(default_factory=dict)
    closed: int = 0
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)


class EdgeAggregator:
    """An edge (or region) aggregator as a sans-IO machine (see the module docstring).

    Args:
        config: this level's settings (quorum, deadlines, selection, retries,
            seed, extra train config); ``rounds`` and ``evaluate`` are ignored.
        node: this edge's id (prefixes the request ids it broadcasts).
        run: the run id (the same at every level).
        edge_rounds: local aggregation rounds per parent round.
        aggregator: this level's aggregator; sample-weighted FedAvg by default.
        validators: screen each local round's updates.
        rehoming: this edge's own re-homing policy, when its parent may die.
    """

    def __init__(
        self,
        config: FedAvgConfig,
        *,
        node: NodeId,
        run: RunId,
        edge_rounds: int = 1,
        aggregator: Aggregator | None = None,
        validators: Sequence[Validator] = (),
        rehoming: Rehoming | None = None,
    ) -> None:
        if edge_rounds < 1:
            raise ValueError(f"edge_rounds must be positive, got {edge_rounds}")
        self.config = dataclasses.replace(config, evaluate="central")
        self.node = node
        self.run = run
        self.edge_rounds = edge_rounds
        self.aggregator: Aggregator = aggregator if aggregator is not None else FedAvg()
        self._validators = tuple(validators)
        self.upstream = Upstream(run=run, rehoming=rehoming)
        self._state = EdgeState.IDLE
        self._allowed: frozenset[EdgeState] = frozenset()
        self._now = -math.inf
        self._live: dict[NodeId, int] = {}
        self._base = 0
        self._task: _Task | None = None

    # --- the Machine surface ----------------------------------------------

    @property
    def state(self) -> EdgeState:
        """The current state."""
        return self._state

    @property
    def inner(self) -> FedAvgServer | None:
        """The downward FedAvg server of the open task, if any."""
        return None if self._task is None else self._task.server

    @property
    def local_base(self) -> int:
        """Local rounds used up by finished or aborted tasks."""
        return self._base

    @property
    def live_children(self) -> frozenset[NodeId]:
        """Children that joined and have not left."""
        return frozenset(self._live)

    def next_deadline(self) -> float | None:
        """The earliest of the inner server's deadline and the re-homing watchdog."""
        found = [self.upstream.next_deadline()]
        if self._task is not None:
            found.append(self._task.server.next_deadline())
        return min((d for d in found if d is not None), default=None)

    def handle(self, event: Event, *, now: float) -> list[Command]:
        """Handle one event at time ``now``.

        Raises:
            LocalProtocolError: illegal event for the state, time went
                backwards, the machine is in ERROR, or an inner machine
                refused (our misuse); the edge is then in ERROR.
        """
        if self._state is EdgeState.ERROR:
            raise LocalProtocolError("the edge aggregator is in ERROR and accepts nothing")
        try:
            allowed = legal_targets(EDGE_TRANSITIONS, self._state, event)
            if now < self._now:
                raise LocalProtocolError(f"time went backwards: {now} < {self._now}")
            self._now = now
            self._allowed = allowed
            return self._dispatch(event)
        except LocalProtocolError:
            self._state = EdgeState.ERROR
            self._task = None
            raise

    def _set_state(self, state: EdgeState) -> None:
        if state not in self._allowed:  # pragma: no cover - a bug in this module
            raise LocalProtocolError(f"internal: {self._state.name} -> {state.name} not allowed")
        self._state = state

    # --- dispatch ------------------------------------------------------------

    def _dispatch(self, event: Event) -> list[Command]:
        match event:
            case Started():
                self._set_state(EdgeState.WAITING_FOR_PARENT)
                return [self._manifest("waiting"), *self._up(event)]
            case NodeJoined() | NodeLeft() | UpdateReceived() | UpdateFailed() | SenderMismatched():
                return self._on_child(event)
            case Tick():
                out = self._down(event) if self._task is not None else []
                return out + (self._up(event) if self._state is not EdgeState.IDLE else [])
        # parent events
        return self._up(event)

    def _on_child(self, event: Event) -> list[Command]:
        if isinstance(event, NodeJoined):
            self._live[event.node] = event.num_examples
        elif isinstance(event, NodeLeft):
            self._live.pop(event.node, None)
        if self._task is not None:
            return self._down(event)
        if isinstance(event, UpdateReceived | UpdateFailed | SenderMismatched):
            sender = event.node if isinstance(event, SenderMismatched) else event.sender
            reason = (
                RejectReason.SENDER_MISMATCH
                if isinstance(event, SenderMismatched)
                else RejectReason.STALE_ROUND
            )
            return [
                Reject(
                    sender=sender, round=event.round, reason=reason, detail="no local round open"
                )
            ]
        return []

    # --- upward ----------------------------------------------------------------

    def _up(self, event: Event) -> list[Command]:
        if self._state is EdgeState.DONE:
            return []  # the run is over: late models, manifests and watchdogs change nothing
        return self._from_upstream(self.upstream.feed(event, now=self._now))

    def _from_upstream(self, commands: list[Command]) -> list[Command]:
        out: list[Command] = []
        for command in commands:
            match command:
                case Train():
                    out += self._begin_task(command)
                case Evaluate():
                    done = EvaluationDone(round=command.round, num_examples=0)
                    out += self._from_upstream(self.upstream.feed(done, now=self._now))
                case CancelTraining():
                    out += self._abort_task()
                case Stop():
                    out += self._abort_task()
                    self._set_state(EdgeState.DONE)
                    out += [self._manifest("finished"), command]
                case _:
                    out.append(command)
        return out

    def _begin_task(self, train: Train) -> list[Command]:
        out = self._abort_task()  # never two tasks at once (the client cancels first anyway)
        top = train.config.get(TOP_ROUND_KEY, train.round)
        top_round = top if isinstance(top, int) and not isinstance(top, bool) else train.round
        config = dataclasses.replace(
            self.config,
            rounds=self._base + self.edge_rounds,
            train_config={**train.config, **self.config.train_config, TOP_ROUND_KEY: top_round},
        )
        server = FedAvgServer(
            config, run=self.run, weights=train.weights, aggregator=self.aggregator,
            validators=self._validators, expected_nodes=len(self._live) or None,
            completed_round=self._base,
        )  # fmt: skip
        self._task = _Task(round=train.round, top_round=top_round, server=server)
        self._set_state(EdgeState.AGGREGATING)
        for child, examples in sorted(self._live.items()):
            out += self._down(NodeJoined(node=child, num_examples=examples))
        return out + self._down(Started())

    def _abort_task(self) -> list[Command]:
        if self._task is None:
            return []
        self._task = None
        self._base += self.edge_rounds
        self._set_state(EdgeState.WAITING_FOR_PARENT)
        return [self._manifest("waiting")]

    # --- downward --------------------------------------------------------------

    def _down(self, event: Event) -> list[Command]:
        task = self._task
        assert task is not None
        commands = task.server.handle(event, now=self._now)
        if isinstance(event, UpdateReceived) and not any(
            isinstance(c, Reject) and c.sender == event.sender and c.round == event.round
            for c in commands
        ):
            task.pending[(event.round, event.sender)] = event.num_examples
        out: list[Command] = []
        for command in commands:
            match command:
                case BroadcastModel():
                    out.append(
                        dataclasses.replace(command, request_id=f"{self.node}:{command.request_id}")
                    )
                case PublishManifest():
                    state = "waiting" if command.state == "finished" else command.state
                    out.append(dataclasses.replace(command, state=state))
                case RoundClosed():
                    task.closed += 1
                    task.metrics = dict(command.client_metrics)
                    for child in command.participants:
                        task.counted[child] = task.pending[(command.round, child)]
                    out.append(command)
                case Finish():
                    out += self._end_task(task, command)
                case _:
                    out.append(command)
        return out

    def _end_task(self, task: _Task, finish: Finish) -> list[Command]:
        self._task = None
        self._base += self.edge_rounds
        self._set_state(EdgeState.WAITING_FOR_PARENT)
        result: Event
        if task.closed:
            metrics = {
                **task.metrics,
                "edge_rounds": task.closed,
                "edge_participants": len(task.counted),
            }
            result = TrainingDone(
                round=task.round, weights=task.server.weights,
                num_examples=sum(task.counted.values()), metrics=metrics,
            )  # fmt: skip
        else:
            result = TrainingFailed(round=task.round, reason=f"edge {self.node}: {finish.reason}")
        return self._from_upstream(self.upstream.feed(result, now=self._now))

    def _manifest(self, state: str) -> PublishManifest:
        return PublishManifest(
            run=self.run, round=self._base + 1, attempt=1, state=state, selected=(),
            completed_round=self._base,
        )  # fmt: skip
