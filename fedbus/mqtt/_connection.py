"""`MqttConnection`: the client side of one MQTT 3.1.1 connection, without I/O.

Theory of operation (h11's shape, STYLE.md section 2):

* **Bytes in, events out.** `receive_data` takes whatever the socket read
  (any split: half a header, three packets and a bit) and returns one event
  per complete packet. Calls that send (`connect`, `publish`, `subscribe`,
  ...) return the packet bytes; the caller writes them. Nothing here touches
  a socket, a clock or an event loop: time comes in as ``now``.
* **Automatic acknowledgements.** An incoming QoS 1 PUBLISH queues its PUBACK,
  collected with `data_to_send` after `receive_data` (one write for all the
  acknowledgements of a read).
* **Packet ids.** QoS 1 publishes, SUBSCRIBEs and UNSUBSCRIBEs get ids from
  one 16-bit counter that skips ids still awaiting their acknowledgement; an
  acknowledgement for an id we are not waiting for is a protocol error.
* **Bounded input.** A packet whose announced body exceeds ``max_packet_size``
  is refused as soon as its header is read, so at most one header plus
  ``max_packet_size`` bytes are ever buffered.
* **Errors.** Malformed or unexpected input raises `RemoteProtocolError` and
  moves the connection to ERROR, where every further call raises
  `LocalProtocolError` (the caller drops the socket). Events of packets
  that came before the bad one in the same read are dropped with it, as
  with any lost connection (a persistent session gets QoS 1 ones resent).
  Calls that do not fit the state (publishing before CONNACK) raise
  `LocalProtocolError`.
* **Copies.** Packets are parsed in place from the read buffer through a
  memoryview; a payload is copied exactly once, into the ``bytes`` handed out.

States and transitions (`TRANSITIONS`)::

    IDLE       --connect()-->    CONNECTING
    CONNECTING --CONNACK 0-->    CONNECTED
    CONNECTING --CONNACK 1..5--> CLOSED
    CONNECTING --disconnect()--> CLOSED
    CONNECTED  --disconnect()--> CLOSED
    any --malformed input--> ERROR

QoS 2 is not implemented: subscriptions request at most QoS 1 (so the broker
never sends QoS 2) and publishes are QoS 0 or 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from fedbus._types import StateEnum
from fedbus.errors import LocalProtocolError, RemoteProtocolError
from fedbus.mqtt import _codec as c
from fedbus.mqtt._events import (
    ConnectionAccepted,
    ConnectionRefused,
    Event,
    MessageReceived,
    PongReceived,
    PublishAcked,
    SubscribeAcked,
    UnsubscribeAcked,
)

__all__ = ["DEFAULT_MAX_PACKET_SIZE", "TRANSITIONS", "ConnectionState", "MqttConnection"]

DEFAULT_MAX_PACKET_SIZE: Final = 1 << 20
"""Default bound on an incoming packet's body; fedbus chunks below ``max_payload_bytes``."""


class ConnectionState(StateEnum):
    """Where the connection stands; ERROR and CLOSED are terminal."""

    IDLE = "idle"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    CLOSED = "closed"
    ERROR = "error"


S = ConnectionState
TRANSITIONS: Final[dict[tuple[ConnectionState, str], ConnectionState]] = {
    (S.IDLE, "connect"): S.CONNECTING,
    (S.CONNECTING, "accepted"): S.CONNECTED,
    (S.CONNECTING, "refused"): S.CLOSED,
    (S.CONNECTING, "disconnect"): S.CLOSED,
    (S.CONNECTED, "disconnect"): S.CLOSED,
}
"""(state, input) -> next state; a missing pair is an illegal move."""

_KIND_PUBLISH: Final = 0
_KIND_SUBSCRIBE: Final = 1
_KIND_UNSUBSCRIBE: Final = 2
_ACK_KIND: Final = {c.PUBACK: _KIND_PUBLISH, c.UNSUBACK: _KIND_UNSUBSCRIBE}
_FLAGS_0010: Final = (c.PUBREL, c.SUBSCRIBE, c.UNSUBSCRIBE)


