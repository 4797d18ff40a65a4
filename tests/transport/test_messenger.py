"""Messenger over MemoryTransport: chunking, flow control, recovery, validation."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import msgspec
import numpy as np
import pytest

from fedbus import codec, topics
from fedbus.config import AWS_IOT_MAX_PAYLOAD_BYTES
from fedbus.errors import ConfigError, TransferError
from fedbus.flow import TransferLimits
from fedbus.messages import Chunk, Heartbeat, ModelBroadcast, ModelUpdate, Tensor
from fedbus.transport.memory import MemoryBus
from fedbus.transport.messenger import Incoming, Messenger, _InFlight

RUN = "run-1"
FAST = TransferLimits(request_gap_s=0.05, transfer_timeout_s=5.0, credit_timeout_s=5.0)


@contextlib.asynccontextmanager
async def network(
    *ids: str, max_payload_bytes: int = 1_000_000, limits: TransferLimits = FAST, **bus_kw: int
) -> AsyncIterator[tuple[MemoryBus, dict[str, Messenger]]]:
    bus = MemoryBus(**bus_kw)
    async with contextlib.AsyncExitStack() as stack:
        nodes: dict[str, Messenger] = {}
        for node_id in ids:
            t = await stack.enter_async_context(
                bus.transport(node_id, max_payload_bytes=max_payload_bytes)
            )
            nodes[node_id] = await stack.enter_async_context(
                Messenger(t, node_id=node_id, run=RUN, limits=limits)
            )
        yield bus, nodes


async def receive(m: Messenger, n: int, *, timeout_s: float = 20.0) -> list[Incoming]:
    out: list[Incoming] = []
    async with asyncio.timeout(timeout_s):
        async for item in m.messages():
            out.append(item)
            if len(out) == n:
                break
    return out


def model(n_floats: int, *, sender: str, seed: int = 0) -> tuple[ModelUpdate, np.ndarray]:
    arr = np.random.default_rng(seed).standard_normal(n_floats).astype(np.float32)
    return ModelUpdate(run=RUN, sender=sender, weights={"w": Tensor.from_array(arr)}), arr


def weights_of(item: Incoming) -> np.ndarray:
    msg = item.message
    assert isinstance(msg, ModelUpdate | ModelBroadcast)
    return msg.weights["w"].array


async def settled(pred: Callable[[], bool], *, timeout_s: float = 5.0) -> bool:
    """Whether ``pred`` holds within ``timeout_s``.

    A sender counts a chunk after its publish returns, and the memory bus
    hands a message to its receiver inside that publish: the receiver may
    hold the whole message before the sender has counted the last chunk.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            while not pred():  # noqa: ASYNC110 (a counter, not an event, changes)
                await asyncio.sleep(0.001)
    return pred()


def chunk_index(payload: bytes) -> int | None:
    try:
        msg = codec.decode(payload)
    except Exception:
        return None
    return msg.index if isinstance(msg, Chunk) else None


def once(pred: Callable[[str, bytes], bool]) -> Callable[[str, bytes], bool]:
    fired: list[bool] = []

    def hook(topic: str, payload: bytes) -> bool:
        if not fired and pred(topic, payload):
            fired.append(True)
            return True
        return False

    return hook


async def test_node_id_must_be_client_id() -> None:
    with pytest.raises(ConfigError):
        Messenger(MemoryBus().transport("a"), node_id="b", run=RUN)


async def test_small_directed_messages_keep_order() -> None:
    async with network("a", "b") as (_, m):
        for i in range(20):
            await m["a"].send("b", Heartbeat(run=RUN, sender="a", round=i))
        got = await receive(m["b"], 20)
        assert [x.message.round for x in got] == list(range(20))
        assert got[0].topic == topics.parse(topics.directed(RUN, "b", "a"))
        assert m["a"].stats.chunks_sent == 0


@pytest.mark.parametrize("max_payload_bytes", [1_000_000, AWS_IOT_MAX_PAYLOAD_BYTES])
async def test_large_directed_transfer_is_bit_exact(max_payload_bytes: int) -> None:
    msg, arr = model(5_000_000, sender="a")  # 20 MB
    async with network("a", "b", max_payload_bytes=max_payload_bytes) as (bus, m):
        await m["a"].send("b", msg)
        (got,) = await receive(m["b"], 1)
        assert np.array_equal(weights_of(got), arr)
        assert got.message.id == msg.id
        assert m["b"].stats.transfers_completed == 1
        assert m["a"].stats.chunks_sent >= 20_000_000 // max_payload_bytes
        depth = bus.stats.client("b").max_queue_depth
        assert depth <= FAST.window + 2  # credits bound what streams to b
        assert not m["b"].stats.dropped


