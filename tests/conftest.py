"""Fixtures shared by the whole suite. Keep this file small.

* ``mosquitto``: a session-wide `ManagedBroker` (mosquitto on 127.0.0.1, a
  free port). Skipped when mosquitto is not installed, unless
  ``FEDBUS_REQUIRE_MOSQUITTO=1`` (CI sets it), where a missing broker must fail
  the run instead of silently skipping every integration test.
  Tests that restart or stop a broker should start their own `ManagedBroker`
  rather than disturb this shared one.
* ``amqtt_broker``: the same with the pure-Python amqtt fallback (MQTT 3.1.1
  only); skipped when amqtt is not installed.
* ``unique_prefix``: a fresh topic prefix per test (``t`` + 8 hex digits),
  so tests sharing the session broker never see each other's messages.
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from collections.abc import Iterator

import pytest

from fedbus.broker import ManagedBroker, find_mosquitto


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[ManagedBroker]:
    """A running mosquitto on 127.0.0.1 for the whole session."""
    if find_mosquitto() is None:
        reason = "mosquitto is not installed (apt install mosquitto)"
        if os.environ.get("FEDBUS_REQUIRE_MOSQUITTO") == "1":
            pytest.fail(f"FEDBUS_REQUIRE_MOSQUITTO=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    broker = ManagedBroker(kind="mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture(scope="session")
def amqtt_broker() -> Iterator[ManagedBroker]:
    """A running amqtt broker (the pure-Python fallback) for the whole session."""
    if importlib.util.find_spec("amqtt") is None:
        pytest.skip("amqtt is not installed (pip install 'fedbus[broker]')")
    broker = ManagedBroker(kind="amqtt")
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture
def unique_prefix() -> str:
    """A topic prefix no other test uses, e.g. ``t1a2b3c4d``."""
    return f"t{uuid.uuid4().hex[:8]}"
