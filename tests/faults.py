"""Fault injection for tests: a `Transport` wrapper and a killable TCP relay.

`FaultyTransport` wraps any `fedbus.transport.base.Transport` (MqttTransport,
MemoryTransport) and applies `Fault` rules to what goes through it, in either
direction:

* ``publish`` rules act before the inner ``publish``: a dropped message never
  reaches the broker (the caller still sees success, as when a broker drops
  silently), a corrupted one reaches it altered, a duplicated one is
  published twice;
* ``receive`` rules act on what the inner transport delivers, before the
  consumer (a `Messenger`) sees it.

Every action is counted in `FaultyTransport.counts` under
``"<direction>.<action>"`` (e.g. ``"publish.drop"``), and every message that
passes through is recorded in `FaultyTransport.log`, in the order the
wrapper saw it, so a test can check causal order (e.g. that no chunk arrived
before the credit that allowed it was sent).

`TcpRelay` forwards TCP connections to a broker and can abort them all at
once (a reset, no MQTT DISCONNECT): to the broker that is a crashed client.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, Self

import msgspec

from fedbus import codec, topics
from fedbus.errors import DecodeError
from fedbus.messages import AnyMessage, Chunk
from fedbus.transport.base import Received, Transport

__all__ = [
    "Fault",
    "FaultyTransport",
    "LogEntry",
    "TcpRelay",
    "chunk_matching",
    "decoded",
    "flip_chunk_data",
]

Action = Literal["drop", "corrupt", "duplicate"]
Direction = Literal["publish", "receive"]
Predicate = Callable[[str, bytes], bool]


def decoded(payload: bytes) -> AnyMessage | None:
    """The fedbus message in ``payload``, or None if it does not decode."""
    try:
        return codec.decode(payload)
    except DecodeError:
        return None


def chunk_matching(
    *, index: int | None = None, form: Literal["out", "to"] | None = None, prefix: str
) -> Predicate:
    """A predicate selecting chunks (of any transfer) with ``index`` on topics of ``form``."""

    def match(topic: str, payload: bytes) -> bool:
        parsed = topics.parse(topic, prefix=prefix)
        if parsed is None or (form is not None and parsed.form != form):
            return False
        message = decoded(payload)
        return isinstance(message, Chunk) and (index is None or message.index == index)

    return match


def flip_chunk_data(topic: str, payload: bytes) -> bytes:
    """Flip one bit of a chunk's data and keep its crc: a CRC mismatch for the receiver."""
    chunk = decoded(payload)
    if not isinstance(chunk, Chunk) or not len(chunk.data):
        raise ValueError("flip_chunk_data needs a non-empty chunk")
    data = bytearray(chunk.data)
    data[len(data) // 2] ^= 0x01
    return codec.encode(msgspec.structs.replace(chunk, data=memoryview(bytes(data))))


@dataclass(slots=True)
class Fault:
    """One rule: do ``action`` to messages ``match`` selects, at most ``times`` times.

    Attributes:
        action: "drop", "corrupt" (the payload becomes ``tamper(topic,
            payload)``) or "duplicate" (the message goes through twice).
        match: ``match(topic, payload) -> bool`` selects the messages.
        times: how often the rule may fire; None: every time.
        tamper: the corruption applied by "corrupt" (default `flip_chunk_data`).
        fired: how often it fired so far.
    """

    action: Action
    match: Predicate
    times: int | None = 1
    tamper: Callable[[str, bytes], bytes] = flip_chunk_data
    fired: int = 0

    def applies(self, topic: str, payload: bytes) -> bool:
        if self.times is not None and self.fired >= self.times:
            return False
        if not self.match(topic, payload):
            return False
        self.fired += 1
        return True


@dataclass(frozen=True, slots=True)
class LogEntry:
    """A message seen by the wrapper: direction, topic and the decoded message (None if not)."""

    direction: Direction
    topic: str
    message: AnyMessage | None
    size: int


@dataclass(slots=True)
class _Rules:
    publish: list[Fault] = field(default_factory=list)
    receive: list[Fault] = field(default_factory=list)


class FaultyTransport:
    """A `Transport` that drops, corrupts or duplicates chosen messages of another.

    Args:
        inner: the transport to wrap; entering the wrapper enters it.
        publish: rules for outgoing messages (applied before the broker sees them).
        receive: rules for incoming messages (applied before the consumer sees them).
        record: keep a `LogEntry` of every message in ``log`` (decodes each one).
        on_published: called with (topic, payload) after each publish the inner
            transport completed (for QoS 1: the broker acknowledged it).

    The first rule that applies to a message decides what happens to it.
    """

    def __init__(
        self,
        inner: Transport,
        *,
        publish: list[Fault] | None = None,
        receive: list[Fault] | None = None,
        record: bool = False,
        on_published: Callable[[str, bytes], None] | None = None,
    ) -> None:
        self.inner = inner
        self._on_published = on_published
        self.rules = _Rules(publish or [], receive or [])
        self.counts: Counter[str] = Counter()
        self.log: list[LogEntry] = []
        self._record = record

    @property
    def client_id(self) -> str:
        """The inner transport's client id."""
        return self.inner.client_id

    @property
    def max_payload_bytes(self) -> int:
        """The inner transport's packet limit."""
        return self.inner.max_payload_bytes

    async def __aenter__(self) -> Self:
        await self.inner.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.inner.__aexit__(exc_type, exc, tb)

    def _apply(self, direction: Direction, topic: str, payload: bytes) -> list[bytes]:
        """The payloads to pass on for one message: none, one (maybe altered) or two."""
        out = [payload]
        for rule in getattr(self.rules, direction):
            if rule.applies(topic, payload):
                self.counts[f"{direction}.{rule.action}"] += 1
                if rule.action == "drop":
                    out = []
                elif rule.action == "corrupt":
                    out = [rule.tamper(topic, payload)]
                else:
                    out = [payload, payload]
                break
        if self._record:
            for p in out:
                self.log.append(LogEntry(direction, topic, decoded(p), len(p)))
        return out

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        """Publish through the rules: dropped messages return as if the broker took them."""
        for p in self._apply("publish", topic, bytes(payload)):
            await self.inner.publish(topic, p, qos=qos, retain=retain)
            if self._on_published is not None:
                self._on_published(topic, p)

    async def subscribe(self, topic_filter: str, *, qos: int = 1) -> None:
        """Subscribe on the inner transport."""
        await self.inner.subscribe(topic_filter, qos=qos)

    async def unsubscribe(self, topic_filter: str) -> None:
        """Unsubscribe on the inner transport."""
        await self.inner.unsubscribe(topic_filter)

    async def messages(self) -> AsyncIterator[Received]:
        """The inner transport's messages, through the receive rules."""
        async for received in self.inner.messages():
            for p in self._apply("receive", received.topic, received.payload):
                yield Received(received.topic, p, received.qos, received.retain)

    async def aclose(self) -> None:
        """Close the inner transport."""
        await self.inner.aclose()


class TcpRelay:
    """Relays TCP connections from a local port to ``127.0.0.1:target_port``; can cut them.

    Use as an async context manager; ``port`` is where clients connect.
    `crash` aborts every relayed connection in both directions and stops
    accepting new ones, so a client behind the relay looks crashed to the
    broker (which then publishes its last will) and cannot come back.
    """

    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._pipes: set[asyncio.Task[None]] = set()
        self.port = 0

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.crash()
        assert self._server is not None
        await self._server.wait_closed()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    def crash(self) -> None:
        """Stop accepting and reset every relayed connection (no DISCONNECT reaches the broker)."""
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers += [writer, up_writer]
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(1 << 16):
                dst.write(data)
                await dst.drain()
        dst.transport.abort()
