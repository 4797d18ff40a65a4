"""What an `MqttConnection` reports: one event per packet the broker sent.

Events are facts, named in the past tense (STYLE.md section 5). They are
frozen and slotted: a round of 1,000 clients creates thousands of them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ConnectionAccepted",
    "ConnectionRefused",
    "Event",
    "MessageReceived",
    "PongReceived",
    "PublishAcked",
    "SubscribeAcked",
    "UnsubscribeAcked",
]


@dataclass(frozen=True, slots=True)
class ConnectionAccepted:
    """CONNACK with return code 0; ``session_present`` says the broker kept our session."""

    session_present: bool


@dataclass(frozen=True, slots=True)
class ConnectionRefused:
    """CONNACK with a non-zero return code; the broker closes the connection next.

    Attributes:
        return_code: 1-5 (3.2.2.3).
        reason: the spec's words for it, e.g. ``"bad user name or password"``.
    """

    return_code: int
    reason: str


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """An incoming PUBLISH. For QoS 1 the PUBACK is already queued in `data_to_send`.

    ``dup`` is the broker's redelivery flag; ``packet_id`` is None at QoS 0.
    """

    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool = False
    packet_id: int | None = None


@dataclass(frozen=True, slots=True)
class PublishAcked:
    """PUBACK for one of our QoS 1 publishes."""

    packet_id: int


@dataclass(frozen=True, slots=True)
class SubscribeAcked:
    """SUBACK: one return code per filter of the SUBSCRIBE, in order.

    Codes 0 and 1 are the granted QoS; 0x80 is a refusal (an ACL, usually).
    """

    packet_id: int
    filters: tuple[str, ...]
    return_codes: tuple[int, ...]

    @property
    def refused(self) -> tuple[str, ...]:
        """The filters the broker refused (return code 0x80)."""
        return tuple(f for f, c in zip(self.filters, self.return_codes, strict=True) if c == 0x80)


@dataclass(frozen=True, slots=True)
class UnsubscribeAcked:
    """UNSUBACK for one of our UNSUBSCRIBEs."""

    packet_id: int
    filters: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PongReceived:
    """PINGRESP: the broker is alive."""


Event = (
    ConnectionAccepted
    | ConnectionRefused
    | MessageReceived
    | PublishAcked
    | SubscribeAcked
    | UnsubscribeAcked
    | PongReceived
)
"""Everything `MqttConnection.receive_data` can return."""
