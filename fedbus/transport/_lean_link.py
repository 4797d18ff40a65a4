"""`Link`: one TCP connection of `fedbus.transport.lean.LeanMqttTransport`, as an asyncio.Protocol.

The protocol object is where bytes meet the sans-IO `MqttConnection`:
``data_received`` feeds it, writes the PUBACKs it queued in one write, hands
incoming messages to the transport's inbox in the same callback (no task
hop) and resolves the futures of calls awaiting an acknowledgement.

Writes within one event-loop iteration are coalesced into one socket send
(`write` batches, a ``call_soon`` flushes): the PUBACK of a broadcast and the
answer a consumer publishes right after it leave together. The PUBACKs are
therefore written after the messages are delivered, so the consumer's
wake-up runs before the flush. Packets of ``COALESCE_MAX_BYTES`` or more
are written directly, never copied into a batch.

A link dies once: `lost` then holds the cause (None for a clean close) and
every waiter is resolved with None, which callers read as "re-send on the
next link". Waiters are resolved with values, never exceptions, so a waiter
abandoned by a cancelled caller cannot log "exception never retrieved".
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from typing import Final

from fedbus.errors import ProtocolError
from fedbus.mqtt import (
    ConnectionAccepted,
    ConnectionRefused,
    Event,
    MessageReceived,
    MqttConnection,
    PublishAcked,
    SubscribeAcked,
    UnsubscribeAcked,
)

__all__ = ["TIMED_OUT", "Link"]

COALESCE_MAX_BYTES: Final = 16 * 1024
TIMED_OUT: Final = "timed out"
"""What a waiter resolves to when its deadline passed (see `Link.expire`)."""

Answer = Event | str | None
"""A waiter's result: the acknowledgement, `TIMED_OUT`, or None (the link died)."""


class Link(asyncio.Protocol):
    """One connection to the broker; created per attempt, never reused."""

    def __init__(
        self, connection: MqttConnection, deliver: Callable[[MessageReceived], None]
    ) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._batch: list[bytes] = []
        self._flush_scheduled = False
        self.conn = connection
        self._deliver = deliver
        self._transport: asyncio.Transport | None = None
        self.connack: asyncio.Future[ConnectionAccepted | ConnectionRefused] = loop.create_future()
        self.lost: asyncio.Future[BaseException | None] = loop.create_future()
        self._waiters: dict[int, tuple[asyncio.Future[Answer], float]] = {}
        self._drained: asyncio.Future[None] | None = None

    # -- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Small packets (PUBACKs, credits) must not wait for the peer's delayed ACK.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except ProtocolError as exc:
            self.kill(exc)
            return
        for event in events:
            if type(event) is MessageReceived:
                self._deliver(event)
            elif isinstance(event, ConnectionAccepted | ConnectionRefused):
                if not self.connack.done():
                    self.connack.set_result(event)
            elif isinstance(event, PublishAcked | SubscribeAcked | UnsubscribeAcked):
                waiter = self._waiters.pop(event.packet_id, None)
                if waiter is not None and not waiter[0].done():
                    waiter[0].set_result(event)
        out = self.conn.data_to_send()
        if out:
            self.write(out)  # after the deliveries: see the module docstring

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._die(
            exc if exc is not None else ConnectionResetError("the broker closed the connection")
        )

    def pause_writing(self) -> None:
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    # -- used by the transport ------------------------------------------------------

    @property
    def alive(self) -> bool:
        """Whether the connection is still up."""
        return not self.lost.done()

    def write(self, data: bytes) -> None:
        """Queue ``data`` for the socket (sent at the end of this loop iteration); a no-op once dead."""
        if self._transport is None or self.lost.done():
            return
        if len(data) >= COALESCE_MAX_BYTES:
            self.flush()
            self._transport.write(data)
            return
        self._batch.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Hand the batched small packets to the socket in one write."""
        self._flush_scheduled = False
        batch = self._batch
        if not batch:
            return
        self._batch = []
        if self._transport is not None and not self.lost.done():
            self._transport.write(batch[0] if len(batch) == 1 else b"".join(batch))

    async def drain(self) -> None:
        """Wait while the socket's write buffer is over its high-water mark (or until the link dies)."""
        drained = self._drained
        if drained is not None:
            await asyncio.wait((drained, self.lost), return_when=asyncio.FIRST_COMPLETED)

    def expect(self, packet_id: int, deadline: float) -> asyncio.Future[Answer]:
        """A future for the acknowledgement of ``packet_id``; `expire` enforces ``deadline``."""
        future: asyncio.Future[Answer] = self.lost.get_loop().create_future()
        if self.lost.done():
            future.set_result(None)
        else:
            self._waiters[packet_id] = (future, deadline)
        return future

    def forget(self, packet_id: int) -> None:
        """Stop waiting for ``packet_id`` (its caller was cancelled or is done)."""
        self._waiters.pop(packet_id, None)

    def expire(self, now: float) -> None:
        """Resolve the waiters whose deadline passed with `TIMED_OUT`."""
        expired = [pid for pid, (_, deadline) in self._waiters.items() if deadline <= now]
        for packet_id in expired:
            future, _ = self._waiters.pop(packet_id)
            if not future.done():
                future.set_result(TIMED_OUT)

    def close(self) -> None:
        """Close after the queued bytes are written (after a DISCONNECT)."""
        self.flush()
        if self._transport is not None:
            self._transport.close()

    def kill(self, cause: BaseException | None) -> None:
        """Drop the TCP connection at once, without DISCONNECT (the broker fires the will)."""
        self._batch = []
        if self._transport is not None:
            self._transport.abort()
        self._die(cause)

    def _die(self, cause: BaseException | None) -> None:
        if self.lost.done():
            return
        self.lost.set_result(cause)
        waiters, self._waiters = self._waiters, {}
        for future, _ in waiters.values():
            if not future.done():
                future.set_result(None)
        self.resume_writing()
