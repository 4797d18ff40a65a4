"""Byte-exact transcripts of MqttConnection, each checked by hand against MQTT 3.1.1.

The expected bytes are written out literally (not produced by a helper), with
the spec section that fixes each field, so a change in the codec shows up as
a diff against the standard rather than against itself.
"""

from __future__ import annotations

import pytest

from fedbus.errors import LocalProtocolError, RemoteProtocolError
from fedbus.mqtt import (
    ConnectionAccepted,
    ConnectionRefused,
    ConnectionState,
    MessageReceived,
    MqttConnection,
    PongReceived,
    PublishAcked,
    SubscribeAcked,
    UnsubscribeAcked,
    encode_remaining_length,
)


def connected() -> MqttConnection:
    conn = MqttConnection()
    conn.connect("a", keepalive_s=60)
    assert conn.receive_data(b"\x20\x02\x00\x00") == [ConnectionAccepted(session_present=False)]
    return conn


@pytest.mark.parametrize(
    ("value", "encoded"),
    [  # Table 2.4 (2.2.3): the boundaries of 1..4 bytes
        (0, "00"),
        (127, "7f"),
        (128, "8001"),
        (16_383, "ff7f"),
        (16_384, "808001"),
        (2_097_151, "ffff7f"),
        (2_097_152, "80808001"),
        (268_435_455, "ffffff7f"),
    ],
)
def test_remaining_length_table(value: int, encoded: str) -> None:
    assert encode_remaining_length(value).hex() == encoded


def test_remaining_length_beyond_four_bytes_is_refused() -> None:
    with pytest.raises(LocalProtocolError):
        encode_remaining_length(268_435_456)


def test_minimal_connect() -> None:
    conn = MqttConnection()
    data = conn.connect("a", keepalive_s=60)
    assert data == bytes.fromhex(
        "10 0d"  # CONNECT, remaining length 13
        " 0004 4d515454"  # protocol name "MQTT" (3.1.2.1)
        " 04"  # protocol level 4 = 3.1.1 (3.1.2.2)
        " 02"  # connect flags: clean session only (3.1.2.3-4)
        " 003c"  # keepalive 60 s (3.1.2.10)
        " 0001 61"  # client id "a" (3.1.3.1)
    )
    assert conn.state is ConnectionState.CONNECTING


def test_connect_with_will_and_credentials() -> None:
    conn = MqttConnection()
    data = conn.connect(
        "fedbus-1",
        clean_session=True,
        keepalive_s=30,
        username="u",
        password="p",
        will=("w", b"bye", 1, False),
    )
    assert data == bytes.fromhex(
        "10 22"  # remaining length 34
        " 0004 4d515454 04"
        " ce"  # user name 0x80, password 0x40, will QoS 1 0x08, will 0x04, clean 0x02
        " 001e"  # keepalive 30
        " 0008 6665646275732d31"  # "fedbus-1"
        " 0001 77"  # will topic "w" (3.1.3.2)
        " 0003 627965"  # will message "bye" (3.1.3.3)
        " 0001 75"  # user name "u" (3.1.3.4)
        " 0001 70"  # password "p" (3.1.3.5)
    )


def test_connect_retained_will_without_clean_session() -> None:
    data = MqttConnection().connect(
        "c", clean_session=False, keepalive_s=0, will=("t", b"", 0, True)
    )
    # flags: will retain 0x20, will 0x04, QoS 0, no clean session
    assert data == bytes.fromhex("10 12 0004 4d515454 04 24 0000 0001 63 0001 74 0000")


def test_password_without_user_name_is_refused() -> None:
    with pytest.raises(LocalProtocolError, match=r"3\.1\.2\.9"):
        MqttConnection().connect("a", password="p")


def test_connack_refusals_name_the_reason() -> None:
    for code, words in [
        (1, "unacceptable protocol version"),
        (2, "identifier rejected"),
        (3, "server unavailable"),
        (4, "bad user name or password"),
        (5, "not authorized"),
    ]:
        conn = MqttConnection()
        conn.connect("a")
        (event,) = conn.receive_data(bytes((0x20, 0x02, 0x00, code)))
        assert isinstance(event, ConnectionRefused)
        assert (event.return_code, words in event.reason) == (code, True)
        assert conn.state is ConnectionState.CLOSED


def test_connack_session_present() -> None:
    conn = MqttConnection()
    conn.connect("a", clean_session=False)
    assert conn.receive_data(b"\x20\x02\x01\x00") == [ConnectionAccepted(session_present=True)]


def test_publish_qos1_and_its_puback() -> None:
    conn = connected()
    packet_id, data = conn.publish("a/b", b"hi", qos=1)
    assert packet_id == 1
    # PUBLISH QoS 1 (0x32), length 9, topic "a/b", packet id 1, payload "hi" (3.3)
    assert data == bytes.fromhex("32 09 0003 612f62 0001 6869")
    assert conn.receive_data(bytes.fromhex("40 02 0001")) == [PublishAcked(1)]
    assert conn.pending_ids == frozenset()


def test_publish_qos0_retained() -> None:
    packet_id, data = connected().publish("t", b"", qos=0, retain=True)
    assert (packet_id, data) == (None, bytes.fromhex("31 03 0001 74"))


