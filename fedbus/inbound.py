"""The receiving side of a messenger, sans-IO: validation, reassembly, credits.

`Inbound` takes each message the transport delivered (`handle`) and the
passing of time (`tick`), both with ``now``, and returns commands for the
I/O layer (`fedbus.transport.messenger.Messenger`) to carry out:

- `Deliver`: a validated application message (control kinds are consumed here);
- `Publish`: a control message to send (Credit, ChunkRequest);
- `CreditReceived`, `ResendRequested`: news for the sending side, which owns
  the send windows and the resend cache.

Checks, in order; a failed one drops the message and counts the reason in
``stats.dropped`` (see `DROP_REASONS`), never raising: topic parses and is
ours, run, size, decode, envelope run (unless ``strict_run`` is off), envelope
sender == topic sender level, message id not seen recently. An empty payload
(a retained message being cleared) is ignored without counting.

Chunks: a directed transfer's first chunk asks `fedbus.flow.CreditGate` for a
slot (ACTIVE: reassemble and grant credit; QUEUED: keep the chunk, tell the
sender to hold with Credit(upto=1)); broadcast chunks go straight to the
`fedbus.chunking.Reassembler`. When a transfer ends (completed, failed,
expired) its slot passes to the oldest queued transfer. `tick` re-requests
missing chunks of stalled transfers (and repeats their last credit, which
may have been lost) and frees expired ones.

Invariant: every live transfer is in the reassembler or queued in the gate;
``_origin`` holds the topic of each live transfer's first accepted chunk and
nothing else, so the delivered message carries the topic it was sent on.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Final, NamedTuple

from fedbus import codec, topics
from fedbus.chunking import Fed, Reassembler, Status, TransferKey
from fedbus.codec import DecodeLimits
from fedbus.errors import DecodeError, IncompatibleVersion
from fedbus.flow import Admission, CreditGate, RecentIds, TransferLimits
from fedbus.messages import AnyMessage, Chunk, ChunkRequest, Credit, Message
from fedbus.topics import Topic
from fedbus.transport.base import Received

__all__ = [
    "DROP_REASONS",
    "SHARED_DECODES",
    "Command",
    "CreditReceived",
    "Deliver",
    "Inbound",
    "Incoming",
    "MessengerStats",
    "Publish",
    "ResendRequested",
    "SharedDecodes",
]

DROP_REASONS: Final = (
    "malformed",  # DecodeError
    "incompatible_version",  # IncompatibleVersion
    "not_fedbus_topic",  # the topic does not parse, or is another node's inbox
    "foreign_run",  # topic or envelope of another run
    "sender_mismatch",  # envelope sender != topic sender level
    "duplicate",  # message id seen recently
    "corrupt_chunk",  # CRC or geometry of a chunk is wrong
    "corrupt_transfer",  # all chunks arrived but the chunk-table digest differs
    "transfer_expired",  # reassembly made no progress for transfer_timeout_s
    "transfer_refused",  # reassembly budget or flow-control queue full
    "oversize",  # above max_message_bytes / decode limits
    "overflow",  # the application is not reading messages(): queue full
    "unanswerable_request",  # ChunkRequest for a transfer not (or no longer) ours to resend
)

CONTROL_ROUND: Final = 0
"""Round number carried by control messages (credits, chunk requests)."""


class Incoming(NamedTuple):
    """A validated message and the parsed topic it came on."""

    topic: Topic
    message: AnyMessage


@dataclass(slots=True)
class MessengerStats:
    """Counters of one messenger; ``dropped`` maps a reason to a count."""

    sent: int = 0
    received: int = 0
    chunks_sent: int = 0
    chunks_resent: int = 0
    chunks_received: int = 0
    duplicate_chunks: int = 0
    transfers_completed: int = 0
    credits_sent: int = 0
    chunk_requests_sent: int = 0
    chunk_requests_received: int = 0
    probes_sent: int = 0
    dropped: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True, slots=True)
class Deliver:
    """Hand a validated message to the application."""

    incoming: Incoming


@dataclass(frozen=True, slots=True)
class Publish:
    """Publish a control message."""

    topic: str
    message: Message


@dataclass(frozen=True, slots=True)
class CreditReceived:
    """``sender`` granted credit up to ``upto`` for our transfer ``xfer``."""

    sender: str
    xfer: str
    upto: int


@dataclass(frozen=True, slots=True)
class ResendRequested:
    """``requester`` asks us for chunks ``missing`` of our transfer ``xfer`` again."""

    requester: str
    xfer: str
    missing: list[int]


Command = Deliver | Publish | CreditReceived | ResendRequested


SharedKey = tuple[tuple[int, int, int], bytes]
"""A `SharedDecodes` key: the decode limits' values and the payload.

