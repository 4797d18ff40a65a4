"""Messenger chunked transfers through a real mosquitto that enforces the packet cap itself.

The brokers here run with ``max_packet_size`` set (``ManagedBroker(max_payload_bytes=...)``),
so a chunk one byte too large would cost the sender its connection: the
transfers below pass only if every PUBLISH fits. Faults are injected with
`faults.FaultyTransport`: a dropped publish never reaches the broker, a
receive-side drop is a message the broker delivered but the node lost.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import numpy as np
import pytest
from faults import Fault, FaultyTransport, chunk_matching

from fedbus import topics
from fedbus.broker import ManagedBroker
from fedbus.config import AWS_IOT_MAX_PAYLOAD_BYTES, DEFAULT_MAX_PAYLOAD_BYTES, BrokerConfig
from fedbus.errors import TransportError
from fedbus.flow import TransferLimits
from fedbus.messages import Chunk, ModelBroadcast, ModelUpdate, Tensor
from fedbus.transport.base import Transport, publish_packet_size
from fedbus.transport.messenger import Incoming, Messenger
from fedbus.transport.mqtt import MqttTransport

pytestmark = [pytest.mark.integration]

WAIT_S = 20.0
# A short request gap so a lost chunk is asked for again quickly; the other
# deadlines are generous: they bound a hang, not the speed of the machine.
LIMITS = TransferLimits(request_gap_s=0.25, transfer_timeout_s=30.0, credit_timeout_s=30.0)


@pytest.fixture(scope="module")
def broker_1mb(mosquitto: ManagedBroker) -> Iterator[ManagedBroker]:
    """A mosquitto whose max_packet_size is fedbus's default 1,000,000 bytes.

    Depends on the session ``mosquitto`` fixture for its skip-or-fail rule only.
    """
    broker = ManagedBroker(kind="mosquitto", max_payload_bytes=DEFAULT_MAX_PAYLOAD_BYTES)
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture(scope="module")
def broker_aws(mosquitto: ManagedBroker) -> Iterator[ManagedBroker]:
    """A mosquitto capped like AWS IoT Core: 131,072 bytes per packet."""
    broker = ManagedBroker(kind="mosquitto", max_payload_bytes=AWS_IOT_MAX_PAYLOAD_BYTES)
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


def model_update(n_floats: int, *, run: str, sender: str) -> tuple[ModelUpdate, bytes]:
    """An update of ``n_floats`` random float32 and the exact bytes of its tensor."""
    arr = np.random.default_rng(7).standard_normal(n_floats, dtype=np.float32)
    return ModelUpdate(run=run, sender=sender, weights={"w": Tensor.from_array(arr)}), arr.tobytes()


def tensor_bytes(item: Incoming) -> bytes:
    message = item.message
    assert isinstance(message, ModelUpdate | ModelBroadcast)
    return bytes(message.weights["w"].data)


async def receive_one(m: Messenger) -> Incoming:
    async with asyncio.timeout(WAIT_S):
        async for item in m.messages():
            return item
    raise AssertionError("messages() ended before a message arrived")


@contextlib.asynccontextmanager
async def messenger(
    config: BrokerConfig,
    node_id: str,
    run: str,
    prefix: str,
    **faults: list[Fault],
) -> AsyncIterator[tuple[Messenger, FaultyTransport]]:
    """A Messenger over MqttTransport, always through a (recording) FaultyTransport."""
    async with MqttTransport(config, node_id) as inner:
        transport: Transport = inner
        faulty = FaultyTransport(transport, record=True, **faults)
        async with Messenger(faulty, node_id=node_id, run=run, prefix=prefix, limits=LIMITS) as m:
            yield m, faulty


def chunks_published(faulty: FaultyTransport, index: int) -> list[tuple[str, Chunk]]:
    """(topic, chunk) of every publish of chunk ``index`` that went through the wrapper.

    Read from the wrapper's log rather than ``stats.chunks_resent``, which
    counts a resend only once the broker acknowledged it.
    """
    return [
        (e.topic, e.message)
        for e in faulty.log
        if e.direction == "publish" and isinstance(e.message, Chunk) and e.message.index == index
    ]


def packet_sizes(faulty: FaultyTransport) -> list[int]:
    return [publish_packet_size(e.topic, e.size) for e in faulty.log if e.direction == "publish"]


@pytest.mark.timeout(30)
async def test_broker_cap_is_enforced_by_mosquitto(
    broker_1mb: ManagedBroker, unique_prefix: str
) -> None:
    # The tests below rely on the broker refusing oversize packets; check it does.
    # The client is configured above the cap, so only the broker stops the packet.
    loose = broker_1mb.client_config(max_payload_bytes=4_000_000)
    topic = f"{unique_prefix}/x"
    async with (
        MqttTransport(broker_1mb.client_config(), f"{unique_prefix}-sub") as sub,
        MqttTransport(loose, f"{unique_prefix}-pub") as pub,
    ):
        await sub.subscribe(f"{unique_prefix}/#")
        async with asyncio.timeout(WAIT_S):
            with pytest.raises(TransportError, match="died"):
                await pub.publish(topic, bytes(DEFAULT_MAX_PAYLOAD_BYTES + 1))
            await pub.publish(topic, b"marker")  # waits for the reconnection
            got = await anext(sub.messages())
        assert got.payload == b"marker"  # the oversize packet was never delivered


@pytest.mark.timeout(60)
async def test_50mb_update_through_1mb_broker_recovers_a_dropped_chunk(
    broker_1mb: ManagedBroker, unique_prefix: str
) -> None:
    # Prepare: 12.5M float32 (50 MB); chunk 17 of the transfer never reaches the broker.
    run = f"r-{unique_prefix}"
    msg, expected = model_update(12_500_000, run=run, sender=f"{unique_prefix}-client")
    config = broker_1mb.client_config()
    assert config.max_payload_bytes == DEFAULT_MAX_PAYLOAD_BYTES
    drop = Fault("drop", chunk_matching(index=17, form="to", prefix=unique_prefix))
    async with (
        messenger(config, f"{unique_prefix}-server", run, unique_prefix) as (server, _),
        messenger(config, f"{unique_prefix}-client", run, unique_prefix, publish=[drop]) as (
            client,
            faulty,
        ),
    ):
        # Execute
        async with asyncio.timeout(WAIT_S):
            await client.send(server.node_id, msg)
        got = await receive_one(server)

    # Assert: bit-exact, recovered by a ChunkRequest, every packet under the cap.
    assert isinstance(got.message, ModelUpdate)
    assert got.message.id == msg.id
    assert got.topic.sender == client.node_id
    assert tensor_bytes(got) == expected
    assert faulty.counts == {"publish.drop": 1}
    assert server.stats.chunk_requests_sent >= 1
    assert client.stats.chunk_requests_received >= 1
    # The original never went through (dropped): what did is the resend.
    assert len(chunks_published(faulty, 17)) >= 1
    assert server.stats.transfers_completed == 1
    assert not server.stats.dropped
    sizes = packet_sizes(faulty)
    assert len(sizes) >= 50  # 50 MB in chunks of just under 1 MB
    assert max(sizes) <= DEFAULT_MAX_PAYLOAD_BYTES


@pytest.mark.timeout(60)
async def test_broadcast_subscriber_missing_a_chunk_recovers_it(
    broker_1mb: ManagedBroker, unique_prefix: str
) -> None:
    # Prepare: a 20 MB model broadcast to three subscribers; the broker delivers
    # chunk 5 to c1, which loses it (a receive-side drop), and only to c1.
    run = f"r-{unique_prefix}"
    arr = np.random.default_rng(3).standard_normal(5_000_000, dtype=np.float32)
    server_id = f"{unique_prefix}-server"
    model = ModelBroadcast(
        run=run, round=1, sender=server_id, weights={"w": Tensor.from_array(arr)}
    )
    config = broker_1mb.client_config()
    lose = Fault("drop", chunk_matching(index=5, form="out", prefix=unique_prefix))
    ids = [f"{unique_prefix}-c{i}" for i in range(3)]
    async with contextlib.AsyncExitStack() as stack:
        server, server_faults = await stack.enter_async_context(
            messenger(config, server_id, run, unique_prefix)
        )
        subs: list[tuple[Messenger, FaultyTransport]] = []
        for node in ids:
            faults = {"receive": [lose]} if node == ids[1] else {}
            subs.append(
                await stack.enter_async_context(
                    messenger(config, node, run, unique_prefix, **faults)
                )
            )
        for m, _ in subs:
            await m.subscribe_broadcasts(server_id, "model")

        # Execute
        async with asyncio.timeout(WAIT_S):
            await server.broadcast(model, "model")
        got = [await receive_one(m) for m, _ in subs]

    # Assert: everyone bit-exact; c1 lost one chunk and asked the server for it.
    for item in got:
        assert item.topic.form == "out"
        assert item.topic.channel == "model"
        assert item.message.id == model.id
        assert tensor_bytes(item) == arr.tobytes()
    lossy, lossy_faults = subs[1]
    assert lossy_faults.counts == {"receive.drop": 1}
    assert lossy.stats.chunk_requests_sent >= 1
    assert server.stats.chunk_requests_received >= 1
    # Chunk 5 went out once to everyone, then again to c1 alone (its inbox).
    topics_of_5 = [topic for topic, _ in chunks_published(server_faults, 5)]
    assert topics_of_5[0] == topics.broadcast(run, server_id, "model", prefix=unique_prefix)
    assert topics.directed(run, ids[1], server_id, prefix=unique_prefix) in topics_of_5[1:]
    for m, _ in subs:
        assert not m.stats.dropped


@pytest.mark.timeout(30)
async def test_corrupt_chunk_is_rejected_and_requested_again(
    broker_1mb: ManagedBroker, unique_prefix: str
) -> None:
    # Prepare: chunk 2 of a 4 MB update leaves with one bit of its data flipped
    # (its crc unchanged): the broker carries it, the receiver must refuse it.
    run = f"r-{unique_prefix}"
    msg, expected = model_update(1_000_000, run=run, sender=f"{unique_prefix}-client")
    config = broker_1mb.client_config()
    corrupt = Fault("corrupt", chunk_matching(index=2, form="to", prefix=unique_prefix))
    async with (
        messenger(config, f"{unique_prefix}-server", run, unique_prefix) as (server, _),
        messenger(config, f"{unique_prefix}-client", run, unique_prefix, publish=[corrupt]) as (
            client,
            faulty,
        ),
    ):
        # Execute
        async with asyncio.timeout(WAIT_S):
            await client.send(server.node_id, msg)
        got = await receive_one(server)

    # Assert
    assert tensor_bytes(got) == expected
    assert faulty.counts == {"publish.corrupt": 1}
    assert server.stats.dropped == {"corrupt_chunk": 1}
    assert server.stats.chunk_requests_sent >= 1
    assert client.stats.chunk_requests_received >= 1
    assert len(chunks_published(faulty, 2)) >= 2  # the corrupted one, then the resend


@pytest.mark.timeout(30)
async def test_aws_preset_through_a_131072_byte_broker(
    broker_aws: ManagedBroker, unique_prefix: str
) -> None:
    # Prepare: the AWS IoT-class preset against a broker enforcing the same cap.
    run = f"r-{unique_prefix}"
    client_id, server_id = f"{unique_prefix}-client", f"{unique_prefix}-server"
    msg, expected = model_update(1_000_000, run=run, sender=client_id)  # 4 MB
    model = ModelBroadcast(run=run, sender=server_id, weights=msg.weights)
    config = broker_aws.client_config(max_payload_bytes=AWS_IOT_MAX_PAYLOAD_BYTES)
    async with (
        messenger(config, server_id, run, unique_prefix) as (server, server_faults),
        messenger(config, client_id, run, unique_prefix) as (client, client_faults),
    ):
        await client.subscribe_broadcasts(server_id, "model")
        # Execute: one directed transfer up, one broadcast down.
        async with asyncio.timeout(WAIT_S):
            await asyncio.gather(client.send(server_id, msg), server.broadcast(model, "model"))
        up = await receive_one(server)
        down = await receive_one(client)

    # Assert
    assert tensor_bytes(up) == expected
    assert tensor_bytes(down) == expected
    for faulty in (server_faults, client_faults):
        sizes = packet_sizes(faulty)
        assert max(sizes) <= AWS_IOT_MAX_PAYLOAD_BYTES
    assert client.stats.chunks_sent >= 4_000_000 // AWS_IOT_MAX_PAYLOAD_BYTES
    assert server.stats.chunks_sent >= 4_000_000 // AWS_IOT_MAX_PAYLOAD_BYTES
    assert not server.stats.dropped
    assert not client.stats.dropped
