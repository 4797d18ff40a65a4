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
``Evaluate`` is federated evaluation (see below); ``CancelTraining`` aborts
the task; ``Stop`` ends the edge and tells the children (a "finished"
manifest); ``SendUpdate``, ``SendFailure``, `SwitchParent` and `Stranded` go
out as they are. Inner server: ``BroadcastModel`` goes out with this edge's
id prefixed to its ``request_id``; ``PublishManifest`` goes out with
"finished" rewritten to "waiting" (the task ended, not the run: a child that
read "finished" would stop for good); ``Reject``, ``RoundClosed`` and
``RoundFailed`` go out (per-level metrics); its ``Finish`` ends the task.

Round numbering. Children see one monotone local round sequence: task ``t``
runs local rounds ``base + 1 .. base + edge_rounds`` and ``base`` grows by
``edge_rounds`` after every task, finished or aborted (an evaluation task
uses one local round), so no child's client
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
goes up; with none closed the edge sends ``SendFailure``. Every task, finished
or aborted, ends with a `TaskEnded` report (per-level metrics: local rounds,
participants, rejections by reason, evaluation) that also carries what a
resumed run restarts this edge from (``local_base``, aggregator state; the
constructor's ``local_base`` takes it back).

Defenses. ``validators`` screen every local round's updates (the inner
server runs them before aggregating; rejections become ``Reject`` commands
and ``TaskEnded.rejected``), and ``aggregator`` may be a robust one: the same
objects as at the cloud, so an edge is an aggregation point like any other.

