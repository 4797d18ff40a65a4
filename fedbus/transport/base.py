"""The one async transport interface fedbus nodes talk through.

Two implementations: `fedbus.transport.mqtt.MqttTransport` (aiomqtt, a real
broker) and `fedbus.transport.memory.MemoryTransport` (an in-process bus with
the same semantics, for unit tests and very large simulations). Everything
above this layer (chunking, flow control, protocols) is written against
`Transport` only.

Semantics both implementations keep:
- ``publish`` returns once the message is accepted (QoS 1: PUBACK received).
  That is not end-to-end delivery: brokers drop silently on queue overflow.
- ``messages()`` yields every message matching a subscription, in order per
  publisher, until the transport is closed; then the iterator ends.
- MQTT wildcards ``+`` and ``#``, retained messages, and a last will published
  when the connection is lost without a clean close.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

__all__ = [
    "PushReceiver",
    "Received",
    "Transport",
    "Will",
    "packet_overhead",
    "publish_packet_size",
    "topic_matches",
]


def packet_overhead(topic: str) -> int:
    """Upper bound on the bytes a PUBLISH packet adds around its payload.

    Fixed header (1 byte plus a remaining length of up to 4), the topic (2-byte
    length plus its UTF-8 bytes), the packet id (2, QoS > 0) and an empty MQTT 5
    property block (1). The bound holds for MQTT 3.1.1 and 5 and any QoS, so
    ``len(payload) <= max_payload_bytes - packet_overhead(topic)`` always fits.
    Every transport checks ``max_payload_bytes`` with this one function.
    """
    return 1 + 4 + 2 + len(topic.encode("utf-8")) + 2 + 1


def publish_packet_size(topic: str, payload_size: int) -> int:
    """Upper bound of the whole PUBLISH packet carrying ``payload_size`` bytes on ``topic``."""
    return packet_overhead(topic) + payload_size


@dataclass(frozen=True, slots=True)
class Will:
    """The last will the broker publishes if the connection dies uncleanly."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass(frozen=True, slots=True)
class Received:
    """One message as delivered by the broker."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@runtime_checkable
class Transport(Protocol):
    """A connection to a message bus, used as an async context manager.

    Reusable but not re-entrant: ``async with t:`` connects; leaving the block
    (or `aclose`) disconnects cleanly, so no last will is published.
    """

    @property
    def client_id(self) -> str:
        """The MQTT client id: equals the node id."""
        ...

    @property
    def max_payload_bytes(self) -> int:
        """Largest PUBLISH packet this connection may send."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        """Publish; return when the broker accepted it (QoS 1) or it was sent (QoS 0).

        Raises:
            TransportError: the connection failed and could not be restored in time.
            TransportClosed: the transport was closed.
        """
        ...

    async def subscribe(self, topic_filter: str, *, qos: int = 1) -> None:
        """Subscribe; kept across reconnects."""
        ...

    async def unsubscribe(self, topic_filter: str) -> None:
        """Drop a subscription."""
        ...

    def messages(self) -> AsyncIterator[Received]:
        """Iterate over received messages until the transport is closed."""
        ...

    async def aclose(self) -> None:
        """Disconnect cleanly. Idempotent."""
        ...


@runtime_checkable
class PushReceiver(Protocol):
    """An optional capability: a transport that can call a function per message.

    ``set_receiver(fn)`` makes the transport call ``fn(received)`` as each
    message arrives, from wherever it arrives (the memory bus's delivery
    callback, a socket callback), instead of queueing it for `messages`.
    ``fn`` must not block or raise. `messages` still yields what was queued
    before and still ends when the transport closes.

    Why: a task that only moves messages from a queue onward costs a task
    wake-up per message. With 1,000 simulated clients on one event loop that
    is 1,000 wake-ups a round for the model broadcast alone.
    `fedbus.transport.messenger.Messenger` uses it when the transport has it.
    """

    def set_receiver(self, receiver: Callable[[Received], None] | None) -> None:
        """Call ``receiver`` for each message from now on (None: queue them again)."""
        ...


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic-filter matching (``+`` one level, ``#`` the rest), per MQTT 3.1.1 4.7.

    Topics starting with ``$`` are not matched by filters starting with a wildcard.
    """
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    for i, f in enumerate(f_levels):
        if f == "#":
            return True
        if i >= len(t_levels):
            return False
        if f != "+" and f != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)
