"""Chunking and reassembly (sans-IO) and the flow-control pieces."""

from __future__ import annotations

import hashlib
import random
import zlib

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedbus import codec, topics
from fedbus.chunking import (
    OutgoingTransfer,
    Reassembler,
    Status,
    max_chunk_data,
    publish_packet_size,
    split,
)
from fedbus.config import AWS_IOT_MAX_PAYLOAD_BYTES, DEFAULT_MAX_PAYLOAD_BYTES
from fedbus.flow import Admission, CreditGate, RecentIds, ResendCache, SendWindow
from fedbus.messages import Chunk, ModelUpdate, Tensor

RUN, SENDER = "run-1", "client-7"


def make_reassembler(**kw: float) -> Reassembler:
    args: dict[str, float] = {
        "max_transfers": 8,
        "max_bytes": 1 << 20,
        "timeout_s": 10.0,
        "max_message_bytes": 1 << 20,
        "request_gap_s": 1.0,
        "max_requests": 3,
    }
    args.update(kw)
    return Reassembler(**args)  # type: ignore[arg-type]


def chunks_of(payload: bytes, size: int, xfer: str = "x1") -> list[Chunk]:
    return split(payload, max_chunk_data=size, xfer=xfer, run=RUN, sender=SENDER)


def wire(chunk: Chunk) -> Chunk:
    """Round-trip through the codec, as a receiver sees it."""
    decoded = codec.decode(codec.encode(chunk))
    assert isinstance(decoded, Chunk)
    return decoded


def corrupt(chunk: Chunk) -> Chunk:
    data = bytearray(chunk.data)
    data[0] ^= 0xFF
    return msgspec.structs.replace(chunk, data=memoryview(bytes(data)))


@pytest.mark.parametrize("limit", [DEFAULT_MAX_PAYLOAD_BYTES, AWS_IOT_MAX_PAYLOAD_BYTES, 4096])
def test_chunks_fit_the_packet_limit(limit: int) -> None:
    topic = topics.directed(RUN, "r" * 64, SENDER)
    xfer = "0123456789abcdef"
    size = max_chunk_data(limit, topic, run=RUN, sender=SENDER, round=2**31, xfer=xfer)
    payload = bytes(3 * size + 1)
    t = OutgoingTransfer(payload, size, xfer, RUN, SENDER, 2**31)
    for chunk in t.chunks():
        assert publish_packet_size(topic, len(codec.encode(chunk))) <= limit
    assert size > limit * 0.95 - 400  # the overhead stays small


def test_max_chunk_data_refuses_a_tiny_limit() -> None:
    with pytest.raises(ValueError, match="no room"):
        max_chunk_data(100, "t", run=RUN, sender=SENDER, xfer="x")


def test_split_is_views_and_complete() -> None:
    payload = bytes(range(256)) * 10
    chunks = chunks_of(payload, 1000)
    assert [c.index for c in chunks] == [0, 1, 2]
    assert {c.count for c in chunks} == {3}
    assert b"".join(bytes(c.data) for c in chunks) == payload
    table = len(payload).to_bytes(8, "big") + b"".join(
        zlib.crc32(payload[i : i + 1000]).to_bytes(4, "big") for i in range(0, len(payload), 1000)
    )
    # Only the last chunk carries the chunk-table digest (wire format section 8).
    assert [c.digest for c in chunks] == [b"", b"", hashlib.sha256(table).digest()]
    assert len({c.id for c in chunks}) == 3  # one message id per chunk
    assert chunks_of(b"", 10)[0].count == 1


def test_reassembles_in_order() -> None:
    payload = random.Random(0).randbytes(5000)
    r = make_reassembler()
    results = [r.feed(wire(c), sender=SENDER, now=0.0) for c in chunks_of(payload, 1024)]
    assert [f.status for f in results] == [Status.ACCEPTED] * 4 + [Status.COMPLETED]
    done = results[-1].payload
    assert done is not None
    assert done.readonly
    assert bytes(done) == payload
    assert len(r) == 0
    assert r.bytes_reserved == 0
    # A late copy of a finished transfer is a duplicate and allocates nothing.
    assert r.feed(chunks_of(payload, 1024)[0], sender=SENDER, now=1.0).status is Status.DUPLICATE
    assert len(r) == 0


