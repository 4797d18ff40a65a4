"""Transports: one async interface over MQTT and an in-process bus.

`MqttTransport` (aiomqtt; MQTT 5 or 3.1.1), `LeanMqttTransport` (fedbus's own
sans-IO MQTT 3.1.1 client, `fedbus.mqtt`; far less CPU per packet) and
`MemoryTransport` implement `Transport`; `Messenger` carries fedbus messages
over any of them (chunking, flow control, validation).
They are imported from their modules (``fedbus.transport.mqtt`` loads
aiomqtt), so importing this package stays cheap.
"""

from fedbus.transport.base import (
    Received,
    Transport,
    Will,
    packet_overhead,
    publish_packet_size,
    topic_matches,
)

__all__ = [
    "Received",
    "Transport",
    "Will",
    "packet_overhead",
    "publish_packet_size",
    "topic_matches",
]
