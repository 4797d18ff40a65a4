"""`SupervisedTransport`: the lifecycle both MQTT transports share, over their own links.

Why: `fedbus.transport.lean.LeanMqttTransport` (our MQTT 3.1.1 client) and
`fedbus.transport.mqtt.MqttTransport` (aiomqtt) keep the same contract: one
supervisor task owns the connection, reconnects with backoff until
``reconnect.deadline_s``, publishes each live link through an event, and on
giving up fails every waiter with one `ConnectError`. That contract lives
here once, so the two cannot drift apart; each transport supplies only how a
link is opened, served, judged alive and closed (the abstract hooks below).
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import logging
import math
import random
import ssl
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any, ClassVar, Final, Generic, Self, TypeVar

from fedbus.config import BrokerConfig
from fedbus.errors import ConnectError, PayloadTooLargeError, TransportClosed
from fedbus.transport._mqtt_support import Inbox, MqttStats
from fedbus.transport._tls import client_credentials, client_ssl_context
from fedbus.transport.base import Received, packet_overhead

__all__ = [
    "CLOSE_TIMEOUT_S",
    "MAX_LOSSES_PER_CALL",
    "FatalConnect",
    "SupervisedTransport",
    "check_client_args",
    "default_ack_timeout_s",
]

LinkT = TypeVar("LinkT")

MAX_LOSSES_PER_CALL: Final = 3
CLOSE_TIMEOUT_S: Final = 5.0


class FatalConnect(Exception):
    """Internal: the broker refused us in a way that retrying will not fix; the message is final."""


def check_client_args(client_id: str, max_queued_messages: int) -> None:
    """The constructor checks both transports make first."""
    if not client_id:
        raise ValueError("client_id must not be empty")
    if max_queued_messages < 0:
        raise ValueError("max_queued_messages must be >= 0 (0: unbounded)")


def default_ack_timeout_s(config: BrokerConfig) -> float:
    """The PUBACK deadline: generous, it bounds a wedged broker, not a slow link.

    At least 60 s, plus the time a full window of largest packets takes at 100 kB/s.
    """
    return max(60.0, 3.0 * config.keepalive_s) + (
        config.max_inflight * config.max_payload_bytes / 100_000
    )


class SupervisedTransport(abc.ABC, Generic[LinkT]):
    """The shared part of an MQTT transport whose connection a supervisor task owns.

    Subclasses name themselves (``_KIND`` in messages, ``_TASK_TAG`` in the
    supervisor's task name ``fedbus[<client_id>].<tag>``) and implement the
    hooks: `_link_alive`, `_open_link`, `_serve`, `_end_link`, and the log
    lines `_log_retry` and `_log_reconnected`.
    """

    _KIND: ClassVar[str]
    """The class name used in error messages."""
    _TASK_TAG: ClassVar[str]
    """Suffix of the supervisor task's name."""
    _SUPERVISOR_LOG_NAME: ClassVar[str]
    """How the supervisor is called when it crashes."""
    _RETRYABLE: ClassVar[tuple[type[Exception], ...]]
    """Connection errors worth another attempt after a backoff."""

    def __init__(
        self,
        config: BrokerConfig,
        client_id: str,
        *,
        logger: logging.Logger | None,
        default_logger: str,
        inbox: Inbox,
    ) -> None:
        self._config = config
        self._client_id = client_id
        self._log = logger or logging.getLogger(default_logger)
        self._ssl: ssl.SSLContext | None = client_ssl_context(config)
        self._username, self._password = client_credentials(config, client_id)
        self._window = asyncio.Semaphore(config.max_inflight)
        self._inbox = inbox
        self._stats = MqttStats()
        self._subscriptions: dict[str, int] = {}
        self._link: LinkT | None = None
        self._link_changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._open = False
        self._closing = False
        self._failure: tuple[str, BaseException | None] | None = None
        self._consuming = False

    # -- properties -------------------------------------------------------------

    @property
    def client_id(self) -> str:
        """The MQTT client id: equals the node id."""
        return self._client_id

    @property
    def max_payload_bytes(self) -> int:
        """Largest PUBLISH packet this connection may send."""
        return self._config.max_payload_bytes

    @property
    def connected(self) -> bool:
        """Whether a connection is up right now (False during an outage)."""
        return self._link is not None and self._link_alive(self._link)

    @property
    def stats(self) -> MqttStats:
        """A snapshot of the counters."""
        return dataclasses.replace(self._stats)

    # -- hooks --------------------------------------------------------------------

    @abc.abstractmethod
    def _link_alive(self, link: LinkT) -> bool:
        """Whether ``link`` is still usable."""

    @abc.abstractmethod
    async def _open_link(self) -> LinkT:
        """One connection attempt; raises `FatalConnect` or one of ``_RETRYABLE``."""

    @abc.abstractmethod
    async def _serve(self, link: LinkT) -> None:
        """Publish ``link`` in ``_link`` and keep it until it dies; then unpublish it."""

    @abc.abstractmethod
    async def _end_link(self, task: asyncio.Task[None] | None) -> None:
        """In `aclose`, after the supervisor ``task`` ended: release the last link."""

    @abc.abstractmethod
    def _log_retry(self, cause: BaseException, attempt: int, delay: float) -> None:
        """Log a failed connection attempt (``attempt`` counts the failures so far)."""

    @abc.abstractmethod
    def _log_reconnected(self) -> None:
        """Log a connection re-established after a loss."""

    def _retry_cause(self, exc: BaseException) -> BaseException:
        """The cause worth reporting for a retryable connection error."""
        return exc

    def _on_open(self) -> None:
        """Reset per-session state at the start of `__aenter__`."""

    # -- lifecycle --------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Connect, retrying with backoff until ``reconnect.deadline_s``.

        Raises:
            RuntimeError: already open (reusable, not re-entrant).
            ConnectError: refused (bad credentials, not authorized, TLS
                verification) or unreachable until the deadline; the cause is chained.
        """
        if self._open:
            raise RuntimeError(
                f"{self._KIND} {self._client_id!r} is already open: "
                "it is reusable but not re-entrant"
            )
        self._open = True
        self._closing = False
        self._failure = None
        self._on_open()
        self._link_changed.clear()
        self._inbox.reopen()
        self._task = asyncio.create_task(
            self._supervise(), name=f"fedbus[{self._client_id}].{self._TASK_TAG}"
        )
        try:
            await self._wait_link()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Disconnect cleanly (DISCONNECT: the broker discards the will); idempotent.

        Calls waiting on the connection raise `TransportClosed`; the message
        iterator ends; messages still queued for it are dropped and counted.
        """
        if not self._open:
            return
        self._closing = True
        self._link_changed.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})
        await self._end_link(task)
        self._stats.dropped += self._inbox.close(discard=True)
        self._subscriptions.clear()
        self._open = False

    def messages(self) -> AsyncIterator[Received]:
        """Iterate over received messages across reconnects until the transport is closed.

        One consumer at a time. If reconnecting gives up, the messages already
        received are yielded, then the iterator raises `ConnectError`.
        """
        return _MessageStream(self)

    # -- calls on the current link ------------------------------------------------

    def _check_size(self, topic: str, payload: bytes) -> None:
        size = len(payload) + packet_overhead(topic)
        if size > self._config.max_payload_bytes:
            raise PayloadTooLargeError(
                f"PUBLISH to {topic!r} would be up to {size} bytes, over max_payload_bytes="
                f"{self._config.max_payload_bytes}; send it in chunks of at most "
                f"{self._config.max_payload_bytes - packet_overhead(topic)} payload bytes"
            )

    def _check_open(self) -> None:
        if not self._open or self._closing:
            raise TransportClosed(f"{self._KIND} {self._client_id!r} is closed")

    def _connect_error(self) -> ConnectError:
        assert self._failure is not None
        message, cause = self._failure
        error = ConnectError(message)
        error.__cause__ = cause
        return error

    async def _wait_link(self) -> LinkT:
        """The live connection; waits through an outage (the supervisor bounds it)."""
        while True:
            self._check_open()
            if self._failure is not None:
                raise self._connect_error()
            link = self._link
            if link is not None and self._link_alive(link):
                return link
            self._link_changed.clear()
            await self._link_changed.wait()

    # -- the supervisor (connect, reconnect) -----------------------------------------

    async def _supervise(self) -> None:
        try:
            await self._connect_loop()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not leave waiters hanging
            self._log.exception(
                "%s supervisor of %s crashed", self._SUPERVISOR_LOG_NAME, self._client_id
            )
            self._fail(f"MQTT connection handling failed: {exc!r}", exc)

    async def _connect_loop(self) -> None:
        loop = asyncio.get_running_loop()
        policy = self._config.reconnect
        attempt = 0
        first = True
        outage_since = loop.time()
        while True:
            try:
                link = await self._open_link()
            except FatalConnect as exc:
                self._fail(str(exc), exc.__cause__)
                return
            except self._RETRYABLE as exc:
                cause = self._retry_cause(exc)
                remaining = (
                    math.inf
                    if policy.deadline_s is None
                    else outage_since + policy.deadline_s - loop.time()
                )
                if remaining <= 0:
                    verb = "connect" if first else "reconnect"
                    self._fail(
                        f"could not {verb} to {self._config.url} as {self._client_id!r} within "
                        f"{policy.deadline_s:g} s ({attempt + 1} attempts); last error: {cause}",
                        cause,
                    )
                    return
                delay = min(policy.delay_s(attempt, random.random()), remaining)
                attempt += 1
                self._log_retry(cause, attempt, delay)
                await asyncio.sleep(delay)
                continue
            if not first:
                self._stats.reconnects += 1
                self._log_reconnected()
            first = False
            attempt = 0
            await self._serve(link)
            if self._closing:
                return  # closed or aborted meanwhile: no reconnect
            outage_since = loop.time()

    def _fail(self, message: str, cause: BaseException | None) -> None:
        self._failure = (message, cause)
        # Callers see the failure raised (publish, messages()); no second report here.
        self._log.debug("%s", message)
        self._inbox.close(discard=False)
        self._link_changed.set()


class _MessageStream:
    """The iterator `SupervisedTransport.messages` returns: one consumer at a time."""

    def __init__(self, transport: SupervisedTransport[Any]) -> None:
        self._transport = transport

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Received:
        t = self._transport
        if t._consuming:
            raise RuntimeError(
                f"{t._KIND} {t.client_id!r}: messages() already has a consumer; "
                "only one task may iterate at a time"
            )
        t._consuming = True
        try:
            item = await t._inbox.get()
        finally:
            t._consuming = False
        if item is not None:
            return item
        if t._failure is not None and not t._closing:
            raise t._connect_error()
        raise StopAsyncIteration
