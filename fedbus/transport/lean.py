"""`LeanMqttTransport`: the `Transport` interface over MQTT 3.1.1, without paho or aiomqtt.

Why: a simulation runs 1,000 clients, each with its own MQTT connection, in
one event loop. Through aiomqtt each packet costs about 100 us (paho's parsing
and copies, aiomqtt's futures, one send per packet, a thread-pool TCP
connect). Here the sans-IO `fedbus.mqtt.MqttConnection` parses in place and
an `asyncio.Protocol` (`fedbus.transport._lean_link.Link`) feeds it.

Theory of operation, the same contract as `fedbus.transport.mqtt.MqttTransport`:

* **Supervisor.** A task named ``fedbus[<client_id>].lean`` connects
  (``loop.create_connection``, TCP_NODELAY, TLS through `client_ssl_context`),
  sends CONNECT, waits for CONNACK, re-subscribes every subscription in one
  SUBSCRIBE, publishes the link, then sends keepalive pings and enforces
  PUBACK deadlines until the link dies. It then reconnects after an
  exponential backoff with full jitter (`fedbus.config.ReconnectPolicy`);
  an outage longer than ``reconnect.deadline_s`` fails the transport, and
  every waiter raises `ConnectError` chained to the last cause.
* **Calls.** A QoS 1 publish waits for its PUBACK; at most ``max_inflight``
  wait at once. If its link dies first it is re-sent on the next link (at
  least once), at most ``MAX_LOSSES_PER_CALL`` times.
* **Receiving.** Messages go into the inbox from ``data_received`` itself, or
  to the function given to `set_receiver` (`fedbus.transport.base.PushReceiver`:
  a `Messenger` then handles each message in that same callback); the PUBACKs
  of one read leave in one write.
* **Limits.** A PUBLISH over ``max_payload_bytes`` is refused before sending
  (`PayloadTooLargeError`); an incoming packet over ``max_incoming_bytes``
  (default: ``max_payload_bytes``) is a protocol error that drops the link,
  so a hostile or misconfigured peer cannot make us buffer without bound.
* **Scope.** MQTT 3.1.1 only (``protocol`` "auto" or "3.1.1"; "5" is a
  `ConfigError`), QoS 0 and 1. `MqttTransport` stays the default for
  MQTT 5 and cloud brokers.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import ClassVar, Literal

from fedbus.config import BrokerConfig
from fedbus.errors import ConfigError, LocalProtocolError, TransportError
from fedbus.mqtt import (
    MessageReceived,
    MqttConnection,
    PublishAcked,
    SubscribeAcked,
    check_topic_filter,
)
from fedbus.transport import _supervised
from fedbus.transport._lean_connect import FatalConnect, Refused, open_link, serve
from fedbus.transport._lean_link import TIMED_OUT, Answer, Link
from fedbus.transport._mqtt_support import Inbox
from fedbus.transport._supervised import (
    CLOSE_TIMEOUT_S,
    MAX_LOSSES_PER_CALL,
    SupervisedTransport,
    check_client_args,
    default_ack_timeout_s,
)
from fedbus.transport.base import Received, Will

__all__ = ["LeanMqttTransport"]


class _Inbox(Inbox):
    def empty(self) -> bool:
        return not self._items


class LeanMqttTransport(SupervisedTransport[Link]):
    """A `fedbus.transport.base.Transport` over an MQTT 3.1.1 broker, on asyncio alone.

    Args:
        config: broker address, TLS, credentials, limits and reconnect policy.
        client_id: MQTT client id; equals the node id.
        will: last will, published by the broker if the connection dies
            without a clean close.
        clean_session: False keeps the broker-side session across disconnects.
        logger: where connection events go; ``fedbus.transport.lean`` by default.
        max_queued_messages: bound on received messages waiting for the
            consumer; beyond it new ones are dropped and counted. 0: unbounded.
        max_incoming_bytes: largest incoming packet body; default ``max_payload_bytes``.
        ack_timeout_s: PUBACK deadline; default as `MqttTransport` (at least 60 s).

    Raises:
        ConfigError: ``protocol="5"``, unreadable TLS files, or ``password_env`` not set.
    """

    _KIND: ClassVar[str] = "LeanMqttTransport"
    _TASK_TAG: ClassVar[str] = "lean"
    _SUPERVISOR_LOG_NAME: ClassVar[str] = "lean mqtt"
    _RETRYABLE: ClassVar[tuple[type[Exception], ...]] = (OSError, TimeoutError, Refused)
    _inbox: _Inbox

    def __init__(
        self,
        config: BrokerConfig,
        client_id: str,
        *,
        will: Will | None = None,
        clean_session: bool = True,
        logger: logging.Logger | None = None,
        max_queued_messages: int = 0,
        max_incoming_bytes: int | None = None,
        ack_timeout_s: float | None = None,
    ) -> None:
        check_client_args(client_id, max_queued_messages)
        if config.protocol == "5":
            raise ConfigError(
                "LeanMqttTransport speaks MQTT 3.1.1 only; use MqttTransport for MQTT 5",
                path="broker.protocol",
            )
        super().__init__(
            config,
            client_id,
            logger=logger,
            default_logger=__name__,
            inbox=_Inbox(max_queued_messages),
        )
        self._will = None if will is None else (will.topic, will.payload, will.qos, will.retain)
        self._clean_session = clean_session
        self._max_incoming = max_incoming_bytes or config.max_payload_bytes
        self._ack_timeout_s = ack_timeout_s or default_ack_timeout_s(config)
        self._tick_s = min(config.keepalive_s, self._ack_timeout_s) / 4
        self._receiver: Callable[[Received], None] | None = None
        self._connected_once = False

    # -- properties and hooks of SupervisedTransport -------------------------------

    @property
    def protocol(self) -> Literal["3.1.1"] | None:
        """Always "3.1.1" once connected; None before the first connection."""
        return "3.1.1" if self._connected_once else None

    def _link_alive(self, link: Link) -> bool:
        return link.alive

    async def _end_link(self, task: asyncio.Task[None] | None) -> None:
        """Send DISCONNECT (the broker discards the will) and close the last link."""
        link, self._link = self._link, None
        if link is not None and link.alive:
            link.write(link.conn.disconnect())
            link.close()
            await asyncio.wait({link.lost}, timeout=CLOSE_TIMEOUT_S)
            link.kill(None)

    # -- lifecycle --------------------------------------------------------------

    async def abort(self) -> None:
        """Simulate a crash: drop the TCP connection without DISCONNECT, so the will fires.

        Then the transport closes as `aclose` does. For fault injection; idempotent.
        """
        link = self._link
        if self._open and link is not None:
            self._closing = True  # no reconnect
            link.kill(None)
        await self.aclose()

    # -- the Transport interface ------------------------------------------------

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        """Publish; return when the broker accepted it (QoS 1) or it was written (QoS 0).

        Raises:
            PayloadTooLargeError: the packet would exceed ``max_payload_bytes``.
            ValueError: QoS other than 0 or 1, or a bad topic.
            ConnectError: the broker stayed unreachable past ``reconnect.deadline_s``.
            TransportError: no PUBACK in time, or the connection died repeatedly
                while this message was in flight.
            TransportClosed: the transport is closed.
        """
        if qos not in (0, 1):
            raise ValueError(f"LeanMqttTransport publishes at QoS 0 or 1, not {qos}")
        if not topic or "+" in topic or "#" in topic:
            raise ValueError(f"cannot publish to {topic!r}: empty or a wildcard")
        self._check_size(topic, payload)
        self._check_open()
        if qos == 0:
            link = await self._writable_link()
            link.write(link.conn.publish(topic, payload, qos=0, retain=retain)[1])
        else:
            async with self._window:
                await self._publish_qos1(topic, payload, retain)
        self._stats.published += 1
        self._stats.bytes_out += len(payload)

    async def _publish_qos1(self, topic: str, payload: bytes, retain: bool) -> None:
        loop = asyncio.get_running_loop()
        losses = 0
        while True:
            link = await self._writable_link()
            packet_id, data = link.conn.publish(topic, payload, qos=1, retain=retain)
            assert packet_id is not None
            answer = link.expect(packet_id, loop.time() + self._ack_timeout_s)
            link.write(data)
            try:
                result = await answer
            finally:
                link.forget(packet_id)
            if type(result) is PublishAcked:
                return
            if result == TIMED_OUT:
                raise TransportError(
                    f"no PUBACK for the publish to {topic!r} within {self._ack_timeout_s:g} s "
                    f"({self._config.url})"
                )
            losses = self._after_loss(link, losses, f"publish to {topic!r}")
            self._stats.republished += 1

    async def subscribe(self, topic_filter: str, *, qos: int = 1) -> None:
        """Subscribe; kept across reconnects (re-sent on every new connection).

        Raises:
            ValueError: QoS other than 0 or 1, or a malformed filter.
            TransportError: the broker refused the subscription (e.g. an ACL).
            ConnectError: the broker stayed unreachable past the deadline.
            TransportClosed: the transport is closed.
        """
        if qos not in (0, 1):
            raise ValueError(f"LeanMqttTransport subscribes at QoS 0 or 1, not {qos}")
        try:
            check_topic_filter(topic_filter)
        except LocalProtocolError as exc:
            raise ValueError(str(exc)) from exc
        self._check_open()
        self._subscriptions[topic_filter] = qos
        try:
            result = await self._request(
                lambda conn: conn.subscribe([(topic_filter, qos)]),
                what=f"subscribe to {topic_filter!r}",
            )
        except BaseException:
            self._subscriptions.pop(topic_filter, None)
            raise
        assert isinstance(result, SubscribeAcked)
        if result.refused:
            self._subscriptions.pop(topic_filter, None)
            raise TransportError(
                f"broker refused the subscription to {topic_filter!r} (SUBACK 0x80)"
            )

    async def unsubscribe(self, topic_filter: str) -> None:
        """Drop a subscription (also from the set re-sent on reconnect).

        Raises:
            ConnectError: the broker stayed unreachable past the deadline.
            TransportClosed: the transport is closed.
        """
        try:
            check_topic_filter(topic_filter)
        except LocalProtocolError as exc:
            raise ValueError(str(exc)) from exc
        self._check_open()
        self._subscriptions.pop(topic_filter, None)
        await self._request(
            lambda conn: conn.unsubscribe([topic_filter]),
            what=f"unsubscribe from {topic_filter!r}",
        )

    def set_receiver(self, receiver: Callable[[Received], None] | None) -> None:
        """Call ``receiver`` for each message from now on instead of queueing it (None: queue again).

        `fedbus.transport.base.PushReceiver`: the call happens in the socket's
        ``data_received``, so ``receiver`` must not block; an exception it
        raises is logged and the message dropped (the connection stays up).
        Messages queued before are still yielded by `messages`, first.
        """
        self._receiver = receiver

    # -- calls on the current link ------------------------------------------------

    async def _writable_link(self) -> Link:
        """The live connection, once its write buffer is below the high-water mark."""
        while True:
            link = self._link
            if link is None or not link.alive:
                link = await self._wait_link()
            await link.drain()
            if link.alive:
                self._check_open()
                return link

    def _after_loss(self, link: Link, losses: int, what: str) -> int:
        self._check_open()
        losses += 1
        if losses >= MAX_LOSSES_PER_CALL:
            cause = link.lost.result() if link.lost.done() else None
            raise TransportError(
                f"{what}: the connection to {self._config.url} died {losses} times "
                "while this call was in flight; a broker limit (message_size_limit) "
                "may be rejecting it"
            ) from cause
        return losses

    async def _request(
        self, make: Callable[[MqttConnection], tuple[int, bytes]], *, what: str
    ) -> Answer:
        """Send a SUBSCRIBE or UNSUBSCRIBE; its acknowledgement, re-sent on the next link if needed."""
        losses = 0
        timeout_s = self._config.connect_timeout_s
        while True:
            link = await self._writable_link()
            packet_id, data = make(link.conn)
            answer = link.expect(packet_id, math.inf)
            link.write(data)
            try:
                async with asyncio.timeout(timeout_s):
                    result = await answer
            except TimeoutError as exc:
                raise TransportError(
                    f"{what}: no acknowledgement within {timeout_s:g} s ({self._config.url})"
                ) from exc
            finally:
                link.forget(packet_id)
            if result is not None:
                return result
            losses = self._after_loss(link, losses, what)

    def _deliver(self, message: MessageReceived) -> None:
        stats = self._stats
        stats.received += 1
        stats.bytes_in += len(message.payload)
        received = Received(message.topic, message.payload, message.qos, message.retain)
        receiver = self._receiver
        if receiver is not None and self._inbox.empty() and not self._inbox.closed:
            try:
                receiver(received)
            except Exception:  # the receiver owns its errors; keep the connection
                stats.dropped += 1
                self._log.exception("%s: the message receiver failed", self._client_id)
            return
        if not self._inbox.put(received):
            stats.dropped += 1

    # -- the supervisor (connect, keepalive, reconnect) ------------------------------

    def _where(self) -> str:
        return f"{self._config.url} as {self._client_id!r}"

    async def _open_link(self) -> Link:
        try:
            return await open_link(
                self._config,
                self._client_id,
                MqttConnection(max_packet_size=self._max_incoming),
                self._deliver,
                ssl_context=self._ssl,
                clean_session=self._clean_session,
                credentials=(self._username, self._password),
                will=self._will,
                subscriptions=self._subscriptions,
                log=self._log,
            )
        except FatalConnect as exc:
            raise _supervised.FatalConnect(f"broker at {self._where()} {exc}") from exc.__cause__

    def _log_retry(self, cause: BaseException, attempt: int, delay: float) -> None:
        self._log.debug(
            "connecting to %s failed (%s); retry in %.2f s", self._where(), cause, delay
        )

    def _log_reconnected(self) -> None:
        self._log.info("reconnected to %s", self._where())

    async def _serve(self, link: Link) -> None:
        """Publish the link, send keepalive pings and enforce deadlines until it dies."""
        self._connected_once = True
        self._link = link
        self._link_changed.set()
        cause = await serve(link, tick_s=self._tick_s, keepalive_s=self._config.keepalive_s)
        if self._link is link:
            self._link = None
        self._link_changed.set()
        if not self._closing:
            self._log.warning("connection of %s lost: %s", self._where(), cause)
