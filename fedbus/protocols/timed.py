"""The shared ``handle`` of machines whose deadlines fire before their events.

FedAvgServer, GossipPeer and PushSumPeer drive themselves the same way, and
the rules are part of the protocol contract, so they live here once:

- ERROR is terminal: every later event raises `LocalProtocolError` (h11).
- Time never goes backwards: a smaller ``now`` is our own bug, so it raises.
- An expired deadline is handled first, as if a `Tick` had arrived just
  before the event, so an update arriving after its round's deadline is
  judged against the closed round, whatever order the runtime noticed them.
- Any `LocalProtocolError` raised while handling puts the machine in ERROR
  and clears its deadline, so a runtime stops waking it.

A machine supplies ``_dispatch`` (one event, no deadline logic) and
``_enter_error``; it keeps ``_now`` and ``_deadline`` as plain attributes.
"""

from __future__ import annotations

from fedbus.errors import LocalProtocolError
from fedbus.protocols.base import Command, Event
from fedbus.protocols.fedavg_types import Tick

__all__ = ["DeadlineFirst"]


class DeadlineFirst:
    """Mixin implementing ``handle`` for deadline-first machines (module docstring)."""

    _now: float
    _deadline: float | None

    def _dispatch(self, event: Event) -> list[Command]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _in_error(self) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def _enter_error(self) -> None:  # pragma: no cover - abstract
        """Move to the ERROR state (and drop whatever else the machine must)."""
        raise NotImplementedError

    def handle(self, event: Event, *, now: float) -> list[Command]:
        """Handle one event at time ``now``; an expired deadline is handled first.

        Raises:
            LocalProtocolError: an event illegal in the current state, time
                going backwards, or the machine already in ERROR; the machine
                is in ERROR afterwards.
        """
        if self._in_error():
            raise LocalProtocolError(f"the {type(self).__name__} is in ERROR and accepts nothing")
        try:
            if now < self._now:
                raise LocalProtocolError(f"time went backwards: {now} < {self._now}")
            self._now = now
            out: list[Command] = []
            if self._deadline is not None and now >= self._deadline:
                out += self._dispatch(Tick())
            return out + self._dispatch(event)
        except LocalProtocolError:
            self._enter_error()
            self._deadline = None
            raise
