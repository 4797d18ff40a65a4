"""Run the pure-Python amqtt broker: ``python -m fedbus.broker.amqtt_runner --port P``.

`ManagedBroker` starts this module as a child process when mosquitto is not
installed. It is a fallback only (MQTT 3.1.1, 0.2-0.4x mosquitto's
throughput, no size limits, unbounded queues; see
../shared/notes/mqtt-measurements.md, "Library findings").

It reads the same mosquitto-format password files as mosquitto (through
`MosquittoPasswordAuth`), so one file serves either broker. It exits 0 on
SIGTERM or SIGINT after shutting the broker down, and non-zero with a
one-line reason when it cannot start (a port in use, say).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from amqtt.broker import Broker
from amqtt.plugins.base import BaseAuthPlugin

from fedbus.broker.mosquitto import read_password_file, verify_password

__all__ = ["MosquittoPasswordAuth", "build_config", "main"]

log = logging.getLogger("fedbus.broker.amqtt")


class MosquittoPasswordAuth(BaseAuthPlugin):  # type: ignore[misc]
    """amqtt authentication against a mosquitto password file, or anonymous access.

    amqtt's own file plugin reads argon2/bcrypt hashes only; this one reads
    mosquitto's ``$7$`` (PBKDF2-SHA512) and ``$6$`` hashes so that
    `fedbus.broker.make_password_file` and ``mosquitto_passwd`` files work here too.
    """

    @dataclass
    class Config:
        """Plugin options, filled in by amqtt from the broker config."""

        password_file: str | None = None
        allow_anonymous: bool = True

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        path = self.config.password_file
        self._users = read_password_file(path) if path else {}

    async def authenticate(self, *, session: Any) -> bool:
        """Accept a known user with the right password, or anyone if anonymous is allowed."""
        username = session.username
        if username is None:
            return bool(self.config.allow_anonymous)
        hashed = self._users.get(username)
        if hashed is None:
            return bool(self.config.allow_anonymous and not self._users)
        password = session.password or ""
        if isinstance(password, bytes):
            password = password.decode("utf-8", errors="replace")
        return verify_password(password, hashed)


def build_config(args: argparse.Namespace) -> dict[str, Any]:
    """The amqtt broker config dict for the parsed command line."""
    listener: dict[str, Any] = {"type": "tcp", "bind": _bind(args.host, args.port)}
    if args.tls_cert:
        listener.update(ssl=True, certfile=args.tls_cert, keyfile=args.tls_key)
        if args.tls_ca:
            listener["cafile"] = args.tls_ca
    return {
        "listeners": {"default": listener},
        "timeout_disconnect_delay": 0,
        "plugins": {
            f"{__name__}.MosquittoPasswordAuth": {
                "password_file": args.password_file,
                "allow_anonymous": args.allow_anonymous,
            },
        },
    }


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _serve(config: dict[str, Any]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    broker = Broker(config)
    await broker.start()
    log.info("amqtt broker running on %s", config["listeners"]["default"]["bind"])
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(broker.shutdown(), timeout=5.0)
        log.info("amqtt broker stopped")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fedbus.broker.amqtt_runner")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--allow-anonymous", action="store_true")
    parser.add_argument("--password-file")
    parser.add_argument("--tls-cert")
    parser.add_argument("--tls-key")
    parser.add_argument("--tls-ca")
    parser.add_argument("--require-certificate", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the broker until SIGTERM/SIGINT; returns the exit status."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s amqtt %(levelname)s %(name)s: %(message)s",
    )
    # amqtt logs every packet and transition at INFO; keep its own chatter to warnings.
    logging.getLogger("amqtt").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    logging.getLogger("transitions").setLevel(logging.WARNING)
    if args.require_certificate:
        print("amqtt fallback: require_certificate is not supported", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(build_config(args)))
    except Exception as exc:
        print(f"amqtt broker failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
