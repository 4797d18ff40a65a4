"""`MqttTransport`: the `Transport` interface over a real broker, with aiomqtt 2.x.

This is the only fedbus module that imports aiomqtt, so its 3.0 API break
touches one file. Theory of operation:

* **One connection at a time, owned by one task.** A supervisor task named
  ``fedbus[<client_id>].mqtt`` opens an ``aiomqtt.Client``, re-subscribes every
  subscription, then pumps incoming messages into the transport's inbox until
  the connection dies. aiomqtt 2.x never reconnects on its own, so the
  supervisor then opens a *fresh* client (paho would otherwise replay its old
  in-flight messages under ids we no longer track) after an exponential
  backoff with full jitter (`fedbus.config.ReconnectPolicy`).
* **Links.** Each live connection is a `_Link` whose ``lost`` future resolves
  when it dies. Publish, subscribe and unsubscribe race their aiomqtt call
  against ``lost``: aiomqtt 2.x leaves a pending PUBACK waiting forever when
  the socket drops. A call whose link died is re-sent on the next link (QoS 1
  is at least once anyway), so publishes made during an outage complete after
  it. The outage is bounded by ``reconnect.deadline_s``: then the transport
  fails, and every waiter raises `ConnectError` chained to the last cause.
* **Publisher window.** At most ``max_inflight`` publishes await their PUBACK
  at once (a semaphore): aiomqtt scans all pending calls on each publish
  (O(n^2): 884 msg/s with 20k pending against 8.9k with a window of 20), and
  mosquitto silently drops beyond its queue limits.
* **Sizes.** A PUBLISH packet larger than ``max_payload_bytes`` is refused
  before sending (`PayloadTooLargeError`): callers chunk. An over-size QoS 1
  publish against mosquitto's ``message_size_limit`` over MQTT 5 makes paho
  drop the connection (PUBACK 0x95) and a naive retry loops forever, so one
  message may lose at most ``MAX_LOSSES_PER_CALL`` connections.
* **Protocol.** "auto" offers MQTT 5 and falls back to 3.1.1 when the broker
  refuses it (amqtt answers "unsupported protocol version"); the version that
  worked is kept for this session's reconnects. fedbus needs nothing from
  MQTT 5 properties.
* **Inbox.** aiomqtt's own queue is left unbounded (when full it discards and
  only logs); the transport's inbox may be bounded with
  ``max_queued_messages`` and counts what it drops in `MqttStats.dropped`.
  The default, unbounded, never drops: the fedbus flow control above (credits,
  windows) is what bounds memory, and a silent drop here would look like a
  lost chunk.
* **Errors.** aiomqtt raises ``MqttError`` and, for socket errors, hides the
  ``OSError`` behind ``from None``; the transport chains the real cause
  (``raise ConnectError(...) from exc``) so it shows up in tracebacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable, Coroutine
from typing import Any, ClassVar, Final, Literal, TypeVar

import aiomqtt
from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedbus.config import BrokerConfig
from fedbus.errors import TransportError
from fedbus.transport._mqtt_support import (
    REFUSALS,
    UNSUPPORTED_PROTOCOL,
    Inbox,
    MqttStats,
    is_socket_error,
    reason_value,
    root_cause,
)
from fedbus.transport._supervised import (
    CLOSE_TIMEOUT_S,
    MAX_LOSSES_PER_CALL,
    FatalConnect,
    SupervisedTransport,
    check_client_args,
    default_ack_timeout_s,
)
from fedbus.transport.base import Received, Will

__all__ = ["MqttStats", "MqttTransport"]

_T = TypeVar("_T")

_PAHO_CONNECT_GRACE_S: Final = 6.0
"""paho's blocking TCP connect (5 s timeout) runs in a thread that cannot be cancelled."""
_SESSION_NEVER_EXPIRES: Final = 0xFFFFFFFF
_DROP_LOG_EVERY: Final = 1000


class _LinkLost(Exception):
    """Internal: the connection a call was made on died first."""


