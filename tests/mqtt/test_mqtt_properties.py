"""MqttConnection under Hypothesis: round trips, every split, random bytes.

The broker's side is `mqtt_peer`, written independently with `struct`.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mqtt_peer import (
    PINGRESP,
    connack,
    parse_connect,
    parse_publish,
    parse_subscribe,
    puback,
    publish,
    suback,
    unsuback,
)

from fedbus.errors import LocalProtocolError, RemoteProtocolError
from fedbus.mqtt import (
    ConnectionState,
    Event,
    MessageReceived,
    MqttConnection,
    PongReceived,
    PublishAcked,
    SubscribeAcked,
    UnsubscribeAcked,
)

# Topic names: any text without U+0000 and wildcards, not empty (4.7.3).
topics = st.text(
    st.characters(blacklist_characters="\x00+#", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=40,
)
payloads = st.binary(max_size=300)
messages = st.tuples(
    topics,
    payloads,
    st.sampled_from([0, 1]),
    st.booleans(),
    st.booleans(),
    st.integers(1, 0xFFFF),
)


def connected(**kwargs: int) -> MqttConnection:
    conn = MqttConnection(**kwargs)
    conn.connect("n", keepalive_s=10)
    conn.receive_data(connack())
    return conn


def feed(conn: MqttConnection, data: bytes, cuts: list[int]) -> list[Event]:
    events: list[Event] = []
    pos = 0
    for cut in sorted(set(cuts)):
        events += conn.receive_data(data[pos:cut])
        pos = cut
    events += conn.receive_data(data[pos:])
    return events


@given(st.lists(messages, max_size=8), st.data())
def test_incoming_publishes_round_trip_under_any_split(
    batch: list[tuple[str, bytes, int, bool, bool, int]], data: st.DataObject
) -> None:
    stream = b"".join(
        publish(t, p, qos=q, retain=r, dup=d, packet_id=i) for t, p, q, r, d, i in batch
    )
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    conn = connected()
    events = feed(conn, stream, cuts)
    assert events == [
        MessageReceived(t, p, q, r, d, i if q else None) for t, p, q, r, d, i in batch
    ]
    acks = b"".join(puback(i) for _, _, q, _, _, i in batch if q)
    assert conn.data_to_send() == acks


def test_a_transcript_split_at_every_byte() -> None:
    # Prepare: one of every packet a broker sends, in one stream.
    conn0 = connected()
    sub_id, _ = conn0.subscribe([("a/#", 1), ("b", 0)])
    pub_id, _ = conn0.publish("a/1", b"x", qos=1)
    unsub_id, _ = conn0.unsubscribe(["b"])
    stream = (
        suback(sub_id, 1, 0)
        + publish("a/1", b"payload" * 20, qos=1, packet_id=7)
        + puback(pub_id)
        + publish("b", b"", qos=0)
        + unsuback(unsub_id)
        + PINGRESP
    )
    expected = [
        SubscribeAcked(sub_id, ("a/#", "b"), (1, 0)),
        MessageReceived("a/1", b"payload" * 20, 1, False, False, 7),
        PublishAcked(pub_id),
        MessageReceived("b", b"", 0, False),
        UnsubscribeAcked(unsub_id, ("b",)),
        PongReceived(),
    ]
    # Execute and assert: every single cut, and one byte at a time.
    for cut in range(len(stream) + 1):
        conn = connected()
        conn.subscribe([("a/#", 1), ("b", 0)])
        conn.publish("a/1", b"x", qos=1)
        conn.unsubscribe(["b"])
        assert feed(conn, stream, [cut]) == expected, cut
    conn = connected()
    conn.subscribe([("a/#", 1), ("b", 0)])
    conn.publish("a/1", b"x", qos=1)
    conn.unsubscribe(["b"])
    assert feed(conn, stream, list(range(len(stream)))) == expected
    assert conn.data_to_send() == puback(7)


@given(topics, payloads, st.sampled_from([0, 1]), st.booleans())
def test_outgoing_publish_round_trips(topic: str, payload: bytes, qos: int, retain: bool) -> None:
    conn = connected()
    packet_id, data = conn.publish(topic, payload, qos=qos, retain=retain)
    assert parse_publish(data) == (topic, payload, qos, retain, packet_id)
    if qos:
        assert conn.receive_data(puback(packet_id or 0)) == [PublishAcked(packet_id or 0)]


@given(
    client_id=st.text(
        st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
        min_size=1,
        max_size=30,
    ),
    clean=st.booleans(),
    keepalive=st.integers(0, 0xFFFF),
    username=st.none() | topics,
    password=st.none() | topics,
    will=st.none() | st.tuples(topics, payloads, st.sampled_from([0, 1, 2]), st.booleans()),
)
def test_connect_round_trips(
    client_id: str,
    clean: bool,
    keepalive: int,
    username: str | None,
    password: str | None,
    will: tuple[str, bytes, int, bool] | None,
) -> None:
    if password is not None and username is None:
        username = "user"
    data = MqttConnection().connect(
        client_id,
        clean_session=clean,
        keepalive_s=keepalive,
        username=username,
        password=password,
        will=will,
    )
    got = parse_connect(data)
    assert (got.client_id, got.clean_session, got.keepalive_s) == (client_id, clean, keepalive)
    assert (got.username, got.password, got.will) == (username, password, will)


filters = (
    st.lists(st.sampled_from(["+", "a", "bb", "é", "$SYS"]), min_size=1, max_size=4).map("/".join)
    | st.just("#")
    | st.just("a/#")
)


@given(st.lists(st.tuples(filters, st.sampled_from([0, 1])), min_size=1, max_size=5))
def test_subscribe_round_trips(pairs: list[tuple[str, int]]) -> None:
    conn = connected()
    packet_id, data = conn.subscribe(pairs)
    assert parse_subscribe(data) == (packet_id, pairs)
    codes = [qos for _, qos in pairs]
    assert conn.receive_data(suback(packet_id, *codes)) == [
        SubscribeAcked(packet_id, tuple(f for f, _ in pairs), tuple(codes))
    ]


def _only_protocol_errors(conn: MqttConnection, chunks: list[bytes]) -> None:
    """h11's fuzz invariant: events, or a RemoteProtocolError, nothing else."""
    for chunk in chunks:
        try:
            conn.receive_data(chunk)
        except RemoteProtocolError:
            assert conn.state is ConnectionState.ERROR
            with pytest.raises(LocalProtocolError):
                conn.receive_data(b"\x00")
            return
        assert len(conn._buf) <= 5 + conn._max_packet_size  # bounded buffering


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=64), max_size=6), st.booleans())
def test_random_bytes_raise_only_protocol_errors(chunks: list[bytes], after_connack: bool) -> None:
    conn = MqttConnection(max_packet_size=256)
    conn.connect("n")
    if after_connack:
        conn.receive_data(connack())
        conn.publish("t", b"", qos=1)
        conn.subscribe([("t/#", 1)])
    _only_protocol_errors(conn, chunks)


