"""A sans-IO MQTT 3.1.1 client connection: bytes in, events out, packets to send out.

`MqttConnection` knows the protocol and nothing about sockets, event loops or
clocks (time comes in as ``now``); `fedbus.transport.lean.LeanMqttTransport`
drives it over asyncio. Split like h11: packet encoding in ``_codec``, events
in ``_events``, the state machine in ``_connection``.

Only what fedbus needs from MQTT 3.1.1: CONNECT (clean session, keepalive,
credentials, will), PUBLISH at QoS 0 and 1 both ways, SUBSCRIBE/UNSUBSCRIBE
with several filters, PINGREQ and DISCONNECT. No QoS 2, no MQTT 5.
"""

from fedbus.mqtt._codec import (
    CONNACK_REASONS,
    MAX_REMAINING_LENGTH,
    check_topic_filter,
    check_topic_name,
    encode_remaining_length,
)
from fedbus.mqtt._connection import (
    DEFAULT_MAX_PACKET_SIZE,
    TRANSITIONS,
    ConnectionState,
    MqttConnection,
)
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

__all__ = [
    "CONNACK_REASONS",
    "DEFAULT_MAX_PACKET_SIZE",
    "MAX_REMAINING_LENGTH",
    "TRANSITIONS",
    "ConnectionAccepted",
    "ConnectionRefused",
    "ConnectionState",
    "Event",
    "MessageReceived",
    "MqttConnection",
    "PongReceived",
    "PublishAcked",
    "SubscribeAcked",
    "UnsubscribeAcked",
    "check_topic_filter",
    "check_topic_name",
    "encode_remaining_length",
]
