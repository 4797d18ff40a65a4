"""Flow control for chunked transfers. Sans-IO: no asyncio, time is an input.

Why: mosquitto drops QoS 1 messages silently once a subscriber has 1,000
queued, while still acknowledging the publisher (shared notes, section 8).
So the *receiver* must bound what streams to it, and each sender must never
run ahead of what the receiver allowed.

Directed transfers (one sender, one receiver) use credits::

    sender                                       receiver (`CreditGate`)
    chunk 0 (unsolicited) ---------------------> slot free?  yes: ACTIVE, Credit(upto=contiguous+window)
                                                             no:  QUEUED (FIFO, chunk 0 kept),
                          <--------------------- Credit(upto=1)  "held, wait"
    chunks [sent, upto)   ---------------------> each new chunk may slide upto forward
                          <--------------------- Credit(upto') when it moved by >= window/2
    ...                                          on completion/expiry the slot passes to the
                                                 FIFO head, which gets its first Credit

Invariants:
- `SendWindow`: a sender has sent only indices below the highest credit seen
  (index 0 is credited implicitly). Credits never move backwards.
- `CreditGate`: at most ``max_concurrent`` transfers are ACTIVE, at most
  ``max_pending`` QUEUED; a transfer is in one of the two or unknown. Granted
  credit for a transfer never exceeds ``contiguous + window`` at grant time, so
  the receiver's queue holds at most ``max_pending + max_concurrent * window``
  chunks of directed transfers.

Broadcast transfers (one sender, many receivers) cannot be credit-driven;
the sender paces by the transport's in-flight window and receivers ask for
missing chunks again (`fedbus.chunking.Reassembler.poll`).

`ResendCache` keeps what a sender sent recently (bounded by bytes and age) so
it can answer ChunkRequests; `RecentIds` is the bounded duplicate filter.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

from fedbus._types import StateEnum
from fedbus.chunking import OutgoingTransfer, TransferKey
from fedbus.errors import ConfigError

__all__ = [
    "Admission",
    "CachedTransfer",
    "CreditGate",
    "RecentIds",
    "ResendCache",
    "SendWindow",
    "TransferLimits",
]

T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class TransferLimits:
    """Bounds on chunked transfers, both directions.

    Attributes:
        max_message_bytes: largest (reassembled) message accepted.
        max_reassembly_bytes: all reassembly buffers together.
        max_transfers: transfers reassembled at once (directed and broadcast).
        max_concurrent_transfers: directed transfers streaming to this node at once.
        max_pending_transfers: directed transfers waiting for a slot (their
            first chunk is kept); beyond this, first chunks are dropped.
        window: chunks a directed transfer may have beyond the receiver's
            contiguous progress; also the most chunks of one transfer (directed
            or broadcast) awaiting their PUBACK at once (the transport's
            ``max_inflight`` caps the latter too). 32 (32 MB at the default
            packet size) keeps a stream going while a credit crosses a busy
            broker (with 16 the sender sat idle for tens of ms per credit):
            for a 40 MB transfer on 2 shared, noisy cores, 16 reached a
            median 0.62x of raw paho's throughput and 32 0.69x (about 15
            interleaved runs each; 8 had measured 20-30 % slower than 16).
            The cost: a receiver may hold up to this many chunks per
            transfer in its inbox when it falls behind.
        transfer_timeout_s: a reassembly with no progress for this long is freed.
        request_gap_s: idle time before missing chunks are asked for again;
            also how often a sender without any credit re-sends chunk 0.
        max_requests: ChunkRequests per stall.
        credit_timeout_s: a sender waiting this long for a credit gives up
            with TransferError.
        resend_cache_bytes, resend_cache_age_s: what a sender keeps to answer
            ChunkRequests.
        dedupe_size: message ids remembered for duplicate detection.
        max_queued_messages: validated messages waiting for the application;
            beyond this they are dropped and counted as overflow.
    """

    max_message_bytes: int = 1 << 30
    max_reassembly_bytes: int = 2 << 30
    max_transfers: int = 256
    max_concurrent_transfers: int = 8
    max_pending_transfers: int = 4096
    window: int = 32
    transfer_timeout_s: float = 60.0
    request_gap_s: float = 1.0
    max_requests: int = 5
    credit_timeout_s: float = 60.0
    resend_cache_bytes: int = 256 << 20
    resend_cache_age_s: float = 120.0
    dedupe_size: int = 65536
    max_queued_messages: int = 100_000

    def __post_init__(self) -> None:
        for name in (
            "max_message_bytes",
            "max_reassembly_bytes",
            "max_transfers",
            "max_concurrent_transfers",
            "max_pending_transfers",
            "window",
            "max_requests",
            "resend_cache_bytes",
            "dedupe_size",
            "max_queued_messages",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1", path=f"transfer.{name}")
        for name in (
            "transfer_timeout_s",
            "request_gap_s",
            "credit_timeout_s",
            "resend_cache_age_s",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive", path=f"transfer.{name}")


class SendWindow:
    """Sender side of one directed transfer: which chunks may go out now.

    Args:
        count: chunks in the transfer.
        now: start time; `idle_s` measures from the last credit (or this).
    """

    def __init__(self, count: int, *, now: float) -> None:
        self.count = count
        self.next_index = 0  # first chunk not sent yet
        self.credit = 1  # chunk 0 goes unsolicited
        self.credited = False  # any Credit seen yet
        self.last_credit = now

    @property
    def done(self) -> bool:
        """Every chunk has been sent once."""
        return self.next_index >= self.count

    def take(self) -> range:
        """Indices that may be sent now; they count as sent."""
        end = min(self.credit, self.count)
        out = range(self.next_index, end)
        self.next_index = max(self.next_index, end)
        return out

    def on_credit(self, upto: int, *, now: float) -> bool:
        """Record a Credit; returns whether it allows new chunks."""
        self.credited = True
        self.last_credit = now
        if upto > self.credit:
            self.credit = min(upto, self.count)
            return self.credit > self.next_index
        return False

    def idle_s(self, now: float) -> float:
        """Seconds since the last credit (or the start)."""
        return now - self.last_credit


class Admission(StateEnum):
    """What `CreditGate.offer` decided for a new directed transfer."""

    ACTIVE = "active"  # may stream now: send its first credit
    QUEUED = "queued"  # waits in the FIFO; tell the sender to hold
    KNOWN = "known"  # already active or queued (a repeated first chunk)
    FULL = "full"  # FIFO full: drop


@dataclass(slots=True)
class _Grant:
    count: int
    granted: int = 0


class CreditGate(Generic[T]):
    """Receiver side: admits directed transfers and computes their credits.

    ``T`` is whatever the caller keeps for a queued transfer (its first chunk).

    Args:
        max_concurrent: transfers ACTIVE at once.
        window: chunks granted beyond the receiver's contiguous progress.
        max_pending: transfers QUEUED at most.
    """

    def __init__(self, *, max_concurrent: int, window: int, max_pending: int) -> None:
        self.max_concurrent = max_concurrent
        self.window = window
        self.max_pending = max_pending
        self._active: dict[TransferKey, _Grant] = {}
        self._queued: OrderedDict[TransferKey, tuple[int, T]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._active) + len(self._queued)

    def is_active(self, key: TransferKey) -> bool:
        """Whether ``key`` holds a slot."""
        return key in self._active

    def is_queued(self, key: TransferKey) -> bool:
        """Whether ``key`` waits in the FIFO."""
        return key in self._queued

    def queued(self) -> list[TransferKey]:
        """Transfers waiting in the FIFO, oldest first."""
        return list(self._queued)

    def offer(self, key: TransferKey, count: int, held: T) -> Admission:
        """A first chunk of an unknown directed transfer arrived."""
        if key in self._active or key in self._queued:
            return Admission.KNOWN
        if len(self._active) < self.max_concurrent:
            self._active[key] = _Grant(count)
            return Admission.ACTIVE
        if len(self._queued) >= self.max_pending:
            return Admission.FULL
        self._queued[key] = (count, held)
        return Admission.QUEUED

    def credit(self, key: TransferKey, contiguous: int, *, force: bool = False) -> int | None:
        """The new credit for an active transfer, or None if it need not be sent.

        A credit is sent when it moves by at least half a window (or reaches
        the end), so a transfer costs about two credits per window of chunks.
        ``force`` re-sends the current credit (e.g. after a stall: it may be lost).
        """
        grant = self._active.get(key)
        if grant is None:
            return None
        upto = min(grant.count, contiguous + self.window)
        step = max(1, self.window // 2)
        if force or upto >= grant.granted + step or (upto == grant.count > grant.granted):
            grant.granted = max(grant.granted, upto)
            return grant.granted
        return None

    def finish(self, key: TransferKey) -> list[tuple[TransferKey, T]]:
        """Free ``key``'s slot (or FIFO place); return the transfers admitted in its place."""
        self._queued.pop(key, None)
        if self._active.pop(key, None) is None:
            return []
        admitted: list[tuple[TransferKey, T]] = []
        while self._queued and len(self._active) < self.max_concurrent:
            nxt, (count, held) = self._queued.popitem(last=False)
            self._active[nxt] = _Grant(count)
            admitted.append((nxt, held))
        return admitted