@settings(max_examples=150, deadline=None)
@given(
    payload=st.binary(max_size=4000),
    chunk_size=st.integers(1, 700),
    seed=st.integers(0, 2**32),
    dup_fraction=st.floats(0, 1),
)
def test_any_order_with_duplicates_is_bit_exact(
    payload: bytes, chunk_size: int, seed: int, dup_fraction: float
) -> None:
    rng = random.Random(seed)
    chunks = chunks_of(payload, chunk_size)
    stream = chunks + [c for c in chunks if rng.random() < dup_fraction]
    rng.shuffle(stream)
    r = make_reassembler(max_bytes=10_000, max_message_bytes=5000)
    completed = []
    for c in stream:
        fed = r.feed(c, sender=SENDER, now=0.0)
        assert fed.status in (Status.ACCEPTED, Status.DUPLICATE, Status.COMPLETED)
        assert r.bytes_reserved <= r.max_bytes
        if fed.status is Status.COMPLETED:
            completed.append(fed.payload)
    assert len(completed) == 1
    assert bytes(completed[0]) == payload
    assert r.bytes_reserved == 0


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=12),
    seed=st.integers(0, 2**32),
)
def test_memory_bound_never_exceeded(sizes: list[int], seed: int) -> None:
    rng = random.Random(seed)
    r = make_reassembler(max_bytes=5000, max_transfers=3, max_message_bytes=2500)
    stream = [c for i, n in enumerate(sizes) for c in chunks_of(rng.randbytes(n), 400, f"x{i}")]
    rng.shuffle(stream)
    for c in stream:
        fed = r.feed(c, sender=SENDER, now=0.0)
        assert r.bytes_reserved <= 5000
        assert len(r) <= 3
        if fed.status is Status.COMPLETED:
            assert fed.payload is not None
        if len(c.data) and c.size > 2500:
            assert fed.status in (Status.OVERSIZE, Status.DUPLICATE)


def test_corrupt_chunk_rejected_then_recovered() -> None:
    payload = random.Random(1).randbytes(3000)
    chunks = chunks_of(payload, 1000)
    r = make_reassembler()
    assert r.feed(chunks[0], sender=SENDER, now=0.0).status is Status.ACCEPTED
    assert r.feed(corrupt(chunks[1]), sender=SENDER, now=0.0).status is Status.CORRUPT
    assert r.missing((SENDER, "x1")) == [1, 2]
    r.feed(chunks[2], sender=SENDER, now=0.0)
    fed = r.feed(chunks[1], sender=SENDER, now=0.0)
    assert fed.status is Status.COMPLETED
    assert bytes(fed.payload or b"") == payload
    assert r.counts["corrupt"] == 1


def test_corrupt_first_chunk_allocates_nothing() -> None:
    r = make_reassembler()
    assert r.feed(corrupt(chunks_of(bytes(3000), 1000)[0]), sender=SENDER, now=0).status is (
        Status.CORRUPT
    )
    assert len(r) == 0
    assert r.bytes_reserved == 0


def test_inconsistent_geometry_is_corrupt() -> None:
    good = chunks_of(bytes(3000), 1000)
    r = make_reassembler()
    r.feed(good[0], sender=SENDER, now=0.0)
    other_len = chunks_of(bytes(3000), 1500)[1]  # same transfer id, other chunk length
    assert r.feed(other_len, sender=SENDER, now=0.0).status is Status.CORRUPT
    r2 = make_reassembler()
    bad_last = msgspec.structs.replace(good[2], size=3001)
    assert r2.feed(bad_last, sender=SENDER, now=0.0).status is Status.CORRUPT


def test_digest_mismatch_fails_the_transfer() -> None:
    chunks = chunks_of(bytes(2000), 1000)
    r = make_reassembler()
    wrong = [msgspec.structs.replace(c, digest=bytes(32)) for c in chunks]
    r.feed(wrong[0], sender=SENDER, now=0.0)
    assert r.feed(wrong[1], sender=SENDER, now=0.0).status is Status.DIGEST_MISMATCH
    assert len(r) == 0
    assert r.bytes_reserved == 0


