"""LeanMqttTransport where only a scripted broker (or TLS) can take it.

`ScriptedBroker` is a real TCP server on 127.0.0.1 speaking just enough MQTT
3.1.1 (framing from tests/mqtt's independent peer encoding) to withhold a
PUBACK, refuse a subscription, stay silent to pings or send garbage.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import struct
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

import pytest

from fedbus.broker import BrokerTls, ManagedBroker
from fedbus.config import BrokerConfig, ReconnectPolicy
from fedbus.errors import ConnectError, TransportError
from fedbus.transport.base import Received
from fedbus.transport.lean import LeanMqttTransport

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

WAIT_S = 10.0
FAST = ReconnectPolicy(initial_s=0.02, max_s=0.1, deadline_s=10.0)

Packet = tuple[int, bytes]  # (first byte, body)
Handler = Callable[["Session", Packet], Awaitable[None]]


def frame(first: int, body: bytes) -> bytes:
    n, length = len(body), b""
    while True:
        n, digit = divmod(n, 128)
        length += bytes((digit | (0x80 if n else 0),))
        if not n:
            return bytes((first,)) + length + body


class Session:
    """One client connection to the scripted broker."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def read(self) -> Packet | None:
        try:
            first = (await self.reader.readexactly(1))[0]
            length, shift = 0, 0
            while True:
                byte = (await self.reader.readexactly(1))[0]
                length |= (byte & 0x7F) << shift
                shift += 7
                if byte < 0x80:
                    break
            return first, await self.reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    def send(self, data: bytes) -> None:
        self.writer.write(data)


class ScriptedBroker:
    """Accepts CONNECT with ``connack_code``, then hands each packet to ``handler``."""

    def __init__(self, handler: Handler, *, connack_codes: tuple[int, ...] = (0,)) -> None:
        self.handler = handler
        self.connack_codes = connack_codes
        self.connects = 0
        self.packets: list[Packet] = []
        self.new_connect = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._sessions: set[asyncio.StreamWriter] = set()

    @property
    def config(self) -> BrokerConfig:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return BrokerConfig(port=port, reconnect=FAST, connect_timeout_s=2.0)

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._sessions:
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._sessions.add(writer)
        session = Session(reader, writer)
        try:
            packet = await session.read()
            assert packet is not None
            assert packet[0] == 0x10
            code = self.connack_codes[min(self.connects, len(self.connack_codes) - 1)]
            self.connects += 1
            self.new_connect.set()
            session.send(frame(0x20, bytes((0, code))))
            while (packet := await session.read()) is not None:
                self.packets.append(packet)
                await self.handler(session, packet)
        finally:
            self._sessions.discard(writer)
            writer.close()

    async def wait_connects(self, n: int) -> None:
        async with asyncio.timeout(WAIT_S):
            while self.connects < n:
                self.new_connect.clear()
                await self.new_connect.wait()


async def polite(session: Session, packet: Packet) -> None:
    """Acknowledge like a broker: PUBACK, SUBACK granting QoS 1, PINGRESP."""
    first, body = packet
    if first >> 4 == 3 and first & 0x06:
        topic_len = struct.unpack_from("!H", body)[0]
        session.send(frame(0x40, body[2 + topic_len : 4 + topic_len]))
    elif first >> 4 == 8:
        session.send(frame(0x90, body[:2] + b"\x01"))
    elif first >> 4 == 12:
        session.send(b"\xd0\x00")


async def test_withheld_puback_raises_at_the_deadline() -> None:
    async def swallow(session: Session, packet: Packet) -> None:
        pass

    async with ScriptedBroker(swallow) as broker:
        transport = LeanMqttTransport(broker.config, "n1", ack_timeout_s=0.3)
        async with transport:
            async with asyncio.timeout(WAIT_S):
                with pytest.raises(TransportError, match="no PUBACK"):
                    await transport.publish("t", b"x")
                await transport.publish("t", b"qos0 needs no ack", qos=0)


