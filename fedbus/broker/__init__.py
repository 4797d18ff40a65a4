"""Embedded and managed MQTT brokers.

`ManagedBroker` runs mosquitto (or, without it, the pure-Python amqtt broker)
as a child process for a federation, the test suite and ``fedbus broker``.
"""

from __future__ import annotations

from fedbus.broker._net import free_port
from fedbus.broker.managed import AMQTT_NOTICE, BrokerKind, ManagedBroker, find_mosquitto
from fedbus.broker.mosquitto import BrokerTls, make_password_file

__all__ = [
    "AMQTT_NOTICE",
    "BrokerKind",
    "BrokerTls",
    "ManagedBroker",
    "find_mosquitto",
    "free_port",
    "make_password_file",
]
