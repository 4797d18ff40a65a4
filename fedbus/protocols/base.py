"""What every fedbus protocol machine shares: events in, commands out.

A machine is sans-IO (sans-io.readthedocs.io, h11): it never touches the
network, the clock or a global random generator. A runtime turns what it
receives into `Event` objects, calls ``machine.handle(event, now=clock())`` and
executes the `Command` objects it gets back, in order. Time is an input, so
deadlines are just numbers compared with ``now``; `Machine.next_deadline` tells
the runtime when to wake the machine if nothing else arrives.

Naming (STYLE.md section 5): events are past-tense facts (``NodeJoined``),
commands are imperatives (``BroadcastModel``), states are UPPER_SNAKE enums.

Errors: input from a remote node is data; a bad update becomes a ``Reject``
command, never an exception. `LocalProtocolError` means our own code drove a
machine wrongly (an event illegal in the current state, time going backwards);
the machine then enters its ERROR state and refuses everything after.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

from fedbus.errors import LocalProtocolError

__all__ = [
    "Command",
    "Event",
    "Machine",
    "checked_transition",
    "legal_targets",
]

_S = TypeVar("_S", bound=enum.Enum)
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base class of machine inputs: facts that happened (past tense)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Command:
    """Base class of machine outputs: things the runtime must do (imperative)."""


@runtime_checkable
class Machine(Protocol):
    """The driver-facing surface of every protocol machine."""

    @property
    def state(self) -> enum.Enum:
        """The current state (an enum member; ERROR is terminal)."""
        ...

    def handle(self, event: Event, *, now: float) -> list[Command]:
        """Feed one event at time ``now`` (seconds, monotonic) and return what to do.

        Raises:
            LocalProtocolError: the event is illegal in the current state, or
                ``now`` went backwards; the machine is then in ERROR.
        """
        ...

    def next_deadline(self) -> float | None:
        """When the machine must be handled again if no event comes (None: never)."""
        ...


def legal_targets(table: Mapping[_S, Mapping[type[Event], _T]], state: _S, event: Event) -> _T:
    """The transition-table entry for ``event`` in ``state`` (h11: illegal = failed lookup).

    Every machine keeps its transitions as a ``TRANSITIONS`` table of
    state -> event type -> allowed next states; this is the one lookup.

    Raises:
        LocalProtocolError: ``event`` is illegal in ``state``.
    """
    targets = table[state].get(type(event))
    if targets is None:
        raise LocalProtocolError(f"{type(event).__name__} is illegal in state {state.name}")
    return targets


def checked_transition(allowed: frozenset[_S], current: _S, target: _S) -> _S:
    """``target`` if the transition-table entry ``allowed`` permits it from ``current``.

    Raises:
        LocalProtocolError: it does not: a bug in the machine itself.
    """
    if target not in allowed:  # pragma: no cover - a bug in the calling machine
        raise LocalProtocolError(f"internal: {current.name} -> {target.name} not allowed")
    return target
