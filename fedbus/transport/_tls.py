"""TLS context and credentials for `fedbus.transport.mqtt.MqttTransport`.

Kept apart from the transport so that the rules about files and secrets (read
once, fail early with the YAML path, never log a password) live in one place.
"""

from __future__ import annotations

import ssl

from fedbus.config import BrokerConfig
from fedbus.errors import ConfigError

__all__ = ["client_credentials", "client_ssl_context"]


class _HandshakeClosingSSLSocket(ssl.SSLSocket):
    """An SSL socket that closes itself when its handshake fails.

    paho 2.2 runs the handshake inside ``connect()`` and, when it fails (wrong
    CA, bad host name), drops the socket without closing it: a file
    descriptor left to the garbage collector and a ``ResourceWarning``. Set as
    the context's documented ``sslsocket_class``, this closes it at once.
    """

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise  # a non-blocking handshake in progress, not a failure
        except BaseException:
            self.close()
            raise


def client_ssl_context(config: BrokerConfig) -> ssl.SSLContext | None:
    """Build the TLS context for ``config``, or None for a plain TCP connection.

    The context verifies the broker's certificate and host name against
    ``ca_file`` (the system CAs when it is None) and presents
    ``cert_file``/``key_file`` when both are set.

    Raises:
        ConfigError: a CA or client certificate file is named for a plain
            ``mqtt://`` connection (they would be silently ignored and the
            traffic sent in clear), or a file cannot be read or parsed.
    """
    if not config.tls:
        if config.ca_file is not None or config.cert_file is not None:
            raise ConfigError(
                "ca_file/cert_file are set but the broker URL is mqtt:// (no TLS); "
                "use mqtts:// or drop the certificate settings",
                path="broker.url",
            )
        return None
    try:
        context = ssl.create_default_context(cafile=config.ca_file)
        context.sslsocket_class = _HandshakeClosingSSLSocket
    except OSError as exc:  # ssl.SSLError is an OSError too
        raise ConfigError(
            f"cannot load CA file {config.ca_file!r}: {exc}", path="broker.ca_file"
        ) from exc
    if config.cert_file is not None:
        try:
            context.load_cert_chain(config.cert_file, config.key_file)
        except OSError as exc:
            raise ConfigError(
                f"cannot load client certificate {config.cert_file!r} / key "
                f"{config.key_file!r}: {exc}",
                path="broker.cert_file",
            ) from exc
    return context


def client_credentials(config: BrokerConfig, client_id: str) -> tuple[str | None, str | None]:
    """The MQTT username and password to send, as ``(username, password)``.

    A password without a username logs in as the client id: per-node
    credentials, where ACL patterns (``%u``) confine each node to its topics.

    Raises:
        ConfigError: ``password_env`` names a variable that is not set
            (nor its ``_FILE`` variant, see `BrokerConfig.password`).
    """
    password = config.password(client_id)
    username = config.username
    if username is None and password is not None:
        username = client_id
    return username, password