The limits as a tuple of ints rather than the `DecodeLimits` object: a
dataclass hashes in Python code, and the key is hashed once per receiver of
every broadcast (1,000 a round at 1,000 simulated clients).
"""


class SharedDecodes:
    """The last few decoded broadcasts, shared by every `Inbound` of this process.

    Why: ``fedbus run`` hosts every client of a federation in one process, and
    each of them receives the same model broadcast and manifest; at 1,000
    clients, decoding the 1,000-id ``selected`` list of each copy was the
    largest single cost of a round (about 40 us per copy). Equal payload bytes
    decode to equal messages (decoding is a pure function of the bytes and the
    limits), and a decoded message is immutable (frozen structs; tensors are
    read-only views of the ``bytes``), so receivers can share one. Only
    broadcasts (``out`` topics) whose payload is ``bytes`` are cached:
    directed messages reach one receiver, and a ``bytearray`` or view could
    change under the cache. Failed decodes are not cached, so every receiver
    counts its own drop. Bounded by entries and bytes; oldest out first.
    """

    def __init__(self, *, max_entries: int = 32, max_bytes: int = 16 << 20) -> None:
        self._max_entries, self._max_bytes = max_entries, max_bytes
        self._entries: dict[SharedKey, AnyMessage] = {}
        self._bytes = 0
        self._lock = threading.Lock()  # nodes may run event loops in several threads

    def get(self, key: SharedKey) -> AnyMessage | None:
        """The message decoded from these bytes under these limits, if still cached."""
        return self._entries.get(key)

    def put(self, key: SharedKey, message: AnyMessage, size: int) -> None:
        """Remember ``message`` (``size`` payload bytes); evict the oldest beyond the bounds."""
        if size > self._max_bytes:
            return
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = message
            self._bytes += size
            while len(self._entries) > self._max_entries or self._bytes > self._max_bytes:
                oldest = next(iter(self._entries))
                del self._entries[oldest]
                self._bytes -= len(oldest[1])

    def clear(self) -> None:
        """Forget everything (tests)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0


SHARED_DECODES: Final = SharedDecodes()
"""The process-wide cache `Inbound` decodes broadcasts through."""


