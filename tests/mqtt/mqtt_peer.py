"""The broker's side of MQTT 3.1.1, written independently of fedbus.mqtt, for the tests.

Encoders for what a broker sends (CONNACK, PUBLISH, PUBACK, SUBACK, UNSUBACK,
PINGRESP) and a decoder for what a client sends, both with `struct` straight
from the spec's figures, so that a bug in fedbus.mqtt's codec is not mirrored
here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass


def varint(n: int) -> bytes:
    """Remaining length, per the spec's non-normative algorithm in 2.2.3."""
    out = b""
    while True:
        digit, n = n % 128, n // 128
        out += struct.pack("B", digit | (0x80 if n > 0 else 0))
        if n == 0:
            return out


def packet(first: int, body: bytes) -> bytes:
    return struct.pack("B", first) + varint(len(body)) + body


def utf8(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("!H", len(raw)) + raw


def connack(code: int = 0, session_present: bool = False) -> bytes:
    return packet(0x20, struct.pack("BB", int(session_present), code))


def publish(
    topic: str,
    payload: bytes,
    *,
    qos: int = 0,
    retain: bool = False,
    dup: bool = False,
    packet_id: int | None = None,
) -> bytes:
    first = 0x30 | (0x08 if dup else 0) | (qos << 1) | int(retain)
    pid = struct.pack("!H", packet_id) if qos else b""
    return packet(first, utf8(topic) + pid + payload)


def puback(packet_id: int) -> bytes:
    return packet(0x40, struct.pack("!H", packet_id))


def suback(packet_id: int, *codes: int) -> bytes:
    return packet(0x90, struct.pack("!H", packet_id) + bytes(codes))


def unsuback(packet_id: int) -> bytes:
    return packet(0xB0, struct.pack("!H", packet_id))


PINGRESP = b"\xd0\x00"


@dataclass
class Packet:
    """A client packet split into its fixed-header parts."""

    kind: int
    flags: int
    body: bytes


def split_packets(data: bytes) -> list[Packet]:
    """Every packet in ``data``, which must hold whole packets only."""
    out = []
    pos = 0
    while pos < len(data):
        first = data[pos]
        pos += 1
        length = 0
        mult = 1
        while True:
            byte = data[pos]
            pos += 1
            length += (byte & 0x7F) * mult
            mult *= 128
            if byte < 128:
                break
        out.append(Packet(first >> 4, first & 0x0F, data[pos : pos + length]))
        pos += length
    assert pos == len(data)
    return out


def _string(body: bytes, pos: int) -> tuple[bytes, int]:
    (n,) = struct.unpack_from("!H", body, pos)
    return body[pos + 2 : pos + 2 + n], pos + 2 + n


@dataclass
class Connect:
    client_id: str
    clean_session: bool
    keepalive_s: int
    username: str | None
    password: str | None
    will: tuple[str, bytes, int, bool] | None


def parse_connect(data: bytes) -> Connect:
    (p,) = split_packets(data)
    assert (p.kind, p.flags) == (1, 0)
    assert p.body[:7] == b"\x00\x04MQTT\x04"
    flags, keepalive = struct.unpack_from("!BH", p.body, 7)
    assert flags & 0x01 == 0  # reserved
    client_id, pos = _string(p.body, 10)
    will = None
    if flags & 0x04:
        topic, pos = _string(p.body, pos)
        message, pos = _string(p.body, pos)
        will = (topic.decode(), message, (flags >> 3) & 3, bool(flags & 0x20))
    else:
        assert flags & 0x38 == 0
    username = password = None
    if flags & 0x80:
        raw, pos = _string(p.body, pos)
        username = raw.decode()
    if flags & 0x40:
        raw, pos = _string(p.body, pos)
        password = raw.decode()
    assert pos == len(p.body)
    return Connect(client_id.decode(), bool(flags & 0x02), keepalive, username, password, will)


def parse_publish(data: bytes) -> tuple[str, bytes, int, bool, int | None]:
    """(topic, payload, qos, retain, packet id) of one PUBLISH packet."""
    (p,) = split_packets(data)
    assert p.kind == 3
    qos = (p.flags >> 1) & 3
    topic, pos = _string(p.body, 0)
    packet_id = None
    if qos:
        (packet_id,) = struct.unpack_from("!H", p.body, pos)
        pos += 2
    return topic.decode(), p.body[pos:], qos, bool(p.flags & 1), packet_id


def parse_subscribe(data: bytes) -> tuple[int, list[tuple[str, int]]]:
    (p,) = split_packets(data)
    assert (p.kind, p.flags) == (8, 2)
    (packet_id,) = struct.unpack_from("!H", p.body, 0)
    pos = 2
    filters = []
    while pos < len(p.body):
        raw, pos = _string(p.body, pos)
        filters.append((raw.decode(), p.body[pos]))
        pos += 1
    return packet_id, filters