async def test_broadcast_model_to_twenty_subscribers() -> None:
    msg, arr = model(250_000, sender="server")  # 1 MB in 64 KiB chunks
    clients = [f"c{i}" for i in range(20)]
    async with network("server", *clients, max_payload_bytes=65536) as (_, m):
        for c in clients:
            await m[c].subscribe_broadcasts("server", "model")
        await m["server"].broadcast(msg, "model")
        for c in clients:
            (got,) = await receive(m[c], 1)
            assert got.topic.form == "out"
            assert got.topic.channel == "model"
            assert np.array_equal(weights_of(got), arr)
        assert m["server"].stats.chunks_resent == 0


async def test_dropped_chunk_recovered_by_chunk_request() -> None:
    msg, arr = model(100_000, sender="a")  # 400 KB in 64 KiB chunks
    async with network("a", "b", max_payload_bytes=65536) as (bus, m):
        bus.drop = once(lambda topic, payload: chunk_index(payload) == 2)
        await m["a"].send("b", msg)
        (got,) = await receive(m["b"], 1)
        assert np.array_equal(weights_of(got), arr)
        assert bus.stats.dropped_by_hook == 1
        assert m["b"].stats.chunk_requests_sent >= 1
        assert await settled(lambda: m["a"].stats.chunks_resent >= 1)


async def test_dropped_broadcast_chunk_resent_directed_to_requester() -> None:
    msg, arr = model(100_000, sender="server")
    async with network("server", "c0", "c1", max_payload_bytes=65536) as (bus, m):
        for c in ("c0", "c1"):
            await m[c].subscribe_broadcasts("server", "model")
        # Chunk 3 is lost for every subscriber: each asks the server, which answers each directly.
        bus.drop = once(lambda topic, payload: chunk_index(payload) == 3)
        await m["server"].broadcast(msg, "model")
        for c in ("c0", "c1"):
            (got,) = await receive(m[c], 1)
            assert np.array_equal(weights_of(got), arr)
        # Each receiver asked for chunk 3.
        assert await settled(lambda: m["server"].stats.chunks_resent == 2)
        await asyncio.sleep(0.05)
        assert m["server"].stats.chunks_resent == 2


async def test_corrupt_chunk_dropped_and_requested_again() -> None:
    msg, arr = model(100_000, sender="a")

    def flip(topic: str, payload: bytes) -> bytes:
        if chunk_index(payload) != 1 or flipped:
            return payload
        flipped.append(True)
        chunk = codec.decode(payload)
        assert isinstance(chunk, Chunk)
        data = bytearray(chunk.data)
        data[10] ^= 0x01
        return codec.encode(msgspec.structs.replace(chunk, data=memoryview(bytes(data))))

    flipped: list[bool] = []
    async with network("a", "b", max_payload_bytes=65536) as (bus, m):
        bus.tamper = flip
        await m["a"].send("b", msg)
        (got,) = await receive(m["b"], 1)
        assert np.array_equal(weights_of(got), arr)
        assert m["b"].stats.dropped["corrupt_chunk"] == 1
        assert m["b"].stats.chunk_requests_sent >= 1


async def test_many_senders_bounded_by_receiver_credit() -> None:
    # Prepare: 50 senders, each an update of 5 chunks, a server admitting 4 at once.
    limits = TransferLimits(
        request_gap_s=2.0,
        transfer_timeout_s=20,
        credit_timeout_s=20,
        max_concurrent_transfers=4,
        window=2,
    )
    senders = [f"c{i}" for i in range(50)]
    async with network("server", *senders, max_payload_bytes=4096, limits=limits) as (bus, m):
        updates = {s: model(4000, sender=s, seed=i) for i, s in enumerate(senders)}  # 16 KB
        # Execute
        async with asyncio.timeout(30):
            await asyncio.gather(*(m[s].send("server", updates[s][0]) for s in senders))
            got = await receive(m["server"], 50)
        # Assert: all bit-exact, and the server's queue stayed far below 50 x 5 chunks.
        assert {x.topic.sender for x in got} == set(senders)
        for x in got:
            assert np.array_equal(weights_of(x), updates[x.topic.sender][1])
        chunks_per_update = m["c0"].stats.chunks_sent
        assert chunks_per_update >= 5
        depth = bus.stats.client("server").max_queue_depth
        assert depth <= len(senders) + 4 * limits.window + 4
        assert depth < len(senders) * chunks_per_update // 2
        assert bus.stats.dropped_queue_full == 0


