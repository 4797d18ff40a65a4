"""MQTT 3.1.1 packet encoding for the client side, and the constants both directions share.

Everything here is a pure function of its arguments. Section numbers refer to
the OASIS MQTT 3.1.1 standard (29 October 2014). Encoders check what the
spec forbids a client to send (a wildcard in a PUBLISH topic, U+0000 in any
string, a string over 65,535 bytes, a password without a user name) and raise
`LocalProtocolError`, so a bad call fails here and never reaches the broker.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from fedbus.errors import LocalProtocolError

__all__ = [
    "CONNACK_REASONS",
    "DISCONNECT",
    "MAX_REMAINING_LENGTH",
    "PINGREQ",
    "SUBACK_FAILURE",
    "check_topic_filter",
    "check_topic_name",
    "encode_connect",
    "encode_publish",
    "encode_remaining_length",
    "encode_subscribe",
    "encode_unsubscribe",
]

# Control packet types (2.2.1), as the high nibble of the first byte.
CONNECT: Final = 1
CONNACK: Final = 2
PUBLISH: Final = 3
PUBACK: Final = 4
PUBREC: Final = 5
PUBREL: Final = 6
PUBCOMP: Final = 7
SUBSCRIBE: Final = 8
SUBACK: Final = 9
UNSUBSCRIBE: Final = 10
UNSUBACK: Final = 11
PINGREQ_TYPE: Final = 12
PINGRESP: Final = 13
DISCONNECT_TYPE: Final = 14

MAX_REMAINING_LENGTH: Final = 268_435_455
"""Four varint bytes (2.2.3): the largest packet body MQTT can express."""

PINGREQ: Final = b"\xc0\x00"
DISCONNECT: Final = b"\xe0\x00"
SUBACK_FAILURE: Final = 0x80

CONNACK_REASONS: Final = {
    1: "unacceptable protocol version (the broker does not speak MQTT 3.1.1)",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}
"""CONNACK return codes 1-5 (3.2.2.3); 0 is acceptance, 6-255 are reserved."""

_PROTOCOL_NAME_AND_LEVEL: Final = b"\x00\x04MQTT\x04"
_MAX_STRING: Final = 0xFFFF


def encode_remaining_length(n: int) -> bytes:
    """The variable-length "remaining length" (2.2.3): 7 bits a byte, low group first."""
    if not 0 <= n <= MAX_REMAINING_LENGTH:
        raise LocalProtocolError(f"packet body of {n} bytes is over MQTT's {MAX_REMAINING_LENGTH}")
    if n < 128:
        return bytes((n,))
    out = bytearray()
    while True:
        digit = n & 0x7F
        n >>= 7
        if n:
            out.append(digit | 0x80)
        else:
            out.append(digit)
            return bytes(out)


def _string(value: str, what: str) -> bytes:
    """A UTF-8 string with its 2-byte length prefix (1.5.3)."""
    if "\x00" in value:
        raise LocalProtocolError(f"{what} {value!r} contains U+0000, which MQTT forbids")
    return _binary(value.encode("utf-8"), what)


def _binary(value: bytes, what: str) -> bytes:
    if len(value) > _MAX_STRING:
        raise LocalProtocolError(f"{what} is {len(value)} bytes, over MQTT's 65,535")
    return len(value).to_bytes(2, "big") + value


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + encode_remaining_length(len(body)) + body


def check_topic_filter(topic_filter: str) -> None:
    """Raise `LocalProtocolError` for a filter 4.7.1 forbids (misplaced ``#`` or ``+``)."""
    if not topic_filter:
        raise LocalProtocolError("a topic filter must not be empty")
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if ("#" in level and (level != "#" or i != len(levels) - 1)) or (
            "+" in level and level != "+"
        ):
            raise LocalProtocolError(
                f"topic filter {topic_filter!r}: '#' must be a whole last level and '+' a whole level"
            )


def encode_connect(
    client_id: str,
    *,
    clean_session: bool,
    keepalive_s: int,
    username: str | None = None,
    password: str | None = None,
    will: tuple[str, bytes, int, bool] | None = None,
) -> bytes:
    """CONNECT (3.1): protocol level 4, then client id, will, user name, password.

    ``will`` is ``(topic, payload, qos, retain)``.
    """
    if not 0 <= keepalive_s <= 0xFFFF:
        raise LocalProtocolError(f"keepalive must be 0..65535 s, got {keepalive_s}")
    if not client_id and not clean_session:
        raise LocalProtocolError("an empty client id needs clean_session=True (3.1.3.1)")
    if password is not None and username is None:
        raise LocalProtocolError("MQTT 3.1.1 sends a password only with a user name (3.1.2.9)")
    flags = 0x02 if clean_session else 0
    payload = [_string(client_id, "client id")]
    if will is not None:
        topic, message, qos, retain = will
        if qos not in (0, 1, 2):
            raise LocalProtocolError(f"will QoS must be 0, 1 or 2, got {qos}")
        check_topic_name(topic)
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        payload += [_string(topic, "will topic"), _binary(message, "will payload")]
    if username is not None:
        flags |= 0x80
        payload.append(_string(username, "user name"))
    if password is not None:
        flags |= 0x40
        payload.append(_binary(password.encode("utf-8"), "password"))
    header = _PROTOCOL_NAME_AND_LEVEL + bytes((flags,)) + keepalive_s.to_bytes(2, "big")
    return _packet(CONNECT << 4, header + b"".join(payload))


def check_topic_name(topic: str) -> None:
    """Raise `LocalProtocolError` for a name a PUBLISH may not carry (4.7.3, 3.3.2.1)."""
    if not topic or "+" in topic or "#" in topic:
        raise LocalProtocolError(f"cannot publish to {topic!r}: empty or a wildcard")


def encode_publish(
    topic: str, payload: bytes, *, qos: int, retain: bool, packet_id: int | None
) -> bytes:
    """PUBLISH (3.3); ``packet_id`` for QoS 1 only. The payload is copied once, here."""
    check_topic_name(topic)
    name = _string(topic, "topic")
    first = (PUBLISH << 4) | (qos << 1) | (1 if retain else 0)
    pid = b"" if packet_id is None else packet_id.to_bytes(2, "big")
    length = len(name) + len(pid) + len(payload)
    return b"".join((bytes((first,)), encode_remaining_length(length), name, pid, payload))


def encode_subscribe(packet_id: int, filters: Sequence[tuple[str, int]]) -> bytes:
    """SUBSCRIBE (3.8): fixed-header flags 0b0010, then (filter, requested QoS) pairs."""
    if not filters:
        raise LocalProtocolError("SUBSCRIBE needs at least one topic filter (3.8.3)")
    body = [packet_id.to_bytes(2, "big")]
    for topic_filter, qos in filters:
        check_topic_filter(topic_filter)
        if qos not in (0, 1):
            # A QoS 2 grant would bring PUBREL handshakes this client does not implement.
            raise LocalProtocolError(f"requested QoS must be 0 or 1, got {qos}")
        body += [_string(topic_filter, "topic filter"), bytes((qos,))]
    return _packet((SUBSCRIBE << 4) | 0x02, b"".join(body))


def encode_unsubscribe(packet_id: int, filters: Sequence[str]) -> bytes:
    """UNSUBSCRIBE (3.10): fixed-header flags 0b0010, then the filters."""
    if not filters:
        raise LocalProtocolError("UNSUBSCRIBE needs at least one topic filter (3.10.3)")
    body = [packet_id.to_bytes(2, "big")]
    for topic_filter in filters:
        check_topic_filter(topic_filter)
        body.append(_string(topic_filter, "topic filter"))
    return _packet((UNSUBSCRIBE << 4) | 0x02, b"".join(body))
