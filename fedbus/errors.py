"""The whole fedbus exception tree.

Every error fedbus raises on purpose derives from `FedbusError`, so callers can
catch the library as one family and still tell the layers apart::

    FedbusError
    ├── ConfigError (also ValueError)    names the path: protocol.rounds
    ├── WireError
    │   ├── DecodeError                  malformed MessagePack, schema mismatch, over a limit
    │   │   └── IncompatibleVersion      unknown major format version
    │   └── EncodeError                  an object the wire format cannot carry
    ├── PayloadTooLargeError (also ValueError)  a PUBLISH over max_payload_bytes; chunk it
    ├── ProtocolError                    abstract: TypeError if instantiated directly
    │   ├── LocalProtocolError           we drove a machine illegally; it enters ERROR
    │   └── RemoteProtocolError          a single counterpart broke protocol
    ├── TransportError (also ConnectionError)
    │   ├── ConnectError
    │   └── TransportClosed
    ├── TransferError                    a chunked transfer failed (timeout, corrupt, too big)
    └── BrokerError                      managed broker failed to start or died

Errors are translated where modules meet (``raise TransportError(...) from exc``)
so that the cause is kept for debugging while callers see one vocabulary.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BrokerError",
    "ConfigError",
    "ConnectError",
    "DecodeError",
    "EncodeError",
    "FedbusError",
    "IncompatibleVersion",
    "LocalProtocolError",
    "PayloadTooLargeError",
    "ProtocolError",
    "RemoteProtocolError",
    "TransferError",
    "TransportClosed",
    "TransportError",
    "WireError",
]


class FedbusError(Exception):
    """Base class of every error fedbus raises on purpose."""


class ConfigError(FedbusError, ValueError):
    """A configuration value is invalid.

    Args:
        message: what is wrong.
        path: where, as a dotted YAML path (``protocol.rounds``), if known.
        line: 1-based line in the source file, if known.
    """

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None) -> None:
        self.message = message
        self.path = path
        self.line = line
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = self.path or ""
        if self.line is not None:
            where = f"{where} (line {self.line})" if where else f"line {self.line}"
        return f"{where}: {self.message}" if where else self.message


class WireError(FedbusError):
    """Something is wrong with bytes on the wire."""


class DecodeError(WireError):
    """A payload is malformed, truncated, oversize or does not match the schema.

    The one error family `fedbus.codec.decode` raises: receivers drop and count
    the message instead of crashing.
    """


class IncompatibleVersion(DecodeError):
    """A payload carries a major format version this build cannot read."""

    def __init__(self, message: str, *, version: Any = None) -> None:
        self.version = version
        super().__init__(message)


class EncodeError(WireError):
    """An object cannot be expressed in the wire format (e.g. an object-dtype tensor)."""


class PayloadTooLargeError(FedbusError, ValueError):
    """A PUBLISH packet would exceed the connection's ``max_payload_bytes``; nothing was sent.

    A caller's mistake (the payload should have been chunked), not a
    connection failure, hence also a ValueError.
    """


class ProtocolError(FedbusError):
    """A protocol was violated. Abstract: raise a subclass.

    As in h11, refusing direct instantiation forces every raise site to say
    whose fault it was.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> ProtocolError:  # noqa: D102
        if cls is ProtocolError:
            raise TypeError(
                "ProtocolError is abstract; raise LocalProtocolError or RemoteProtocolError"
            )
        return super().__new__(cls, *args, **kwargs)


class LocalProtocolError(ProtocolError):
    """Our own code drove a state machine illegally; the machine enters ERROR."""


class RemoteProtocolError(ProtocolError):
    """A single counterpart (e.g. our server, seen from a client) broke the protocol."""


class TransportError(FedbusError, ConnectionError):
    """The transport failed: the broker is unreachable or the connection dropped."""


class ConnectError(TransportError):
    """Could not connect (or reconnect) to the broker within the deadline."""


class TransportClosed(TransportError):
    """The transport was closed, locally or by the broker, and cannot be used."""


class TransferError(FedbusError):
    """A chunked transfer could not complete (deadline, corruption, size limit)."""


class BrokerError(FedbusError):
    """The managed broker failed to start, its port is taken, or it died."""
