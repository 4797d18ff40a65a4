"""FedAvg client machine: which models to act on, one task at a time.

Theory of operation
===================

States (`ClientState`)::

    IDLE --ModelReceived(newer round, selected)--> EVALUATING (federated eval first)
                                               --> TRAINING
    EVALUATING --EvaluationDone--> TRAINING (train after evaluating)
               --EvaluationDone--> IDLE     (evaluation-only round: report sent)
    TRAINING --TrainingDone / TrainingFailed--> IDLE (update or failure sent)
    EVALUATING | TRAINING --ModelReceived(newer round)--> CancelTraining, then as from IDLE
    any --ManifestReceived(finished)--> DONE (terminal; Stop)
    any --(our own misuse)--> ERROR (terminal)

Rules and invariants:
- the client acts on each round at most once: models of past rounds, repeats
  of the current one (a QoS 1 duplicate, or a retry attempt of a round already
  being worked on or answered) and rounds it is not selected for produce no
  command; models of other runs are ignored;
- at most one task (evaluation or training) is outstanding; a newer round's
  model cancels it, and the stale result that may still come back is dropped;
- a result naming a round the machine never asked for is our own bug:
  `LocalProtocolError`, state ERROR.

Asynchronous servers (FedBuff, `fedbus.protocols.fedbuff`) mark their models
with ``async: True``. Such a model's task is *not* cancelled by a newer model:
cancelling would let a slow client never deliver anything while versions move
on, whereas FedBuff wants its (stale, down-weighted) update. The newest model
that arrives meanwhile is kept and trained on as soon as the update is sent, so
the client always moves on to the newest version it has.

Federated evaluation: when the broadcast config says ``evaluate: True`` the
client first evaluates the received global model (`Evaluate`) and then trains
(`Train`); the evaluation travels inside the update's metrics as ``eval_*``
keys plus ``eval_num_examples`` (`fedbus.protocols.metrics`). A broadcast with
``task: evaluate`` (the final model) asks for the evaluation only, answered by
an update with no tensors.

There are no client-side deadlines: the server's deadlines bound every round,
so `next_deadline` is always None.
"""

from __future__ import annotations

import math

from fedbus._types import RunId, StateEnum
from fedbus.errors import LocalProtocolError
from fedbus.protocols.base import Command, Event, checked_transition, legal_targets
from fedbus.protocols.fedavg_types import (
    ASYNC_KEY,
    EVALUATE_KEY,
    TASK_EVALUATE,
    TASK_KEY,
    CancelTraining,
    Evaluate,
    EvaluationDone,
    ManifestReceived,
    ModelReceived,
    ScalarMap,
    SendFailure,
    SendUpdate,
    Stop,
    Tick,
    Train,
    TrainingDone,
    TrainingFailed,
)
from fedbus.protocols.metrics import eval_metrics_entry

__all__ = ["CLIENT_TRANSITIONS", "ClientState", "FedAvgClient"]


class ClientState(StateEnum):
    """Where the client stands; see the module docstring."""

    IDLE = "idle"
    EVALUATING = "evaluating"
    TRAINING = "training"
    DONE = "done"
    ERROR = "error"


_C = ClientState
_ANY_TASK = frozenset({_C.IDLE, _C.EVALUATING, _C.TRAINING})
_BUSY = {_C.EVALUATING, _C.TRAINING}

CLIENT_TRANSITIONS: dict[ClientState, dict[type[Event], frozenset[ClientState]]] = {
    state: {
        ModelReceived: _ANY_TASK,
        ManifestReceived: _ANY_TASK | {_C.DONE},
        TrainingDone: _ANY_TASK,
        EvaluationDone: _ANY_TASK,
        TrainingFailed: _ANY_TASK,
        Tick: frozenset({state}),
    }
    for state in (_C.IDLE, _C.EVALUATING, _C.TRAINING)
}
# DONE swallows late input (results of cancelled work, retained messages).
CLIENT_TRANSITIONS[_C.DONE] = {
    kind: frozenset({_C.DONE})
    for kind in (
        ModelReceived,
        ManifestReceived,
        TrainingDone,
        EvaluationDone,
        TrainingFailed,
        Tick,
    )
}
CLIENT_TRANSITIONS[_C.ERROR] = {}