class Inbound:
    """Receiving state of one node.

    Args:
        node_id: this node's id; messages for other inboxes are dropped.
        run: the run id.
        prefix: topic prefix.
        limits: transfer bounds.
        decode_limits: bounds for decoding one message.
        max_payload_bytes: the transport's packet limit (sizes ChunkRequests).
        stats: counters to update (shared with the sending side).
        strict_run: drop messages whose envelope run differs from ``run``.
            False makes ``run`` only the topic namespace: the envelope run is
            then the protocol machines' business (they learn it, and count
            foreign runs with a reason of their own).
    """

    def __init__(
        self,
        *,
        node_id: str,
        run: str,
        prefix: str,
        limits: TransferLimits,
        decode_limits: DecodeLimits,
        max_payload_bytes: int,
        stats: MessengerStats,
        strict_run: bool = True,
    ) -> None:
        self.node_id, self.run, self.prefix = node_id, run, prefix
        self.strict_run = strict_run
        self.stats = stats
        self._decode_limits = decode_limits
        self._limits_key = (
            decode_limits.max_bytes,
            decode_limits.max_tensors,
            decode_limits.max_tensor_bytes,
        )
        self._reasm = Reassembler(
            max_transfers=limits.max_transfers,
            max_bytes=limits.max_reassembly_bytes,
            timeout_s=limits.transfer_timeout_s,
            max_message_bytes=limits.max_message_bytes,
            request_gap_s=limits.request_gap_s,
            max_requests=limits.max_requests,
        )
        self._gate: CreditGate[tuple[Topic, Chunk]] = CreditGate(
            max_concurrent=limits.max_concurrent_transfers,
            window=limits.window,
            max_pending=limits.max_pending_transfers,
        )
        self._recent = RecentIds(limits.dedupe_size)
        self._origin: dict[TransferKey, Topic] = {}
        self._admitted: list[tuple[TransferKey, tuple[Topic, Chunk]]] = []
        # When each queued transfer was last told to hold: the hold is repeated
        # every request_gap_s, because a sender counts its credit deadline from
        # the last credit it saw and would otherwise give up while it waits.
        self._held_at: dict[TransferKey, float] = {}
        # False while no transfer can be open (no chunk since `busy` last found
        # none): the messenger asks `busy` after every message (1,000 a round).
        self._chunked = False
        self._hold_every_s = limits.request_gap_s
        # Indices of one ChunkRequest must fit a packet (at most 5 bytes each).
        self._request_limit = max(1, min(65536, (max_payload_bytes - 1024) // 5))

    @property
    def busy(self) -> bool:
        """Whether any transfer is open (so `tick` has work)."""
        if not self._chunked:
            return False  # no chunk since the last check found nothing open: cheap
        self._chunked = bool(len(self._reasm) or len(self._gate))
        return self._chunked

    def handle(self, received: Received, *, now: float) -> list[Command]:
        """Process one delivered message."""
        out: list[Command] = []
        topic = topics.parse(received.topic, prefix=self.prefix)
        if topic is None or (topic.form == "to" and topic.recipient != self.node_id):
            self._drop("not_fedbus_topic")
        elif topic.run != self.run:
            self._drop("foreign_run")
        elif not received.payload:
            pass  # a retained message being cleared: nothing to deliver, nothing wrong
        elif len(received.payload) > self._decode_limits.max_bytes:
            self._drop("oversize")
        else:
            payload = received.payload
            if topic.form == "out" and type(payload) is bytes:
                message = self._decode_shared(payload)
            else:
                message = self._decode(payload)
            if message is not None:
                self._on_message(topic, message, now, out)
        if self._admitted:
            self._admit(now, out)
        return out

    def tick(self, *, now: float) -> list[Command]:
        """Expire idle transfers; ask again for chunks of stalled ones."""
        out: list[Command] = []
        polled = self._reasm.poll(now)
        for key in polled.expired:
            self._drop("transfer_expired")
            self._finish(key)
        for key in polled.stalled:
            below = None
            if self._gate.is_active(key):
                below = self._gate.credit(key, self._reasm.contiguous(key), force=True)
                if below is not None:  # the last credit may have been lost: repeat it
                    out.append(self._credit(key, below))
            missing = self._reasm.missing(key, below=below, limit=self._request_limit)
            if missing:
                self.stats.chunk_requests_sent += 1
                request = ChunkRequest(
                    run=self.run,
                    round=CONTROL_ROUND,
                    sender=self.node_id,
                    xfer=key[1],
                    missing=missing,
                )
                out.append(Publish(self._reply_topic(key[0]), request))
        for key in self._gate.queued():
            if now - self._held_at.get(key, now) >= self._hold_every_s:
                self._held_at[key] = now
                out.append(self._credit(key, 1))
        self._admit(now, out)
        return out

    # -- internals ----------------------------------------------------------------

    def _drop(self, reason: str) -> None:
        self.stats.dropped[reason] += 1

    def _decode(self, payload: bytes | memoryview) -> AnyMessage | None:
        try:
            return codec.decode(payload, limits=self._decode_limits)
        except IncompatibleVersion:
            self._drop("incompatible_version")
        except DecodeError:
            self._drop("malformed")
        return None

    def _decode_shared(self, payload: bytes) -> AnyMessage | None:
        """`_decode` through the process-wide cache of broadcast decodes (`SharedDecodes`)."""
        key = (self._limits_key, payload)
        message = SHARED_DECODES.get(key)
        if message is None:
            message = self._decode(payload)
            if message is not None:
                SHARED_DECODES.put(key, message, len(payload))
        return message

    def _reply_topic(self, recipient: str) -> str:
        return topics.directed(self.run, recipient, self.node_id, prefix=self.prefix)

    def _on_message(
        self, topic: Topic, message: AnyMessage, now: float, out: list[Command]
    ) -> None:
        if self.strict_run and message.run != self.run:
            return self._drop("foreign_run")
        if message.sender != topic.sender:
            return self._drop("sender_mismatch")
        if self._recent.seen((message.sender, message.id)):
            return self._drop("duplicate")
        if isinstance(message, Chunk):
            self._on_chunk(topic, message, now, out)
        elif isinstance(message, Credit):
            if topic.form == "to":
                out.append(CreditReceived(message.sender, message.xfer, message.upto))
        elif isinstance(message, ChunkRequest):
            self.stats.chunk_requests_received += 1
            if topic.form == "to":
                out.append(ResendRequested(message.sender, message.xfer, message.missing))
        else:
            out.append(Deliver(Incoming(topic, message)))

    def _on_chunk(self, topic: Topic, chunk: Chunk, now: float, out: list[Command]) -> None:
        self._chunked = True  # transfers may be open: `busy` looks again
        self.stats.chunks_received += 1
        key = (chunk.sender, chunk.xfer)
        if topic.form == "to" and key not in self._reasm and not self._gate.is_active(key):
            # The first chunk of a directed transfer: it streams only with a slot.
            refused = self._reasm.check(chunk, sender=chunk.sender)
            if refused is not None:
                return self._after_feed(Fed(refused, key), topic, now, out)
            admission = self._gate.offer(key, chunk.count, (topic, chunk))
            if admission is Admission.ACTIVE:
                self._after_feed(self._reasm.feed(chunk, sender=key[0], now=now), topic, now, out)
            elif admission is Admission.QUEUED:
                self._held_at[key] = now
                out.append(self._credit(key, 1))  # "held": the sender stops probing
            elif admission is Admission.KNOWN:
                self.stats.duplicate_chunks += 1
            else:
                self._drop("transfer_refused")
            return
        self._after_feed(self._reasm.feed(chunk, sender=key[0], now=now), topic, now, out)

    def _after_feed(self, fed: Fed, topic: Topic, now: float, out: list[Command]) -> None:
        key, status = fed.key, fed.status
        if status is Status.ACCEPTED:
            self._origin.setdefault(key, topic)  # the message counts as sent on its first topic
            upto = self._gate.credit(key, self._reasm.contiguous(key))
            if upto is not None:
                out.append(self._credit(key, upto))
            return
        if status is Status.DUPLICATE:
            self.stats.duplicate_chunks += 1
            return
        reason = {
            Status.CORRUPT: "corrupt_chunk",
            Status.OVERSIZE: "oversize",
            Status.REFUSED: "transfer_refused",
            Status.DIGEST_MISMATCH: "corrupt_transfer",
        }.get(status)
        if reason is not None:
            self._drop(reason)
        if status is Status.CORRUPT:
            return  # nothing held for it; a live transfer will ask for it again
        origin = self._finish(key) or topic
        if status is Status.COMPLETED and fed.payload is not None:
            self.stats.transfers_completed += 1
            message = self._decode(fed.payload)
            if isinstance(message, Chunk | Credit | ChunkRequest):
                self._drop("malformed")  # control messages are never chunked
            elif message is not None:
                self._on_message(origin, message, now, out)

    def _finish(self, key: TransferKey) -> Topic | None:
        self._admitted.extend(self._gate.finish(key))
        self._held_at.pop(key, None)
        return self._origin.pop(key, None)

    def _admit(self, now: float, out: list[Command]) -> None:
        # Transfers let in by finished ones, oldest first; feeding their first
        # chunk sends their first credit (and may finish them, admitting more).
        while self._admitted:
            self._chunked = True
            key, (topic, chunk) = self._admitted.pop(0)
            self._held_at.pop(key, None)
            self._after_feed(self._reasm.feed(chunk, sender=key[0], now=now), topic, now, out)

    def _credit(self, key: TransferKey, upto: int) -> Publish:
        self.stats.credits_sent += 1
        credit = Credit(
            run=self.run, round=CONTROL_ROUND, sender=self.node_id, xfer=key[1], upto=upto
        )
        return Publish(self._reply_topic(key[0]), credit)
