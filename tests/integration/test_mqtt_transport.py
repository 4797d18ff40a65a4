"""MqttTransport against a real mosquitto (and amqtt for the 3.1.1 fallback)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt
import pytest

from fedbus.broker import ManagedBroker
from fedbus.errors import PayloadTooLargeError, TransportClosed
from fedbus.transport.base import Received, packet_overhead
from fedbus.transport.mqtt import MqttTransport

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

WAIT_S = 10.0


async def _next(stream: AsyncIterator[Received]) -> Received:
    async with asyncio.timeout(WAIT_S):
        return await anext(stream)


async def test_round_trip_with_wildcards(mosquitto: ManagedBroker, unique_prefix: str) -> None:
    config = mosquitto.client_config()
    async with (
        MqttTransport(config, f"{unique_prefix}-sub") as sub,
        MqttTransport(config, f"{unique_prefix}-pub") as pub,
    ):
        assert sub.protocol == "5"  # mosquitto speaks MQTT 5: "auto" keeps it
        await sub.subscribe(f"{unique_prefix}/+/update")
        await sub.subscribe(f"{unique_prefix}/model/#", qos=0)
        stream = sub.messages()

        await pub.publish(f"{unique_prefix}/node-1/update", b"u1")
        await pub.publish(f"{unique_prefix}/node-1/other", b"not matched")
        await pub.publish(f"{unique_prefix}/model/3/chunk/0", b"m", qos=1)
        await pub.publish(f"{unique_prefix}/node-2/update", b"u2", qos=0)

        got = [await _next(stream) for _ in range(3)]
    assert got == [
        Received(f"{unique_prefix}/node-1/update", b"u1", qos=1, retain=False),
        Received(f"{unique_prefix}/model/3/chunk/0", b"m", qos=0, retain=False),
        Received(f"{unique_prefix}/node-2/update", b"u2", qos=0, retain=False),
    ]
    assert pub.stats.published == 4
    assert sub.stats.received == 3
    assert sub.stats.dropped == 0


async def test_retained_message_reaches_a_late_subscriber(
    mosquitto: ManagedBroker, unique_prefix: str
) -> None:
    config = mosquitto.client_config()
    topic = f"{unique_prefix}/manifest"
    async with MqttTransport(config, f"{unique_prefix}-pub") as pub:
        await pub.publish(topic, b"round 7", retain=True)
    async with MqttTransport(config, f"{unique_prefix}-late") as late:
        await late.subscribe(f"{unique_prefix}/#")
        got = await _next(late.messages())
        assert got == Received(topic, b"round 7", qos=1, retain=True)
        await late.publish(topic, b"", retain=True)  # clear it for reruns


@pytest.mark.parametrize("size", [1 << 20, 4 << 20], ids=["1MiB", "4MiB"])
async def test_large_payloads(mosquitto: ManagedBroker, unique_prefix: str, size: int) -> None:
    config = mosquitto.client_config(max_payload_bytes=8 << 20)
    payload = os.urandom(size)
    topic = f"{unique_prefix}/big"
    async with (
        MqttTransport(config, f"{unique_prefix}-sub") as sub,
        MqttTransport(config, f"{unique_prefix}-pub") as pub,
    ):
        await sub.subscribe(topic)
        await pub.publish(topic, payload)
        got = await _next(sub.messages())
    assert got.payload == payload


async def test_oversize_publish_is_refused_before_sending(
    mosquitto: ManagedBroker, unique_prefix: str
) -> None:
    config = mosquitto.client_config(max_payload_bytes=4096)
    topic = f"{unique_prefix}/x"
    limit = 4096 - packet_overhead(topic)
    async with (
        MqttTransport(config, f"{unique_prefix}-sub") as sub,
        MqttTransport(config, f"{unique_prefix}-pub") as pub,
    ):
        await sub.subscribe(topic)
        with pytest.raises(PayloadTooLargeError):
            await pub.publish(topic, bytes(limit + 1))
        await pub.publish(topic, bytes(limit))  # the largest that fits goes through
        got = await _next(sub.messages())
        assert len(got.payload) == limit  # the refused one never reached the broker
        assert pub.stats.published == 1


async def test_fallback_to_311_against_amqtt(
    amqtt_broker: ManagedBroker, unique_prefix: str
) -> None:
    config = amqtt_broker.client_config(protocol="auto")  # the fixture pins 3.1.1; undo that
    async with (
        MqttTransport(config, f"{unique_prefix}-sub") as sub,
        MqttTransport(config, f"{unique_prefix}-pub") as pub,
    ):
        assert sub.protocol == "3.1.1"
        await sub.subscribe(f"{unique_prefix}/#")
        await pub.publish(f"{unique_prefix}/a", b"hello 3.1.1")
        got = await _next(sub.messages())
    assert (got.topic, got.payload) == (f"{unique_prefix}/a", b"hello 3.1.1")


async def test_inflight_window_bounds_pending_publishes(
    mosquitto: ManagedBroker, unique_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Count the aiomqtt publish calls in progress: each one awaits its PUBACK.
    pending = 0
    peak = 0
    original = aiomqtt.Client.publish

    async def counting_publish(self: aiomqtt.Client, *args: Any, **kwargs: Any) -> None:
        nonlocal pending, peak
        pending += 1
        peak = max(peak, pending)
        try:
            await original(self, *args, **kwargs)
        finally:
            pending -= 1

    monkeypatch.setattr(aiomqtt.Client, "publish", counting_publish)
    config = mosquitto.client_config(max_inflight=4)
    topic = f"{unique_prefix}/w"
    async with (
        MqttTransport(config, f"{unique_prefix}-sub") as sub,
        MqttTransport(config, f"{unique_prefix}-pub") as pub,
    ):
        await sub.subscribe(topic)
        async with asyncio.timeout(WAIT_S):
            await asyncio.gather(*(pub.publish(topic, b"%d" % i) for i in range(200)))
        stream = sub.messages()
        got = [await _next(stream) for _ in range(200)]
    assert peak == 4  # the window was used fully, never exceeded
    assert sorted(int(m.payload) for m in got) == list(range(200))
    assert pub.stats.published == 200


async def test_lifecycle_rules(mosquitto: ManagedBroker, unique_prefix: str) -> None:
    transport = MqttTransport(mosquitto.client_config(), f"{unique_prefix}-n")
    async with transport:
        with pytest.raises(RuntimeError, match="not re-entrant"):
            await transport.__aenter__()
        stream = transport.messages()
        consumer = asyncio.create_task(anext(stream))
        await asyncio.sleep(0)  # let it start waiting
        with pytest.raises(RuntimeError, match="one task"):
            await anext(transport.messages())
        await transport.aclose()
        with pytest.raises(StopAsyncIteration):
            async with asyncio.timeout(WAIT_S):
                await consumer
        await transport.aclose()  # idempotent
        with pytest.raises(TransportClosed):
            await transport.publish(f"{unique_prefix}/x", b"")
    # Reusable: a second session on the same object works.
    async with transport:
        await transport.subscribe(f"{unique_prefix}/again")
        await transport.publish(f"{unique_prefix}/again", b"2")
        got = await _next(transport.messages())
        assert got.payload == b"2"


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_persistent_session_keeps_messages_while_away(
    mosquitto: ManagedBroker, unique_prefix: str, protocol: str
) -> None:
    config = mosquitto.client_config(protocol=protocol)
    topic = f"{unique_prefix}/queued"
    node = MqttTransport(config, f"{unique_prefix}-node", clean_session=False)
    async with node:
        await node.subscribe(topic)
    async with MqttTransport(config, f"{unique_prefix}-pub") as pub:
        await pub.publish(topic, b"while you were away")
    async with node:  # same client id, session resumed: the broker hands over the queue
        got = await _next(node.messages())
        assert got.payload == b"while you were away"
        await node.unsubscribe(topic)
    # Leave no session behind on the shared broker.
    async with MqttTransport(config, f"{unique_prefix}-node", clean_session=True):
        pass
