"""Typed, validated configuration shared by the transport and broker layers.

Config objects are frozen, keyword-only dataclasses that validate themselves
(like aiomqtt's ``Topic``); cross-field problems raise `ConfigError` naming the
field. The YAML layer (`fedbus.topology`) adds the path and line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Final, Literal
from urllib.parse import unquote, urlsplit

from fedbus.errors import ConfigError

__all__ = [
    "AWS_IOT_MAX_PAYLOAD_BYTES",
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "BrokerConfig",
    "ReconnectPolicy",
]

DEFAULT_MAX_PAYLOAD_BYTES: Final = 1_000_000
"""Fits EMQX's 1 MB default ``max_packet_size``; mosquitto's own limit is far above."""

AWS_IOT_MAX_PAYLOAD_BYTES: Final = 131_072
"""AWS IoT Core-class brokers cap a PUBLISH at 128 KB."""

_SCHEMES: Final = {
    "mqtt": (False, 1883),
    "tcp": (False, 1883),
    "mqtts": (True, 8883),
    "ssl": (True, 8883),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class ReconnectPolicy:
    """Exponential backoff with full jitter between reconnect attempts.

    Attributes:
        initial_s: first delay ceiling.
        max_s: delay cap (paho C uses 60 s).
        deadline_s: give up (ConnectError) when the broker stays unreachable
            this long; None retries forever.
    """

    initial_s: float = 0.2
    max_s: float = 30.0
    deadline_s: float | None = 120.0

    def __post_init__(self) -> None:
        if self.initial_s <= 0 or self.max_s < self.initial_s:
            raise ConfigError("reconnect delays need 0 < initial_s <= max_s", path="reconnect")
        if self.deadline_s is not None and self.deadline_s <= 0:
            raise ConfigError("deadline_s must be positive or None", path="reconnect.deadline_s")

    def delay_s(self, attempt: int, rand: float) -> float:
        """Delay before reconnect ``attempt`` (0-based), given ``rand`` in [0, 1)."""
        ceiling = min(self.max_s, self.initial_s * (2.0 ** min(attempt, 32)))
        return ceiling * rand


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerConfig:
    """Where and how to connect to an MQTT broker.

    Attributes:
        host: broker host name or address.
        port: TCP port.
        tls: connect with TLS (``mqtts://``).
        username: MQTT username; None means "the node id" when per-node
            credentials are in use, else anonymous.
        password_env: name of the environment variable holding the password
            (never the password itself in a file that gets committed).
        ca_file: CA bundle to verify the broker; cert_file/key_file: client certificate.
        max_payload_bytes: bound on a whole PUBLISH packet; larger messages are chunked.
        keepalive_s: MQTT keepalive.
        protocol: "auto" tries MQTT 5 then falls back to 3.1.1.
        connect_timeout_s: deadline for one connection attempt.
        max_inflight: most QoS 1 publishes awaiting PUBACK per connection.
        reconnect: backoff policy after a lost connection.
    """

    host: str = "127.0.0.1"
    port: int = 1883
    tls: bool = False
    username: str | None = None
    password_env: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    keepalive_s: int = 30
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    connect_timeout_s: float = 10.0
    max_inflight: int = 16
    reconnect: ReconnectPolicy = field(default_factory=ReconnectPolicy)

    def __post_init__(self) -> None:
        if not self.host:
            raise ConfigError("host must not be empty", path="broker.url")
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be in 1..65535, got {self.port}", path="broker.url")
        if self.max_payload_bytes < 1024:
            raise ConfigError(
                f"max_payload_bytes must be at least 1024, got {self.max_payload_bytes}",
                path="broker.max_payload_bytes",
            )
        if self.keepalive_s < 1:
            raise ConfigError("keepalive_s must be at least 1", path="broker.keepalive_s")
        if self.max_inflight < 1:
            raise ConfigError("max_inflight must be at least 1", path="broker.max_inflight")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("cert_file and key_file go together", path="broker.cert_file")
        if self.protocol not in ("auto", "5", "3.1.1"):
            raise ConfigError(
                f"protocol must be auto, 5 or 3.1.1, got {self.protocol!r}", path="broker.protocol"
            )

    @classmethod
    def from_url(cls, url: str, **overrides: object) -> BrokerConfig:
        """Build a config from ``mqtt://[user[:password]@]host[:port]`` or ``mqtts://...``.

        A password in the URL is refused: it would end up in logs and shell
        history; use ``password_env``.

        Raises:
            ConfigError: unknown scheme, missing host, bad port, inline password.
        """
        parts = urlsplit(url)
        if parts.scheme not in _SCHEMES:
            raise ConfigError(
                f"broker URL {url!r} must start with mqtt:// or mqtts://", path="broker.url"
            )
        tls, default_port = _SCHEMES[parts.scheme]
        try:
            port = parts.port or default_port
        except ValueError as exc:
            raise ConfigError(f"broker URL {url!r} has an invalid port", path="broker.url") from exc
        if parts.password is not None:
            raise ConfigError(
                "put the password in an environment variable (password_env), not in the URL",
                path="broker.url",
            )
        if not parts.hostname:
            raise ConfigError(f"broker URL {url!r} has no host", path="broker.url")
        kwargs: dict[str, object] = {"host": parts.hostname, "port": port, "tls": tls}
        if parts.username:
            kwargs["username"] = unquote(parts.username)
        kwargs.update(overrides)
        return cls(**kwargs)  # type: ignore[arg-type]

    @property
    def url(self) -> str:
        """The broker URL, without credentials."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def password(self, client_id: str | None = None) -> str | None:
        """Read the password named by ``password_env``.

        The variable itself holds the password. Unset, ``<password_env>_FILE``
        is tried, the container convention for secrets: a file holding the
        password (a compose secret under ``/run/secrets``), or a directory of
        one file per node id, so that ``fedbus run`` can start many nodes
        with per-node credentials in one process. One trailing newline of a
        file is dropped (editors add one).

        Args:
            client_id: the node whose password is wanted, for a directory.

        Raises:
            ConfigError: neither variable is set, or the file cannot be read.
        """
        if self.password_env is None:
            return None
        value = os.environ.get(self.password_env)
        if value is not None:
            return value
        file_var = f"{self.password_env}_FILE"
        location = os.environ.get(file_var)
        if location is None:
            raise ConfigError(
                f"environment variable {self.password_env} (broker.password_env) is not set, "
                f"nor {file_var}",
                path="broker.password_env",
            )
        path = location
        if os.path.isdir(location):
            if client_id is None:
                raise ConfigError(
                    f"{file_var} names a directory; a node id is needed to pick the file",
                    path="broker.password_env",
                )
            path = os.path.join(location, client_id)
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except OSError as exc:
            raise ConfigError(
                f"cannot read the password file {path!r} ({file_var}): {exc.strerror}",
                path="broker.password_env",
            ) from exc
        return text.removesuffix("\n").removesuffix("\r")
