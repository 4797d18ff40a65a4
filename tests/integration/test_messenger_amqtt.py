"""The Messenger over the amqtt fallback broker (MQTT 3.1.1 only, no size limits).

Small on purpose: amqtt is slow, and it runs here to show that nothing in
fedbus's chunking or flow control needs mosquitto or MQTT 5.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from faults import Fault, FaultyTransport, chunk_matching

from fedbus.broker import ManagedBroker
from fedbus.flow import TransferLimits
from fedbus.messages import Chunk, Heartbeat, ModelBroadcast, ModelUpdate, Tensor
from fedbus.transport.messenger import Incoming, Messenger
from fedbus.transport.mqtt import MqttTransport

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

WAIT_S = 15.0
LIMITS = TransferLimits(request_gap_s=0.25, transfer_timeout_s=20.0, credit_timeout_s=20.0)


async def receive(m: Messenger, n: int) -> list[Incoming]:
    out: list[Incoming] = []
    async with asyncio.timeout(WAIT_S):
        async for item in m.messages():
            out.append(item)
            if len(out) == n:
                break
    return out


async def test_chunked_transfers_over_amqtt(
    amqtt_broker: ManagedBroker, unique_prefix: str
) -> None:
    # Prepare: 400 KB in 64 KiB chunks, both ways; one chunk of the update is lost.
    run = f"r-{unique_prefix}"
    server_id, client_id = f"{unique_prefix}-server", f"{unique_prefix}-client"
    config = amqtt_broker.client_config(max_payload_bytes=65536)
    arr = np.random.default_rng(5).standard_normal(100_000, dtype=np.float32)
    weights = {"w": Tensor.from_array(arr)}
    model = ModelBroadcast(run=run, round=1, sender=server_id, weights=weights)
    update = ModelUpdate(run=run, round=1, sender=client_id, weights=weights, reply_to=model.id)
    drop = Fault("drop", chunk_matching(index=3, form="to", prefix=unique_prefix))
    client_faults = FaultyTransport(MqttTransport(config, client_id), publish=[drop], record=True)
    async with (
        MqttTransport(config, server_id) as ts,
        Messenger(ts, node_id=server_id, run=run, prefix=unique_prefix, limits=LIMITS) as server,
        client_faults,
        Messenger(
            client_faults,
            node_id=client_id,
            run=run,
            prefix=unique_prefix,
            limits=LIMITS,
        ) as client,
    ):
        assert ts.protocol == "3.1.1"
        await client.subscribe_broadcasts(server_id, "model")

        # Execute
        async with asyncio.timeout(WAIT_S):
            await server.broadcast(model, "model")
        (down,) = await receive(client, 1)
        async with asyncio.timeout(WAIT_S):
            await client.send(server_id, update)
            await client.send(server_id, Heartbeat(run=run, sender=client_id))
        # The heartbeat may overtake the update: the update completes only
        # once its lost chunk was sent again.
        got = {type(item.message): item.message for item in await receive(server, 2)}

    # Assert
    assert isinstance(down.message, ModelBroadcast)
    assert bytes(down.message.weights["w"].data) == arr.tobytes()
    up = got[ModelUpdate]
    assert isinstance(up, ModelUpdate)
    assert up.reply_to == model.id
    assert bytes(up.weights["w"].data) == arr.tobytes()
    assert set(got) == {ModelUpdate, Heartbeat}
    # The lost chunk was asked for and sent again (the original is not in the log).
    assert client.stats.chunk_requests_received >= 1
    assert any(
        isinstance(e.message, Chunk) and e.message.index == 3
        for e in client_faults.log
        if e.direction == "publish"
    )
    assert not server.stats.dropped
    assert not client.stats.dropped
