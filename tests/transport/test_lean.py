"""MqttTransport's broker tests, run over both MqttTransport and LeanMqttTransport.

The same assertions against a real mosquitto on loopback: the lean transport
must keep every semantic the aiomqtt one has (wildcards, retained messages,
sizes, the will, reconnects, credentials, ACL refusals, lifecycle rules).
Tests only the lean transport can take (fake brokers, keepalive, PUBACK
deadline) are in test_lean_edges.py; third-party clients in test_lean_interop.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest
from faults import TcpRelay

from fedbus.broker import ManagedBroker, make_password_file
from fedbus.config import BrokerConfig, ReconnectPolicy
from fedbus.errors import (
    ConfigError,
    ConnectError,
    PayloadTooLargeError,
    TransportClosed,
)
from fedbus.messages import ModelUpdate, Tensor
from fedbus.transport.base import Received, Transport, Will, packet_overhead
from fedbus.transport.lean import LeanMqttTransport
from fedbus.transport.messenger import Messenger
from fedbus.transport.mqtt import MqttTransport

pytestmark = [pytest.mark.integration, pytest.mark.timeout(45)]

WAIT_S = 10.0
FAST_RECONNECT = ReconnectPolicy(initial_s=0.05, max_s=0.3, deadline_s=20.0)
PATIENT = ReconnectPolicy(initial_s=0.05, max_s=0.2, deadline_s=60.0)

Factory = Callable[..., Any]


@pytest.fixture(params=["aiomqtt", "lean"])
def make(request: pytest.FixtureRequest) -> Factory:
    """Builds the transport under test: ``make(config, client_id, **kwargs)``."""
    if request.param == "aiomqtt":
        return MqttTransport
    return LeanMqttTransport


async def _next(stream: AsyncIterator[Received]) -> Received:
    async with asyncio.timeout(WAIT_S):
        return await anext(stream)


async def test_is_a_transport_and_refuses_mqtt5() -> None:
    assert isinstance(LeanMqttTransport(BrokerConfig(), "n1"), Transport)
    with pytest.raises(ConfigError, match=r"3\.1\.1 only"):
        LeanMqttTransport(BrokerConfig(protocol="5"), "n1")
    with pytest.raises(ValueError, match="QoS 0 or 1"):
        await LeanMqttTransport(BrokerConfig(), "n1").publish("a", b"", qos=2)


async def test_round_trip_with_wildcards(
    make: Factory, mosquitto: ManagedBroker, unique_prefix: str
) -> None:
    config = mosquitto.client_config()
    async with (
        make(config, f"{unique_prefix}-sub") as sub,
        make(config, f"{unique_prefix}-pub") as pub,
    ):
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
    make: Factory, mosquitto: ManagedBroker, unique_prefix: str
) -> None:
    config = mosquitto.client_config()
    topic = f"{unique_prefix}/manifest"
    async with make(config, f"{unique_prefix}-pub") as pub:
        await pub.publish(topic, b"round 7", retain=True)
    async with make(config, f"{unique_prefix}-late") as late:
        await late.subscribe(f"{unique_prefix}/#")
        got = await _next(late.messages())
        assert got == Received(topic, b"round 7", qos=1, retain=True)
        await late.publish(topic, b"", retain=True)  # clear it for reruns


@pytest.mark.parametrize("size", [1 << 20, 4 << 20], ids=["1MiB", "4MiB"])
async def test_large_payloads(
    make: Factory, mosquitto: ManagedBroker, unique_prefix: str, size: int
) -> None:
    config = mosquitto.client_config(max_payload_bytes=8 << 20)
    payload = os.urandom(size)
    topic = f"{unique_prefix}/big"
    async with (
        make(config, f"{unique_prefix}-sub") as sub,
        make(config, f"{unique_prefix}-pub") as pub,
    ):
        await sub.subscribe(topic)
        await pub.publish(topic, payload)
        got = await _next(sub.messages())
    assert got.payload == payload


async def test_the_largest_payload_that_fits_and_one_more(
    make: Factory, mosquitto: ManagedBroker, unique_prefix: str
) -> None:
    config = mosquitto.client_config(max_payload_bytes=64 * 1024)
    topic = f"{unique_prefix}/x"
    limit = config.max_payload_bytes - packet_overhead(topic)
    async with (
        make(config, f"{unique_prefix}-sub") as sub,
        make(config, f"{unique_prefix}-pub") as pub,
    ):
        await sub.subscribe(topic)
        with pytest.raises(PayloadTooLargeError):
            await pub.publish(topic, bytes(limit + 1))
        payload = os.urandom(limit)
        await pub.publish(topic, payload)  # received under the same limit, too
        got = await _next(sub.messages())
        assert got.payload == payload  # the refused one never reached the broker
        assert pub.stats.published == 1


async def test_many_publishes_through_the_window(
    make: Factory, mosquitto: ManagedBroker, unique_prefix: str
) -> None:
    config = mosquitto.client_config(max_inflight=4)
    topic = f"{unique_prefix}/w"
    async with (
        make(config, f"{unique_prefix}-sub") as sub,
        make(config, f"{unique_prefix}-pub") as pub,
    ):
        await sub.subscribe(topic)
        async with asyncio.timeout(WAIT_S):
            await asyncio.gather(*(pub.publish(topic, b"%d" % i) for i in range(300)))
        stream = sub.messages()
        got = [await _next(stream) for _ in range(300)]
    assert [int(m.payload) for m in got] == list(range(300))  # in order per publisher
    assert pub.stats.published == 300


async def test_lifecycle_rules(make: Factory, mosquitto: ManagedBroker, unique_prefix: str) -> None:
    transport = make(mosquitto.client_config(), f"{unique_prefix}-n")
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
        with pytest.raises(TransportClosed):
            await transport.subscribe(f"{unique_prefix}/x")
    async with transport:  # reusable
        await transport.subscribe(f"{unique_prefix}/again")
        await transport.publish(f"{unique_prefix}/again", b"2")
        got = await _next(transport.messages())
        assert got.payload == b"2"


async def test_persistent_session_keeps_messages_while_away(
    make: Factory, mosquitto: ManagedBroker, unique_prefix: str
) -> None:
    config = mosquitto.client_config(protocol="3.1.1")
    topic = f"{unique_prefix}/queued"
    node = make(config, f"{unique_prefix}-node", clean_session=False)
    async with node:
        await node.subscribe(topic)
    async with make(config, f"{unique_prefix}-pub") as pub:
        await pub.publish(topic, b"while you were away")
    async with node:  # same client id, session resumed: the broker hands over the queue
        got = await _next(node.messages())
        assert got.payload == b"while you were away"
        await node.unsubscribe(topic)
    async with make(config, f"{unique_prefix}-node", clean_session=True):
        pass  # leave no session behind on the shared broker


async def test_will_on_abort_and_on_a_dead_socket_not_on_a_clean_close(
    make: Factory, mosquitto: ManagedBroker, unique_prefix: str
) -> None:
    config = mosquitto.client_config(reconnect=FAST_RECONNECT)
    will_topic = f"{unique_prefix}/will"
    async with make(config, f"{unique_prefix}-observer") as observer:
        await observer.subscribe(f"{unique_prefix}/#")
        stream = observer.messages()

        aborted = make(config, f"{unique_prefix}-aborted", will=Will(will_topic, b"aborted"))
        async with aborted:
            await aborted.abort()  # no DISCONNECT: the broker publishes the will
            got = await _next(stream)
            assert got == Received(will_topic, b"aborted", qos=1, retain=False)

        async with TcpRelay(mosquitto.port) as proxy:
            crashed = make(
                mosquitto.client_config(port=proxy.port, reconnect=FAST_RECONNECT),
                f"{unique_prefix}-crashed",
                will=Will(will_topic, b"crashed"),
            )
            async with crashed:
                proxy.crash()
                got = await _next(stream)
                assert (got.topic, got.payload) == (will_topic, b"crashed")

        polite = make(config, f"{unique_prefix}-polite", will=Will(will_topic, b"polite"))
        async with polite:
            pass
        for i in range(2):  # markers sent after the close; a will would have come first
            await observer.publish(f"{unique_prefix}/marker", b"%d" % i)
            got = await _next(stream)
            assert (got.topic, got.payload) == (f"{unique_prefix}/marker", b"%d" % i)


async def test_reconnect_after_broker_restart(make: Factory, unique_prefix: str) -> None:
    broker = ManagedBroker(kind="mosquitto")
    await asyncio.to_thread(broker.start)
    try:
        config = broker.client_config(reconnect=FAST_RECONNECT)
        topic = f"{unique_prefix}/after"
        async with make(config, f"{unique_prefix}-node") as node:
            await node.subscribe(f"{unique_prefix}/#")
            stream = node.messages()

            await asyncio.to_thread(broker.stop)
            during = asyncio.create_task(node.publish(topic, b"sent during the outage"))
            await asyncio.sleep(0.2)
            assert not during.done()
            await asyncio.to_thread(broker.start)
            async with asyncio.timeout(WAIT_S):
                await during
            got = await _next(stream)  # through the subscription restored on the new link
            assert (got.topic, got.payload) == (topic, b"sent during the outage")

            async with make(config, f"{unique_prefix}-other") as other:
                await other.publish(topic, b"after")
            got = await _next(stream)
            assert got.payload == b"after"
            assert node.stats.reconnects == 1
    finally:
        await broker.aclose()


async def test_gives_up_after_the_deadline(make: Factory, unique_prefix: str) -> None:
    broker = ManagedBroker(kind="mosquitto")
    await asyncio.to_thread(broker.start)
    try:
        policy = ReconnectPolicy(initial_s=0.05, max_s=0.2, deadline_s=1.0)
        async with make(broker.client_config(reconnect=policy), f"{unique_prefix}-node") as node:
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


async def test_connect_error_when_nothing_listens(make: Factory) -> None:
    from fedbus.broker import free_port

    policy = ReconnectPolicy(initial_s=0.05, max_s=0.2, deadline_s=0.5)
    transport = make(BrokerConfig(port=free_port("127.0.0.1"), reconnect=policy), "n1")
    async with asyncio.timeout(15):
        with pytest.raises(ConnectError, match=r"could not connect to mqtt://127\.0\.0\.1") as info:
            await transport.__aenter__()
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    with pytest.raises(TransportClosed):
        await transport.publish("a", b"")
    async with asyncio.timeout(5):
        assert [m async for m in transport.messages()] == []


@pytest.fixture(scope="module")
def secured_broker(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Passwords for node-1 and node-2; an ACL lets node-1 use only ``allowed/#``."""
    d = tmp_path_factory.mktemp("lean-auth")
    make_password_file(d / "passwords", {"node-1": "s3cret", "node-2": "s3cret"})
    (d / "acl").write_text(
        "user node-1\ntopic readwrite allowed/#\n\nuser node-2\ntopic readwrite #\n"
    )
    broker = ManagedBroker(kind="mosquitto", password_file=d / "passwords", acl_file=d / "acl")
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


