"""FedBuff server machine (Nguyen et al. 2022): buffered asynchronous aggregation.

Theory of operation
===================

States (`FedBuffState`)::

    IDLE --Started--> RUNNING --(max_versions aggregations)--> FINISHED (terminal; Finish)
    any --(our own misuse)--> ERROR (terminal)

There are no rounds. The server holds model version v (0: the initial
model). Clients train continuously on the newest model they have and answer
with an update naming the version it was trained on (the update's ``round``).
The server buffers updates; each time the buffer holds ``buffer_size`` (K)
of them it aggregates::

    x_{v+1} = x_v + server_lr * (1/K) * sum_i s(tau_i) * delta_i
    s(tau)  = (1 + tau) ** -staleness_exponent      (0.5: 1/sqrt(1 + tau))

where tau_i = v - (version update i was trained on) and delta_i is the
update's change to *the model it was trained on* (a dense update is turned
into that delta on arrival, against the kept copy of that version), then
broadcasts version v+1 to every live node.

Rules and invariants:
- versions only go forward, by one per aggregation; every `BroadcastModel`
  names a version above every earlier one, except the re-send of the current
  version to a node that joins mid-run (``selected`` is that node alone);
- an update is aggregated at most once: updates are deduplicated by message
  id and by (sender, version); the buffer is emptied by each aggregation;
- an update is refused (`Reject`) when it names another run
  (``foreign_run``), a version not yet published (``future_round``), a
  staleness above ``max_staleness`` (``stale_round``: its base model is no
  longer kept), a sender that never joined (``unselected``), a repeat
  (``duplicate``), or tensors that do not fit the model (``invalid``);
- aggregation order is fixed (sender, version, id), so arrival order within a
  buffer never changes a bit.

No deadlines: `next_deadline` is always None (a buffer waits for K updates).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from fedbus._types import NodeId, RunId
from fedbus.aggregation import DELTA, DENSE, Arrays, cast_like
from fedbus.aggregation.mean import weighted_sum
from fedbus.errors import ConfigError, LocalProtocolError
from fedbus.protocols.base import Command, Event
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
    ScalarMap,
    Started,
    UpdateReceived,
)

__all__ = [
    "BufferAggregated",
    "FedBuffConfig",
    "FedBuffServer",
    "FedBuffState",
    "staleness_weight",
]

_PATH: Final = "protocol"


class FedBuffState(enum.Enum):
    """Where the asynchronous server stands."""

    IDLE = "idle"
    RUNNING = "running"
    FINISHED = "finished"
    ERROR = "error"


TRANSITIONS: Final[Mapping[FedBuffState, frozenset[type[Event]]]] = {
    FedBuffState.IDLE: frozenset({Started, NodeJoined, NodeLeft, UpdateReceived}),
    FedBuffState.RUNNING: frozenset({NodeJoined, NodeLeft, UpdateReceived}),
    FedBuffState.FINISHED: frozenset({NodeJoined, NodeLeft, UpdateReceived}),
    FedBuffState.ERROR: frozenset(),
}
"""Events each state accepts; anything else is a `LocalProtocolError`."""


def staleness_weight(staleness: int, exponent: float) -> float:
    """s(tau) = (1 + tau) ** -exponent; 0.5 gives FedBuff's 1/sqrt(1 + tau)."""
    return float((1.0 + staleness) ** -exponent)