class FedAvgClient:
    """A FedAvg client as a sans-IO machine (see the module docstring).

    Args:
        run: this run's id; models and manifests of other runs are ignored.
    """

    def __init__(self, *, run: RunId) -> None:
        self.run = run
        self._state = ClientState.IDLE
        self._allowed: frozenset[ClientState] = frozenset()
        self._now = -math.inf
        self._round = 0  # newest round heard of (model or manifest)
        self._acted = 0  # newest round a task was started for
        self._task_round = 0  # round of the outstanding task, 0 when none
        self._reply_to = ""
        self._train_after_eval: tuple[ScalarMap, ModelReceived] | None = None
        self._eval_metrics: dict[str, float] = {}
        self._async = False  # the outstanding task came from an asynchronous server
        self._next: ModelReceived | None = None  # async: newest model to train on next

    @property
    def state(self) -> ClientState:
        """The current state."""
        return self._state

    @property
    def current_round(self) -> int:
        """The newest round this client knows of."""
        return self._round

    def next_deadline(self) -> float | None:
        """Clients keep no deadlines; the server's bound every round."""
        return None

    def handle(self, event: Event, *, now: float) -> list[Command]:
        """Handle one event at time ``now``.

        Raises:
            LocalProtocolError: an illegal event, a result for a round never
                asked for, time going backwards, or the machine is in ERROR.
        """
        try:
            allowed = legal_targets(CLIENT_TRANSITIONS, self._state, event)
            if now < self._now:
                raise LocalProtocolError(f"time went backwards: {now} < {self._now}")
            self._now = now
            self._allowed = allowed
            return self._dispatch(event)
        except LocalProtocolError:
            self._state = ClientState.ERROR
            raise

    def _set_state(self, state: ClientState) -> None:
        self._state = checked_transition(self._allowed, self._state, state)

    def _dispatch(self, event: Event) -> list[Command]:
        match event:
            case ModelReceived():
                return self._on_model(event)
            case ManifestReceived():
                return self._on_manifest(event)
            case TrainingDone() | EvaluationDone() | TrainingFailed():
                return self._on_result(event)
        return []  # Tick: nothing is time-driven on a client

    # --- models and manifests -----------------------------------------------------

    def _newer(self, run: str, round_: int) -> list[Command] | None:
        """Move to ``round_`` if it is newer: cancel stale work. None: ignore the input."""
        if self._state is ClientState.DONE or run != self.run or round_ < self._round:
            return None
        out: list[Command] = []
        if round_ > self._round:
            self._round = round_
            if self._task_round and self._task_round < round_ and not self._async:
                out.append(CancelTraining(round=self._task_round))
                self._task_round = 0
                self._train_after_eval = None
                self._set_state(ClientState.IDLE)
        return out

    def _on_model(self, event: ModelReceived) -> list[Command]:
        out = self._newer(event.run, event.round)
        if out is None or not event.selected or self._acted >= event.round:
            return out or []
        if self._task_round and self._async:
            self._next = event  # busy with an older version: finish it, then this one
            return out
        return [*out, *self._start(event)]

    def _start(self, event: ModelReceived) -> list[Command]:
        self._acted = event.round
        self._async = event.config.get(ASYNC_KEY) is True
        self._task_round = event.round
        self._reply_to = event.model_id
        self._eval_metrics = {}
        evaluate_only = event.config.get(TASK_KEY) == TASK_EVALUATE
        if evaluate_only or event.config.get(EVALUATE_KEY) is True:
            self._train_after_eval = None if evaluate_only else (event.config, event)
            self._set_state(ClientState.EVALUATING)
            return [Evaluate(round=event.round, weights=event.weights)]
        return self._train(event)

    def _train(self, model: ModelReceived) -> list[Command]:
        self._set_state(ClientState.TRAINING)
        reserved = (TASK_KEY, EVALUATE_KEY, ASYNC_KEY)
        config = {k: v for k, v in model.config.items() if k not in reserved}
        return [Train(round=model.round, weights=model.weights, config=config, extras=model.extras)]

    def _on_manifest(self, event: ManifestReceived) -> list[Command]:
        out = self._newer(event.run, event.round)
        if out is None or event.state != "finished":
            return out or []
        if self._task_round:
            out.append(CancelTraining(round=self._task_round))
            self._task_round = 0
        self._next = None
        self._set_state(ClientState.DONE)
        return [*out, Stop(reason=f"the server finished the run at round {event.round}")]

    # --- results ---------------------------------------------------------------------

    def _on_result(self, event: TrainingDone | EvaluationDone | TrainingFailed) -> list[Command]:
        if event.round > self._acted:
            raise LocalProtocolError(
                f"{type(event).__name__} for round {event.round}, which was never requested"
            )
        expected = {ClientState.EVALUATING: EvaluationDone, ClientState.TRAINING: TrainingDone}
        current = event.round == self._task_round and self._state in _BUSY
        if not current or not isinstance(event, expected[self._state] | TrainingFailed):
            if current:
                raise LocalProtocolError(
                    f"{type(event).__name__} while {self._state.name} for round {event.round}"
                )
            return []  # the result of cancelled or finished work: dropped
        if isinstance(event, TrainingFailed):
            return self._done(
                SendFailure(round=event.round, reason=event.reason, reply_to=self._reply_to)
            )
        if isinstance(event, EvaluationDone):
            self._eval_metrics = eval_metrics_entry(event.num_examples, event.metrics)
            if self._train_after_eval is not None:
                _, model = self._train_after_eval
                self._train_after_eval = None
                return self._train(model)
            return self._done(
                SendUpdate(
                    round=event.round, weights={}, num_examples=0, encoding="dense",
                    metrics=self._eval_metrics, reply_to=self._reply_to,
                )
            )  # fmt: skip
        metrics = {**event.metrics, **self._eval_metrics}
        return self._done(
            SendUpdate(
                round=event.round, weights=event.weights, num_examples=event.num_examples,
                encoding=event.encoding, metrics=metrics, reply_to=self._reply_to,
                extras=event.extras,
            )
        )  # fmt: skip

    def _done(self, command: Command) -> list[Command]:
        self._task_round = 0
        self._set_state(ClientState.IDLE)
        upcoming, self._next = self._next, None
        if upcoming is not None and upcoming.round > self._acted:
            return [command, *self._start(upcoming)]
        return [command]
