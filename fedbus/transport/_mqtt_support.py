"""Pieces of `fedbus.transport.mqtt` that need no connection: limits, counters, inbox, error triage.

Split out to keep the transport module about its one job (owning the
connection); everything public here is re-exported by `fedbus.transport.mqtt`.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from typing import Final

from fedbus.transport.base import Received

__all__ = [
    "REFUSALS",
    "UNSUPPORTED_PROTOCOL",
    "Inbox",
    "MqttStats",
    "is_socket_error",
    "reason_value",
    "root_cause",
]

# CONNACK reason codes (MQTT 5 numbering; paho maps 3.1.1 return codes onto them).
UNSUPPORTED_PROTOCOL: Final = 0x84
REFUSALS: Final = {
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x8A: "banned",
    0x8C: "bad authentication method",
}
"""Refusals that no amount of retrying fixes: fail at once instead of backing off."""


@dataclasses.dataclass(slots=True)
class MqttStats:
    """Counters of one transport, cumulative over every ``async with``.

    Attributes:
        published: publishes the broker accepted (PUBACK for QoS 1).
        republished: publishes re-sent because their connection died before the PUBACK.
        received: messages the broker delivered, including dropped ones.
        dropped: received messages discarded: inbox full, or still queued at `aclose`.
        reconnects: connections re-established after a loss.
        bytes_out: payload bytes of the publishes the broker accepted (the
            encoded messages, as `MemoryTransport` counts them).
        bytes_in: payload bytes of the messages the broker delivered.
    """

    published: int = 0
    republished: int = 0
    received: int = 0
    dropped: int = 0
    reconnects: int = 0
    bytes_out: int = 0
    bytes_in: int = 0


class Inbox:
    """FIFO between the supervisor and the one consumer; bounded, and counts what it refuses."""

    def __init__(self, maxsize: int) -> None:
        self._items: collections.deque[Received] = collections.deque()
        self._maxsize = maxsize
        self._waiter: asyncio.Future[None] | None = None
        self.closed = True

    def put(self, item: Received) -> bool:
        if self.closed or (self._maxsize and len(self._items) >= self._maxsize):
            return False
        self._items.append(item)
        self._wake()
        return True

    async def get(self) -> Received | None:
        """The next message, or None once closed and empty."""
        while not self._items:
            if self.closed:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()

    def close(self, *, discard: bool) -> int:
        """Close; with ``discard`` drop what is queued and return how many."""
        self.closed = True
        dropped = 0
        if discard:
            dropped = len(self._items)
            self._items.clear()
        self._wake()
        return dropped

    def reopen(self) -> None:
        self.closed = False

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


def root_cause(exc: BaseException) -> BaseException:
    """The exception worth chaining: aiomqtt hides socket errors with ``from None``."""
    context = exc.__context__
    if exc.__suppress_context__ and isinstance(context, OSError):
        return context
    return exc


def is_socket_error(exc: BaseException) -> bool:
    """Whether ``exc`` failed at the TCP/TLS level, before any MQTT exchange.

    Timeouts are excluded: aiomqtt's CONNACK wait and paho's TCP connect both
    end in a `TimeoutError`, and after the former a socket is open.
    """
    cause = root_cause(exc)
    return isinstance(cause, OSError) and not isinstance(cause, TimeoutError)


def reason_value(rc: object) -> int | None:
    value = getattr(rc, "value", rc)
    return value if isinstance(value, int) else None
