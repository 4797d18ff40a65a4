"""``fedbus broker``: run the managed broker in the foreground until interrupted.

Lives beside the broker rather than in `fedbus.cli`, so the CLI module only
registers it and ``fedbus --help`` does not import the broker machinery.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from types import FrameType

from fedbus.broker.managed import ManagedBroker
from fedbus.broker.mosquitto import BrokerTls
from fedbus.errors import BrokerError, ConfigError

__all__ = ["add_arguments", "run"]

log = logging.getLogger(__name__)

_CHECK_INTERVAL_S = 0.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``fedbus broker`` options on ``parser``."""
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default %(default)s)"
    )
    parser.add_argument("--port", type=int, default=1883, help="TCP port (default %(default)s)")
    parser.add_argument(
        "--kind",
        choices=("auto", "mosquitto", "amqtt"),
        default="auto",
        help="broker to run; auto: mosquitto if installed, else the slower amqtt fallback",
    )
    parser.add_argument(
        "--allow-anonymous",
        action="store_true",
        help="accept clients without credentials even beyond loopback",
    )
    parser.add_argument("--password-file", help="mosquitto-format password file")
    parser.add_argument("--tls-cert", help="PEM certificate: makes the listener TLS (mqtts)")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument("--tls-ca", help="PEM CA bundle for client certificates")
    parser.add_argument(
        "--require-certificate",
        action="store_true",
        help="refuse TLS clients without a certificate signed by --tls-ca",
    )
    parser.add_argument(
        "--persistence", action="store_true", help="keep sessions across restarts (mosquitto)"
    )
    parser.add_argument(
        "--max-payload-bytes", type=int, help="largest MQTT packet accepted (mosquitto)"
    )


def _build(args: argparse.Namespace) -> ManagedBroker:
    tls = None
    if args.tls_cert or args.tls_key or args.tls_ca or args.require_certificate:
        if not (args.tls_cert and args.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together")
        tls = BrokerTls(
            certfile=args.tls_cert,
            keyfile=args.tls_key,
            cafile=args.tls_ca,
            require_certificate=args.require_certificate,
        )
    return ManagedBroker(
        host=args.host,
        port=args.port,
        kind=args.kind,
        allow_anonymous=True if args.allow_anonymous else None,
        password_file=args.password_file,
        tls=tls,
        persistence=args.persistence,
        max_payload_bytes=args.max_payload_bytes,
    )


def _fail(exc: Exception, status: int) -> int:
    # One line on stderr; the broker log tail (if any) is logged for -v.
    first, _, rest = str(exc).partition("\n")
    if rest and not log.isEnabledFor(logging.INFO):
        first += " (run with -v for the broker log)"
    print(f"fedbus broker: {first}", file=sys.stderr)
    if rest:
        log.info("%s", rest)
    return status


def run(args: argparse.Namespace) -> int:
    """Run the broker until SIGINT/SIGTERM; 0 on a clean stop, 1 if it failed, 2 on bad options."""
    try:
        broker = _build(args)
    except (ConfigError, BrokerError) as exc:
        return _fail(exc, 2 if isinstance(exc, ConfigError) else 1)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        broker.start()
        print(f"fedbus broker: {broker.kind} listening on {broker.url}", flush=True)
        while not stop.wait(_CHECK_INTERVAL_S):
            broker.check()
    except BrokerError as exc:
        return _fail(exc, 1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        broker.close()
    return 0