@dataclass(frozen=True, slots=True, kw_only=True)
class FedBuffConfig:
    """Settings of a FedBuff run (YAML ``protocol`` with ``mode: async``).

    Attributes:
        buffer_size: K, updates per aggregation.
        max_versions: aggregations to run before finishing (the rounds' analogue).
        max_staleness: updates older than this many versions are refused.
        server_lr: the global learning rate eta_g.
        staleness_exponent: a in s(tau) = (1 + tau) ** -a (0: no discount).
        train_config: scalars sent with every model (epochs, lr, ...).
    """

    buffer_size: int = 10
    max_versions: int = 10
    max_staleness: int = 10
    server_lr: float = 1.0
    staleness_exponent: float = 0.5
    train_config: ScalarMap = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("buffer_size", "max_versions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"must be an integer >= 1, got {value!r}", path=f"{_PATH}.{name}")
        ms = self.max_staleness
        if isinstance(ms, bool) or not isinstance(ms, int) or ms < 0:
            raise ConfigError(f"must be an integer >= 0, got {ms!r}", path=f"{_PATH}.max_staleness")
        if not (math.isfinite(self.server_lr) and self.server_lr > 0):
            raise ConfigError(f"must be > 0, got {self.server_lr}", path=f"{_PATH}.server_lr")
        a = self.staleness_exponent
        if not (math.isfinite(a) and a >= 0):
            raise ConfigError(f"must be >= 0, got {a}", path=f"{_PATH}.staleness_exponent")


@dataclass(frozen=True, slots=True, kw_only=True)
class BufferAggregated(Command):
    """A full buffer was aggregated into model ``version`` (record it; checkpoint it).

    ``contributors`` lists (sender, version trained on, staleness), in
    aggregation order; ``weights`` is the new model.
    """

    version: int
    weights: Arrays
    contributors: tuple[tuple[NodeId, int, int], ...]
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class _Buffered:
    sender: NodeId
    version: int
    update_id: str
    delta: dict[str, npt.NDArray[np.float64]]
    num_examples: int
    train_loss: float | None


class FedBuffServer:
    """The FedBuff server machine (module docstring).

    Args:
        config: buffer size, staleness bound and weighting, run length.
        run: this run's id.
        weights: the initial model (version 0).
    """

    def __init__(self, config: FedBuffConfig, *, run: RunId, weights: Arrays) -> None:
        self.config = config
        self.run = run
        self._weights: dict[str, npt.NDArray[Any]] = {k: np.asarray(v) for k, v in weights.items()}
        self._version = 0
        self._history: dict[int, dict[str, npt.NDArray[Any]]] = {0: self._weights}
        self._state = FedBuffState.IDLE
        self._live: set[NodeId] = set()
        self._buffer: list[_Buffered] = []
        self._seen_ids: set[str] = set()
        self._seen_pairs: set[tuple[NodeId, int]] = set()
        self._now: float | None = None
        self.rejected: dict[str, int] = {}

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
        """Never: a buffer waits for its K updates."""
        return None

    def handle(self, event: Event, *, now: float) -> list[Command]:
        """Handle one event at time ``now``.

        Raises:
            LocalProtocolError: an event illegal in the current state, or time going
                backwards; the machine is then in ERROR.
        """
        if self._now is not None and now < self._now:
            self._state = FedBuffState.ERROR
            raise LocalProtocolError(f"time went backwards: {now} < {self._now}")
        self._now = now
        if type(event) not in TRANSITIONS[self._state]:
            state = self._state
            self._state = FedBuffState.ERROR
            raise LocalProtocolError(f"{type(event).__name__} is illegal in {state.name}")
        match event:
            case Started():
                self._state = FedBuffState.RUNNING
                return self._broadcast(tuple(sorted(self._live))) if self._live else []
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

    # --- updates -------------------------------------------------------------

    def _on_update(self, event: UpdateReceived) -> list[Command]:
        reason, detail = self._classify(event)
        if reason:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1
            return [
                Reject(
                    sender=event.sender, round=event.round, reason=reason, detail=detail,
                    update_id=event.update_id,
                )
            ]  # fmt: skip
        if event.update_id:
            self._seen_ids.add(event.update_id)
        self._seen_pairs.add((event.sender, event.round))
        base = self._history[event.round]
        delta = {
            n: (
                np.asarray(event.weights[n], np.float64)
                if event.encoding == DELTA
                else np.asarray(event.weights[n], np.float64) - np.asarray(b, np.float64)
            )
            for n, b in base.items()
        }
        loss = event.metrics.get("train_loss")
        self._buffer.append(
            _Buffered(
                sender=event.sender, version=event.round, update_id=event.update_id, delta=delta,
                num_examples=event.num_examples,
                train_loss=float(loss) if isinstance(loss, int | float) else None,
            )
        )  # fmt: skip
        if len(self._buffer) < self.config.buffer_size:
            return []
        return self._aggregate()

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
        if (event.update_id and event.update_id in self._seen_ids) or (
            event.sender,
            event.round,
        ) in self._seen_pairs:
            return RejectReason.DUPLICATE, ""
        detail = self._invalid(event)
        return (RejectReason.INVALID, detail) if detail else ("", "")

    def _invalid(self, event: UpdateReceived) -> str:
        if event.encoding not in (DENSE, DELTA):
            return f"unknown encoding {event.encoding!r}"
        if event.num_examples < 1:
            return f"num_examples must be positive, got {event.num_examples}"
        if list(event.weights) != list(self._weights):
            return "tensor names differ from the model's"
        for name, current in self._weights.items():
            value = np.asarray(event.weights[name])
            if value.shape != current.shape:
                return f"{name}: shape {list(value.shape)}, the model has {list(current.shape)}"
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                return f"{name}: contains NaN or infinity"
        return ""

    # --- aggregation -----------------------------------------------------------

    def _aggregate(self) -> list[Command]:
        ordered = sorted(self._buffer, key=lambda b: (b.sender, b.version, b.update_id))
        self._buffer = []
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
        losses = [(b.train_loss, b.num_examples) for b in ordered if b.train_loss is not None]
        metrics: dict[str, float] = {"mean_staleness": float(np.mean(stale))}
        if losses:
            metrics["train_loss"] = sum(x * n for x, n in losses) / sum(n for _, n in losses)
        out: list[Command] = [
            BufferAggregated(
                version=self._version, weights=new,
                contributors=tuple((b.sender, b.version, s) for b, s in zip(ordered, stale, strict=True)),
                num_examples=sum(b.num_examples for b in ordered), metrics=metrics,
            )
        ]  # fmt: skip
        if self._version >= self.config.max_versions:
            self._state = FedBuffState.FINISHED
            out.append(
                Finish(
                    success=True, reason=f"{self._version} aggregations done",
                    completed_round=self._version,
                )
            )  # fmt: skip
            return out
        return out + self._broadcast(tuple(sorted(self._live)))

    def _broadcast(self, selected: tuple[NodeId, ...]) -> list[Command]:
        return [
            BroadcastModel(
                round=self._version, attempt=1, weights=self._weights, selected=selected,
                config={**self.config.train_config, TASK_KEY: TASK_TRAIN, ASYNC_KEY: True},
                request_id=f"{self.run}:{self._version}",
            )
        ]  # fmt: skip
