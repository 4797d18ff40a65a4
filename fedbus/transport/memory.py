"""An in-process message bus with MQTT semantics, for tests and very large simulations.

`MemoryBus` plays the broker; each `MemoryTransport` is one client connection.
It keeps the semantics fedbus relies on from a real broker, including the
unpleasant ones, so code tested here behaves the same over mosquitto:

- wildcards ``+``/``#`` (`topic_matches` rules, ``$`` topics excluded), one copy
  per client however many of its filters match, QoS = min(publish, subscribe);
- retained messages (an empty retained payload clears the topic), delivered on
  subscribe with ``retain=True``;
- the last will is published when a connection ends through
  `MemoryTransport.abort` (a simulated crash), never on a clean `aclose`;
- a bounded queue per subscriber: beyond ``max_queued_messages`` new messages
  are dropped silently while the publisher's ``publish`` still succeeds, as
  mosquitto does with QoS 1 (shared notes, section 8);
- QoS 1 duplicates on demand, and fault hooks (drop, tamper, delay) for tests.

Scale: publishing is synchronous fan-out into per-subscriber deques (no task
per message or subscriber); matching walks a topic trie, so the cost is about
the number of filters that can match, not the number of clients, and the
subscribers of a topic are cached until the next (un)subscription.
Subscribers with a push receiver (`MemoryTransport.set_receiver`) get their
messages in one callback per pass of the event loop, in publish order, never
inside the publisher's ``publish`` (`MemoryBus._push`). A publisher that
publishes several times in one pass of the loop yields once per few
publishes, standing in for the PUBACK round trip.

Accounting: ``bytes_out``/``bytes_in`` count payload bytes a client published
and had delivered (the encoded messages), the figure behind ``bytes_up`` and
``bytes_down`` in the metrics.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from fedbus.config import DEFAULT_MAX_PAYLOAD_BYTES
from fedbus.errors import PayloadTooLargeError, TransportClosed
from fedbus.transport.base import Received, Will, publish_packet_size, topic_matches

__all__ = ["BusStats", "ClientStats", "MemoryBus", "MemoryTransport"]

DropHook = Callable[[str, bytes], bool]
TamperHook = Callable[[str, bytes], bytes]
DelayHook = Callable[[str, bytes], float]


@dataclass(slots=True)
class ClientStats:
    """Per-client counters, kept by the bus across reconnects of the same client id."""

    messages_out: int = 0
    bytes_out: int = 0
    messages_in: int = 0
    bytes_in: int = 0
    dropped_queue_full: int = 0
    max_queue_depth: int = 0


@dataclass(slots=True)
class BusStats:
    """Bus-wide counters."""

    published: int = 0
    delivered: int = 0
    dropped_queue_full: int = 0
    dropped_by_hook: int = 0
    duplicated: int = 0
    clients: dict[str, ClientStats] = field(default_factory=dict)

    def client(self, client_id: str) -> ClientStats:
        """Counters of one client (created on first use)."""
        stats = self.clients.get(client_id)
        if stats is None:
            stats = self.clients[client_id] = ClientStats()
        return stats


class _Node:
    # One trie level. ``subs`` maps a subscribed client to its subscription QoS.
    __slots__ = ("children", "subs")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.subs: dict[MemoryTransport, int] = {}


_MAX_CACHED_MATCHES = 16_384
"""Topics whose subscribers `MemoryBus._match` remembers at most (then it starts over)."""


class MemoryBus:
    """The in-process broker.

    Args:
        max_queued_messages: per-subscriber queue bound (mosquitto's default 1000);
            messages beyond it are dropped silently and counted.
        duplicate_probability: chance that a QoS 1 delivery is made twice.
        seed: seeds the bus's own `random.Random` (duplicates), so runs repeat.

    Attributes:
        drop: fault hook; ``drop(topic, payload) -> True`` drops the message
            for every subscriber (the publisher is still acknowledged).
        tamper: fault hook returning the payload subscribers receive instead.
        delay: fault hook returning seconds to hold the message back (0: none);
            delayed messages may overtake one another, as on a real network.
        duplicate: explicit hook deciding per message whether QoS 1 delivery
            happens twice; overrides ``duplicate_probability``.
        stats: counters, bus-wide and per client.
    """

    def __init__(
        self, *, max_queued_messages: int = 1000, duplicate_probability: float = 0.0, seed: int = 0
    ) -> None:
        if max_queued_messages < 1:
            raise ValueError("max_queued_messages must be at least 1")
        if not 0.0 <= duplicate_probability <= 1.0:
            raise ValueError("duplicate_probability must be in [0, 1]")
        self.max_queued_messages = max_queued_messages
        self.duplicate_probability = duplicate_probability
        self.random = random.Random(seed)
        self.drop: DropHook | None = None
        self.tamper: TamperHook | None = None
        self.delay: DelayHook | None = None
        self.duplicate: DropHook | None = None
        self.stats = BusStats()
        self._root = _Node()
        self._retained: dict[str, Received] = {}
        self._clients: dict[str, MemoryTransport] = {}
        # Subscribers per published topic, valid while the trie is unchanged (`_match`).
        self._matches: dict[str, dict[MemoryTransport, int]] = {}
        self._trie_version = 0
        self._matches_version = 0
        # Deliveries to push receivers not yet made: (transport, its session, message).
        self._pushes: list[tuple[MemoryTransport, int, Received]] = []
        self._flushes = 0  # push batches delivered so far (`MemoryTransport.publish`)

    def transport(self, client_id: str, **kwargs: object) -> MemoryTransport:
        """Shorthand for ``MemoryTransport(self, client_id, ...)``."""
        return MemoryTransport(self, client_id, **kwargs)  # type: ignore[arg-type]

    @property
    def retained(self) -> dict[str, bytes]:
        """Retained payloads by topic (a copy)."""
        return {t: r.payload for t, r in self._retained.items()}

    # -- connections ----------------------------------------------------------

    def _connect(self, client: MemoryTransport) -> None:
        old = self._clients.get(client.client_id)
        if old is not None and old is not client:
            # MQTT session takeover: the older connection is closed by the broker.
            old._disconnect()
        self._clients[client.client_id] = client

    def _disconnect(self, client: MemoryTransport) -> None:
        if self._clients.get(client.client_id) is client:
            del self._clients[client.client_id]
        for topic_filter in list(client._filters):
            self._unsubscribe(client, topic_filter)

    # -- subscriptions --------------------------------------------------------

    def _subscribe(self, client: MemoryTransport, topic_filter: str, qos: int) -> None:
        self._trie_version += 1
        node = self._root
        for level in topic_filter.split("/"):
            node = node.children.setdefault(level, _Node())
        node.subs[client] = qos
        for topic, msg in self._retained.items():
            if topic_matches(topic_filter, topic):
                client._enqueue(Received(topic, msg.payload, min(qos, msg.qos), True))

    def _unsubscribe(self, client: MemoryTransport, topic_filter: str) -> None:
        self._trie_version += 1
        path = [self._root]
        for level in topic_filter.split("/"):
            nxt = path[-1].children.get(level)
            if nxt is None:
                return
            path.append(nxt)
        path[-1].subs.pop(client, None)
        # Prune empty branches so the trie does not grow with churn.
        levels = topic_filter.split("/")
        for i in range(len(levels), 0, -1):
            node = path[i]
            if node.subs or node.children:
                break
            del path[i - 1].children[levels[i - 1]]

    def _match(self, topic: str) -> dict[MemoryTransport, int]:
        """Subscribers of ``topic`` and their QoS (do not modify the result).

        Cached per topic until the next (un)subscription: a federation's
        topics repeat every round (each client's update topic, the model
        channel), and walking the trie was about half of a publish.
        """
        if self._matches_version != self._trie_version:
            self._matches.clear()
            self._matches_version = self._trie_version
        found = self._matches.get(topic)
        if found is None:
            if len(self._matches) >= _MAX_CACHED_MATCHES:
                self._matches.clear()
            found = self._matches[topic] = self._walk(topic)
        return found

    def _walk(self, topic: str) -> dict[MemoryTransport, int]:
        found: dict[MemoryTransport, int] = {}
        levels = topic.split("/")
        dollar = topic.startswith("$")

        def visit(node: _Node, i: int) -> None:
            wild = not (dollar and i == 0)
            if wild and (hash_node := node.children.get("#")) is not None:
                _merge(found, hash_node.subs)
            if i == len(levels):
                _merge(found, node.subs)
                return
            if (exact := node.children.get(levels[i])) is not None:
                visit(exact, i + 1)
            if wild and (plus := node.children.get("+")) is not None:
                visit(plus, i + 1)

        visit(self._root, 0)
        return found

    # -- publishing -----------------------------------------------------------

    def _publish(self, sender: str, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        self.stats.published += 1
        out = self.stats.client(sender)
        out.messages_out += 1
        out.bytes_out += len(payload)
        if retain:
            if payload:
                self._retained[topic] = Received(topic, payload, qos, True)
            else:
                self._retained.pop(topic, None)
        if self.drop is not None and self.drop(topic, payload):
            self.stats.dropped_by_hook += 1
            return
        delay_s = self.delay(topic, payload) if self.delay is not None else 0.0
        if self.tamper is not None:
            payload = self.tamper(topic, payload)
        if delay_s > 0:
            loop = asyncio.get_running_loop()
            loop.call_later(delay_s, self._fan_out, topic, payload, qos)
        else:
            self._fan_out(topic, payload, qos)

    def _fan_out(self, topic: str, payload: bytes, qos: int) -> None:
        # One immutable Received per delivered QoS, shared by every subscriber:
        # a broadcast to 1,000 clients built 1,000 equal objects (issue 3).
        shared: dict[int, Received] = {}
        dup, chance = self.duplicate, self.duplicate_probability
        for client, sub_qos in self._match(topic).items():
            q = qos if qos < sub_qos else sub_qos
            msg = shared.get(q)
            if msg is None:
                msg = shared[q] = Received(topic, payload, q, False)
            if q < 1 or (dup is None and not chance):
                client._enqueue(msg)
                continue
            copies = 1 + (dup(topic, payload) if dup is not None else self.random.random() < chance)
            self.stats.duplicated += copies - 1
            for _ in range(copies):
                client._enqueue(msg)

    def _push(self, client: MemoryTransport, msg: Received) -> None:
        """Queue a delivery to ``client``'s push receiver for the next pass of the loop.

        Why: delivering inside the publisher's ``publish`` interleaved each
        receiver's work with the publisher's (at 1,000 simulated clients the
        server decoded and checked each update between two clients' fits, with
        cold caches every time: about three times the cost of doing the same
        1,000 in a row). Deferred, all deliveries published during one pass of
        the event loop are made together in one callback, in publish order; a
        broker delivers asynchronously too, so nothing may rely on a delivery
        happening inside ``publish``.
        """
        if not self._pushes:
            asyncio.get_running_loop().call_soon(self._flush_pushes)
        client._pushed += 1
        self._pushes.append((client, client._session, msg))

    def _flush_pushes(self) -> None:
        self._flushes += 1
        pushes, self._pushes = self._pushes, []
        for client, session, msg in pushes:
            client._pushed -= 1
            if client._session == session and client._connected:
                client._deliver(msg)


def _merge(found: dict[MemoryTransport, int], subs: dict[MemoryTransport, int]) -> None:
    for client, qos in subs.items():
        if found.get(client, -1) < qos:
            found[client] = qos


_PUBLISHES_PER_YIELD = 4
"""A `MemoryTransport` yields to the event loop once per this many publishes in one pass of it."""


class MemoryTransport:
    """One client connection to a `MemoryBus`, implementing `fedbus.transport.base.Transport`.

    Args:
        bus: the bus to connect to.
        client_id: the MQTT client id (equals the node id).
        will: last will, published by the bus if this connection is aborted.
        max_payload_bytes: bound on a whole PUBLISH packet, as on a real broker.
    """

    def __init__(
        self,
        bus: MemoryBus,
        client_id: str,
        *,
        will: Will | None = None,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> None:
        self._bus = bus
        self._client_id = client_id
        self._will = will
        self._max_payload_bytes = max_payload_bytes
        self._filters: dict[str, int] = {}
        self._queue: deque[Received] = deque()
        self._receiver: Callable[[Received], None] | None = None
        self._unyielded = 0
        self._wakeup = asyncio.Event()
        self._connected = False
        self._entered = False
        self._session = 0  # counts connections: a push made for an older one is dropped
        self._pushed = 0  # deliveries waiting in the bus's push batch
        self._flushes_seen = 0  # the bus's flush count at this client's last publish

    @property
    def client_id(self) -> str:
        """The MQTT client id."""
        return self._client_id

    @property
    def max_payload_bytes(self) -> int:
        """Largest PUBLISH packet this connection may send."""
        return self._max_payload_bytes

    @property
    def bus(self) -> MemoryBus:
        """The bus this transport connects to."""
        return self._bus

    @property
    def stats(self) -> ClientStats:
        """This client's counters (kept by the bus)."""
        return self._bus.stats.client(self._client_id)

    @property
    def connected(self) -> bool:
        """Whether the connection is open."""
        return self._connected

    async def __aenter__(self) -> Self:
        if self._entered:
            raise RuntimeError("MemoryTransport is reusable but not re-entrant")
        self._entered = True
        self._connected = True
        self._session += 1
        self._wakeup = asyncio.Event()
        self._queue.clear()
        self._bus._connect(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _check_open(self) -> None:
        if not self._connected:
            raise TransportClosed(f"transport {self._client_id!r} is closed")

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        """Publish; returns once the bus has accepted (not necessarily delivered) it.

        Raises:
            PayloadTooLargeError: the PUBLISH packet would exceed ``max_payload_bytes``.
            TransportClosed: the transport is closed.
        """
        self._check_open()
        size = publish_packet_size(topic, len(payload))
        if size > self._max_payload_bytes:
            raise PayloadTooLargeError(
                f"PUBLISH of {size} bytes on {topic!r} exceeds max_payload_bytes "
                f"{self._max_payload_bytes}"
            )
        if "+" in topic or "#" in topic or not topic:
            raise ValueError(f"cannot publish to a topic filter: {topic!r}")
        bus = self._bus
        bus._publish(self._client_id, topic, bytes(payload), min(qos, 1), retain)
        if self._flushes_seen != bus._flushes:
            # The loop made its deliveries since this client last published: it
            # is not publishing in a loop, whatever it published before.
            self._flushes_seen, self._unyielded = bus._flushes, 0
        self._unyielded += 1
        if self._unyielded >= _PUBLISHES_PER_YIELD:
            # Stands in for the PUBACK round trip: a publisher in a loop lets
            # others run. Not on every publish: a client that publishes one
            # update a round would pay a task wake-up for nothing (at 1,000
            # clients in step, a thousand wake-ups every fourth round).
            self._unyielded = 0
            await asyncio.sleep(0)

    async def subscribe(self, topic_filter: str, *, qos: int = 1) -> None:
        """Subscribe; retained messages matching the filter are delivered at once."""
        self._check_open()
        if topic_filter in self._filters:
            self._bus._unsubscribe(self, topic_filter)
        self._filters[topic_filter] = qos
        self._bus._subscribe(self, topic_filter, min(qos, 1))

    async def unsubscribe(self, topic_filter: str) -> None:
        """Drop a subscription (no error if there was none)."""
        self._check_open()
        if self._filters.pop(topic_filter, None) is not None:
            self._bus._unsubscribe(self, topic_filter)

    def set_receiver(self, receiver: Callable[[Received], None] | None) -> None:
        """Deliver each message by calling ``receiver`` instead of queueing it.

        `fedbus.transport.base.PushReceiver`: the call happens in a callback
        of the event loop soon after the publish (`MemoryBus._push`: every
        delivery of one pass of the loop in one callback, in order), so
        ``receiver`` must not block and must not raise (it owns its errors).
        Messages queued before are still yielded by `messages`, which ends as
        usual when the transport closes.
        """
        self._receiver = receiver

    async def messages(self) -> AsyncIterator[Received]:
        """Yield delivered messages in order until the transport is closed."""
        while True:
            while self._queue:
                yield self._queue.popleft()
            if not self._connected:
                return
            self._wakeup.clear()
            await self._wakeup.wait()

    async def aclose(self) -> None:
        """Disconnect cleanly (no last will). Idempotent."""
        if self._connected:
            self._disconnect()

    async def abort(self) -> None:
        """Simulate a crash: the connection drops and the bus publishes the last will."""
        if not self._connected:
            return
        self._disconnect()
        will = self._will
        if will is not None:
            self._bus._publish(self._client_id, will.topic, will.payload, will.qos, will.retain)

    def _disconnect(self) -> None:
        self._connected = False
        self._entered = False
        self._bus._disconnect(self)
        self._filters.clear()
        self._queue.clear()
        self._wakeup.set()

    def _enqueue(self, msg: Received) -> None:
        stats = self._bus.stats.client(self._client_id)
        if len(self._queue) >= self._bus.max_queued_messages:
            stats.dropped_queue_full += 1
            self._bus.stats.dropped_queue_full += 1
            return
        stats.messages_in += 1
        stats.bytes_in += len(msg.payload)
        self._bus.stats.delivered += 1
        if self._pushed or (self._receiver is not None and not self._queue):
            self._bus._push(self, msg)  # behind earlier pushes, so the order holds
            return
        self._append(msg, stats)

    def _deliver(self, msg: Received) -> None:
        """Make a delivery the bus deferred (`MemoryBus._push`), already counted."""
        receiver = self._receiver
        if receiver is not None and not self._queue:
            try:
                receiver(msg)
            except Exception as exc:  # the receiver owns its errors; never lose the batch
                asyncio.get_running_loop().call_exception_handler(
                    {"message": f"push receiver of {self._client_id!r} raised", "exception": exc}
                )
            return
        stats = self._bus.stats.client(self._client_id)
        if len(self._queue) >= self._bus.max_queued_messages:
            stats.dropped_queue_full += 1
            self._bus.stats.dropped_queue_full += 1
            return
        self._append(msg, stats)

    def _append(self, msg: Received, stats: ClientStats) -> None:
        self._queue.append(msg)
        if len(self._queue) > stats.max_queue_depth:
            stats.max_queue_depth = len(self._queue)
        self._wakeup.set()
