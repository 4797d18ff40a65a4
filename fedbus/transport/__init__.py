"""Transports: one async interface over MQTT (aiomqtt) and an in-process bus."""

from fedbus.transport.base import Received, Transport, Will, topic_matches

__all__ = ["Received", "Transport", "Will", "topic_matches"]
