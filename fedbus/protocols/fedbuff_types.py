"""FedBuff's states, TRANSITIONS table, config and output command.

The theory of operation opens `fedbus.protocols.fedbuff`; this module holds
the data the machine is configured with and looks transitions up in, so the
machine module stays small and the table can be read on its own.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from fedbus._types import NodeId
from fedbus.aggregation import Arrays
from fedbus.errors import ConfigError
from fedbus.protocols.base import Command, Event
from fedbus.protocols.fedavg_types import (
    NodeJoined,
    NodeLeft,
    ScalarMap,
    Started,
    Tick,
    UpdateReceived,
)

__all__ = [
    "TRANSITIONS",
    "BufferAggregated",
    "FedBuffConfig",
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


_S = FedBuffState
_Row = dict[type[Event], frozenset[FedBuffState]]


def _row(state: FedBuffState, changes: _Row | None = None) -> _Row:
    """Remote events and ticks are legal in every live state and may keep it; add ``changes``."""
    row: _Row = {k: frozenset({state}) for k in (NodeJoined, NodeLeft, UpdateReceived, Tick)}
    for kind, targets in (changes or {}).items():
        row[kind] = row[kind] | targets if kind in row else targets
    return row


_ENDS: Final = frozenset({_S.FINISHED})
TRANSITIONS: dict[FedBuffState, _Row] = {
    # Started may finish at once: a resumed run whose last version was already the final one.
    _S.IDLE: _row(_S.IDLE, {Started: frozenset({_S.RUNNING, _S.FINISHED})}),
    _S.RUNNING: _row(_S.RUNNING, {UpdateReceived: _ENDS, Tick: _ENDS}),
    _S.FINISHED: _row(_S.FINISHED),
    _S.ERROR: {},
}
"""state -> {legal event type -> states it may lead to}; a missing entry is illegal.

Started appears only under IDLE: starting twice is our bug. ERROR has no row.
"""


def staleness_weight(staleness: int, exponent: float) -> float:
    """s(tau) = (1 + tau) ** -exponent; 0.5 gives FedBuff's 1/sqrt(1 + tau)."""
    return float((1.0 + staleness) ** -exponent)


def _positive_int(value: object, name: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"must be an integer >= {low}, got {value!r}", path=f"{_PATH}.{name}")


@dataclass(frozen=True, slots=True, kw_only=True)
class FedBuffConfig:
    """Settings of a FedBuff run (YAML ``protocol`` with ``mode: async``).

    Attributes:
        buffer_size: K, updates per aggregation.
        max_versions: aggregations to run before finishing (the rounds' analogue).
        max_staleness: updates older than this many versions are refused.
        server_lr: the global learning rate eta_g.
        staleness_exponent: a in s(tau) = (1 + tau) ** -a (0: no discount).
        min_clients: the smallest buffer aggregated at the deadline, and the
            fewest updates surviving the validators that make an aggregation.
        round_timeout_s: the aggregation deadline: the longest wait for the
            next accepted update (from the last one, the last aggregation or
            the start).
        join_timeout_s: added to the first wait of a run (or of a resumed
            run), while the nodes connect and join.
        train_config: scalars sent with every model (epochs, lr, ...).
    """

    buffer_size: int = 10
    max_versions: int = 10
    max_staleness: int = 10
    server_lr: float = 1.0
    staleness_exponent: float = 0.5
    min_clients: int = 1
    round_timeout_s: float = 60.0
    join_timeout_s: float = 60.0
    train_config: ScalarMap = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("buffer_size", "max_versions", "min_clients"):
            _positive_int(getattr(self, name), name, 1)
        _positive_int(self.max_staleness, "max_staleness", 0)
        if self.min_clients > self.buffer_size:
            raise ConfigError(
                f"must not exceed buffer_size={self.buffer_size}, got {self.min_clients}",
                path=f"{_PATH}.min_clients",
            )
        if not (math.isfinite(self.server_lr) and self.server_lr > 0):
            raise ConfigError(f"must be > 0, got {self.server_lr}", path=f"{_PATH}.server_lr")
        a = self.staleness_exponent
        if not (math.isfinite(a) and a >= 0):
            raise ConfigError(f"must be >= 0, got {a}", path=f"{_PATH}.staleness_exponent")
        for name in ("round_timeout_s", "join_timeout_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"must be > 0, got {value}", path=f"{_PATH}.{name}")


@dataclass(frozen=True, slots=True, kw_only=True)
class BufferAggregated(Command):
    """A buffer was aggregated into model ``version`` (record it; checkpoint it).

    ``contributors`` lists (sender, version trained on, staleness), in
    aggregation order; ``weights`` is the new model. ``rejected`` counts the
    updates refused (by reason, validators included) since the previous
    aggregation. ``deadline`` is True for a partial buffer flushed at the
    aggregation deadline.
    """

    version: int
    weights: Arrays
    contributors: tuple[tuple[NodeId, int, int], ...]
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    rejected: Mapping[str, int] = field(default_factory=dict)
    deadline: bool = False