def test_incoming_qos1_publish_is_acknowledged() -> None:
    conn = connected()
    events = conn.receive_data(bytes.fromhex("3b 07 0001 78 1234 6f6b"))  # dup, QoS 1, retain
    assert events == [MessageReceived("x", b"ok", 1, True, True, 0x1234)]
    assert conn.data_to_send() == bytes.fromhex("40 02 1234")  # PUBACK (3.4)
    assert conn.data_to_send() == b""


def test_incoming_qos0_publish_needs_no_ack() -> None:
    conn = connected()
    assert conn.receive_data(bytes.fromhex("30 05 0001 78 6f6b")) == [
        MessageReceived("x", b"ok", 0, False)
    ]
    assert conn.data_to_send() == b""


def test_subscribe_several_filters_and_a_refusal() -> None:
    conn = connected()
    packet_id, data = conn.subscribe([("a/+", 1), ("b/#", 0)])
    # SUBSCRIBE has flags 0b0010 (3.8.1); each filter is followed by its QoS byte
    assert data == bytes.fromhex("82 0e 0001 0003 612f2b 01 0003 622f23 00")
    (event,) = conn.receive_data(bytes.fromhex("90 04 0001 01 80"))
    assert event == SubscribeAcked(packet_id, ("a/+", "b/#"), (1, 0x80))
    assert event.refused == ("b/#",)


def test_unsubscribe() -> None:
    conn = connected()
    conn.publish("x", b"", qos=1)  # takes packet id 1
    packet_id, data = conn.unsubscribe(["a/+"])
    assert packet_id == 2
    assert data == bytes.fromhex("a2 07 0002 0003 612f2b")  # flags 0b0010 (3.10.1)
    assert conn.receive_data(bytes.fromhex("b0 02 0002")) == [UnsubscribeAcked(2, ("a/+",))]


def test_ping_and_disconnect() -> None:
    conn = connected()
    assert conn.ping() == b"\xc0\x00"
    assert conn.receive_data(b"\xd0\x00") == [PongReceived()]
    assert conn.disconnect() == b"\xe0\x00"
    assert conn.state is ConnectionState.CLOSED
    assert conn.receive_data(b"\x30\x03\x00\x01x") == []  # moot after DISCONNECT


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ("30 03 0001 2b", "wildcard"),  # topic "+"
        ("30 03 0001 00", "U\\+0000"),
        ("30 02 0000", "empty"),
        ("30 03 0001 ff", "UTF-8"),
        ("34 05 0001 78 0001", "QoS 2"),
        ("36 05 0001 78 0001", "QoS 3"),
        ("32 05 0001 78 0000", "packet id 0"),
        ("32 04 0001 78 00", "packet id"),
        ("30 01 00", "topic length"),
        ("30 02 0005", "topic"),
        ("40 02 0009", "not pending"),
        ("40 03 0001 00", "2-byte body"),
        ("41 02 0001", "reserved flags"),
        ("90 03 0001 02", "return code 0x02"),
        ("90 03 0009 01", "not pending"),
        ("90 02 0001", "without a return code"),
        ("d0 01 00", "body"),
        ("20 02 0000", "not connecting"),
        ("c0 00", "does not send packet type 12"),
        ("00 00", "packet type 0"),
        ("30 ff ff ff ff 7f", "longer than 4 bytes"),
    ],
)
def test_malformed_input_is_a_remote_protocol_error(data: str, match: str) -> None:
    conn = connected()
    with pytest.raises(RemoteProtocolError, match=match):
        conn.receive_data(bytes.fromhex(data))
    assert conn.state is ConnectionState.ERROR
    with pytest.raises(LocalProtocolError, match="ERROR"):
        conn.receive_data(b"\xd0\x00")


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ("20 02 0006", "reserved"),  # return code 6
        ("20 02 0200", "reserved flags"),
        ("20 02 0105", "session present"),
        ("20 03 000000", "2-byte body"),
        ("30 03 0001 78", "before CONNACK"),
        ("d0 00", "before CONNACK"),
    ],
)
def test_bad_connack_is_a_remote_protocol_error(data: str, match: str) -> None:
    conn = MqttConnection()
    conn.connect("a")
    with pytest.raises(RemoteProtocolError, match=match):
        conn.receive_data(bytes.fromhex(data))


def test_oversize_packet_is_refused_from_its_header_alone() -> None:
    conn = MqttConnection(max_packet_size=1000)
    conn.connect("a")
    conn.receive_data(b"\x20\x02\x00\x00")
    # PUBLISH announcing 1001 bytes (e9 07): refused before any body byte arrives.
    with pytest.raises(RemoteProtocolError, match="over the limit of 1000"):
        conn.receive_data(b"\x30\xe9\x07")


def test_a_packet_at_the_limit_is_accepted() -> None:
    conn = MqttConnection(max_packet_size=1000)
    conn.connect("a")
    conn.receive_data(b"\x20\x02\x00\x00")
    body = b"\x00\x01x" + bytes(997)
    (event,) = conn.receive_data(b"\x30\xe8\x07" + body)
    assert isinstance(event, MessageReceived)
    assert len(event.payload) == 997
