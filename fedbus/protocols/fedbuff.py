"""FedBuff server machine (Nguyen et al. 2022): buffered asynchronous aggregation.

Theory of operation
===================

States (`FedBuffState`, table in `fedbus.protocols.fedbuff_types`)::

    IDLE --Started--> RUNNING --(max_versions aggregations)--> FINISHED (success)
                              --(aggregation deadline, too few updates)--> FINISHED (failure)
    any --(our own misuse)--> ERROR (terminal)

There are no rounds. The server holds model version v (0: the initial
model). Clients train continuously on the newest model they have and answer
with an update naming the version it was trained on (the update's ``round``).
The server buffers updates; each time the buffer holds ``buffer_size`` (K)
of them it aggregates the k updates that pass the validators::

    x_{v+1} = x_v + server_lr * (1/k) * sum_i s(tau_i) * delta_i
    s(tau)  = (1 + tau) ** -staleness_exponent      (0.5: 1/sqrt(1 + tau))

where tau_i = v - (version update i was trained on) and delta_i is the
update's change to *the model it was trained on* (a dense update is turned
into that delta on arrival, against the kept copy of that version), then
broadcasts version v+1 to every live node. Without rejections k = K, as in
FedBuff; a rejected update is left out of the mean rather than counted as a
zero step.

Validators (``protocol.validators``, `fedbus.aggregation.validators`) judge a
buffer when it is flushed, all at once, because the outlier checks compare
updates with each other. Each sees every buffered update as its raw delta
applied to the current model x_v (staleness weighting comes after), under a
sender key ``"<sender>@<version>"`` (one sender may have two updates of
different versions in a buffer), with ``round`` = v + 1. A rejected update
becomes a `Reject` with the validator's reason and is counted in the next
`BufferAggregated`'s ``rejected``. If fewer than ``min_clients`` survive, no
aggregation happens: the survivors stay buffered and wait for more.

Deadline (every wait has one): the server waits at most ``round_timeout_s``
for the next accepted update, counted from the last accepted update, the
last aggregation or the start (the first wait also gets ``join_timeout_s``,
while nodes connect). At the deadline a buffer holding at least
``min_clients`` updates is flushed as a partial buffer (validated, then the
mean of what it holds; ``BufferAggregated.deadline`` is True), and the run
goes on. Otherwise, or if too few survive the validators, the run ends with
``Finish(success=False)`` and a reason naming the wait, the buffer and the
live nodes: all clients crashed or left, or none can send an acceptable
update. Joins and rejected updates are not progress, so a node that joins and
leaves over and over cannot keep a run alive.

Resuming: `FedBuffServer` takes ``version`` (a checkpoint's round) and that
version's weights. Older versions are not kept in checkpoints, so an update
trained on a version before the checkpoint is refused as ``stale_round``; the
buffer at a checkpoint is empty (it is written after each aggregation).

Rules and invariants:
- versions only go forward, by one per aggregation; every `BroadcastModel`
  names a version above every earlier one, except the re-send of the current
  version to a node that joins mid-run (``selected`` is that node alone);
- an update is aggregated at most once: updates are deduplicated by message
  id and by (sender, version), remembered while that version can still be
  accepted (a redelivery on an older one is stale anyway), so the memory
  stays bounded over a long run; the buffer is emptied by each aggregation;
- an update is refused (`Reject`) when it names another run
  (``foreign_run``), a version not yet published (``future_round``), a
  staleness above ``max_staleness`` (``stale_round``: its base model is no
  longer kept), a sender that never joined (``unselected``), a repeat
  (``duplicate``), tensors that do not fit the model (``invalid``), or when
  a validator rejects it (the validator's name);
- aggregation order is fixed (sender, version, id), so arrival order within a
  buffer never changes a bit;
- time is an input: an expired deadline is handled before the event that
  noticed it (`fedbus.protocols.timed.DeadlineFirst`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from fedbus._types import NodeId, RunId
from fedbus.aggregation import Arrays, Validator, cast_like
from fedbus.aggregation.mean import weighted_sum
from fedbus.protocols.base import Command, Event, legal_targets
from fedbus.protocols.fedavg_types import (
    ASYNC_KEY,
    TASK_KEY,
    TASK_TRAIN,
    BroadcastModel,
    Finish,
    NodeJoined,
    NodeLeft,
    Reject,
    RejectReason,
    Started,
    Tick,
    UpdateReceived,
)
from fedbus.protocols.fedbuff_buffer import Buffered, buffered, invalid_detail, validate_buffer
from fedbus.protocols.fedbuff_types import (
    TRANSITIONS,
    BufferAggregated,
    FedBuffConfig,
    FedBuffState,
    staleness_weight,
)
from fedbus.protocols.timed import DeadlineFirst

__all__ = [
    "TRANSITIONS",
    "BufferAggregated",
    "FedBuffConfig",
    "FedBuffServer",
    "FedBuffState",
    "staleness_weight",
]


class FedBuffServer(DeadlineFirst):
    """The FedBuff server machine (module docstring).

    Args:
        config: buffer size, staleness bound and weighting, deadline, run length.
        run: this run's id.
        weights: the model of ``version`` (the initial model for a fresh run).
        version: the version ``weights`` is: 0 for a fresh run, a checkpoint's
            round when resuming.
        validators: screen each buffer before it is aggregated.
    """

    def __init__(
        self,
        config: FedBuffConfig,
        *,
        run: RunId,
        weights: Arrays,
        version: int = 0,
        validators: Sequence[Validator] = (),
    ) -> None:
        self.config = config
        self.run = run
        self._weights: dict[str, npt.NDArray[Any]] = {k: np.asarray(v) for k, v in weights.items()}
        self._version = version
        self._history: dict[int, dict[str, npt.NDArray[Any]]] = {version: self._weights}
        self._validators = tuple(validators)
        self._state = FedBuffState.IDLE
        self._live: set[NodeId] = set()
        self._buffer: list[Buffered] = []
        # Accepted message ids and senders by the version they were trained on:
        # kept only while that version can still be accepted (pruned with
        # `_history`), so a long asynchronous run does not grow without bound.
        self._seen: dict[int, tuple[set[str], set[NodeId]]] = {}
        self._now = -float("inf")
        self._deadline: float | None = None
        self._first_wait = True  # no update accepted yet in this session
        self._since: Counter[str] = Counter()  # rejections since the last aggregation
        self.rejected: dict[str, int] = {}
        """Rejections by reason over the whole session (cumulative)."""

    # --- Machine surface -----------------------------------------------------

    @property
    def state(self) -> FedBuffState:
        """The current state."""
        return self._state

    @property
    def version(self) -> int:
        """The newest model version (0 before the first aggregation)."""
        return self._version

    @property
    def weights(self) -> Arrays:
        """The newest model."""
        return self._weights

    @property
    def completed_round(self) -> int:
        """Aggregations done: the newest version (the server runtime's view of progress)."""
        return self._version

    @property
    def live_nodes(self) -> frozenset[NodeId]:
        """Nodes that joined and have not left (every broadcast goes to all of them)."""
        return frozenset(self._live)

    @property
    def buffered(self) -> int:
        """Updates waiting in the buffer."""
        return len(self._buffer)

    def next_deadline(self) -> float | None:
        """The aggregation deadline while running (module docstring); None otherwise."""
        return self._deadline

    def _in_error(self) -> bool:
        return self._state is FedBuffState.ERROR

    def _enter_error(self) -> None:
        self._state = FedBuffState.ERROR

    def _dispatch(self, event: Event) -> list[Command]:
        legal_targets(TRANSITIONS, self._state, event)
        match event:
            case Started():
                return self._on_started()
            case Tick():
                expired = self._deadline is not None and self._now >= self._deadline
                return self._on_deadline() if expired else []
            case NodeJoined():
                new = event.node not in self._live
                self._live.add(event.node)
                if new and self._state is FedBuffState.RUNNING:
                    return self._broadcast((event.node,))  # catch the newcomer up
                return []
            case NodeLeft():
                self._live.discard(event.node)
                return []
            case UpdateReceived():
                return self._on_update(event)
        return []  # unreachable: TRANSITIONS admits only the cases above

    def _on_started(self) -> list[Command]:
        if self._version >= self.config.max_versions:  # resumed after the last aggregation
            return self._finish(True, f"{self._version} aggregations done")
        self._state = FedBuffState.RUNNING
        self._deadline = self._now + self.config.join_timeout_s + self.config.round_timeout_s
        return self._broadcast(tuple(sorted(self._live))) if self._live else []

    # --- updates -------------------------------------------------------------

    def _reject(self, event: UpdateReceived, reason: str, detail: str) -> list[Command]:
        self._count(reason)
        return [
            Reject(
                sender=event.sender, round=event.round, reason=reason, detail=detail,
                update_id=event.update_id,
            )
        ]  # fmt: skip

    def _count(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        self._since[reason] += 1

    def _on_update(self, event: UpdateReceived) -> list[Command]:
        reason, detail = self._classify(event)
        if reason:
            return self._reject(event, reason, detail)
        ids, senders = self._seen.setdefault(event.round, (set(), set()))
        if event.update_id:
            ids.add(event.update_id)
        senders.add(event.sender)
        self._buffer.append(buffered(event, self._history[event.round]))
        self._first_wait = False
        self._deadline = self._now + self.config.round_timeout_s
        if len(self._buffer) < self.config.buffer_size:
            return []
        return self._flush(at_deadline=False)

    def _classify(self, event: UpdateReceived) -> tuple[str, str]:
        """(reason, detail) to refuse ``event``, or ("", "") to accept it."""
        if event.run != self.run:
            return RejectReason.FOREIGN_RUN, ""
        if self._state is not FedBuffState.RUNNING:
            return RejectReason.STALE_ROUND, "the run is not running"
        if event.round > self._version:
            return RejectReason.FUTURE_ROUND, f"version {event.round} > {self._version}"
        staleness = self._version - event.round
        if staleness > self.config.max_staleness or event.round not in self._history:
            return RejectReason.STALE_ROUND, f"staleness {staleness}"
        if event.sender not in self._live:
            return RejectReason.UNSELECTED, "not joined"
        if self._is_duplicate(event):
            return RejectReason.DUPLICATE, ""
        detail = invalid_detail(event, self._weights)
        return (RejectReason.INVALID, detail) if detail else ("", "")

    def _is_duplicate(self, event: UpdateReceived) -> bool:
        """A message id seen before, or a second update of one sender on one version.

        Only versions still acceptable are remembered: an update on an older
        version is refused as stale before this check runs.
        """
        if event.sender in self._seen.get(event.round, ((), ()))[1]:
            return True
        return bool(event.update_id) and any(
            event.update_id in ids for ids, _ in self._seen.values()
        )

    # --- the deadline ----------------------------------------------------------

    def _on_deadline(self) -> list[Command]:
        """No update accepted for a whole wait: flush a big enough buffer, or end the run."""
        cfg = self.config
        out: list[Command] = []
        if len(self._buffer) >= cfg.min_clients:
            out = self._flush(at_deadline=True)
            if any(isinstance(c, BufferAggregated) for c in out):
                return out
        waited = cfg.round_timeout_s + (cfg.join_timeout_s if self._first_wait else 0.0)
        return out + self._finish(
            False,
            f"no update accepted for {waited:g} s at version {self._version}: "
            f"{len(self._buffer)} buffered update(s) (buffer_size={cfg.buffer_size}, "
            f"min_clients={cfg.min_clients}), {len(self._live)} live node(s)",
        )

    def _finish(self, success: bool, reason: str) -> list[Command]:
        self._state = FedBuffState.FINISHED
        self._deadline = None
        return [Finish(success=success, reason=reason, completed_round=self._version)]

    # --- validation and aggregation ----------------------------------------------

    def _validate(self, ordered: list[Buffered]) -> tuple[list[Buffered], list[Command]]:
        """Run the validators over the buffer (module docstring): (survivors, rejections)."""
        if not self._validators:
            return ordered, []
        verdicts = validate_buffer(
            self._validators, self._weights, ordered, round=self._version + 1
        )
        out: list[Command] = []
        for b in ordered:
            if b.key in verdicts:
                self._count(verdicts[b.key])
                out.append(
                    Reject(
                        sender=b.sender, round=b.version, reason=verdicts[b.key],
                        detail="validator", update_id=b.update_id,
                    )
                )  # fmt: skip
        return [b for b in ordered if b.key not in verdicts], out

    def _flush(self, *, at_deadline: bool) -> list[Command]:
        ordered = sorted(self._buffer, key=lambda b: (b.sender, b.version, b.update_id))
        survivors, out = self._validate(ordered)
        if len(survivors) < self.config.min_clients:
            self._buffer = survivors  # too few to aggregate: wait for more
            return out
        self._buffer = []
        return out + self._aggregate(survivors, at_deadline=at_deadline)

    def _aggregate(self, ordered: list[Buffered], *, at_deadline: bool) -> list[Command]:
        k = len(ordered)
        stale = [self._version - b.version for b in ordered]
        coeffs = [
            self.config.server_lr * staleness_weight(s, self.config.staleness_exponent) / k
            for s in stale
        ]
        new: dict[str, npt.NDArray[Any]] = {}
        for name, current in self._weights.items():
            step = weighted_sum([b.delta[name] for b in ordered], coeffs)
            new[name] = cast_like(np.asarray(current, np.float64) + step, np.asarray(current))
        self._version += 1
        self._weights = new
        self._history[self._version] = new
        for old in [v for v in self._history if v < self._version - self.config.max_staleness]:
            del self._history[old]
        for old in [v for v in self._seen if v not in self._history]:
            del self._seen[old]
        losses = [(b.train_loss, b.num_examples) for b in ordered if b.train_loss is not None]
        metrics: dict[str, float] = {"mean_staleness": float(np.mean(stale))}
        if losses:
            metrics["train_loss"] = sum(x * n for x, n in losses) / sum(n for _, n in losses)
        rejected, self._since = dict(sorted(self._since.items())), Counter()
        out: list[Command] = [
            BufferAggregated(
                version=self._version, weights=new,
                contributors=tuple((b.sender, b.version, s) for b, s in zip(ordered, stale, strict=True)),
                num_examples=sum(b.num_examples for b in ordered), metrics=metrics,
                rejected=rejected, deadline=at_deadline,
            )
        ]  # fmt: skip
        if self._version >= self.config.max_versions:
            return out + self._finish(True, f"{self._version} aggregations done")
        self._deadline = self._now + self.config.round_timeout_s
        return out + self._broadcast(tuple(sorted(self._live)))

    def _broadcast(self, selected: tuple[NodeId, ...]) -> list[Command]:
        return [
            BroadcastModel(
                round=self._version, attempt=1, weights=self._weights, selected=selected,
                config={**self.config.train_config, TASK_KEY: TASK_TRAIN, ASYNC_KEY: True},
                request_id=f"{self.run}:{self._version}",
            )
        ]  # fmt: skip