Federated evaluation. A parent model that asks for an evaluation before
training (``EVALUATE_KEY``) is answered at once with an empty
``EvaluationDone`` to the upward client; the task's first local round then
asks the children to evaluate the model it broadcasts (the parent's model)
before training, and the sample-weighted mean of their reports replaces the
``eval_*`` metrics of the upward update, so the parent's mean is
sample-weighted over the devices below. A parent model that asks for the
evaluation only (``TASK_EVALUATE``, the end of the run) starts an
evaluation task: a fresh inner server with no rounds left runs its final
federated evaluation over every live child, and its mean goes up as the
``EvaluationDone``. Any depth works the same way.

Invariants (hypothesis tests): local rounds never go backwards; at most one
task is open; the upward round answered is the one the task was started for;
no child's examples are counted twice in one upward update.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from fedbus._types import NodeId, RunId
from fedbus.aggregation import Aggregator, FedAvg, Validator
from fedbus.aggregation.validators import level_state
from fedbus.errors import LocalProtocolError
from fedbus.protocols.base import Command, Event, checked_transition, legal_targets
from fedbus.protocols.fedavg_server import FedAvgServer
from fedbus.protocols.fedavg_types import (
    EVALUATE_KEY,
    TASK_EVALUATE,
    TASK_KEY,
    BroadcastModel,
    CancelTraining,
    Evaluate,
    EvaluationClosed,
    EvaluationDone,
    FedAvgConfig,
    Finish,
    ModelReceived,
    NodeJoined,
    NodeLeft,
    PublishManifest,
    Reject,
    RejectReason,
    RoundClosed,
    RoundFailed,
    SenderMismatched,
    SendUpdate,
    Started,
    Stop,
    Tick,
    Train,
    UpdateFailed,
    UpdateReceived,
)
from fedbus.protocols.hierarchical_client import Upstream
from fedbus.protocols.hierarchical_rehoming import TOP_ROUND_KEY, Rehoming
from fedbus.protocols.hierarchical_types import (
    EDGE_TRANSITIONS,
    EdgeState,
    EdgeTask,
    TaskEnded,
    top_round_of,
    with_evaluation,
)

__all__ = ["EDGE_TRANSITIONS", "EdgeAggregator", "EdgeState", "TaskEnded"]


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
        local_base: local rounds already used (a resumed run: `TaskEnded.local_base`).
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
        local_base: int = 0,
    ) -> None:
        if edge_rounds < 1:
            raise ValueError(f"edge_rounds must be positive, got {edge_rounds}")
        if local_base < 0:
            raise ValueError(f"local_base must be >= 0, got {local_base}")
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
        self._base = local_base
        self._task: EdgeTask | None = None
        self._last_model: tuple[int, Mapping[str, object]] = (0, {})
        self._evaluate_round: int | None = None

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
        self._state = checked_transition(self._allowed, self._state, state)

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
        if isinstance(event, ModelReceived) and event.selected:
            self._last_model = (event.round, event.config)
        return self._from_upstream(self.upstream.feed(event, now=self._now))

    def _from_upstream(self, commands: list[Command]) -> list[Command]:
        out: list[Command] = []
        for command in commands:
            match command:
                case Train():
                    out += self._begin_task(command)
                case Evaluate():
                    out += self._on_evaluate(command)
                case CancelTraining():
                    out += self._abort_task()
                case Stop():
                    out += self._abort_task()
                    self._set_state(EdgeState.DONE)
                    out += [self._manifest("finished"), command]
                case _:
                    out.append(command)
        return out

    def _on_evaluate(self, evaluate: Evaluate) -> list[Command]:
        asked_round, config = self._last_model
        if asked_round == evaluate.round and config.get(TASK_KEY) == TASK_EVALUATE:
            return self._begin_evaluation(evaluate, top_round_of(config, evaluate.round))
        # Evaluate, then train: the children evaluate in the task's first local round.
        self._evaluate_round = evaluate.round
        done = EvaluationDone(round=evaluate.round, num_examples=0)
        return self._from_upstream(self.upstream.feed(done, now=self._now))

    def _begin_task(self, train: Train) -> list[Command]:
        out = self._abort_task()  # never two tasks at once (the client cancels first anyway)
        top_round = top_round_of(train.config, train.round)
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
        evaluate, self._evaluate_round = self._evaluate_round == train.round, None
        task = EdgeTask(
            round=train.round, top_round=top_round, server=server, first_local=self._base + 1,
            last_local=self._base + self.edge_rounds, evaluate=evaluate,
        )  # fmt: skip
        return out + self._start(task)

    def _begin_evaluation(self, evaluate: Evaluate, top_round: int) -> list[Command]:
        out = self._abort_task()
        done = max(self._base, 1)  # a FedAvgServer needs rounds >= 1
        config = dataclasses.replace(self.config, rounds=done, evaluate="federated")
        server = FedAvgServer(
            config, run=self.run, weights=evaluate.weights, aggregator=self.aggregator,
            completed_round=done,
        )  # fmt: skip
        task = EdgeTask(
            round=evaluate.round, top_round=top_round, server=server, first_local=done + 1,
            last_local=done + 1, kind="evaluate",
        )  # fmt: skip
        return out + self._start(task)

    def _start(self, task: EdgeTask) -> list[Command]:
        self._task = task
        self._set_state(EdgeState.AGGREGATING)
        out: list[Command] = []
        for child, examples in sorted(self._live.items()):
            out += self._down(NodeJoined(node=child, num_examples=examples))
        return out + self._down(Started())

    def _abort_task(self) -> list[Command]:
        task = self._task
        if task is None:
            return []
        self._task = None
        self._base = task.last_local
        self._set_state(EdgeState.WAITING_FOR_PARENT)
        return [self._report(task), self._manifest("waiting")]

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
                    out.append(self._local_broadcast(task, command))
                case PublishManifest():
                    state = "waiting" if command.state == "finished" else command.state
                    out.append(dataclasses.replace(command, state=state))
                case RoundClosed():
                    task.on_closed(command)
                    out.append(command)
                case RoundFailed():
                    task.open_rejected = dict(command.rejected)
                    out.append(command)
                case EvaluationClosed():
                    task.evaluation = dict(command.federated_metrics)
                    task.counted = {NodeId(n): 0 for n in command.participants}
                case Finish():
                    out += self._end_task(task, command)
                case _:
                    out.append(command)
        return out

    def _local_broadcast(self, task: EdgeTask, command: BroadcastModel) -> BroadcastModel:
        """Our id in the request id; the top round served; an evaluation in round one if asked."""
        config = {**command.config, TOP_ROUND_KEY: task.top_round}
        if task.evaluate and command.round == task.first_local:
            config[EVALUATE_KEY] = True
        return dataclasses.replace(
            command, request_id=f"{self.node}:{command.request_id}", config=config
        )

    def _end_task(self, task: EdgeTask, finish: Finish) -> list[Command]:
        self._task = None
        self._base = task.last_local
        self._set_state(EdgeState.WAITING_FOR_PARENT)
        out: list[Command] = [self._report(task)]
        result = task.result(f"edge {self.node}: {finish.reason}")
        for command in self._from_upstream(self.upstream.feed(result, now=self._now)):
            if isinstance(command, SendUpdate) and command.round == task.round and task.evaluation:
                command = dataclasses.replace(command, metrics=with_evaluation(command, task))
            out.append(command)
        return out

    def _report(self, task: EdgeTask) -> TaskEnded:
        # Validators with a history (the accuracy gate's) are kept with the
        # aggregator, so a resumed edge screens as the uninterrupted one would.
        state = level_state(self.aggregator, self._validators)
        return task.report(local_base=self._base, aggregator_state=state)

    def _manifest(self, state: str) -> PublishManifest:
        return PublishManifest(
            run=self.run, round=self._base + 1, attempt=1, state=state, selected=(),
            completed_round=self._base,
        )  # fmt: skip
