"""Transports: one async interface over MQTT (aiomqtt) and an in-process bus.

`MqttTransport` and `MemoryTransport` implement `Transport`; `Messenger`
carries fedbus messages over either (chunking, flow control, validation).
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
