"""Re-homing: when a node's parent (an edge aggregator) dies, switch to a fallback.

Theory of operation
===================

Any node below the cloud (a device, or an edge under a region) has one
parent. `Rehoming` decides, sans-IO, when that parent is gone and where to go.

Detection (`ParentLost`, or silence). The runtime reports the parent gone
with `ParentLost` when it sees the parent's Leave message or MQTT last will
(the usual and fast path: within about 1.5 keepalives). As a backstop,
every message from the parent (`ParentHeard`; the hierarchical machines
feed it themselves for each model or manifest) resets a watchdog, and a
parent silent for ``parent_timeout_s`` counts as lost. The parent's own
parent needs no new event: a dead edge is a `NodeLeft` (or a silent,
dropped node) for its FedAvgServer, which already closes rounds without it.

States (`RehomeState`)::

    ATTACHED --(ParentLost(parent) | watchdog expired)--> ATTACHED  (SwitchParent to the next fallback)
                                                      --> STRANDED  (no fallback left: Stranded)
    any --(our own misuse)--> ERROR (terminal)

Where to. ``fallbacks`` is the ordered list the runtime derives from the
topology with `fallback_chain`: ``rehome: parent`` goes to the dead edge's
parent; ``rehome: sibling`` goes to the designated sibling edge (the next
sibling of the dead edge in topology order, wrapping around), then, should
that one die as well, to the remaining siblings and finally the dead edge's
parent. Each fallback is tried once; a node never goes back to a parent it
left (the dead edge's children have been adopted; returning would split the
accounting across two parents again).

Accounting. Round numbers belong to the parent, so after a switch the node's
FedAvg client is fresh (see `fedbus.protocols.hierarchical_client`). To keep
a device's examples from being counted twice in one top-level round (once
through the dead edge, once through its new parent), every model an edge
sends down carries ``TOP_ROUND_KEY``: the cloud round it serves. A re-homed
node answers only models of a top-level round later than the last one it
trained for (`AccountingGate`).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from fedbus._types import NodeId
from fedbus.errors import ConfigError, LocalProtocolError
from fedbus.protocols.base import Command, Event, legal_targets
from fedbus.protocols.fedavg_types import ModelReceived, Started, Tick

__all__ = [
    "REHOME_TRANSITIONS",
    "TOP_ROUND_KEY",
    "AccountingGate",
    "ParentHeard",
    "ParentLost",
    "RehomeConfig",
    "RehomeState",
    "Rehoming",
    "Stranded",
    "SwitchParent",
    "fallback_chain",
]

TOP_ROUND_KEY: Final = "top_round"
"""Model config key set by edges: the top-level (cloud) round a local round serves."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RehomeConfig:
    """Where a node goes when its parent dies, and when silence means death.

    Attributes:
        fallbacks: parents to try in order (see `fallback_chain`).
        parent_timeout_s: silence after which the parent counts as lost; None
            leaves detection to `ParentLost`. Set it above the longest gap
            between two messages of a live parent (an edge is silent while it
            waits for its own parent: about one top-level round).
    """

    fallbacks: tuple[NodeId, ...] = ()
    parent_timeout_s: float | None = None

    def __post_init__(self) -> None:
        t = self.parent_timeout_s
        if t is not None and (not isinstance(t, int | float) or not 0.0 < t < math.inf):
            raise ConfigError(
                f"must be a positive number of seconds, got {t!r}", path="protocol.rehome"
            )


def fallback_chain(
    mode: Literal["parent", "sibling"],
    *,
    parent: NodeId,
    grandparent: NodeId,
    siblings: Sequence[NodeId],
) -> tuple[NodeId, ...]:
    """The ordered fallbacks of a child of ``parent`` (see the module docstring).

    Args:
        mode: the topology's ``rehome``.
        parent: the node's parent (the edge that may die).
        grandparent: that edge's parent.
        siblings: the edges under ``grandparent`` in topology order, ``parent`` included.
    """
    if mode == "parent":
        return (grandparent,)
    order = list(siblings)
    at = order.index(parent) if parent in order else -1
    rotated = [s for s in order[at + 1 :] + order[: max(at, 0)] if s != parent]
    return (*rotated, grandparent)


# --- events and commands --------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ParentLost(Event):
    """The runtime saw ``parent`` go (Leave message, last will, missed heartbeats)."""

    parent: NodeId
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ParentHeard(Event):
    """A message from ``parent`` arrived; it is alive."""

    parent: NodeId


