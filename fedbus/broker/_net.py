"""Sockets for the managed broker: free ports, the port-taken check, the readiness probe.

The probe speaks just enough MQTT 3.1.1 (one CONNECT, one CONNACK) to prove
that the broker, and not merely its listening socket, is serving: mosquitto
opens the socket before it has finished loading, and amqtt binds before its
plugins are up. Any CONNACK counts, even "not authorized", because a broker
that requires credentials is still ready.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import ssl
import struct
from typing import Final

from fedbus.errors import BrokerError

__all__ = ["free_port", "is_loopback", "port_is_free", "probe_host", "probe_mqtt"]

_CONNACK: Final = 0x20
_LOOPBACK_NAMES: Final = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _family(host: str) -> socket.AddressFamily:
    try:
        return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return socket.AF_INET


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that is free right now.

    mosquitto cannot report an ephemeral port (its ``listener 0`` means a Unix
    socket), so the port is picked first by binding port 0 and releasing it.
    Another process could take it in between; `ManagedBroker.start` then fails
    with a clear `BrokerError` instead of hanging.
    """
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_is_free(host: str, port: int) -> bool:
    """Whether a listener could bind ``host:port`` now.

    Binds with SO_REUSEADDR, as mosquitto and asyncio do, so a port left in
    TIME_WAIT by a broker that just stopped counts as free (restart must work)
    while a live listener, on this address or the wildcard, counts as taken.
    """
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise BrokerError(f"cannot bind {host}:{port}: {exc.strerror}") from exc
    return True


def probe_host(host: str) -> str:
    """The address to probe a listener bound to ``host`` on (wildcards map to loopback)."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def _connect_packet(client_id: str) -> bytes:
    cid = client_id.encode()
    # Variable header: protocol name "MQTT", level 4 (3.1.1), clean session, keepalive 10 s.
    body = b"\x00\x04MQTT\x04\x02\x00\x0a" + struct.pack("!H", len(cid)) + cid
    return bytes([0x10, len(body)]) + body


def probe_mqtt(
    host: str, port: int, *, timeout_s: float, tls: bool = False, client_id: str | None = None
) -> bool:
    """Try one MQTT CONNECT/CONNACK exchange; True if the broker answered.

    Returns False (never raises) when nothing listens yet or the exchange
    fails, so the caller can retry until its own deadline.

    Args:
        host: address to connect to.
        port: TCP port.
        timeout_s: bound on this one attempt.
        tls: wrap the connection in TLS. The certificate is not verified: the
            probe talks to the child process we started, only to learn that it
            is up. A TLS alert after the TCP connect (a listener demanding a
            client certificate) also proves the listener is serving.
        client_id: MQTT client id of the probe; default ``fedbus-probe-<pid>``.
    """
    try:
        raw = socket.create_connection((host, port), timeout=timeout_s)
    except OSError:
        return False
    with contextlib.ExitStack() as stack:
        sock: socket.socket = stack.enter_context(raw)
        try:
            if tls:
                ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                sock = stack.enter_context(ctx.wrap_socket(raw, server_hostname=host))
            sock.sendall(_connect_packet(client_id or f"fedbus-probe-{os.getpid()}"))
            header = sock.recv(4)
        except ssl.SSLError:
            return True
        except OSError:
            return False
        if len(header) >= 2 and header[0] == _CONNACK:
            with contextlib.suppress(OSError):
                sock.sendall(b"\xe0\x00")  # DISCONNECT, so the broker logs a clean close
            return True
        return False
    return False  # pragma: no cover - ExitStack does not swallow exceptions