def test_digest_is_taken_from_whichever_chunk_carries_it() -> None:
    payload = bytes(range(256)) * 20
    chunks = [wire(c) for c in chunks_of(payload, 1000)]
    assert [len(c.digest) for c in chunks] == [0, 0, 0, 0, 0, 32]
    for order in (range(6), [5, 0, 1, 2, 3, 4], [2, 5, 4, 0, 3, 1]):
        r = make_reassembler()
        feds = [r.feed(chunks[i], sender=SENDER, now=0.0) for i in order]
        assert [f.status for f in feds] == [Status.ACCEPTED] * 5 + [Status.COMPLETED]
        assert feds[-1].payload == payload
    # Senders may still put the digest in every chunk.
    digest = chunks[-1].digest
    r = make_reassembler()
    feds = [
        r.feed(msgspec.structs.replace(c, digest=digest), sender=SENDER, now=0.0) for c in chunks
    ]
    assert feds[-1].status is Status.COMPLETED


def test_two_different_digests_are_corrupt() -> None:
    chunks = chunks_of(bytes(3000), 1000)
    other = bytes(range(32))
    r = make_reassembler()
    assert (
        r.feed(msgspec.structs.replace(chunks[0], digest=other), sender=SENDER, now=0.0).status
        is Status.ACCEPTED
    )
    assert r.feed(chunks[1], sender=SENDER, now=0.0).status is Status.ACCEPTED
    assert r.feed(chunks[2], sender=SENDER, now=0.0).status is Status.CORRUPT
    assert r.missing(("client-7", "x1")) == [2]
    # The other way round: the last chunk first, then a non-last one that disagrees.
    r = make_reassembler()
    assert r.feed(chunks[2], sender=SENDER, now=0.0).status is Status.ACCEPTED
    bad = msgspec.structs.replace(chunks[0], digest=other)
    assert r.feed(bad, sender=SENDER, now=0.0).status is Status.CORRUPT


def test_wrong_digest_in_last_chunk_fails_the_transfer() -> None:
    chunks = chunks_of(bytes(2000), 1000)
    r = make_reassembler()
    assert r.feed(chunks[0], sender=SENDER, now=0.0).status is Status.ACCEPTED
    wrong = msgspec.structs.replace(chunks[1], digest=bytes(32))
    assert r.feed(wrong, sender=SENDER, now=0.0).status is Status.DIGEST_MISMATCH


def test_digest_lengths_other_than_0_or_32_are_rejected() -> None:
    chunks = chunks_of(bytes(2000), 1000)
    with pytest.raises(ValueError, match="digest"):
        msgspec.structs.replace(chunks[1], digest=b"")  # required in the last chunk
    for n in (1, 31, 33):
        with pytest.raises(ValueError, match="digest"):
            msgspec.structs.replace(chunks[0], digest=bytes(n))
    for c in chunks:  # and on the wire
        raw = msgspec.msgpack.decode(codec.encode(c))
        for n in [1, 31, 33] if c.index == 0 else [0, 1, 31, 33]:
            with pytest.raises(codec.DecodeError):
                codec.decode(msgspec.msgpack.encode({**raw, "digest": bytes(n)}))


def test_sender_computes_crcs_as_it_builds_chunks() -> None:
    payload = bytes(range(256)) * 40
    t = OutgoingTransfer(payload, 1000, "x1", RUN, SENDER)
    assert t._crcs == [None] * t.count  # no pass over the payload up front
    first = codec.decode(t.encoded_chunk(0))
    assert isinstance(first, Chunk)
    assert first.digest == b""
    assert first.crc == zlib.crc32(payload[:1000])
    assert t._crcs[1:] == [None] * (t.count - 1)
    last = t.chunk(t.count - 1)  # computes the CRCs still missing
    assert last.digest == chunks_of(payload, 1000)[-1].digest
    assert None not in t._crcs
    assert t.chunk(0).digest == b""  # resends of non-last chunks stay as they were