@settings(max_examples=300)
@given(st.lists(messages, min_size=1, max_size=4), st.data())
def test_mutated_streams_raise_only_protocol_errors(
    batch: list[tuple[str, bytes, int, bool, bool, int]], data: st.DataObject
) -> None:
    stream = bytearray(
        b"".join(publish(t, p, qos=q, retain=r, dup=d, packet_id=i) for t, p, q, r, d, i in batch)
        + puback(1)
        + suback(2, 0x80)
        + PINGRESP
    )
    for _ in range(data.draw(st.integers(1, 4))):
        stream[data.draw(st.integers(0, len(stream) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(stream)))
    conn = connected(max_packet_size=1024)
    conn.publish("t", b"", qos=1)
    conn.subscribe([("x", 1)])
    _only_protocol_errors(conn, [bytes(stream[:cut]), bytes(stream[cut:])])


def test_packet_ids_skip_pending_ones_and_wrap() -> None:
    conn = connected()
    ids = [conn.publish("t", b"", qos=1)[0] for _ in range(3)]
    assert ids == [1, 2, 3]
    conn.receive_data(puback(2))
    conn._next_id = 0xFFFE
    assert [conn.publish("t", b"", qos=1)[0] for _ in range(3)] == [0xFFFF, 2, 4]  # 1, 3 pending


def test_packet_ids_run_out_cleanly() -> None:
    conn = connected()
    for _ in range(0xFFFF):
        conn.publish("t", b"", qos=1)
    with pytest.raises(LocalProtocolError, match="65,535"):
        conn.publish("t", b"", qos=1)
    conn.receive_data(puback(77))
    assert conn.publish("t", b"", qos=1)[0] == 77


def test_calls_that_do_not_fit_the_state() -> None:
    conn = MqttConnection()
    with pytest.raises(LocalProtocolError, match="IDLE"):
        conn.publish("t", b"")
    conn.connect("n")
    with pytest.raises(LocalProtocolError, match="connect in state CONNECTING"):
        conn.connect("n")
    with pytest.raises(LocalProtocolError, match="subscribe in state CONNECTING"):
        conn.subscribe([("t", 1)])
    conn.receive_data(connack())
    with pytest.raises(LocalProtocolError, match="QoS 0 or 1"):
        conn.publish("t", b"", qos=2)
    with pytest.raises(LocalProtocolError, match="wildcard"):
        conn.publish("a/+", b"")
    with pytest.raises(LocalProtocolError, match="whole last level"):
        conn.subscribe([("a/#/b", 1)])
    with pytest.raises(LocalProtocolError, match="QoS must be 0 or 1"):
        conn.subscribe([("a", 2)])
    assert conn.pending_ids == frozenset()  # failed calls hold no packet id
    conn.disconnect()
    with pytest.raises(LocalProtocolError, match="CLOSED"):
        conn.publish("t", b"")


def test_keepalive_pings_when_idle_and_notices_silence() -> None:
    conn = connected()  # keepalive 10 s
    assert conn.keepalive(0.0) == b""  # the CONNECT was just sent
    assert conn.keepalive(4.9) == b""
    assert conn.keepalive(5.0) == b"\xc0\x00"  # half the keepalive without sending
    assert conn.keepalive(7.5) == b""  # one ping outstanding at a time
    assert not conn.pong_overdue(14.9)
    assert conn.pong_overdue(15.0)
    conn.receive_data(PINGRESP)
    assert not conn.pong_overdue(15.0)
    conn.publish("t", b"", qos=0)
    assert conn.keepalive(16.0) == b""  # traffic counts as activity
    assert conn.keepalive(21.0) == b"\xc0\x00"


def test_keepalive_zero_never_pings() -> None:
    conn = MqttConnection()
    conn.connect("n", keepalive_s=0)
    conn.receive_data(connack())
    assert conn.keepalive(1e9) == b""
    assert conn.receive_data(b"") == []