async def test_suback_failure_is_a_transport_error() -> None:
    async def refuse(session: Session, packet: Packet) -> None:
        if packet[0] >> 4 == 8:
            session.send(frame(0x90, packet[1][:2] + b"\x80"))

    async with ScriptedBroker(refuse) as broker, LeanMqttTransport(broker.config, "n1") as t:
        async with asyncio.timeout(WAIT_S):
            with pytest.raises(TransportError, match=r"refused the subscription to 'a/#'"):
                await t.subscribe("a/#")


async def test_keepalive_pings_and_a_silent_broker_is_left() -> None:
    pings = 0

    async def mute(session: Session, packet: Packet) -> None:
        nonlocal pings
        pings += packet[0] == 0xC0  # counts PINGREQs, answers none

    async with ScriptedBroker(mute) as broker:
        config = BrokerConfig(port=broker.config.port, keepalive_s=1, reconnect=FAST)
        async with LeanMqttTransport(config, "n1"):
            await broker.wait_connects(2)  # the unanswered ping made it reconnect
            assert pings >= 1


async def test_answered_pings_keep_the_link() -> None:
    pings = 0
    three_pings = asyncio.Event()

    async def counting(session: Session, packet: Packet) -> None:
        nonlocal pings
        await polite(session, packet)
        pings += packet[0] == 0xC0
        if pings >= 3:
            three_pings.set()

    async with ScriptedBroker(counting) as broker:
        config = BrokerConfig(port=broker.config.port, keepalive_s=1, reconnect=FAST)
        async with LeanMqttTransport(config, "n1") as transport:
            async with asyncio.timeout(WAIT_S):
                await three_pings.wait()
            assert broker.connects == 1
            await transport.publish("t", b"still connected")


@pytest.mark.parametrize(
    "reply",
    [b"\x30\x03\x00\x01+", b"\x40\x02\x12\x34", b"\x30\xff\xff\x7f"],
    ids=["wildcard-topic", "unknown-puback", "oversize"],
)
async def test_a_broker_breaking_protocol_is_dropped_and_reconnected(reply: bytes) -> None:
    provoked = False

    async def rude(session: Session, packet: Packet) -> None:
        nonlocal provoked
        await polite(session, packet)
        if packet[0] >> 4 == 3 and not provoked:
            provoked = True
            session.send(reply)

    async with ScriptedBroker(rude) as broker, LeanMqttTransport(broker.config, "n1") as t:
        await t.subscribe("a/#")
        async with asyncio.timeout(WAIT_S):
            await t.publish("a/1", b"provoke")  # re-sent if its PUBACK died with the link
        await broker.wait_connects(2)
        async with asyncio.timeout(WAIT_S):
            await t.publish("a/2", b"fine")  # the new link is used only once re-subscribed
        subscribes = [p for p in broker.packets if p[0] == 0x82]
        assert len(subscribes) == 2


async def test_server_unavailable_is_retried_identifier_rejected_is_not() -> None:
    async with (
        ScriptedBroker(polite, connack_codes=(3, 3, 0)) as broker,
        LeanMqttTransport(broker.config, "n1") as t,
    ):
        assert t.connected
        assert broker.connects == 3
    async with ScriptedBroker(polite, connack_codes=(2,)) as broker:
        async with asyncio.timeout(WAIT_S):
            with pytest.raises(ConnectError, match="client identifier rejected"):
                async with LeanMqttTransport(broker.config, "n1"):
                    pass
        assert broker.connects == 1