def test_size_limits_refuse_without_allocating() -> None:
    r = make_reassembler(max_message_bytes=1000, max_bytes=2500, max_transfers=2)
    big = chunks_of(bytes(1001), 500, "big")[0]
    assert r.feed(big, sender=SENDER, now=0.0).status is Status.OVERSIZE
    r.feed(chunks_of(bytes(1000), 500, "a")[0], sender=SENDER, now=0.0)
    r.feed(chunks_of(bytes(1000), 500, "b")[0], sender=SENDER, now=0.0)
    refused = r.feed(chunks_of(bytes(10), 5, "c")[0], sender=SENDER, now=0.0)
    assert refused.status is Status.REFUSED
    assert len(r) == 2
    assert r.bytes_reserved == 2 * (1000 + 2)


def test_transfers_of_different_senders_do_not_collide() -> None:
    r = make_reassembler()
    a, b = chunks_of(b"a" * 20, 10), chunks_of(b"b" * 20, 10)  # same xfer id
    r.feed(a[0], sender="A", now=0.0)
    r.feed(b[0], sender="B", now=0.0)
    assert bytes(r.feed(a[1], sender="A", now=0.0).payload or b"") == b"a" * 20
    assert bytes(r.feed(b[1], sender="B", now=0.0).payload or b"") == b"b" * 20


def test_poll_reports_stalls_then_expires() -> None:
    r = make_reassembler(timeout_s=10.0, request_gap_s=1.0, max_requests=2)
    chunks = chunks_of(bytes(4000), 1000)
    r.feed(chunks[0], sender=SENDER, now=0.0)
    r.feed(chunks[2], sender=SENDER, now=0.0)
    key = (SENDER, "x1")
    assert r.poll(0.5).stalled == []
    assert r.poll(1.0).stalled == [key]
    assert r.missing(key) == [1, 3]
    assert r.missing(key, below=2) == [1]
    assert r.poll(1.5).stalled == []  # at most every request_gap_s
    assert r.poll(2.0).stalled == [key]
    assert r.poll(3.0).stalled == []  # max_requests per stall
    r.feed(chunks[1], sender=SENDER, now=4.0)  # progress resets the retries
    assert r.contiguous(key) == 3
    assert r.poll(5.0).stalled == [key]
    polled = r.poll(14.0)
    assert polled.expired == [key]
    assert len(r) == 0
    assert r.counts["expired"] == 1
    assert r.feed(chunks[3], sender=SENDER, now=15.0).status is Status.DUPLICATE


def test_send_window_obeys_credit() -> None:
    w = SendWindow(10, now=0.0)
    assert list(w.take()) == [0]
    assert list(w.take()) == []
    assert w.on_credit(4, now=1.0) is True
    assert list(w.take()) == [1, 2, 3]
    assert w.on_credit(3, now=2.0) is False  # never backwards
    assert w.idle_s(5.0) == 3.0
    w.on_credit(100, now=6.0)
    assert list(w.take()) == list(range(4, 10))
    assert w.done


def test_credit_gate_bounds_active_transfers_fifo() -> None:
    gate: CreditGate[str] = CreditGate(max_concurrent=2, window=4, max_pending=2)
    keys = [("s", f"x{i}") for i in range(5)]
    assert [gate.offer(k, 10, k[1]) for k in keys] == [
        Admission.ACTIVE,
        Admission.ACTIVE,
        Admission.QUEUED,
        Admission.QUEUED,
        Admission.FULL,
    ]
    assert gate.offer(keys[2], 10, "again") is Admission.KNOWN
    assert gate.credit(keys[0], 1) == 5
    assert gate.credit(keys[0], 2) is None  # moved by less than half a window
    assert gate.credit(keys[0], 3) == 7
    assert gate.credit(keys[0], 3, force=True) == 7
    assert gate.credit(keys[2], 1) is None  # queued: no credit
    assert gate.finish(keys[0]) == [(keys[2], "x2")]
    assert gate.is_active(keys[2])
    assert gate.is_queued(keys[3])
    assert gate.finish(keys[3]) == []  # a queued transfer leaving frees no slot
    assert len(gate) == 2


def test_resend_cache_bounded_by_bytes_and_age() -> None:
    cache = ResendCache(max_bytes=2500, max_age_s=10.0)

    def t(x: str) -> OutgoingTransfer:
        return OutgoingTransfer(bytes(1000), 100, x, RUN, SENDER)

    assert cache.put(t("a"), "r", now=0.0)
    assert cache.put(t("b"), None, now=1.0)
    assert cache.put(t("c"), None, now=2.0)  # evicts "a"
    assert cache.get("a", now=2.0) is None
    assert cache.bytes == 2000
    assert cache.get("b", now=11.5) is None  # too old
    assert cache.get("c", now=11.5) is not None
    assert not cache.put(OutgoingTransfer(bytes(3000), 100, "d", RUN, SENDER), None, now=12.0)