class MqttConnection:
    """The client end of an MQTT 3.1.1 connection, as a pure state machine.

    Args:
        max_packet_size: largest incoming packet body (the remaining length)
            accepted; a larger one is a `RemoteProtocolError`.
    """

    def __init__(self, *, max_packet_size: int = DEFAULT_MAX_PACKET_SIZE) -> None:
        if not 2 <= max_packet_size <= c.MAX_REMAINING_LENGTH:
            raise ValueError(f"max_packet_size must be 2..{c.MAX_REMAINING_LENGTH}")
        self._max_packet_size = max_packet_size
        self._state = ConnectionState.IDLE
        self._buf = bytearray()
        self._out = bytearray()
        self._next_id = 0
        self._pending: dict[int, tuple[int, tuple[str, ...]]] = {}
        self._keepalive_s = 0
        self._sent = 0  # packets sent, for the keepalive
        self._received = 0
        self._sent_seen = -1
        self._received_seen = 0
        self._last_sent_at = 0.0
        self._ping_sent_at: float | None = None

    @property
    def state(self) -> ConnectionState:
        """The current state."""
        return self._state

    @property
    def pending_ids(self) -> frozenset[int]:
        """Packet ids awaiting PUBACK, SUBACK or UNSUBACK."""
        return frozenset(self._pending)

    # -- sending ------------------------------------------------------------------

    def connect(
        self,
        client_id: str,
        *,
        clean_session: bool = True,
        keepalive_s: int = 60,
        username: str | None = None,
        password: str | None = None,
        will: tuple[str, bytes, int, bool] | None = None,
    ) -> bytes:
        """The CONNECT packet; ``will`` is ``(topic, payload, qos, retain)``."""
        data = c.encode_connect(
            client_id,
            clean_session=clean_session,
            keepalive_s=keepalive_s,
            username=username,
            password=password,
            will=will,
        )
        self._move("connect")
        self._keepalive_s = keepalive_s
        self._sent += 1
        return data

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> tuple[int | None, bytes]:
        """A PUBLISH packet and its packet id (None at QoS 0); await `PublishAcked` for QoS 1."""
        self._require_connected("publish")
        if qos not in (0, 1):
            raise LocalProtocolError(f"this client publishes at QoS 0 or 1, not {qos}")
        packet_id = self._allocate(_KIND_PUBLISH, ()) if qos else None
        try:
            data = c.encode_publish(topic, payload, qos=qos, retain=retain, packet_id=packet_id)
        except LocalProtocolError:
            if packet_id is not None:
                del self._pending[packet_id]
            raise
        self._sent += 1
        return packet_id, data

    def subscribe(self, filters: Sequence[tuple[str, int]]) -> tuple[int, bytes]:
        """One SUBSCRIBE for several ``(filter, qos)`` pairs; await `SubscribeAcked`."""
        self._require_connected("subscribe")
        names = tuple(f for f, _ in filters)
        packet_id = self._allocate(_KIND_SUBSCRIBE, names)
        try:
            data = c.encode_subscribe(packet_id, filters)
        except LocalProtocolError:
            del self._pending[packet_id]
            raise
        self._sent += 1
        return packet_id, data

    def unsubscribe(self, filters: Sequence[str]) -> tuple[int, bytes]:
        """One UNSUBSCRIBE for several filters; await `UnsubscribeAcked`."""
        self._require_connected("unsubscribe")
        packet_id = self._allocate(_KIND_UNSUBSCRIBE, tuple(filters))
        try:
            data = c.encode_unsubscribe(packet_id, filters)
        except LocalProtocolError:
            del self._pending[packet_id]
            raise
        self._sent += 1
        return packet_id, data

    def ping(self) -> bytes:
        """A PINGREQ; `keepalive` sends them on its own when due."""
        self._require_connected("ping")
        self._sent += 1
        return c.PINGREQ

    def disconnect(self) -> bytes:
        """The DISCONNECT packet (the broker then discards our will); the connection is CLOSED."""
        self._move("disconnect")
        self._pending.clear()
        return c.DISCONNECT

    def data_to_send(self) -> bytes:
        """Bytes queued by `receive_data` (PUBACKs for QoS 1 messages); empties the queue."""
        if not self._out:
            return b""
        data = bytes(self._out)
        self._out.clear()
        return data

    # -- keepalive ----------------------------------------------------------------

    def keepalive(self, now: float) -> bytes:
        """Call every ``keepalive_s / 4`` s or more often: a PINGREQ when one is due, else b"".

        One is due when nothing was sent for half the keepalive (the broker
        allows 1.5 times it, 3.1.2.10); activity is sampled at each call.
        """
        if self._state is not ConnectionState.CONNECTED or not self._keepalive_s:
            return b""
        if self._sent != self._sent_seen:
            self._sent_seen = self._sent
            self._last_sent_at = now
        if self._received != self._received_seen:
            self._received_seen = self._received
            self._ping_sent_at = None  # any packet proves the broker alive
        if self._ping_sent_at is None and now - self._last_sent_at >= self._keepalive_s / 2:
            self._ping_sent_at = now
            return self.ping()
        return b""

    def pong_overdue(self, now: float) -> bool:
        """Whether a PINGREQ went unanswered for a whole keepalive: the link is dead."""
        return self._ping_sent_at is not None and now - self._ping_sent_at >= self._keepalive_s

    # -- receiving ----------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes read from the socket; return the events of every complete packet.

        Raises:
            RemoteProtocolError: malformed or unexpected input; the connection is in ERROR.
            LocalProtocolError: called in ERROR.
        """
        state = self._state
        if state is ConnectionState.ERROR:
            raise LocalProtocolError("the MQTT connection is in ERROR; drop the socket")
        if state is ConnectionState.CLOSED or not data:
            return []  # after DISCONNECT or a refusal, whatever still arrives is moot
        buf = self._buf
        if buf:
            buf += data
            source: bytes | bytearray | memoryview = buf
        else:
            source = data
        events: list[Event] = []
        with memoryview(source) as view:
            try:
                consumed = self._parse(view, events)
            except RemoteProtocolError:
                self._state = ConnectionState.ERROR
                self._buf = bytearray()
                raise
        if source is buf:
            del buf[:consumed]
        elif consumed < len(data):
            buf += data[consumed:]
        return events

    def _parse(self, view: memoryview, events: list[Event]) -> int:
        """Dispatch every complete packet in ``view``; return how many bytes were used."""
        n = len(view)
        pos = 0
        limit = self._max_packet_size
        while n - pos >= 2:
            first = view[pos]
            i = pos + 1
            length = 0
            shift = 0
            while True:
                if i >= n:
                    return pos  # the remaining length itself is incomplete
                byte = view[i]
                i += 1
                length |= (byte & 0x7F) << shift
                if not byte & 0x80:
                    break
                shift += 7
                if shift > 21:
                    raise RemoteProtocolError("remaining length longer than 4 bytes (2.2.3)")
            if length > limit:
                raise RemoteProtocolError(
                    f"incoming packet of {length} bytes is over the limit of {limit} "
                    "(max_packet_size)"
                )
            end = i + length
            if end > n:
                return pos
            self._received += 1
            if first >> 4 == c.PUBLISH:
                events.append(self._publish(first, view, i, end))
            else:
                events.append(self._control(first, view[i:end]))
            pos = end
        return pos

    def _publish(self, first: int, view: memoryview, i: int, end: int) -> MessageReceived:
        if self._state is not ConnectionState.CONNECTED:
            raise RemoteProtocolError("PUBLISH before CONNACK")
        qos = (first >> 1) & 0x03
        if qos > 1:
            raise RemoteProtocolError(f"PUBLISH at QoS {qos}; this client subscribes at most QoS 1")
        if end - i < 2:
            raise RemoteProtocolError("PUBLISH too short for its topic length")
        start = i + 2
        stop = start + ((view[i] << 8) | view[i + 1])
        packet_id = None
        if qos:
            if stop + 2 > end:
                raise RemoteProtocolError("PUBLISH too short for its topic and packet id")
            packet_id = (view[stop] << 8) | view[stop + 1]
            if not packet_id:
                raise RemoteProtocolError("PUBLISH with packet id 0 (2.3.1)")
            self._out += b"\x40\x02"
            self._out += view[stop : stop + 2]
            self._sent += 1
            body_start = stop + 2
        elif stop > end:
            raise RemoteProtocolError("PUBLISH too short for its topic")
        else:
            body_start = stop
        try:
            topic = str(view[start:stop], "utf-8")
        except UnicodeDecodeError as exc:
            raise RemoteProtocolError("PUBLISH topic is not valid UTF-8 (1.5.3)") from exc
        if not topic or "\x00" in topic or "+" in topic or "#" in topic:
            raise RemoteProtocolError(f"PUBLISH topic {topic!r} is empty, a wildcard or has U+0000")
        return MessageReceived(
            topic,
            view[body_start:end].tobytes(),
            qos,
            bool(first & 0x01),
            bool(first & 0x08),
            packet_id,
        )

    def _control(self, first: int, body: memoryview) -> Event:
        kind = first >> 4
        flags = first & 0x0F
        if flags != (0x02 if kind in _FLAGS_0010 else 0):
            raise RemoteProtocolError(f"packet type {kind} with reserved flags {flags:#06b}")
        if kind == c.CONNACK:
            return self._connack(body)
        if self._state is not ConnectionState.CONNECTED:
            raise RemoteProtocolError(f"packet type {kind} before CONNACK")
        if kind == c.PINGRESP:
            if len(body):
                raise RemoteProtocolError("PINGRESP with a body")
            self._ping_sent_at = None
            return PongReceived()
        if kind in (c.PUBACK, c.UNSUBACK):
            if len(body) != 2:
                raise RemoteProtocolError(f"packet type {kind} must have a 2-byte body")
            packet_id = (body[0] << 8) | body[1]
            filters = self._acknowledge(packet_id, _ACK_KIND[kind])
            if kind == c.PUBACK:
                return PublishAcked(packet_id)
            return UnsubscribeAcked(packet_id, filters)
        if kind == c.SUBACK:
            if len(body) < 3:
                raise RemoteProtocolError("SUBACK without a return code")
            packet_id = (body[0] << 8) | body[1]
            codes = tuple(body[2:])
            for code in codes:
                if code not in (0, 1, c.SUBACK_FAILURE):
                    raise RemoteProtocolError(f"SUBACK return code {code:#04x} (3.9.3)")
            filters = self._acknowledge(packet_id, _KIND_SUBSCRIBE)
            if len(codes) != len(filters):
                raise RemoteProtocolError(
                    f"SUBACK has {len(codes)} return codes for {len(filters)} filters"
                )
            return SubscribeAcked(packet_id, filters, codes)
        raise RemoteProtocolError(f"a broker does not send packet type {kind} to a client")

    def _connack(self, body: memoryview) -> Event:
        if self._state is not ConnectionState.CONNECTING:
            raise RemoteProtocolError("CONNACK when not connecting")
        if len(body) != 2:
            raise RemoteProtocolError("CONNACK must have a 2-byte body")
        flags, code = body[0], body[1]
        if flags & 0xFE:
            raise RemoteProtocolError(f"CONNACK with reserved flags {flags:#04x}")
        if code == 0:
            self._move("accepted")
            return ConnectionAccepted(session_present=bool(flags & 0x01))
        if code not in c.CONNACK_REASONS:
            raise RemoteProtocolError(f"CONNACK return code {code} is reserved (3.2.2.3)")
        if flags:
            raise RemoteProtocolError("CONNACK refusal with session present set (3.2.2.2)")
        self._move("refused")
        return ConnectionRefused(code, c.CONNACK_REASONS[code])

    # -- bookkeeping --------------------------------------------------------------

    def _move(self, what: str) -> None:
        try:
            self._state = TRANSITIONS[self._state, what]
        except KeyError:
            raise LocalProtocolError(f"cannot {what} in state {self._state.name}") from None

    def _require_connected(self, what: str) -> None:
        if self._state is not ConnectionState.CONNECTED:
            raise LocalProtocolError(f"cannot {what} in state {self._state.name}")

    def _allocate(self, kind: int, filters: tuple[str, ...]) -> int:
        pending = self._pending
        if len(pending) >= 0xFFFF:
            raise LocalProtocolError("all 65,535 packet ids are awaiting acknowledgement")
        packet_id = self._next_id
        while True:
            packet_id = packet_id % 0xFFFF + 1
            if packet_id not in pending:
                break
        self._next_id = packet_id
        pending[packet_id] = (kind, filters)
        return packet_id

    def _acknowledge(self, packet_id: int, kind: int) -> tuple[str, ...]:
        entry = self._pending.get(packet_id)
        if entry is None or entry[0] != kind:
            raise RemoteProtocolError(
                f"acknowledgement for packet id {packet_id}, which is not pending"
            )
        del self._pending[packet_id]
        return entry[1]
