"""What a Messenger accepts from a real broker: envelope checks, duplicates, last wills."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from faults import TcpRelay

from fedbus import codec, topics
from fedbus.broker import ManagedBroker
from fedbus.config import ReconnectPolicy
from fedbus.messages import Heartbeat, Leave
from fedbus.transport.base import Will
from fedbus.transport.messenger import Incoming, Messenger
from fedbus.transport.mqtt import MqttTransport

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

WAIT_S = 10.0


async def receive(m: Messenger, n: int) -> list[Incoming]:
    out: list[Incoming] = []
    async with asyncio.timeout(WAIT_S):
        async for item in m.messages():
            out.append(item)
            if len(out) == n:
                break
    return out


async def test_sender_mismatch_foreign_run_and_duplicates_are_dropped_and_counted(
    mosquitto: ManagedBroker, unique_prefix: str
) -> None:
    # Prepare: a receiver b, and a raw MQTT client with a's client id that
    # publishes whatever bytes it likes on b's inbox.
    run, other_run = f"r-{unique_prefix}", f"o-{unique_prefix}"
    a, b = f"{unique_prefix}-a", f"{unique_prefix}-b"
    config = mosquitto.client_config()
    to_b = topics.directed(run, b, a, prefix=unique_prefix)
    good = Heartbeat(run=run, sender=a)
    last = Heartbeat(run=run, sender=a, status="last")
    async with (
        MqttTransport(config, b) as tb,
        Messenger(tb, node_id=b, run=run, prefix=unique_prefix) as receiver,
        MqttTransport(config, a) as raw,
    ):
        # Also listen on b's inbox of another run: only the topic tells it apart.
        await tb.subscribe(topics.inbox_filter(other_run, b, prefix=unique_prefix))

        # Execute: each publish is acknowledged before the next, so b sees them in order.
        async with asyncio.timeout(WAIT_S):
            # a's topic, but the envelope claims mallory sent it
            await raw.publish(to_b, codec.encode(Heartbeat(run=run, sender="mallory")))
            # the right topic, an envelope of another run
            await raw.publish(to_b, codec.encode(Heartbeat(run=other_run, sender=a)))
            # a whole message of another run, on that run's topic
            await raw.publish(
                topics.directed(other_run, b, a, prefix=unique_prefix),
                codec.encode(Heartbeat(run=other_run, sender=a)),
            )
            await raw.publish(to_b, codec.encode(good))
            await raw.publish(to_b, codec.encode(good))  # the same message id again
            await raw.publish(to_b, codec.encode(msgspec.structs.replace(good, status="replay")))
            await raw.publish(to_b, b"\xc1 not msgpack")
            await raw.publish(to_b, codec.encode(last))
        got = await receive(receiver, 2)

    # Assert: only the two valid messages came through, each drop was counted.
    assert [item.message for item in got] == [good, last]
    assert all(item.topic.sender == a for item in got)
    assert dict(receiver.stats.dropped) == {
        "sender_mismatch": 1,
        "foreign_run": 2,
        "duplicate": 2,
        "malformed": 1,
    }
    assert receiver.stats.received == 2


async def test_will_of_a_crashed_node_arrives_as_leave(
    mosquitto: ManagedBroker, unique_prefix: str
) -> None:
    # Prepare: a node whose last will is a Leave on its own "leave" channel,
    # connected through a relay the test can cut; an observer of both channels.
    run = f"r-{unique_prefix}"
    node, observer_id = f"{unique_prefix}-node", f"{unique_prefix}-observer"
    leave = Leave(run=run, round=4, sender=node, reason="connection lost")
    will = Will(topics.broadcast(run, node, "leave", prefix=unique_prefix), codec.encode(leave))
    no_retry = ReconnectPolicy(initial_s=0.05, max_s=0.2, deadline_s=30.0)
    heartbeat = Heartbeat(run=run, round=4, sender=node, status="training")
    async with (
        MqttTransport(mosquitto.client_config(), observer_id) as to,
        Messenger(to, node_id=observer_id, run=run, prefix=unique_prefix) as observer,
    ):
        await observer.subscribe_broadcasts(None, "heartbeat")
        await observer.subscribe_broadcasts(None, "leave")
        async with TcpRelay(mosquitto.port) as relay:
            config = mosquitto.client_config(port=relay.port, reconnect=no_retry)
            async with (
                MqttTransport(config, node, will=will) as tn,
                Messenger(tn, node_id=node, run=run, prefix=unique_prefix) as crashing,
            ):
                # Execute: the node publishes, then its connection dies without DISCONNECT.
                async with asyncio.timeout(WAIT_S):
                    await crashing.broadcast(heartbeat, "heartbeat")
                relay.crash()
                got = await receive(observer, 2)

    # Assert: its message, then its will, both validated like any message.
    assert [item.message for item in got] == [heartbeat, leave]
    assert got[1].topic.sender == node
    assert got[1].topic.channel == "leave"
    assert isinstance(got[1].message, Leave)
    assert got[1].message.reason == "connection lost"
    assert not observer.stats.dropped
