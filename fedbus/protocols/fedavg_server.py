"""FedAvg server machine: selection, deadlines, quorum, retries, rejection, aggregation.

Theory of operation
===================

States (`ServerState`)::

    IDLE --Started--> WAITING_FOR_NODES --(enough nodes | join deadline)--> COLLECTING
    COLLECTING --(all selected answered | round deadline)--> COLLECTING  (next round, or a retry)
                                                         --> WAITING_FOR_NODES (too few live nodes)
                                                         --> EVALUATING (federated, last round done)
                                                         --> FINISHED
    EVALUATING --(all answered | deadline)--> FINISHED
    any state --(our own misuse)--> ERROR (terminal)

`TRANSITIONS` lists, per state, the legal event types and the states each may
lead to; an event type missing there is a failed lookup and raises
`LocalProtocolError` (h11's approach). Remote input (joins, leaves, updates,
failures, forged senders) is legal in every state but ERROR: a bad update
becomes a `Reject`, never an exception.

Time and deadlines. ``now`` is an input and must never decrease. Before any
event is handled, an expired deadline (``now >= next_deadline()``) is handled
first, as if a `Tick` had arrived; so an update arriving after the deadline is
judged against the closed round, whatever order the runtime noticed things in.
The runtime calls ``handle(Tick(), now=...)`` when `next_deadline` passes.

Join rule. Round 1 starts as soon as the target number of nodes has joined:
``expected_nodes`` if the runtime passed it, else ``clients_per_round`` if set
(never fewer than ``min_clients``). Otherwise, or if the target is not met,
it starts at ``join_timeout_s`` after Started with at least ``min_clients``
live nodes, and the run fails if fewer joined. Later rounds and retries start
at once when at least ``min_clients`` nodes are live; if not, the server waits
up to ``join_timeout_s`` for nodes to (re)join, then fails.

Selection. Per attempt, ``k`` of the live nodes (``clients_per_round``,
``floor(fraction * live)`` but at least ``min_clients``, or all; see
`fedbus.protocols.selection.selection_size`), sampled by a
`random.Random` seeded with ``(seed, round, attempt)`` from the sorted live
set. Seeding per round instead of drawing from one long-lived generator makes
a resumed run select exactly what the uninterrupted run would have.

Closing. An attempt closes when every selected node answered (update or
failure) or left, or at its deadline. It succeeds with at least ``min_clients``
accepted updates that survive the validators and aggregate without
`AggregationError`. It fails early when the quorum became unreachable. A failed
attempt is retried with a fresh selection; updates already received from nodes
selected again are kept (they trained the same global model, and a client
answers each round only once). After ``1 + max_round_retries`` failed attempts
of one round the run ends with ``Finish(success=False)``.

Invariants (checked by the hypothesis tests):
- rounds never go backwards: RoundClosed rounds are 1, 2, 3... with no gaps;
- an update is aggregated at most once, only in the round it names, only from
  a node selected in the attempt that closed, at most one per node;
- every wait has a deadline, so the run always reaches FINISHED.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from fedbus._types import NodeId, RunId
from fedbus.aggregation import (
    DELTA,
    DENSE,
    AggregationError,
    Aggregator,
    Arrays,
    ClientUpdate,
    FedAvg,
    Validator,
    broadcast_extras,
)
from fedbus.aggregation.validators import level_state, load_level_state
from fedbus.errors import LocalProtocolError
from fedbus.protocols.base import Command, Event, checked_transition, legal_targets
from fedbus.protocols.fedavg_server_states import TRANSITIONS, ServerState
from fedbus.protocols.fedavg_types import (
    EVALUATE_KEY,
    TASK_EVALUATE,
    TASK_KEY,
    TASK_TRAIN,
    BroadcastModel,
    EvaluationClosed,
    FedAvgConfig,
    Finish,
    NodeJoined,
    NodeLeft,
    PublishManifest,
    Reject,
    RejectReason,
    RoundClosed,
    RoundFailed,
    SenderMismatched,
    ServerCheckpoint,
    Started,
    Tick,
    UpdateFailed,
    UpdateReceived,
)
from fedbus.protocols.metrics import federated_metrics, training_metrics
from fedbus.protocols.selection import select_nodes, selection_size
from fedbus.protocols.timed import DeadlineFirst

__all__ = ["TRANSITIONS", "FedAvgServer", "ServerState"]


class FedAvgServer(DeadlineFirst):
    """The central FedAvg server as a sans-IO machine (see the module docstring).

    Args:
        config: the protocol section.
        run: this run's id; updates of other runs are rejected as foreign_run.
        weights: the initial global model (named arrays, fixing names, shapes, dtypes).
        aggregator: combines updates; sample-weighted `FedAvg` by default.
        validators: screen each round's updates before aggregation.
        expected_nodes: how many nodes the topology declares; round 1 starts
            as soon as that many joined.
        completed_round: rounds already completed (resume); see `from_checkpoint`.
    """

    def __init__(
        self,
        config: FedAvgConfig,
        *,
        run: RunId,
        weights: Arrays,
        aggregator: Aggregator | None = None,
        validators: Sequence[Validator] = (),
        expected_nodes: int | None = None,
        completed_round: int = 0,
    ) -> None:
        if expected_nodes is not None and expected_nodes < 1:
            raise ValueError(f"expected_nodes must be positive, got {expected_nodes}")
        if completed_round < 0:
            raise ValueError(f"completed_round must be >= 0, got {completed_round}")
        self.config = config
        self.run = run
        self.aggregator: Aggregator = aggregator if aggregator is not None else FedAvg()
        self._validators = tuple(validators)
        self._expected = expected_nodes
        self._weights: dict[str, npt.NDArray[Any]] = {k: np.asarray(v) for k, v in weights.items()}
        self._signature_of: object = None
        self._signature_cache: list[tuple[str, tuple[int, ...], np.dtype[Any]]] = []
        self._state = ServerState.IDLE
        self._allowed: frozenset[ServerState] = frozenset()
        self._now = -math.inf
        self._deadline: float | None = None
        self._any_round_started = False
        self._live: dict[NodeId, int] = {}
        self._completed = completed_round
        self._round = completed_round + 1
        self._attempt = 1
        self._failed_attempts = 0
        self._rejected: Counter[str] = Counter()
        self._seen_ids: set[str] = set()
        self._reset_attempt(frozenset())

    @classmethod
    def from_checkpoint(
        cls, config: FedAvgConfig, checkpoint: ServerCheckpoint, **kwargs: Any
    ) -> FedAvgServer:
        """Continue a run after ``checkpoint.round``, restoring the aggregator's state.

        ``kwargs`` are the other constructor arguments except ``weights``.
        Stateful validators (the gate's per-sender history) travel in the
        same mapping under ``validators/``, so the checkpoint format is
        unchanged and an older checkpoint simply restores none.
        """
        server = cls(config, weights=checkpoint.weights, completed_round=checkpoint.round, **kwargs)
        load_level_state(server.aggregator, server._validators, checkpoint.aggregator_state)
        return server

    def _state_to_keep(self) -> dict[str, npt.NDArray[Any]]:
        """The aggregator's state plus stateful validators' (`level_state`)."""
        return level_state(self.aggregator, self._validators)

    # --- the Machine surface ----------------------------------------------

    @property
    def state(self) -> ServerState:
        """The current state."""
        return self._state

    @property
    def weights(self) -> dict[str, npt.NDArray[Any]]:
        """The current global model."""
        return self._weights

    @property
    def completed_round(self) -> int:
        """The last completed (aggregated) round; 0 before the first."""
        return self._completed

    @property
    def current_round(self) -> int:
        """The round being (or next to be) collected."""
        return self._round

    @property
    def selected(self) -> frozenset[NodeId]:
        """Nodes selected in the open attempt (empty when none is open)."""
        return self._selected

    @property
    def live_nodes(self) -> frozenset[NodeId]:
        """Nodes that joined and have not left."""
        return frozenset(self._live)

    def next_deadline(self) -> float | None:
        """The join, round or evaluation deadline in force, if any."""
        return self._deadline

    def _in_error(self) -> bool:
        return self._state is ServerState.ERROR

    def _enter_error(self) -> None:
        self._state = ServerState.ERROR

    # --- dispatch ------------------------------------------------------------

    def _dispatch(self, event: Event) -> list[Command]:
        allowed = legal_targets(TRANSITIONS, self._state, event)
        self._allowed = allowed
        match event:
            case Started():
                return self._on_started()
            case Tick():
                return self._on_tick() if self._expired() else []
            case NodeJoined():
                return self._on_joined(event)
            case NodeLeft():
                return self._on_left(event)
            case UpdateReceived():
                return self._on_update(event)
            case UpdateFailed():
                return self._on_failure(event)
            case SenderMismatched():
                return self._reject(
                    event.node, event.round, RejectReason.SENDER_MISMATCH,
                    f"message claims sender {event.claimed!r}", event.update_id,
                )  # fmt: skip
        raise LocalProtocolError(f"unknown event {event!r}")  # pragma: no cover

    def _set_state(self, state: ServerState) -> None:
        self._state = checked_transition(self._allowed, self._state, state)

    def _expired(self) -> bool:
        return self._deadline is not None and self._now >= self._deadline

    # --- joining and waiting ---------------------------------------------------

    def _on_started(self) -> list[Command]:
        if self._completed >= self.config.rounds:
            return self._after_last_round()
        self._set_state(ServerState.WAITING_FOR_NODES)
        self._deadline = self._now + self.config.join_timeout_s
        return [self._manifest(), *self._maybe_begin()]

    def _join_target(self) -> int | None:
        target = self._expected if self._expected is not None else self.config.clients_per_round
        return None if target is None else max(target, self.config.min_clients)

    def _maybe_begin(self) -> list[Command]:
        """In WAITING_FOR_NODES: begin the attempt if enough nodes are live."""
        if self._any_round_started:
            ready = len(self._live) >= self.config.min_clients
        else:
            target = self._join_target()
            ready = target is not None and len(self._live) >= target
        return self._begin_attempt() if ready else []

    def _on_joined(self, event: NodeJoined) -> list[Command]:
        self._live[event.node] = event.num_examples
        if self._state is ServerState.WAITING_FOR_NODES:
            return self._maybe_begin()
        return []

    def _on_left(self, event: NodeLeft) -> list[Command]:
        self._live.pop(event.node, None)
        if event.node in self._selected and event.node not in self._answered:
            self._gone.add(event.node)
            self._outstanding.discard(event.node)
            return self._progress()
        return []

    def _on_tick(self) -> list[Command]:
        match self._state:
            case ServerState.WAITING_FOR_NODES:
                if len(self._live) >= self.config.min_clients:
                    return self._begin_attempt()
                what = (
                    "before round 1" if not self._any_round_started else f"for round {self._round}"
                )
                return self._finish(
                    False,
                    f"only {len(self._live)} live node(s), below min_clients="
                    f"{self.config.min_clients}, after waiting {self.config.join_timeout_s:g} s {what}",
                )
            case ServerState.COLLECTING:
                return self._close_attempt()
            case _:  # EVALUATING: the only other state with a deadline
                return self._close_evaluation()

    # --- round attempts ------------------------------------------------------------

    def _reset_attempt(self, selected: frozenset[NodeId]) -> None:
        self._selected = selected
        kept: dict[NodeId, UpdateReceived] = getattr(self, "_updates", {})
        failed: set[NodeId] = getattr(self, "_failed", set())
        # A node selected again keeps its answer from the failed attempt: it
        # trained the same global model and answers each round only once.
        self._updates: dict[NodeId, UpdateReceived] = {
            n: u for n, u in kept.items() if n in selected
        }
        prepared: dict[NodeId, ClientUpdate] = getattr(self, "_prepared", {})
        self._prepared: dict[NodeId, ClientUpdate] = {
            n: u for n, u in prepared.items() if n in self._updates
        }
        self._failed: set[NodeId] = {n for n in failed if n in selected}
        self._answered: set[NodeId] = set(self._updates) | self._failed
        self._gone: set[NodeId] = {n for n in selected if n not in self._live} - self._answered
        # Kept incrementally (``selected - answered - gone``): recomputing it on
        # every answer made a round of n answers O(n^2) (issue 3: ~1,000 set
        # differences of 1,000 ids per round at 1,000 clients).
        self._outstanding: set[NodeId] = set(selected) - self._answered - self._gone

    def _select(self, live: list[NodeId]) -> frozenset[NodeId]:
        cfg = self.config
        k = selection_size(
            len(live),
            clients_per_round=cfg.clients_per_round,
            fraction=cfg.fraction,
            min_clients=cfg.min_clients,
        )
        return select_nodes(cfg.seed, self._round, self._attempt, live, k)

    def _begin_attempt(self) -> list[Command]:
        live = sorted(self._live)
        if len(live) < self.config.min_clients:
            self._reset_attempt(frozenset())
            self._set_state(ServerState.WAITING_FOR_NODES)
            self._deadline = self._now + self.config.join_timeout_s
            return [self._manifest()]
        self._any_round_started = True
        self._reset_attempt(self._select(live))
        self._set_state(ServerState.COLLECTING)
        self._deadline = self._now + self.config.round_timeout_s
        config = {
            **self.config.train_config,
            TASK_KEY: TASK_TRAIN,
            EVALUATE_KEY: self.config.evaluate == "federated",
        }
        return [self._broadcast(config), self._manifest(), *self._progress()]

    def _broadcast(self, config: Mapping[str, bool | int | float | str]) -> BroadcastModel:
        return BroadcastModel(
            round=self._round,
            attempt=self._attempt,
            weights=self._weights,
            selected=tuple(sorted(self._selected)),
            config=config,
            request_id=f"{self.run}:{self._round}:{self._attempt}",
            extras=broadcast_extras(self.aggregator, self._weights),
        )

    def _progress(self) -> list[Command]:
        """After an answer or a leave: close when nobody is outstanding, fail if hopeless."""
        outstanding = self._outstanding
        if self._state is ServerState.EVALUATING:
            return [] if outstanding else self._close_evaluation()
        if not outstanding:
            return self._close_attempt()
        if len(self._updates) + len(outstanding) < self.config.min_clients:
            return self._fail_attempt(
                f"quorum unreachable: {len(self._updates)} update(s) and {len(outstanding)} "
                f"outstanding, min_clients={self.config.min_clients}"
            )
        return []

    # --- answers -------------------------------------------------------------------

    def _classify(self, sender: NodeId, run: str, round_: int, update_id: str) -> str | None:
        """The reject reason for an answer, or None when it counts."""
        if run != self.run:
            return RejectReason.FOREIGN_RUN
        open_ = self._state in (ServerState.COLLECTING, ServerState.EVALUATING)
        if round_ < self._round or (round_ == self._round and not open_):
            return RejectReason.STALE_ROUND
        if round_ > self._round:
            return RejectReason.FUTURE_ROUND
        if sender not in self._selected:
            return RejectReason.UNSELECTED
        if sender in self._answered or (update_id and update_id in self._seen_ids):
            return RejectReason.DUPLICATE
        return None

    def _on_update(self, event: UpdateReceived) -> list[Command]:
        reason = self._classify(event.sender, event.run, event.round, event.update_id)
        detail = ""
        if reason is None and self._state is ServerState.COLLECTING:
            detail = self._invalid(event)
            reason = RejectReason.INVALID if detail else None
        if reason is not None:
            return self._reject(event.sender, event.round, reason, detail, event.update_id)
        if event.update_id:
            self._seen_ids.add(event.update_id)
        self._updates[event.sender] = event
        if self._state is ServerState.COLLECTING:
            # The aggregator's view, built while the update is at hand: at close
            # the 1,000 updates of a round were all touched again (issue 3).
            self._prepared[event.sender] = _client_update(event)
        self._answered.add(event.sender)
        self._outstanding.discard(event.sender)
        return self._progress()

    def _on_failure(self, event: UpdateFailed) -> list[Command]:
        reason = self._classify(event.sender, event.run, event.round, event.update_id)
        if reason is not None:
            return self._reject(event.sender, event.round, reason, event.reason, event.update_id)
        if event.update_id:
            self._seen_ids.add(event.update_id)
        self._failed.add(event.sender)
        self._answered.add(event.sender)
        self._outstanding.discard(event.sender)
        return self._progress()

    def _invalid(self, event: UpdateReceived) -> str:
        """Why an update cannot be aggregated with the global model ('' if it can)."""
        if event.encoding not in (DENSE, DELTA):
            return f"unknown encoding {event.encoding!r}"
        if event.num_examples < 1:
            return f"num_examples must be positive, got {event.num_examples}"
        weights = event.weights
        for name, shape, dtype in self._signature():
            value = weights.get(name)
            if value is None:
                return "tensor names differ from the global model's"
            if type(value) is not np.ndarray:
                value = np.asarray(value)
            if value.shape != shape or value.dtype != dtype:
                return (
                    f"{name}: {value.dtype}{list(value.shape)} where the global model "
                    f"has {dtype}{list(shape)}"
                )
            if dtype.kind == "f" and not np.isfinite(value).all():
                return f"{name}: contains NaN or infinity"
        if tuple(weights) != tuple(self._weights):  # extra names, or another order
            return "tensor names differ from the global model's"
        return ""

    def _signature(self) -> list[tuple[str, tuple[int, ...], np.dtype[Any]]]:
        """Name, shape and dtype of each global tensor, in order (cached per model)."""
        if self._signature_of is not self._weights:
            self._signature_of = self._weights
            self._signature_cache = [(n, w.shape, w.dtype) for n, w in self._weights.items()]
        return self._signature_cache

    def _reject(
        self, sender: str, round_: int, reason: str, detail: str, update_id: str
    ) -> list[Command]:
        self._rejected[reason] += 1
        return [
            Reject(sender=sender, round=round_, reason=reason, detail=detail, update_id=update_id)
        ]

    # --- closing ---------------------------------------------------------------------

    def _close_attempt(self) -> list[Command]:
        out: list[Command] = []
        prepared = self._prepared
        accepted = [
            prepared.get(sender) or _client_update(u) for sender, u in sorted(self._updates.items())
        ]
        for validator in self._validators:
            verdicts = validator.validate(self._weights, accepted, round=self._round)
            for sender, reason in sorted(verdicts.items()):
                out += self._reject(sender, self._round, reason, "validator", "")
            accepted = [u for u in accepted if u.sender not in verdicts]
        if len(accepted) < self.config.min_clients:
            return out + self._fail_attempt(
                f"{len(accepted)} accepted update(s), below min_clients={self.config.min_clients}"
            )
        try:
            new_weights = self.aggregator.aggregate(self._weights, accepted, round=self._round)
        except AggregationError as exc:
            return out + self._fail_attempt(f"aggregation failed: {exc}")
        self._weights = new_weights
        participants = tuple(NodeId(u.sender) for u in accepted)
        out.append(
            RoundClosed(
                round=self._round,
                attempt=self._attempt,
                weights=new_weights,
                participants=participants,
                dropped=tuple(sorted(self._selected - set(participants))),
                rejected=dict(sorted(self._rejected.items())),
                num_examples=sum(u.num_examples for u in accepted),
                client_metrics=training_metrics(accepted),
                federated_metrics=federated_metrics(u.metrics for u in accepted),
                aggregator_state=self._state_to_keep(),
            )
        )
        self._rejected.clear()
        self._completed = self._round
        self._round += 1
        self._attempt = 1
        self._failed_attempts = 0
        self._seen_ids.clear()
        self._updates, self._failed, self._prepared = {}, set(), {}
        if self._completed >= self.config.rounds:
            return out + self._after_last_round()
        return out + self._begin_attempt()

    def _fail_attempt(self, reason: str) -> list[Command]:
        out: list[Command] = [
            RoundFailed(
                round=self._round,
                attempt=self._attempt,
                reason=reason,
                answered=tuple(sorted(self._answered)),
                rejected=dict(sorted(self._rejected.items())),
            )
        ]
        self._failed_attempts += 1
        if self._failed_attempts > self.config.max_round_retries:
            return out + self._finish(
                False,
                f"round {self._round} failed {self._failed_attempts} attempt(s) "
                f"(max_round_retries={self.config.max_round_retries}); last: {reason}",
            )
        self._attempt += 1
        return out + self._begin_attempt()

    # --- the end -----------------------------------------------------------------------

    def _after_last_round(self) -> list[Command]:
        if self.config.evaluate != "federated":
            return self._finish(True, f"completed {self._completed} round(s)")
        # Federated evaluation of the final model: every live node, one attempt.
        self._round = self._completed + 1
        self._reset_attempt(frozenset(self._live))
        self._set_state(ServerState.EVALUATING)
        self._deadline = self._now + self.config.round_timeout_s
        out: list[Command] = [
            self._broadcast({TASK_KEY: TASK_EVALUATE, EVALUATE_KEY: True}),
            self._manifest(),
        ]
        return out + self._progress()

    def _close_evaluation(self) -> list[Command]:
        reports = [u for _, u in sorted(self._updates.items())]
        closed = EvaluationClosed(
            round=self._completed,
            participants=tuple(u.sender for u in reports),
            federated_metrics=federated_metrics(u.metrics for u in reports),
        )
        return [closed, *self._finish(True, f"completed {self._completed} round(s)")]

    def _finish(self, success: bool, reason: str) -> list[Command]:
        self._set_state(ServerState.FINISHED)
        self._deadline = None
        self._reset_attempt(frozenset())
        finish = Finish(success=success, reason=reason, completed_round=self._completed)
        return [self._manifest(), finish]

    def _manifest(self) -> PublishManifest:
        return PublishManifest(
            run=self.run,
            round=self._round,
            attempt=self._attempt,
            state=self._state.value,
            selected=tuple(sorted(self._selected)),
            completed_round=self._completed,
        )


def _client_update(u: UpdateReceived) -> ClientUpdate:
    """What the aggregator and validators see of an accepted update (fresh containers)."""
    weights = u.weights
    return ClientUpdate(
        sender=u.sender,
        weights={k: v if type(v) is np.ndarray else np.asarray(v) for k, v in weights.items()},
        num_examples=u.num_examples,
        encoding=u.encoding,
        metrics={k: float(v) for k, v in u.metrics.items() if _is_number(v)},
        round=u.round,
        extras={k: {n: np.asarray(a) for n, a in v.items()} for k, v in u.extras.items()}
        if u.extras
        else {},
    )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