class _Link:
    """One live connection: its client and a future resolved when it dies."""

    __slots__ = ("client", "lost", "protocol")

    def __init__(self, client: aiomqtt.Client, protocol: aiomqtt.ProtocolVersion) -> None:
        self.client = client
        self.protocol = protocol
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()


def _protocol_name(version: aiomqtt.ProtocolVersion) -> Literal["5", "3.1.1"]:
    return "5" if version == aiomqtt.ProtocolVersion.V5 else "3.1.1"


class MqttTransport(SupervisedTransport[_Link]):
    """A `fedbus.transport.base.Transport` over an MQTT broker.

    Example::

        async with MqttTransport(BrokerConfig.from_url(url), "client-3") as t:
            await t.subscribe("fedbus/run1/+/model")
            async for message in t.messages():
                ...

    Args:
        config: broker address, TLS, credentials, limits and reconnect policy.
        client_id: MQTT client id; equals the node id.
        will: last will, published by the broker if the connection dies
            without a clean close.
        clean_session: False keeps the broker-side session (subscriptions,
            queued QoS 1 messages) across disconnects; with MQTT 5 the session
            then never expires, as in 3.1.1.
        logger: where connection events go; ``fedbus.transport.mqtt`` by default.
        max_queued_messages: bound on received messages waiting for the
            consumer; beyond it new ones are dropped and counted. 0 (default)
            means unbounded.

    Raises:
        RuntimeError: built outside a running event loop (aiomqtt 2.x binds to it).
        ConfigError: unreadable TLS files, or ``password_env`` not set.
    """

    _KIND: ClassVar[str] = "MqttTransport"
    _TASK_TAG: ClassVar[str] = "mqtt"
    _SUPERVISOR_LOG_NAME: ClassVar[str] = "mqtt"
    _RETRYABLE: ClassVar[tuple[type[Exception], ...]] = (aiomqtt.MqttError, TimeoutError, OSError)

    def __init__(
        self,
        config: BrokerConfig,
        client_id: str,
        *,
        will: Will | None = None,
        clean_session: bool = True,
        logger: logging.Logger | None = None,
        max_queued_messages: int = 0,
    ) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "MqttTransport must be built inside a running event loop "
                "(aiomqtt 2.x binds to it); create it in async code"
            ) from None
        check_client_args(client_id, max_queued_messages)
        super().__init__(
            config,
            client_id,
            logger=logger,
            default_logger=__name__,
            inbox=Inbox(max_queued_messages),
        )
        self._will = will
        self._clean_session = clean_session
        self._paho_log = self._log.getChild("paho")
        self._ack_timeout_s = default_ack_timeout_s(config)
        self._protocol: aiomqtt.ProtocolVersion | None = None

    # -- properties and hooks of SupervisedTransport -------------------------------

    @property
    def protocol(self) -> Literal["5", "3.1.1"] | None:
        """The MQTT version in use ("5" or "3.1.1"), or None before the first connection."""
        return None if self._protocol is None else _protocol_name(self._protocol)

    def _on_open(self) -> None:
        self._protocol = None

    def _link_alive(self, link: _Link) -> bool:
        return not link.lost.done()

    async def _end_link(self, task: asyncio.Task[None] | None) -> None:
        """The supervisor sent DISCONNECT on its way out, bounded by CLOSE_TIMEOUT_S."""
        if task is not None and not task.cancelled() and task.exception() is not None:
            self._log.error("mqtt supervisor of %s failed", self._client_id)
        self._link = None

    # -- lifecycle --------------------------------------------------------------

    async def abort(self) -> None:
        """Simulate a crash: drop the connection without DISCONNECT, so the will fires.

        The socket is shut down under paho (the broker sees the connection die
        and publishes the last will), then the transport closes as `aclose`
        does. For fault injection in simulations and tests; idempotent.
        """
        link, task = self._link, self._task
        if self._open and link is not None:
            self._closing = True  # no reconnect, and nobody waits for this link again
            paho_client = getattr(link.client, "_client", None)
            sock = paho_client.socket() if paho_client is not None else None
            if isinstance(sock, socket.socket):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                # Let the supervisor see the loss itself before closing: a DISCONNECT
                # queued meanwhile would make aiomqtt register a writer on a dead socket.
                if task is not None:
                    await asyncio.wait({task}, timeout=CLOSE_TIMEOUT_S)
        await self.aclose()

    # -- the Transport interface ------------------------------------------------

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        """Publish; return when the broker accepted it (QoS 1) or it was sent (QoS 0).

        During an outage the call waits for the reconnection; a message whose
        connection died before its PUBACK is sent again (at least once).

        Raises:
            PayloadTooLargeError: the packet would exceed ``max_payload_bytes``.
            ValueError: bad QoS or topic.
            ConnectError: the broker stayed unreachable past ``reconnect.deadline_s``.
            TransportError: no PUBACK in time, or the connection died repeatedly
                while this message was in flight (a broker-side size limit does that).
            TransportClosed: the transport is closed.
        """
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {qos}")
        if not topic or "+" in topic or "#" in topic:
            raise ValueError(f"cannot publish to {topic!r}: empty or a wildcard")
        self._check_size(topic, payload)
        self._check_open()
        async with self._window:
            await self._call_until_done(
                lambda client: client.publish(
                    topic, payload, qos=qos, retain=retain, timeout=self._ack_timeout_s
                ),
                what=f"publish to {topic!r}",
                on_resend=self._count_republish,
            )
        self._stats.published += 1
        self._stats.bytes_out += len(payload)

    async def subscribe(self, topic_filter: str, *, qos: int = 1) -> None:
        """Subscribe; kept across reconnects (re-sent on every new connection).

        Retained messages are delivered again after each reconnect, with
        ``retain=True``.

        Raises:
            TransportError: the broker refused the subscription (e.g. an ACL).
            ConnectError: the broker stayed unreachable past the deadline.
            TransportClosed: the transport is closed.
        """
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {qos}")
        if not topic_filter:
            raise ValueError("topic filter must not be empty")
        self._check_open()
        self._subscriptions[topic_filter] = qos
        codes = await self._call_until_done(
            lambda client: client.subscribe(
                topic_filter, qos, timeout=self._config.connect_timeout_s
            ),
            what=f"subscribe to {topic_filter!r}",
        )
        for code in codes:
            value = reason_value(code)
            if value is not None and value >= 0x80:
                self._subscriptions.pop(topic_filter, None)
                raise TransportError(f"broker refused the subscription to {topic_filter!r}: {code}")

    async def unsubscribe(self, topic_filter: str) -> None:
        """Drop a subscription (also from the set re-sent on reconnect).

        Raises:
            ConnectError: the broker stayed unreachable past the deadline.
            TransportClosed: the transport is closed.
        """
        self._check_open()
        self._subscriptions.pop(topic_filter, None)
        await self._call_until_done(
            lambda client: client.unsubscribe(topic_filter, timeout=self._config.connect_timeout_s),
            what=f"unsubscribe from {topic_filter!r}",
        )

    # -- calls on the current link ------------------------------------------------

    def _count_republish(self) -> None:
        self._stats.republished += 1

    async def _call_until_done(
        self,
        call: Callable[[aiomqtt.Client], Coroutine[Any, Any, _T]],
        *,
        what: str,
        on_resend: Callable[[], None] | None = None,
    ) -> _T:
        """Run ``call(client)`` on the live link; re-run it on the next one if the link dies."""
        losses = 0
        while True:
            link = await self._wait_link()
            try:
                return await self._on_link(link, call(link.client))
            except _LinkLost as exc:
                self._check_open()
                losses += 1
                if losses >= MAX_LOSSES_PER_CALL:
                    raise TransportError(
                        f"{what}: the connection to {self._config.url} died {losses} times "
                        "while this call was in flight; a broker limit (message_size_limit, "
                        "max_packet_size) may be rejecting it"
                    ) from exc.__cause__
                if on_resend is not None:
                    on_resend()

    async def _on_link(self, link: _Link, coro: Coroutine[Any, Any, _T]) -> _T:
        task = asyncio.ensure_future(coro)
        try:
            await asyncio.wait((task, link.lost), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
        if not task.done() or task.cancelled():
            raise _LinkLost from self._link_cause(link)
        exc = task.exception()
        if exc is None:
            return task.result()
        if isinstance(exc, aiomqtt.MqttError):
            # A dead socket fails the call before the supervisor's message
            # iterator reports it; give the supervisor a moment to confirm.
            if not link.lost.done():
                await asyncio.wait({link.lost}, timeout=self._config.connect_timeout_s)
            if link.lost.done():
                raise _LinkLost from exc
            raise TransportError(f"{exc} ({self._config.url})") from root_cause(exc)
        raise exc

    @staticmethod
    def _link_cause(link: _Link) -> BaseException | None:
        if link.lost.done() and not link.lost.cancelled():
            return link.lost.exception()
        return None

    # -- the supervisor -----------------------------------------------------------

    def _retry_cause(self, exc: BaseException) -> BaseException:
        return root_cause(exc)

    def _log_retry(self, cause: BaseException, attempt: int, delay: float) -> None:
        self._log.debug(
            "connecting to %s failed (%s); retry %d in %.2f s",
            self._config.url,
            cause,
            attempt,
            delay,
        )

    def _log_reconnected(self) -> None:
        self._log.info("reconnected to %s as %s", self._config.url, self._client_id)

    async def _open_link(self) -> _Link:
        versions = (
            [self._protocol]
            if self._protocol is not None
            else {
                "5": [aiomqtt.ProtocolVersion.V5],
                "3.1.1": [aiomqtt.ProtocolVersion.V311],
                "auto": [aiomqtt.ProtocolVersion.V5, aiomqtt.ProtocolVersion.V311],
            }[self._config.protocol]
        )
        first_error: BaseException | None = None
        for i, version in enumerate(versions):
            last = i == len(versions) - 1
            try:
                client = await self._open_client(version)
            except (aiomqtt.MqttError, TimeoutError) as exc:
                self._raise_if_fatal(exc, version, last=last)
                first_error = first_error or exc
                if is_socket_error(exc):
                    break  # a TCP/TLS failure: another protocol version will not help
                continue
            if self._protocol is None:
                self._protocol = version
                self._log.info(
                    "connected to %s as %s (MQTT %s)",
                    self._config.url,
                    self._client_id,
                    _protocol_name(version),
                )
            return _Link(client, version)
        assert first_error is not None
        raise first_error

    def _raise_if_fatal(
        self, exc: BaseException, version: aiomqtt.ProtocolVersion, *, last: bool
    ) -> None:
        where = f"{self._config.url} as {self._client_id!r}"
        if isinstance(exc, aiomqtt.MqttCodeError):
            code = reason_value(exc.rc)
            if code in REFUSALS:
                raise FatalConnect(
                    f"broker at {where} refused the connection: {REFUSALS[code]}"
                ) from exc
            if code == UNSUPPORTED_PROTOCOL and last:
                raise FatalConnect(
                    f"broker at {where} does not support MQTT {_protocol_name(version)} "
                    '(set protocol "auto" or "3.1.1")'
                ) from exc
        cause = root_cause(exc)
        if isinstance(cause, ssl.SSLCertVerificationError):
            raise FatalConnect(
                f"TLS verification of {where} failed: {cause.verify_message}"
            ) from cause

    async def _open_client(self, version: aiomqtt.ProtocolVersion) -> aiomqtt.Client:
        v5 = version == aiomqtt.ProtocolVersion.V5
        properties = None
        if v5 and not self._clean_session:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = _SESSION_NEVER_EXPIRES
        will = self._will
        client = aiomqtt.Client(
            self._config.host,
            self._config.port,
            username=self._username,
            password=self._password,
            logger=self._paho_log,
            identifier=self._client_id,
            protocol=version,
            will=None
            if will is None
            else aiomqtt.Will(will.topic, will.payload, qos=will.qos, retain=will.retain),
            clean_session=None if v5 else self._clean_session,
            clean_start=self._clean_session if v5 else MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
            timeout=self._config.connect_timeout_s,
            keepalive=self._config.keepalive_s,
            max_inflight_messages=self._config.max_inflight,
            tls_context=self._ssl,
        )
        # aiomqtt warns past 10 pending calls; our window allows more by design.
        client.pending_calls_threshold = self._config.max_inflight + 64
        enter = asyncio.ensure_future(client.__aenter__())
        try:
            async with asyncio.timeout(self._config.connect_timeout_s):
                await asyncio.shield(enter)
        except BaseException:
            await self._abandon(client, enter)
            raise
        _disable_nagle(client)
        return client

    async def _abandon(self, client: aiomqtt.Client, enter: asyncio.Future[Any]) -> None:
        """Make sure a failed or cancelled connection attempt leaves no socket open."""
        if not enter.done():
            # aiomqtt's TCP connect runs in a thread; let it finish so its socket gets closed.
            await asyncio.wait({enter}, timeout=_PAHO_CONNECT_GRACE_S)
        if not enter.done():
            enter.cancel()
            return
        if enter.cancelled():
            return
        exc = enter.exception()
        if exc is not None and (isinstance(exc, aiomqtt.MqttCodeError) or is_socket_error(exc)):
            return  # refused by CONNACK (paho closed the socket) or never connected
        # Connected late, or no CONNACK in time: a socket may be open. aiomqtt
        # then waits for a disconnect callback that never comes, hence the short bound.
        await self._disconnect(client, timeout_s=1.0)

    async def _disconnect(
        self, client: aiomqtt.Client, *, timeout_s: float = CLOSE_TIMEOUT_S
    ) -> None:
        """Send DISCONNECT (so no will) and close, within ``timeout_s``; never raises."""
        try:
            async with asyncio.timeout(timeout_s):
                await client.__aexit__(None, None, None)
        except (aiomqtt.MqttError, TimeoutError, OSError) as exc:
            self._log.debug("unclean disconnect of %s: %s", self._client_id, exc)

    async def _serve(self, link: _Link) -> None:
        """Re-subscribe, publish the link, pump messages until the connection dies."""
        client = link.client
        cause: BaseException | None = None
        try:
            if self._subscriptions:
                await client.subscribe(
                    list(self._subscriptions.items()), timeout=self._config.connect_timeout_s
                )
            self._link = link
            self._link_changed.set()
            async for message in client.messages:
                self._deliver(message)
        except aiomqtt.MqttError as exc:
            cause = root_cause(exc)
            self._log.warning(
                "connection of %s to %s lost: %s", self._client_id, self._config.url, cause
            )
        finally:
            if self._link is link:
                self._link = None
            if cause is None:
                link.lost.set_result(None)
            else:
                link.lost.set_exception(cause)
                link.lost.exception()  # mark retrieved: waiters may all be gone
            self._link_changed.set()
            await self._disconnect(client)

    def _deliver(self, message: aiomqtt.Message) -> None:
        payload = message.payload
        received = Received(
            topic=message.topic.value,
            payload=payload if isinstance(payload, bytes) else bytes(payload),
            qos=message.qos,
            retain=bool(message.retain),
        )
        self._stats.received += 1
        self._stats.bytes_in += len(received.payload)
        if not self._inbox.put(received):
            self._stats.dropped += 1
            if self._stats.dropped % _DROP_LOG_EVERY == 1:
                self._log.warning(
                    "%s: inbox full, dropped %d messages so far (max_queued_messages)",
                    self._client_id,
                    self._stats.dropped,
                )


def _disable_nagle(client: aiomqtt.Client) -> None:
    """Set TCP_NODELAY on the connection's socket; paho leaves Nagle's algorithm on.

    Why: credits, chunk requests and PUBACKs are small packets sent while large
    chunks are still unacknowledged, so Nagle holds them until the peer's
    delayed ACK (40 ms on Linux). A 40 MB chunked stream stalled 40 ms per
    credit that way and ran at about a third of raw paho's speed. aiomqtt 2.x
    offers no hook for socket options, hence its private paho client here.
    """
    paho_client = getattr(client, "_client", None)
    sock = paho_client.socket() if paho_client is not None else None
    if isinstance(sock, socket.socket):  # ssl.SSLSocket is one too
        with contextlib.suppress(OSError):  # not TCP (a Unix socket): nothing to do
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