async def test_inflight_window_is_used_fully_never_exceeded() -> None:
    outstanding: list[bytes] = []
    peak = 0

    async def batch_acks(session: Session, packet: Packet) -> None:
        nonlocal peak
        first, body = packet
        if first >> 4 != 3:
            return await polite(session, packet)
        topic_len = struct.unpack_from("!H", body)[0]
        outstanding.append(body[2 + topic_len : 4 + topic_len])
        peak = max(peak, len(outstanding))
        if len(outstanding) == 4:  # a window under 4 would deadlock here
            session.send(b"".join(frame(0x40, pid) for pid in outstanding))
            outstanding.clear()
        return None

    async with ScriptedBroker(batch_acks) as broker:
        config = BrokerConfig(port=broker.config.port, max_inflight=4, reconnect=FAST)
        async with LeanMqttTransport(config, "n1") as t:
            async with asyncio.timeout(WAIT_S):
                await asyncio.gather(*(t.publish("t", b"%d" % i) for i in range(40)))
    assert peak == 4


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 signed by it, and an unrelated CA."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is not installed")
    d = tmp_path_factory.mktemp("lean-pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    for name in ("ca", "other"):
        _openssl("req", "-x509", *ec, "-keyout", f"{name}.key", "-out", f"{name}.pem",
                 "-days", "2", "-subj", f"/CN=lean {name}",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)  # fmt: skip
    (d / "ext").write_text("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=d)  # fmt: skip
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "ext", cwd=d)  # fmt: skip
    return {"ca": d / "ca.pem", "other": d / "other.pem", "cert": d / "server.pem", "key": d / "server.key"}  # fmt: skip


@pytest.fixture(scope="module")
def tls_broker(pki: dict[str, Path]) -> Iterator[ManagedBroker]:
    broker = ManagedBroker(
        kind="mosquitto", tls=BrokerTls(certfile=str(pki["cert"]), keyfile=str(pki["key"]))
    )
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


async def test_tls_round_trip(
    tls_broker: ManagedBroker, pki: dict[str, Path], unique_prefix: str
) -> None:
    config = tls_broker.client_config(ca_file=str(pki["ca"]))
    async with LeanMqttTransport(config, f"{unique_prefix}-tls") as t:
        await t.subscribe(f"{unique_prefix}/#")
        await t.publish(f"{unique_prefix}/secret", b"over TLS")
        async with asyncio.timeout(WAIT_S):
            got = await anext(t.messages())
    assert got.payload == b"over TLS"


async def test_tls_with_the_wrong_ca_is_refused_at_once(
    tls_broker: ManagedBroker, pki: dict[str, Path], unique_prefix: str
) -> None:
    patient = ReconnectPolicy(initial_s=0.05, max_s=0.2, deadline_s=60.0)
    config = tls_broker.client_config(ca_file=str(pki["other"]), reconnect=patient)
    async with asyncio.timeout(WAIT_S):
        with pytest.raises(ConnectError, match="TLS verification") as info:
            async with LeanMqttTransport(config, f"{unique_prefix}-tls"):
                pass
    assert info.value.__cause__ is not None


async def test_state_properties_and_no_nagle(mosquitto: ManagedBroker, unique_prefix: str) -> None:
    transport = LeanMqttTransport(mosquitto.client_config(), f"{unique_prefix}-n")
    assert transport.protocol is None
    assert not transport.connected
    async with transport:
        assert transport.protocol == "3.1.1"
        assert transport.connected
        link = transport._link
        assert link is not None
        sock = link._transport.get_extra_info("socket") if link._transport else None
        assert sock is not None
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    assert not transport.connected


async def test_set_receiver_pushes_messages_and_survives_a_failing_one(
    mosquitto: ManagedBroker, unique_prefix: str
) -> None:
    config = mosquitto.client_config()
    pushed: list[bytes] = []
    arrived = asyncio.Event()

    def receiver(received: Received) -> None:
        pushed.append(received.payload)
        arrived.set()

    failed = asyncio.Event()

    def failing(received: Received) -> None:
        failed.set()
        raise RuntimeError("a receiver bug")

    async with (
        LeanMqttTransport(config, f"{unique_prefix}-sub") as sub,
        LeanMqttTransport(config, f"{unique_prefix}-pub") as pub,
    ):
        await sub.subscribe(f"{unique_prefix}/#")
        sub.set_receiver(receiver)
        await pub.publish(f"{unique_prefix}/a", b"pushed")
        async with asyncio.timeout(WAIT_S):
            await arrived.wait()
        sub.set_receiver(failing)
        await pub.publish(f"{unique_prefix}/a", b"lost to the bug")
        async with asyncio.timeout(WAIT_S):
            await failed.wait()
        sub.set_receiver(None)
        await pub.publish(f"{unique_prefix}/a", b"queued")
        async with asyncio.timeout(WAIT_S):
            got = await anext(sub.messages())
        assert got.payload == b"queued"  # in order: the failed one was dropped, not queued
        assert pushed == [b"pushed"]
        assert sub.stats.dropped == 1
        assert sub.connected