def test_recent_ids_is_a_bounded_lru() -> None:
    ids = RecentIds(2)
    assert not ids.seen(("a", "1"))
    assert ids.seen(("a", "1"))
    ids.seen(("a", "2"))
    ids.seen(("a", "3"))
    assert not ids.seen(("a", "1"))  # forgotten


# -- segmented payloads (codec.encode_segments) ------------------------------------------


def _segmented(sizes: list[int]) -> tuple[list[codec.Segment], bytes]:
    rng = np.random.default_rng(sum(sizes))
    weights = {
        f"t{i}": Tensor.from_array(rng.random(n, dtype=np.float32)) for i, n in enumerate(sizes)
    }
    message = ModelUpdate(run=RUN, round=1, sender=SENDER, weights=weights, num_examples=1)
    return codec.encode_segments(message), codec.encode(message)


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.sampled_from([1, 5000, 16384, 40000]), min_size=1, max_size=4),
    st.sampled_from([1, 7, 1000, 65536, 65537, 100_000, 1 << 20]),
)
def test_segmented_transfer_matches_whole_payload(sizes: list[int], chunk_data: int) -> None:
    segments, whole = _segmented(sizes)
    seg = OutgoingTransfer(segments, chunk_data, "x1", RUN, SENDER, 1)
    ref = OutgoingTransfer(whole, chunk_data, "x1", RUN, SENDER, 1)
    assert (seg.size, seg.count, seg.crcs, seg.digest) == (
        ref.size,
        ref.count,
        ref.crcs,
        ref.digest,
    )
    for i in range(seg.count):
        chunk = seg.chunk(i)
        assert bytes(chunk.data) == bytes(ref.chunk(i).data)
        encoded = seg.encoded_chunk(i)
        again = codec.decode(encoded)
        assert isinstance(again, Chunk)
        # The same bytes as the plain encoder, but for the fresh message id.
        assert encoded == codec.encode(msgspec.structs.replace(chunk, id=again.id))
        assert seg.intact(i)


def test_encoded_chunks_reassemble_bit_exact() -> None:
    segments, whole = _segmented([300_000, 3, 50_000])
    t = OutgoingTransfer(segments, 100_000, "x2", RUN, SENDER, 1)
    r = make_reassembler(max_bytes=1 << 22, max_message_bytes=1 << 22)
    fed = None
    for i in reversed(range(t.count)):
        chunk = codec.decode(t.encoded_chunk(i))
        assert isinstance(chunk, Chunk)
        fed = r.feed(chunk, sender=SENDER, now=0.0)
    assert fed is not None
    assert fed.status is Status.COMPLETED
    assert fed.payload is not None
    assert bytes(fed.payload) == whole
    assert fed.payload.readonly


def test_empty_and_bytes_payloads_encode_like_the_codec() -> None:
    for payload in (b"", b"abc", bytearray(b"xyz" * 1000), memoryview(bytes(2500))):
        t = OutgoingTransfer(payload, 1000, "x3", RUN, SENDER)
        assert t.size == len(payload)
        for i in range(t.count):
            encoded = t.encoded_chunk(i)
            again = codec.decode(encoded)
            assert isinstance(again, Chunk)
            assert encoded == codec.encode(msgspec.structs.replace(t.chunk(i), id=again.id))


def test_intact_notices_a_changed_tensor() -> None:
    arr = np.zeros(100_000, dtype=np.float32)
    message = ModelUpdate(
        run=RUN, round=1, sender=SENDER, weights={"w": Tensor.from_array(arr)}, num_examples=1
    )
    t = OutgoingTransfer(codec.encode_segments(message), 100_000, "x4", RUN, SENDER, 1)
    assert all(t.intact(i) for i in range(t.count))
    arr[-1] = 1.0  # the transfer's segments are views of arr
    assert not t.intact(t.count - 1)
    assert t.intact(0)