@dataclass(frozen=True, slots=True, kw_only=True)
class SwitchParent(Command):
    """Re-home to ``parent``.

    The runtime sends Leave to ``previous`` (best effort), subscribes to
    ``parent``'s namespace (and broker) and Joins there; messages from
    ``previous`` must no longer be delivered.
    """

    parent: NodeId
    previous: NodeId
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Stranded(Command):
    """The parent is gone and no fallback is left; keep waiting on ``previous``."""

    previous: NodeId
    reason: str


# --- the machine ------------------------------------------------------------------


class RehomeState(enum.Enum):
    """Where `Rehoming` stands; see the module docstring."""

    ATTACHED = "attached"
    STRANDED = "stranded"
    ERROR = "error"


_KINDS: tuple[type[Event], ...] = (Started, ParentHeard, ParentLost, Tick)
REHOME_TRANSITIONS: dict[RehomeState, dict[type[Event], frozenset[RehomeState]]] = {
    RehomeState.ATTACHED: {
        kind: frozenset({RehomeState.ATTACHED, RehomeState.STRANDED}) for kind in _KINDS
    },
    RehomeState.STRANDED: {kind: frozenset({RehomeState.STRANDED}) for kind in _KINDS},
    RehomeState.ERROR: {},
}
"""state -> {legal event type -> states it may lead to}; a missing entry is illegal."""


class Rehoming:
    """Decides when the parent is gone and which fallback to join (module docstring).

    Args:
        config: fallbacks and the silence timeout.
        parent: the parent at start.
    """

    def __init__(self, config: RehomeConfig, *, parent: NodeId) -> None:
        self.config = config
        self._parent = parent
        self._left: list[NodeId] = [parent]
        self._remaining = [f for f in config.fallbacks if f != parent]
        self._state = RehomeState.ATTACHED
        self._now = -math.inf
        self._deadline: float | None = None

    @property
    def state(self) -> RehomeState:
        """The current state."""
        return self._state

    @property
    def parent(self) -> NodeId:
        """The parent in force."""
        return self._parent

    @property
    def history(self) -> tuple[NodeId, ...]:
        """Every parent so far, the current one last."""
        return tuple(self._left)

    def next_deadline(self) -> float | None:
        """When silence from the parent counts as its loss (None: no watchdog)."""
        return self._deadline

    def handle(self, event: Event, *, now: float) -> list[Command]:
        """Handle one event at time ``now``.

        Raises:
            LocalProtocolError: illegal event, time went backwards, or ERROR.
        """
        try:
            legal_targets(REHOME_TRANSITIONS, self._state, event)
            if now < self._now:
                raise LocalProtocolError(f"time went backwards: {now} < {self._now}")
            self._now = now
        except LocalProtocolError:
            self._state = RehomeState.ERROR
            self._deadline = None
            raise
        if self._state is RehomeState.STRANDED:
            return []
        match event:
            case Started():
                self._arm()
            case ParentHeard() if event.parent == self._parent:
                self._arm()
            case ParentLost() if event.parent == self._parent:
                return self._switch(event.reason or "parent left")
            case Tick() if self._deadline is not None and now >= self._deadline:
                return self._switch(
                    f"no message from the parent for {self.config.parent_timeout_s:g} s"
                )
        return []

    def _arm(self) -> None:
        timeout = self.config.parent_timeout_s
        self._deadline = None if timeout is None else self._now + timeout

    def _switch(self, reason: str) -> list[Command]:
        previous = self._parent
        if not self._remaining:
            self._state = RehomeState.STRANDED
            self._deadline = None
            return [Stranded(previous=previous, reason=f"{reason}; no fallback left")]
        self._parent = self._remaining.pop(0)
        self._left.append(self._parent)
        self._arm()
        return [SwitchParent(parent=self._parent, previous=previous, reason=reason)]


class AccountingGate:
    """Keeps a re-homed node from answering a top-level round it already trained for.

    ``top_round(model)`` is the model's ``TOP_ROUND_KEY`` (set by edges), or
    its own round when the sender is the cloud. Before the first switch every
    model passes; after it, only models of a top-level round later than the
    last one trained for before the switch.
    """

    def __init__(self) -> None:
        self._trained = 0
        self._barrier = 0

    @staticmethod
    def top_round(model: ModelReceived) -> int:
        """The top-level round ``model`` serves."""
        value = model.config.get(TOP_ROUND_KEY)
        return value if isinstance(value, int) and not isinstance(value, bool) else model.round

    def admits(self, model: ModelReceived) -> bool:
        """Whether this node may answer ``model``."""
        return self.top_round(model) > self._barrier

    def trained(self, model: ModelReceived) -> None:
        """Record that the node started training (or evaluating) for ``model``."""
        self._trained = max(self._trained, self.top_round(model))

    def switched(self) -> None:
        """The parent changed: close every top-level round trained for so far."""
        self._barrier = self._trained