@dataclass(frozen=True, slots=True)
class CachedTransfer:
    """A sent transfer kept for resends. ``recipient`` None: a broadcast."""

    transfer: OutgoingTransfer
    recipient: str | None
    sent_at: float


class ResendCache:
    """Recently sent transfers by xfer id, bounded by total bytes and by age."""

    def __init__(self, *, max_bytes: int, max_age_s: float) -> None:
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.bytes = 0
        self._entries: OrderedDict[str, CachedTransfer] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, transfer: OutgoingTransfer, recipient: str | None, *, now: float) -> bool:
        """Keep ``transfer``; False if it alone exceeds the byte bound (not kept)."""
        size = transfer.size
        if size > self.max_bytes:
            return False
        self._evict(now, room=size)
        self._entries[transfer.xfer] = CachedTransfer(transfer, recipient, now)
        self.bytes += size
        return True

    def get(self, xfer: str, *, now: float) -> CachedTransfer | None:
        """The cached transfer, if still young enough."""
        self._evict(now, room=0)
        return self._entries.get(xfer)

    def _evict(self, now: float, *, room: int) -> None:
        while self._entries:
            xfer, oldest = next(iter(self._entries.items()))
            if now - oldest.sent_at < self.max_age_s and self.bytes + room <= self.max_bytes:
                return
            del self._entries[xfer]
            self.bytes -= oldest.transfer.size


class RecentIds:
    """Bounded LRU of recently seen message keys (duplicate detection)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()

    def seen(self, key: tuple[str, str]) -> bool:
        """Return True if ``key`` was seen recently; remember it either way."""
        if key in self._seen:
            self._seen.move_to_end(key)
            return True
        self._seen[key] = None
        if len(self._seen) > self.size:
            self._seen.popitem(last=False)
        return False
