"""MqttTransport when connections die: last will, broker restart, give-up deadline."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from faults import TcpRelay

from fedbus.broker import ManagedBroker
from fedbus.config import ReconnectPolicy
from fedbus.errors import ConnectError
from fedbus.transport.base import Received, Will
from fedbus.transport.mqtt import MqttTransport

pytestmark = [pytest.mark.integration, pytest.mark.timeout(45)]

WAIT_S = 10.0
FAST_RECONNECT = ReconnectPolicy(initial_s=0.05, max_s=0.3, deadline_s=20.0)


async def _next(stream: AsyncIterator[Received]) -> Received:
    async with asyncio.timeout(WAIT_S):
        return await anext(stream)


async def test_last_will_on_a_dead_socket_not_on_a_clean_close(
    mosquitto: ManagedBroker, unique_prefix: str
) -> None:
    config = mosquitto.client_config(reconnect=FAST_RECONNECT)
    will_topic = f"{unique_prefix}/will"
    async with MqttTransport(config, f"{unique_prefix}-observer") as observer:
        await observer.subscribe(f"{unique_prefix}/#")
        stream = observer.messages()

        # Unclean: the connection dies under the node; the broker publishes its will.
        async with TcpRelay(mosquitto.port) as proxy:
            crashed = MqttTransport(
                mosquitto.client_config(port=proxy.port, reconnect=FAST_RECONNECT),
                f"{unique_prefix}-crashed",
                will=Will(will_topic, b"crashed gone"),
            )
            async with crashed:
                proxy.crash()  # no DISCONNECT, and its reconnects fail: it stays "crashed"
                got = await _next(stream)
                assert got == Received(will_topic, b"crashed gone", qos=1, retain=False)

        # Clean: aclose sends DISCONNECT, so the broker discards the will.
        polite = MqttTransport(
            config, f"{unique_prefix}-polite", will=Will(will_topic, b"polite gone")
        )
        async with polite:
            pass
        for i in range(2):  # markers sent after the close; a will would have come first
            await observer.publish(f"{unique_prefix}/marker", b"%d" % i)
            got = await _next(stream)
            assert (got.topic, got.payload) == (f"{unique_prefix}/marker", b"%d" % i)


async def test_reconnect_after_broker_restart(unique_prefix: str) -> None:
    broker = ManagedBroker(kind="mosquitto")
    await asyncio.to_thread(broker.start)
    try:
        config = broker.client_config(reconnect=FAST_RECONNECT)
        topic = f"{unique_prefix}/after"
        async with MqttTransport(config, f"{unique_prefix}-node") as node:
            await node.subscribe(f"{unique_prefix}/#")
            stream = node.messages()

            await asyncio.to_thread(broker.stop)
            # Published during the outage (whether or not the loss was noticed
            # yet): waits for the reconnection, then completes.
            during = asyncio.create_task(node.publish(topic, b"sent during the outage"))
            await asyncio.sleep(0.2)
            assert not during.done()
            await asyncio.to_thread(broker.start)
            async with asyncio.timeout(WAIT_S):
                await during
            # Delivered through the subscription restored on the new connection.
            got = await _next(stream)
            assert (got.topic, got.payload) == (topic, b"sent during the outage")

            async with MqttTransport(config, f"{unique_prefix}-other") as other:
                await other.publish(topic, b"after")
            got = await _next(stream)
            assert got.payload == b"after"
            assert node.stats.reconnects == 1
    finally:
        await broker.aclose()


async def test_gives_up_after_the_deadline(unique_prefix: str) -> None:
    broker = ManagedBroker(kind="mosquitto")
    await asyncio.to_thread(broker.start)
    try:
        policy = ReconnectPolicy(initial_s=0.05, max_s=0.2, deadline_s=1.0)
        config = broker.client_config(reconnect=policy)
        async with MqttTransport(config, f"{unique_prefix}-node") as node:
            await node.subscribe(f"{unique_prefix}/#")
            stream = node.messages()
            await asyncio.to_thread(broker.stop)
            async with asyncio.timeout(WAIT_S):
                with pytest.raises(ConnectError, match="could not reconnect") as info:
                    await node.publish(f"{unique_prefix}/x", b"never")
                assert isinstance(info.value.__cause__, ConnectionRefusedError)
                with pytest.raises(ConnectError):
                    await anext(stream)
    finally:
        await broker.aclose()