async def test_credentials_and_acl_confinement(
    make: Factory, secured_broker: ManagedBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # mosquitto 2.0 grants every SUBSCRIBE (SUBACK 0x80 is tested against a fake
    # broker in test_lean_edges.py) and enforces the ACL on delivery instead.
    monkeypatch.setenv("FEDBUS_TEST_PW", "s3cret")
    config = secured_broker.client_config(password_env="FEDBUS_TEST_PW")
    async with make(config, "node-1") as node, make(config, "node-2") as other:
        await node.subscribe("forbidden/#")
        await node.subscribe("allowed/#")
        await other.publish("forbidden/x", b"never delivered")
        await other.publish("allowed/x", b"authenticated")
        got = await _next(node.messages())  # in order per publisher: the forbidden one came first
    assert (got.topic, got.payload) == ("allowed/x", b"authenticated")


@pytest.mark.parametrize("password", ["wrong", None])
async def test_bad_or_missing_password_is_refused_at_once(
    make: Factory,
    secured_broker: ManagedBroker,
    monkeypatch: pytest.MonkeyPatch,
    password: str | None,
) -> None:
    overrides: dict[str, object] = {"reconnect": PATIENT}
    if password is not None:
        monkeypatch.setenv("FEDBUS_TEST_PW", password)
        overrides["password_env"] = "FEDBUS_TEST_PW"
    config = secured_broker.client_config(**overrides)
    async with asyncio.timeout(WAIT_S):
        with pytest.raises(
            ConnectError, match=r"refused the connection: (not authorized|bad user)"
        ):
            async with make(config, "node-1"):
                pass


async def test_messenger_moves_a_chunked_update(
    make: Factory, mosquitto: ManagedBroker, unique_prefix: str
) -> None:
    # A 2 MB update in 64 KiB chunks, with credits and chunk acks: the
    # Messenger's whole protocol over the transport under test.
    run = f"r-{unique_prefix}"
    config = mosquitto.client_config(max_payload_bytes=65536)
    server_id, client_id = f"{unique_prefix}-server", f"{unique_prefix}-client"
    arr = np.random.default_rng(0).standard_normal(500_000, dtype=np.float32)
    update = ModelUpdate(run=run, sender=client_id, weights={"w": Tensor.from_array(arr)})
    async with contextlib.AsyncExitStack() as stack:
        messengers = {}
        for node in (server_id, client_id):
            transport = await stack.enter_async_context(make(config, node))
            messengers[node] = await stack.enter_async_context(
                Messenger(transport, node_id=node, run=run, prefix=unique_prefix)
            )
        sending = asyncio.create_task(messengers[client_id].send(server_id, update))
        async with asyncio.timeout(30):
            got = await anext(messengers[server_id].messages())
            await sending
    assert isinstance(got.message, ModelUpdate)
    assert bytes(got.message.weights["w"].data) == arr.tobytes()
    assert messengers[client_id].stats.chunks_sent >= 30
