"""Messages over any `Transport`: encoding, chunking, flow control, validation.

The layer node runtimes talk through. It owns the I/O only; the decisions
live in sans-IO parts that get ``now`` from here: `fedbus.inbound.Inbound`
(validation, reassembly, credits granted; it returns commands that this
module executes), `fedbus.flow.SendWindow` (credits obeyed),
`fedbus.flow.ResendCache` and `fedbus.chunking`. Two background tasks per messenger: ``fedbus[<node>].receive`` reads the
transport, ``fedbus[<node>].timers`` asks for missing chunks and expires stale
transfers (it sleeps on an event while no transfer is open, so thousands of
idle messengers cost nothing).

Usage::

    async with transport, Messenger(transport, node_id="client-3", run="r1") as m:
        await m.subscribe_broadcasts("server", "model")
        async for topic, message in m.messages():
            await m.send("server", reply)

A message that fits one PUBLISH (``transport.max_payload_bytes``) goes as one;
a larger one is split into chunks (`fedbus.chunking`). Directed transfers are
credit-controlled (`fedbus.flow`); broadcasts are paced by the transport.
Received messages that fail a check are dropped and counted in
``stats.dropped[reason]`` (reasons in `DROP_REASONS`); the iterator never
raises for a bad message, only when the transport fails.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self

from fedbus import codec, topics
from fedbus.chunking import OutgoingTransfer, max_chunk_data
from fedbus.codec import DEFAULT_LIMITS, DecodeLimits
from fedbus.errors import ConfigError, TransferError, TransportClosed, TransportError
from fedbus.flow import ResendCache, SendWindow, TransferLimits
from fedbus.inbound import (
    DROP_REASONS,
    Command,
    CreditReceived,
    Deliver,
    Inbound,
    Incoming,
    MessengerStats,
    Publish,
    ResendRequested,
)
from fedbus.messages import Message, new_message_id
from fedbus.topics import DEFAULT_PREFIX
from fedbus.transport.base import PushReceiver, Received, Transport, publish_packet_size

__all__ = ["DROP_REASONS", "Incoming", "Messenger", "MessengerStats"]

log = logging.getLogger(__name__)

_MAX_RESEND_TASKS: Final = 32
_MAX_CONTROL_PUBLISHES: Final = 64
"""Credits and chunk requests awaiting their PUBACK in the background; beyond
this the receive loop waits for the broker itself (backpressure)."""
_MAX_CACHED_TOPICS: Final = 65_536
"""Directed topics a messenger remembers at most (then it starts over)."""


@dataclass(slots=True)
class _Outbound:
    transfer: OutgoingTransfer
    recipient: str | None  # None: a broadcast (not credit-controlled)
    window: SendWindow
    wake: asyncio.Event


class _InFlight:
    """Chunk publishes of one transfer awaiting their PUBACKs together, at most ``limit``.

    Why: awaiting each PUBACK before publishing the next chunk leaves the
    connection idle for a broker round trip per chunk; a 40 MB stream then
    ran at about a third of raw paho's speed. Overlapping a bounded number
    keeps the pipe full while the receiver's credit (directed transfers) and
    the transport's own in-flight window still bound what is outstanding.
    The first failure is raised from `add` or `drain`; `cancel` ends the rest.
    """

    __slots__ = ("_limit", "_tasks")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._tasks: set[asyncio.Task[None]] = set()

    async def add(self, publish: Coroutine[Any, Any, None]) -> None:
        """Start ``publish``; first wait while ``limit`` publishes are outstanding.

        Returns after one pass of the event loop, in which the publish builds
        and hands over its packet and the loop does its I/O. Why: a credit
        starts up to ``limit`` publishes at once, and building all of them
        (about 1 ms per MB chunk) before the loop next wrote to the socket
        left the connection idle: the receiver got chunk 1 of a 40 MB stream
        25-65 ms after chunk 0 (fedbus went from about 0.75x to about 1x of
        raw paho's throughput with this yield).
        """
        while len(self._tasks) >= self._limit:
            await self._wait(asyncio.FIRST_COMPLETED)
        self._tasks.add(asyncio.ensure_future(publish))
        await asyncio.sleep(0)

    async def drain(self) -> None:
        """Wait for every outstanding publish; raise the first failure."""
        while self._tasks:
            await self._wait(asyncio.ALL_COMPLETED)

    async def cancel(self) -> None:
        """Cancel what is still outstanding (after a failure or cancellation) and reap it."""
        tasks, self._tasks = self._tasks, set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _wait(self, return_when: str) -> None:
        done, self._tasks = await asyncio.wait(self._tasks, return_when=return_when)
        # Retrieve every exception (none is then logged as lost) and raise the first.
        failures = [exc for t in done if not t.cancelled() and (exc := t.exception())]
        if failures:
            raise failures[0]


class Messenger:
    """Sends and receives fedbus messages for one node over a connected transport.

    The messenger is the transport's only reader. It does not connect or close
    the transport; enter the transport first.

    Args:
        transport: a connected transport whose client id is ``node_id``.
        node_id: this node's id.
        run: the run id; messages of other runs are dropped.
        prefix: topic prefix.
        strict_run: True (default) drops messages whose envelope run is not
            ``run``. False keeps ``run`` as the topic namespace only and
            delivers every envelope run, for nodes that learn the run id from
            a manifest (the protocol machines then reject foreign runs).
        limits: chunking and flow-control bounds.
        decode_limits: bounds for decoding one message.
        clock: monotonic seconds; injectable for tests.

    Raises:
        ConfigError: ``node_id`` differs from the transport's client id.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        node_id: str,
        run: str,
        prefix: str = DEFAULT_PREFIX,
        limits: TransferLimits | None = None,
        decode_limits: DecodeLimits = DEFAULT_LIMITS,
        clock: Callable[[], float] = time.monotonic,
        strict_run: bool = True,
    ) -> None:
        if transport.client_id != node_id:
            raise ConfigError(f"node id {node_id!r} must equal the MQTT client id")
        self._inbox_filter = topics.inbox_filter(run, node_id, prefix=prefix)  # validates ids
        self.transport = transport
        self.node_id = node_id
        self.run = run
        self.prefix = prefix
        self.limits = lim = limits or TransferLimits()
        self._clock = clock
        self.stats = MessengerStats()
        self._inbound = Inbound(
            node_id=node_id,
            run=run,
            prefix=prefix,
            limits=lim,
            decode_limits=decode_limits,
            max_payload_bytes=transport.max_payload_bytes,
            stats=self.stats,
            strict_run=strict_run,
        )
        self._cache = ResendCache(
            max_bytes=lim.resend_cache_bytes, max_age_s=lim.resend_cache_age_s
        )
        self._outbound: dict[str, _Outbound] = {}
        # recipient -> (its directed topic, PUBLISH overhead): the same few every round.
        self._directed: dict[str, tuple[str, int]] = {}
        self._queue: asyncio.Queue[Incoming | None] = asyncio.Queue()
        self._sink: Callable[[Incoming], None] | None = None
        self._work = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._control: set[asyncio.Task[None]] = set()
        self._error: BaseException | None = None
        self._closed = True

    # -- lifecycle --------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._closed = False
        self._error = None
        self._queue = asyncio.Queue()
        if isinstance(self.transport, PushReceiver):
            self.transport.set_receiver(self._on_received)
        await self.transport.subscribe(self._inbox_filter)
        self._spawn(self._receive_loop(), "receive")
        self._spawn(self._timer_loop(), "timers")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the background tasks and end `messages`. Idempotent; the transport stays open."""
        self._closed = True
        if isinstance(self.transport, PushReceiver):
            self.transport.set_receiver(None)
        tasks = [*self._tasks, *self._control]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._wake_all()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=f"fedbus[{self.node_id}].{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _wake_all(self) -> None:
        self._queue.put_nowait(None)
        for ob in self._outbound.values():
            ob.wake.set()

    # -- public API -------------------------------------------------------------

    async def subscribe_broadcasts(
        self, sender: str | None = None, channel: str | None = None
    ) -> None:
        """Receive broadcasts of ``sender`` (None: everyone) on ``channel`` (None: all)."""
        filt = topics.broadcast_filter(self.run, sender, channel, prefix=self.prefix)
        await self.transport.subscribe(filt)

    async def unsubscribe_broadcasts(
        self, sender: str | None = None, channel: str | None = None
    ) -> None:
        """Undo `subscribe_broadcasts` with the same arguments."""
        filt = topics.broadcast_filter(self.run, sender, channel, prefix=self.prefix)
        await self.transport.unsubscribe(filt)

    async def send(self, recipient: str, message: Message) -> None:
        """Send ``message`` to ``recipient`` alone; returns when every chunk was published.

        Raises:
            TransferError: the receiver granted no credit within ``credit_timeout_s``.
            TransportError: the transport failed (TransportClosed once closed).
        """
        entry = self._directed.get(recipient)
        if entry is None:
            if len(self._directed) >= _MAX_CACHED_TOPICS:
                self._directed.clear()
            topic = topics.directed(self.run, recipient, self.node_id, prefix=self.prefix)
            entry = self._directed[recipient] = (topic, publish_packet_size(topic, 0))
        topic, overhead = entry
        segments = codec.encode_segments(message)
        size = len(segments[0]) if len(segments) == 1 else sum(len(s) for s in segments)
        if overhead + size <= self.transport.max_payload_bytes:
            await self.transport.publish(topic, _joined(segments))
            self.stats.sent += 1
            return
        transfer = self._new_transfer(segments, message.round, topic)
        now = self._clock()
        self._cache.put(transfer, recipient, now=now)
        ob = _Outbound(transfer, recipient, SendWindow(transfer.count, now=now), asyncio.Event())
        self._outbound[transfer.xfer] = ob
        inflight = _InFlight(self.limits.window)
        try:
            while True:
                for index in ob.window.take():
                    await inflight.add(self._publish_chunk(topic, transfer, index))
                if ob.window.done:
                    break
                await self._await_credit(ob, topic)
            await inflight.drain()
        finally:
            await inflight.cancel()
            del self._outbound[transfer.xfer]
        self.stats.sent += 1

    async def broadcast(self, message: Message, channel: str, *, retain: bool = False) -> None:
        """Publish ``message`` on this node's ``channel`` for every subscriber.

        Large messages are chunked without credits (one sender, many receivers):
        the transport's in-flight window paces them and receivers ask for
        missing chunks again, answered from the resend cache.

        Args:
            message: what to publish.
            channel: the channel level of the topic.
            retain: ask the broker to keep it for later subscribers (a manifest);
                only for a message that fits one packet.

        Raises:
            ValueError: ``retain`` with a message that would need chunks (a
                broker retains one packet; half a transfer would be worse than none).
        """
        topic = topics.broadcast(self.run, self.node_id, channel, prefix=self.prefix)
        segments = codec.encode_segments(message)
        size = sum(len(s) for s in segments)
        fits = publish_packet_size(topic, size) <= self.transport.max_payload_bytes
        if retain and not fits:
            raise ValueError(
                f"cannot retain a {type(message).__name__} of {size} bytes on {topic!r}: "
                "it needs chunks"
            )
        if fits:
            await self.transport.publish(topic, _joined(segments), retain=retain)
        else:
            transfer = self._new_transfer(segments, message.round, topic)
            now = self._clock()
            self._cache.put(transfer, None, now=now)
            # Tracked while streaming so requests for chunks not yet sent are ignored.
            window = SendWindow(transfer.count, now=now)
            self._outbound[transfer.xfer] = _Outbound(transfer, None, window, asyncio.Event())
            inflight = _InFlight(self.limits.window)
            try:
                for index in range(transfer.count):
                    window.next_index = index + 1
                    await inflight.add(self._publish_chunk(topic, transfer, index))
                await inflight.drain()
            finally:
                await inflight.cancel()
                del self._outbound[transfer.xfer]
        self.stats.sent += 1

    async def clear_retained(self, channel: str) -> None:
        """Remove what this node retained on ``channel`` (an empty retained publish)."""
        topic = topics.broadcast(self.run, self.node_id, channel, prefix=self.prefix)
        await self.transport.publish(topic, b"", retain=True)

    def deliver_to(self, sink: Callable[[Incoming], None] | None) -> None:
        """Hand validated messages to ``sink`` as they arrive instead of queueing them.

        ``sink`` runs synchronously in the receive task, so it must not block;
        an exception it raises ends the messenger like a failed transport
        (`messages` raises it). While a sink is set, `messages` yields only
        what was queued before (hand it to the sink too: it came first) and
        then ends (or raises) when the messenger closes, so a node keeps one
        ``async for`` to learn of the end. ``None`` goes back to queueing.

        Why: a queue between the receive task and the node costs a task
        wake-up per message. At 1,000 simulated clients a round is 1,000 such
        wake-ups on one event loop for the model broadcast alone; a client
        that only turns a message into an event for its driver saves them.
        """
        self._sink = sink

    async def messages(self) -> AsyncIterator[Incoming]:
        """Yield validated messages (control traffic is consumed) until closed.

        Raises:
            TransportError: the transport failed underneath.
        """
        while True:
            item = await self._queue.get()
            if item is None:
                self._queue.put_nowait(None)  # let any other reader end too
                if self._error is not None:
                    raise self._error
                return
            yield item

    # -- sending helpers --------------------------------------------------------

    def _new_transfer(
        self, segments: list[codec.Segment], round_: int, topic: str
    ) -> OutgoingTransfer:
        xfer = new_message_id()
        # Resends go to the requester's inbox: size chunks for the longest such topic.
        worst = topics.directed(self.run, "r" * 64, self.node_id, prefix=self.prefix)
        longest = max(topic, worst, key=len)
        data = max_chunk_data(
            self.transport.max_payload_bytes,
            longest,
            run=self.run,
            sender=self.node_id,
            round=round_,
            xfer=xfer,
        )
        return OutgoingTransfer(segments, data, xfer, self.run, self.node_id, round_)

    async def _publish_chunk(self, topic: str, transfer: OutgoingTransfer, index: int) -> None:
        await self.transport.publish(topic, transfer.encoded_chunk(index))
        self.stats.chunks_sent += 1

    async def _await_credit(self, ob: _Outbound, topic: str) -> None:
        lim = self.limits
        while ob.window.credit <= ob.window.next_index:
            if self._closed:
                raise TransportClosed("messenger closed while waiting for credit")
            remaining = lim.credit_timeout_s - ob.window.idle_s(self._clock())
            if remaining <= 0:
                raise TransferError(
                    f"no credit from {ob.recipient!r} for transfer {ob.transfer.xfer} "
                    f"within {lim.credit_timeout_s} s ({ob.window.next_index}/{ob.transfer.count} sent)"
                )
            # Until the first credit, chunk 0 may have been lost: re-send it now and then.
            wait_s = remaining if ob.window.credited else min(remaining, lim.request_gap_s)
            ob.wake.clear()
            try:
                async with asyncio.timeout(wait_s):
                    await ob.wake.wait()
            except TimeoutError:
                if not ob.window.credited and wait_s < remaining:
                    await self._publish_chunk(topic, ob.transfer, 0)
                    self.stats.probes_sent += 1

    async def _resend(self, requester: str, transfer: OutgoingTransfer, indices: list[int]) -> None:
        topic = topics.directed(self.run, requester, self.node_id, prefix=self.prefix)
        try:
            for index in indices:
                if not transfer.intact(index):
                    # The sender changed a tensor after sending it (the chunks are
                    # views of its data): the receiver would drop this chunk anyway.
                    log.warning(
                        "%s: not resending chunk %d of %s: its data changed since it was sent",
                        self.node_id,
                        index,
                        transfer.xfer,
                    )
                    self.stats.dropped["unanswerable_request"] += 1
                    return
                await self._publish_chunk(topic, transfer, index)
                self.stats.chunks_resent += 1
        except Exception:  # a failed resend must not take the messenger down
            log.warning(
                "%s: resend of %s to %s failed",
                self.node_id,
                transfer.xfer,
                requester,
                exc_info=True,
            )

    async def _execute(self, commands: list[Command]) -> None:
        for command in commands:
            if isinstance(command, Publish):
                await self._publish_control(command.topic, codec.encode(command.message))
            else:
                self._execute_local(command)

    def _execute_local(self, command: Command) -> None:
        """Carry out a command that needs no I/O (everything but `Publish`)."""
        if isinstance(command, Deliver):
            if self._sink is not None:
                self.stats.received += 1
                self._sink(command.incoming)
            elif self._queue.qsize() >= self.limits.max_queued_messages:
                self.stats.dropped["overflow"] += 1
            else:
                self._queue.put_nowait(command.incoming)
                self.stats.received += 1
        elif isinstance(command, CreditReceived):
            ob = self._outbound.get(command.xfer)
            if ob is not None and ob.recipient == command.sender:
                ob.window.on_credit(command.upto, now=self._clock())
                ob.wake.set()
        elif isinstance(command, ResendRequested):
            self._on_resend_request(command)

    async def _publish_control(self, topic: str, payload: bytes) -> None:
        """Publish a credit or chunk request without holding up the caller for its PUBACK.

        Why: awaiting the PUBACK inside the receive loop stopped all reading for
        a broker round trip per credit, and the sender's chunks piled up behind it.
        Credits only ever move forward (a late, lower one is ignored) and chunk
        requests are repeated when lost, so their order does not matter.
        """
        if len(self._control) >= _MAX_CONTROL_PUBLISHES:
            await self.transport.publish(topic, payload)
            return
        self._spawn_control(topic, payload)

    def _spawn_control(self, topic: str, payload: bytes) -> None:
        task = asyncio.create_task(
            self._publish_quietly(topic, payload), name=f"fedbus[{self.node_id}].control"
        )
        self._control.add(task)
        task.add_done_callback(self._control.discard)

    async def _publish_quietly(self, topic: str, payload: bytes) -> None:
        try:
            await self.transport.publish(topic, payload)
        except TransportError as exc:  # the receive loop reports a failed transport
            log.debug("%s: control publish to %s failed: %s", self.node_id, topic, exc)

    def _on_resend_request(self, request: ResendRequested) -> None:
        ob = self._outbound.get(request.xfer)
        if ob is not None:
            transfer, recipient, sent = ob.transfer, ob.recipient, ob.window.next_index
        elif (cached := self._cache.get(request.xfer, now=self._clock())) is not None:
            transfer, recipient, sent = cached.transfer, cached.recipient, cached.transfer.count
        else:
            self.stats.dropped["unanswerable_request"] += 1
            return
        indices = sorted({i for i in request.missing if i < sent})
        if recipient not in (None, request.requester) or (
            indices and len(self._tasks) >= _MAX_RESEND_TASKS + 2  # busy: it will ask again
        ):
            self.stats.dropped["unanswerable_request"] += 1
        elif indices:
            self._spawn(self._resend(request.requester, transfer, indices), "resend")

    # -- background tasks -------------------------------------------------------

    def _on_received(self, received: Received) -> None:
        """A message pushed by the transport (`PushReceiver`): handled right here.

        The same work as one pass of `_receive_loop`, without its task's
        wake-up. Control publishes (credits, chunk requests) cannot be awaited
        here and go out in tasks of their own.
        """
        if self._closed:
            return
        try:
            for command in self._inbound.handle(received, now=self._clock()):
                if isinstance(command, Publish):
                    self._spawn_control(command.topic, codec.encode(command.message))
                else:
                    self._execute_local(command)
        except Exception as exc:  # a failing sink: end the messenger like a failed transport
            log.exception("%s: handling a received message failed", self.node_id)
            self._error = exc
            self._closed = True
            self._wake_all()
            return
        if self._inbound.busy:
            self._work.set()

    async def _receive_loop(self) -> None:
        try:
            async for received in self.transport.messages():
                await self._execute(self._inbound.handle(received, now=self._clock()))
                if self._inbound.busy:
                    self._work.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the transport failed: surface it through messages()
            self._error = exc
        self._closed = True
        self._wake_all()

    async def _timer_loop(self) -> None:
        tick_s = self.limits.request_gap_s / 2
        while True:
            if not self._inbound.busy:
                self._work.clear()
                await self._work.wait()
            await asyncio.sleep(tick_s)
            try:
                await self._execute(self._inbound.tick(now=self._clock()))
            except TransportError:
                return  # the receive task sees the failure and reports it


def _joined(segments: list[codec.Segment]) -> bytes:
    """One bytes object of an encoded message's pieces (no copy for a single bytes piece)."""
    if len(segments) == 1 and isinstance(segments[0], bytes):
        return segments[0]
    return b"".join(segments)
