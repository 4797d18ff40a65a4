"""One connection attempt of `fedbus.transport.lean.LeanMqttTransport`, and its keepalive.

Split from the transport so that it keeps to the calls and the reconnect
policy: `open_link` is everything between "no connection" and "a link the
calls may use" (TCP and TLS, CONNECT and CONNACK, the re-subscription), and
`serve` is what the supervisor does while the link lives.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
from collections.abc import Callable
from typing import Final

from fedbus.config import BrokerConfig
from fedbus.mqtt import ConnectionRefused, MessageReceived, MqttConnection, SubscribeAcked
from fedbus.transport._lean_link import Link

__all__ = ["FatalConnect", "Refused", "open_link", "serve"]

_RETRYABLE_REFUSAL: Final = 3  # CONNACK "server unavailable"


class FatalConnect(Exception):
    """The broker refused us in a way that retrying will not fix."""


class Refused(Exception):
    """CONNACK "server unavailable": worth retrying."""


async def open_link(
    config: BrokerConfig,
    client_id: str,
    connection: MqttConnection,
    deliver: Callable[[MessageReceived], None],
    *,
    ssl_context: ssl.SSLContext | None,
    clean_session: bool,
    credentials: tuple[str | None, str | None],
    will: tuple[str, bytes, int, bool] | None,
    subscriptions: dict[str, int],
    log: logging.Logger,
) -> Link:
    """Connect once, within ``config.connect_timeout_s``; the link, re-subscribed.

    Filters the broker refuses on re-subscription are logged and removed
    from ``subscriptions``.

    Raises:
        FatalConnect: refused for good (credentials, authorization, client id,
            protocol version) or TLS verification failed.
        Refused: the broker said "server unavailable".
        OSError: the TCP or TLS connection failed or was lost.
        TimeoutError: no answer within ``connect_timeout_s``.
    """
    loop = asyncio.get_running_loop()
    link = Link(connection, deliver)
    username, password = credentials
    try:
        async with asyncio.timeout(config.connect_timeout_s):
            try:
                await loop.create_connection(
                    lambda: link,
                    config.host,
                    config.port,
                    ssl=ssl_context,
                    server_hostname=config.host if ssl_context is not None else None,
                )
            except ssl.SSLCertVerificationError as exc:
                raise FatalConnect(f"failed TLS verification: {exc.verify_message}") from exc
            link.write(
                link.conn.connect(
                    client_id,
                    clean_session=clean_session,
                    keepalive_s=config.keepalive_s,
                    username=username,
                    password=password,
                    will=will,
                )
            )
            await asyncio.wait((link.connack, link.lost), return_when=asyncio.FIRST_COMPLETED)
            if not link.connack.done():
                raise _lost_error(link, "before CONNACK")
            answer = link.connack.result()
            if isinstance(answer, ConnectionRefused):
                if answer.return_code == _RETRYABLE_REFUSAL:
                    raise Refused(f"CONNACK: {answer.reason}")
                raise FatalConnect(f"refused the connection: {answer.reason}")
            if subscriptions:
                # Every filter in one SUBSCRIBE: one round trip however many there are.
                packet_id, data = link.conn.subscribe(list(subscriptions.items()))
                ack = link.expect(packet_id, math.inf)
                link.write(data)
                result = await ack
                if result is None:
                    raise _lost_error(link, "while re-subscribing")
                assert isinstance(result, SubscribeAcked)
                for refused in result.refused:
                    log.warning("broker refused the re-subscription to %r", refused)
                    subscriptions.pop(refused, None)
    except BaseException:
        link.kill(None)
        raise
    return link


async def serve(link: Link, *, tick_s: float, keepalive_s: int) -> BaseException | None:
    """Send keepalive pings and enforce PUBACK deadlines until the link dies; the cause.

    A ping unanswered for a whole keepalive kills the link: the broker (or
    the path to it) is gone even if TCP has not noticed.
    """
    loop = asyncio.get_running_loop()
    while link.alive:
        await asyncio.wait((link.lost,), timeout=tick_s)
        if not link.alive:
            break
        now = loop.time()
        ping = link.conn.keepalive(now)
        if ping:
            link.write(ping)
        elif link.conn.pong_overdue(now):
            link.kill(TimeoutError(f"no PINGRESP within {keepalive_s} s"))
            break
        link.expire(now)
    return link.lost.result()


def _lost_error(link: Link, when: str) -> OSError:
    cause = link.lost.result() if link.lost.done() else None
    if isinstance(cause, OSError):
        return cause
    error = ConnectionResetError(f"connection lost {when}: {cause}")
    error.__cause__ = cause
    return error
