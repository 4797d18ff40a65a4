"""A thin stand-in for MicroPython's ``umqtt.simple`` over paho-mqtt, for CPython tests.

It implements the API the MicroPython client uses, with umqtt.simple's
semantics where they matter:

- ``MQTTClient(client_id, server, port=0, user=None, password=None, keepalive=0, ...)``;
- ``set_callback(f)``: ``f(topic: bytes, msg: bytes)``, called only from
  ``wait_msg``/``check_msg`` (and from ``publish`` while it waits for a
  PUBACK, as umqtt.simple does), never from another thread;
- ``set_last_will(topic, msg, retain=False, qos=0)``, ``connect(clean_session=True)``,
  ``disconnect()``, ``ping()``, ``subscribe(topic, qos=0)``, ``publish(topic, msg, retain=False, qos=0)`` (QoS 1 waits for
  the PUBACK), ``wait_msg()`` (blocks for one message), ``check_msg()``
  (non-blocking).

paho's network thread only queues incoming messages; the caller's thread
dispatches them. `install` makes ``from umqtt.simple import MQTTClient`` work.
"""

from __future__ import annotations

import queue
import sys
import types
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

_TIMEOUT_S = 30.0


class MQTTException(Exception):
    """Raised like umqtt.simple's MQTTException (connection refused, timeouts)."""


def _bytes(value: str | bytes | bytearray) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


class MQTTClient:
    """umqtt.simple.MQTTClient's API over a paho client (MQTT 3.1.1)."""

    def __init__(
        self,
        client_id: str | bytes,
        server: str,
        port: int = 0,
        user: str | None = None,
        password: str | None = None,
        keepalive: int = 0,
        ssl: bool = False,
        ssl_params: dict[str, Any] | None = None,
    ) -> None:
        if ssl:
            raise MQTTException("the stand-in does not do TLS")
        self.client_id = _bytes(client_id).decode()
        self.server = server
        self.port = port or 1883
        self.keepalive = keepalive
        self.cb: Callable[[bytes, bytes], None] | None = None
        self._inbox: queue.Queue[tuple[bytes, bytes]] = queue.Queue()
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=paho.MQTTv311,
            clean_session=True,
        )
        if user is not None:
            self._client.username_pw_set(user, password)
        self._client.on_message = self._on_message
        self._connected = queue.Queue[int]()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        self._inbox.put((_bytes(message.topic), bytes(message.payload)))

    def set_callback(self, f: Callable[[bytes, bytes], None]) -> None:
        self.cb = f

    def set_last_will(
        self, topic: str | bytes, msg: bytes, retain: bool = False, qos: int = 0
    ) -> None:
        self._client.will_set(_bytes(topic).decode(), bytes(msg), qos=qos, retain=retain)

    def connect(self, clean_session: bool = True) -> bool:
        def on_connect(client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
            self._connected.put(0 if not rc.is_failure else 1)

        self._client.on_connect = on_connect
        self._client.connect(self.server, self.port, keepalive=self.keepalive or 60)
        self._client.loop_start()
        try:
            if self._connected.get(timeout=_TIMEOUT_S) != 0:
                raise MQTTException("connection refused")
        except queue.Empty:
            raise MQTTException("no CONNACK") from None
        return False

    def disconnect(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def ping(self) -> None:
        """Keepalive is paho's business here."""

    def subscribe(self, topic: str | bytes, qos: int = 0) -> None:
        rc, _mid = self._client.subscribe(_bytes(topic).decode(), qos=qos)
        if rc != paho.MQTT_ERR_SUCCESS:
            raise MQTTException(f"subscribe failed: {rc}")

    def publish(
        self, topic: str | bytes, msg: bytes | bytearray, retain: bool = False, qos: int = 0
    ) -> None:
        info = self._client.publish(_bytes(topic).decode(), bytes(msg), qos=qos, retain=retain)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise MQTTException(f"publish failed: {info.rc}")
        if qos:
            # umqtt.simple reads packets until the PUBACK, delivering messages meanwhile
            for _ in range(int(_TIMEOUT_S / 0.01)):
                if info.is_published():
                    return
                self.check_msg(wait_s=0.01)
            raise MQTTException("no PUBACK")

    def wait_msg(self) -> None:
        self.check_msg(wait_s=_TIMEOUT_S)

    def check_msg(self, wait_s: float = 0.0) -> None:
        try:
            topic, payload = self._inbox.get(timeout=wait_s) if wait_s else self._inbox.get_nowait()
        except queue.Empty:
            return
        if self.cb is not None:
            self.cb(topic, payload)


def install() -> None:
    """Make ``import umqtt.simple`` resolve to this stand-in."""
    package = types.ModuleType("umqtt")
    simple = types.ModuleType("umqtt.simple")
    simple.MQTTClient = MQTTClient  # type: ignore[attr-defined]
    simple.MQTTException = MQTTException  # type: ignore[attr-defined]
    package.simple = simple  # type: ignore[attr-defined]
    sys.modules["umqtt"] = package
    sys.modules["umqtt.simple"] = simple