async def test_queue_limit_would_lose_chunks_without_credit() -> None:
    # The same pattern as above through a broker queue of 60: credits keep it lossless.
    limits = TransferLimits(request_gap_s=2.0, max_concurrent_transfers=2, window=2)
    senders = [f"c{i}" for i in range(40)]
    async with network(
        "server", *senders, max_payload_bytes=4096, limits=limits, max_queued_messages=60
    ) as (bus, m):
        msgs = [model(4000, sender=s, seed=i)[0] for i, s in enumerate(senders)]
        async with asyncio.timeout(30):
            await asyncio.gather(
                *(m[s].send("server", msg) for s, msg in zip(senders, msgs, strict=True))
            )
            got = await receive(m["server"], 40)
        assert len(got) == 40
        assert bus.stats.dropped_queue_full == 0


async def test_invalid_messages_are_dropped_and_counted() -> None:
    async with network("b") as (bus, m):
        async with bus.transport("a") as raw:
            to_b = topics.directed(RUN, "b", "a")
            good = Heartbeat(run=RUN, sender="a")
            await raw.publish(to_b, codec.encode(Heartbeat(run=RUN, sender="mallory")))
            await raw.publish(to_b, codec.encode(Heartbeat(run="other", sender="a")))
            await raw.publish(topics.directed("other", "b", "a"), codec.encode(good))
            await raw.publish(to_b, b"\xc1 not msgpack")
            await raw.publish(to_b, codec.encode(good))
            await raw.publish(to_b, codec.encode(good))  # a duplicate by message id
            await raw.publish(to_b, codec.encode(msgspec.structs.replace(good, v=99)))
            await raw.publish(to_b, codec.encode(Heartbeat(run=RUN, sender="a")))
            got = await receive(m["b"], 2)
        assert next(x.message.id for x in got) == good.id
        assert dict(m["b"].stats.dropped) == {
            "sender_mismatch": 1,
            "foreign_run": 1,
            "malformed": 1,
            "duplicate": 1,
            "incompatible_version": 1,
        }


async def test_bus_duplicates_are_dropped() -> None:
    msg, arr = model(50_000, sender="a")
    async with network("a", "b", max_payload_bytes=65536, duplicate_probability=1) as (_, m):
        await m["a"].send("b", Heartbeat(run=RUN, sender="a"))
        await m["a"].send("b", msg)
        got = await receive(m["b"], 2)
        assert np.array_equal(weights_of(got[1]), arr)
        assert m["b"].stats.dropped["duplicate"] >= 2
        await asyncio.sleep(0.01)
        assert m["b"].stats.received == 2


async def test_credit_deadline_raises_transfer_error() -> None:
    limits = TransferLimits(credit_timeout_s=0.3, request_gap_s=0.1)
    msg, _ = model(100_000, sender="a")
    async with network("a", max_payload_bytes=65536, limits=limits) as (_, m):
        async with asyncio.timeout(5):
            with pytest.raises(TransferError, match="no credit"):
                await m["a"].send("nobody", msg)
        assert m["a"].stats.probes_sent >= 1  # chunk 0 was offered again meanwhile


async def test_lost_first_chunk_recovered_by_probe() -> None:
    msg, arr = model(100_000, sender="a")
    async with network("a", "b", max_payload_bytes=65536) as (bus, m):
        bus.drop = once(lambda topic, payload: chunk_index(payload) == 0)
        await m["a"].send("b", msg)
        (got,) = await receive(m["b"], 1)
        assert np.array_equal(weights_of(got), arr)
        assert m["a"].stats.probes_sent >= 1


async def test_messages_ends_on_close() -> None:
    async with network("a") as (_, m):
        task = asyncio.create_task(receive(m["a"], 1))
        await asyncio.sleep(0)
        await m["a"].aclose()
        assert await asyncio.wait_for(task, 2) == []


async def test_inflight_add_starts_each_publish_before_returning() -> None:
    # A credit lets many chunks go at once; each must reach the transport
    # before the next is built, not all in one pass of the event loop (the
    # socket sat idle meanwhile: chunk 1 of a 40 MB stream came 25-65 ms late).
    started: list[int] = []

    async def publish(i: int) -> None:
        started.append(i)
        await asyncio.sleep(0.01)

    inflight = _InFlight(4)
    try:
        for i in range(6):
            await inflight.add(publish(i))
            assert started == list(range(i + 1))
        await inflight.drain()
    finally:
        await inflight.cancel()
