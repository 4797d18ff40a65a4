"""`ManagedBroker`: a broker process owned by this Python process.

Theory of operation. The broker always runs as a child process (mosquitto
itself, or ``python -m fedbus.broker.amqtt_runner``), never in our event loop:
a federation's server and a broker sharing one loop would steal each other's
time, and a child can be killed and restarted to test client reconnects.

* **Port.** Picked once, at construction (mosquitto cannot report an
  ephemeral port), and kept for every restart, so clients reconnect to the
  same address.
* **Start.** Refuse early when the port is taken, write the config into a
  private temp dir, start the child in its own session (a terminal's Ctrl-C
  reaches only us, and we stop the broker in order), then probe with an MQTT
  CONNECT until a CONNACK comes back or the deadline passes. A child that
  exits meanwhile is reported with the tail of its log.
* **Stop.** SIGTERM to the child's process group, SIGKILL after a deadline,
  then reap. A `weakref.finalize` does the same at interpreter exit or when
  the object is collected, so no broker outlives the process that owns it
  (except after SIGKILL of the parent, which nothing in-process can catch).
* **Temp dir.** Lives as long as the object, so persistence survives
  `restart()`; removed by the finalizer.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, Self

from fedbus.broker._net import free_port, is_loopback, port_is_free, probe_host, probe_mqtt
from fedbus.broker.mosquitto import BrokerTls, render_mosquitto_conf
from fedbus.config import DEFAULT_MAX_PAYLOAD_BYTES, BrokerConfig
from fedbus.errors import BrokerError, ConfigError

__all__ = ["AMQTT_NOTICE", "BrokerKind", "ManagedBroker", "find_mosquitto"]

log = logging.getLogger(__name__)

BrokerKind = Literal["auto", "mosquitto", "amqtt"]

AMQTT_NOTICE: Final = (
    "mosquitto not found on PATH: using the pure-Python amqtt broker, a slower "
    "fallback (MQTT 3.1.1 only, 0.2-0.4x mosquitto throughput); install mosquitto "
    "for real runs"
)

_SBIN_DIRS: Final = ("/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin")
_POLL_S: Final = 0.05
_TAIL_LINES: Final = 15


def find_mosquitto() -> str | None:
    """Path of the mosquitto executable, or None.

    Debian installs it in /usr/sbin, which is not on a normal user's PATH, so
    the usual sbin directories are searched too.
    """
    found = shutil.which("mosquitto")
    if found:
        return found
    for directory in _SBIN_DIRS:
        candidate = Path(directory, "mosquitto")
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _amqtt_available() -> bool:
    return importlib.util.find_spec("amqtt") is not None


@dataclass(slots=True)
class _Child:
    """What the finalizer needs: kept apart from ManagedBroker so it holds no reference to it."""

    tmpdir: Path
    proc: subprocess.Popen[bytes] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # Only while the child is unreaped: its pid (and process group id) cannot be reused until then.
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:  # pragma: no cover - the group leader changed its group
            proc.send_signal(sig)


def _terminate(proc: subprocess.Popen[bytes], timeout_s: float) -> int:
    """SIGTERM, then SIGKILL after ``timeout_s``; reap and return the exit status."""
    _signal_group(proc, signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        log.warning("broker pid %d ignored SIGTERM for %.1f s; killing it", proc.pid, timeout_s)
        _signal_group(proc, signal.SIGKILL)
        return proc.wait(timeout=timeout_s)


def _finalize(child: _Child) -> None:
    proc, child.proc = child.proc, None
    if proc is not None:
        _terminate(proc, 2.0)
    shutil.rmtree(child.tmpdir, ignore_errors=True)


class ManagedBroker:
    """An MQTT broker child process for a federation, tests or ``fedbus broker``.

    Example::

        with ManagedBroker() as broker:          # mosquitto on 127.0.0.1, a free port
            config = broker.client_config()      # fedbus.config.BrokerConfig
            ...

    Args:
        host: address to listen on; 127.0.0.1 by default. Beyond loopback a
            password file or TLS is required unless ``allow_anonymous`` is True.
        port: TCP port; None picks a free one now (kept across restarts).
        kind: "mosquitto", "amqtt" (pure-Python fallback, ``fedbus[broker]``),
            or "auto": mosquitto when installed, else amqtt with a warning.
        allow_anonymous: accept clients without credentials. None means: yes
            unless a password file is given.
        password_file: mosquitto-format password file (see
            `fedbus.broker.make_password_file`).
        acl_file: mosquitto ACL file (mosquitto only; see `fedbus.deploy`).
        tls: make the listener a TLS listener.
        persistence: keep sessions and queued messages across restarts
            (mosquitto only; stored in the broker's temp dir).
        max_payload_bytes: bound on a whole MQTT packet (mosquitto only);
            None leaves the protocol maximum.
        start_timeout_s: deadline for the broker to answer an MQTT CONNECT.
        stop_timeout_s: how long SIGTERM may take before SIGKILL.

    Raises:
        ConfigError: beyond loopback without credentials, TLS or allow_anonymous.
        BrokerError: the requested kind is not installed.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        kind: BrokerKind = "auto",
        allow_anonymous: bool | None = None,
        password_file: str | os.PathLike[str] | None = None,
        tls: BrokerTls | None = None,
        persistence: bool = False,
        max_payload_bytes: int | None = None,
        acl_file: str | os.PathLike[str] | None = None,
        start_timeout_s: float = 10.0,
        stop_timeout_s: float = 5.0,
    ) -> None:
        if not is_loopback(host) and password_file is None and tls is None and not allow_anonymous:
            raise ConfigError(
                f"refusing to listen on {host} without credentials: beyond loopback the "
                "broker needs a password file or TLS (or allow_anonymous=True / --allow-anonymous)",
                path="broker.host",
            )
        if password_file is not None and not Path(password_file).is_file():
            raise ConfigError(
                f"password file {os.fspath(password_file)!r} does not exist",
                path="broker.password_file",
            )
        if port is not None and not 0 < port < 65536:
            raise ConfigError(f"port must be in 1..65535, got {port}", path="broker.port")
        if acl_file is not None and not Path(acl_file).is_file():
            raise ConfigError(
                f"ACL file {os.fspath(acl_file)!r} does not exist", path="broker.acl_file"
            )
        if allow_anonymous is None:
            allow_anonymous = password_file is None
        self._host = host
        self._port = port if port is not None else free_port(host)
        self._allow_anonymous = allow_anonymous
        self._password_file = password_file
        self._tls = tls
        self._persistence = persistence
        self._max_payload_bytes = max_payload_bytes
        self._acl_file = acl_file
        self._start_timeout_s = start_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._kind, self._executable = self._resolve_kind(kind)
        self.notice: str | None = None
        """A one-line notice for the user (the amqtt fallback), or None."""
        if self._kind == "amqtt" and kind == "auto":
            self.notice = AMQTT_NOTICE
            log.warning("%s", AMQTT_NOTICE)
        if self._kind == "amqtt":
            if tls is not None and tls.require_certificate:
                raise ConfigError(
                    "the amqtt fallback cannot require client certificates; use mosquitto",
                    path="broker.tls.require_certificate",
                )
            if persistence:
                log.warning("the amqtt fallback keeps no persistent state; persistence is ignored")
            if max_payload_bytes is not None:
                log.warning("the amqtt fallback enforces no packet size limit (max_payload_bytes)")
            if acl_file is not None:
                raise ConfigError(
                    "the amqtt fallback cannot enforce a mosquitto ACL file; use mosquitto",
                    path="broker.acl_file",
                )
        self._child = _Child(tmpdir=Path(tempfile.mkdtemp(prefix="fedbus-broker-")))
        self._finalizer = weakref.finalize(self, _finalize, self._child)

    @staticmethod
    def _resolve_kind(kind: str) -> tuple[Literal["mosquitto", "amqtt"], str | None]:
        if kind not in ("auto", "mosquitto", "amqtt"):
            raise ConfigError(
                f"broker kind must be auto, mosquitto or amqtt, got {kind!r}", path="broker.kind"
            )
        if kind in ("auto", "mosquitto"):
            exe = find_mosquitto()
            if exe is not None:
                return "mosquitto", exe
            if kind == "mosquitto":
                raise BrokerError(
                    "mosquitto is not installed (not on PATH nor in /usr/sbin); "
                    "install it (apt install mosquitto) or use kind='amqtt'"
                )
        if not _amqtt_available():
            raise BrokerError(
                "no MQTT broker available: install mosquitto, or the pure-Python "
                "fallback with pip install 'fedbus[broker]'"
            )
        return "amqtt", None

    # -- properties ---------------------------------------------------------------

    @property
    def host(self) -> str:
        """Address the broker listens on."""
        return self._host

    @property
    def port(self) -> int:
        """TCP port, fixed for the life of this object."""
        return self._port

    @property
    def kind(self) -> Literal["mosquitto", "amqtt"]:
        """Which broker runs: "mosquitto" or "amqtt"."""
        return self._kind

    @property
    def url(self) -> str:
        """``mqtt://host:port``, or ``mqtts://`` for a TLS listener."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{'mqtts' if self._tls else 'mqtt'}://{host}:{self._port}"

    @property
    def pid(self) -> int | None:
        """Process id of the broker child, or None when not started."""
        proc = self._child.proc
        return proc.pid if proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the child process is alive (it may still be starting)."""
        proc = self._child.proc
        return proc is not None and proc.poll() is None

    @property
    def log_path(self) -> Path:
        """The broker's log file (the child's stdout and stderr go there too)."""
        return self._child.tmpdir / "broker.log"

    @property
    def config_path(self) -> Path:
        """The generated mosquitto config file (mosquitto only)."""
        return self._child.tmpdir / "mosquitto.conf"

    def log_tail(self, lines: int = _TAIL_LINES) -> str:
        """The last ``lines`` lines of the broker log, for error messages."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def client_config(self, **overrides: Any) -> BrokerConfig:
        """A `BrokerConfig` for connecting to this broker; ``overrides`` replace fields.

        The host is the listen address, or loopback for a wildcard listener.
        Against amqtt the protocol is pinned to 3.1.1, which it alone speaks.
        """
        kwargs: dict[str, Any] = {
            "host": probe_host(self._host),
            "port": self._port,
            "tls": self._tls is not None,
            "max_payload_bytes": self._max_payload_bytes or DEFAULT_MAX_PAYLOAD_BYTES,
        }
        if self._tls is not None and self._tls.cafile is not None:
            kwargs["ca_file"] = self._tls.cafile
        if self._kind == "amqtt":
            kwargs["protocol"] = "3.1.1"
        kwargs.update(overrides)
        return BrokerConfig(**kwargs)

    # -- lifecycle -----------------------------------------------------------------

    def _command(self) -> Sequence[str]:
        if self._kind == "mosquitto":
            assert self._executable is not None
            persistence_dir = self._child.tmpdir / "data" if self._persistence else None
            if persistence_dir is not None:
                persistence_dir.mkdir(exist_ok=True)
            self.config_path.write_text(
                render_mosquitto_conf(
                    host=self._host,
                    port=self._port,
                    allow_anonymous=self._allow_anonymous,
                    log_path=self.log_path,
                    password_file=self._password_file,
                    tls=self._tls,
                    persistence_dir=persistence_dir,
                    max_payload_bytes=self._max_payload_bytes,
                    acl_file=self._acl_file,
                ),
                encoding="utf-8",
            )
            return [self._executable, "-c", str(self.config_path)]
        cmd = [
            sys.executable,
            "-m",
            "fedbus.broker.amqtt_runner",
            "--host",
            self._host,
            "--port",
            str(self._port),
        ]
        if self._allow_anonymous:
            cmd.append("--allow-anonymous")
        if self._password_file is not None:
            cmd += ["--password-file", str(Path(self._password_file).resolve())]
        if self._tls is not None:
            cmd += ["--tls-cert", self._tls.certfile, "--tls-key", self._tls.keyfile]
            if self._tls.cafile is not None:
                cmd += ["--tls-ca", self._tls.cafile]
            if self._tls.require_certificate:
                cmd.append("--require-certificate")
        return cmd

    def start(self) -> None:
        """Start the broker and block until it answers an MQTT CONNECT.

        Calling it on a running broker does nothing.

        Raises:
            BrokerError: the port is taken, the broker exited during start-up
                (the message includes its log tail), or it did not answer
                within ``start_timeout_s``.
        """
        with self._child.lock:
            if self.running:
                return
            self._reap_locked()
            if not port_is_free(self._host, self._port):
                raise BrokerError(
                    f"port {self._port} on {self._host} is already in use "
                    "(another broker running?); choose another port"
                )
            cmd = self._command()
            with open(self.log_path, "ab") as log_file:
                try:
                    proc = subprocess.Popen(
                        cmd,
                        stdin=subprocess.DEVNULL,
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                        cwd=self._child.tmpdir,
                        start_new_session=True,
                    )
                except OSError as exc:
                    raise BrokerError(f"cannot start {self._kind}: {exc}") from exc
            self._child.proc = proc
            try:
                self._wait_ready(proc)
            except BaseException:
                self._child.proc = None
                _terminate(proc, self._stop_timeout_s)
                raise
            log.info("%s broker ready at %s (pid %d)", self._kind, self.url, proc.pid)

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + self._start_timeout_s
        target = probe_host(self._host)
        while True:
            rc = proc.poll()
            if rc is not None:
                raise BrokerError(self._describe_exit(proc.pid, rc, "before it was ready"))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                tail = self.log_tail()
                raise BrokerError(
                    f"{self._kind} (pid {proc.pid}) did not accept an MQTT connection on "
                    f"{target}:{self._port} within {self._start_timeout_s:.1f} s"
                    + (f"\nbroker log tail:\n{tail}" if tail else "")
                )
            if probe_mqtt(
                target, self._port, timeout_s=min(1.0, remaining), tls=self._tls is not None
            ):
                return
            time.sleep(min(_POLL_S, max(remaining, 0.0)))

    def _describe_exit(self, pid: int, rc: int, when: str) -> str:
        tail = self.log_tail()
        hint = ""
        if "Address already in use" in tail or "address already in use" in tail.lower():
            hint = f" (port {self._port} on {self._host} is already in use)"
        status = f"signal {-rc}" if rc < 0 else f"status {rc}"
        return f"{self._kind} broker (pid {pid}) exited with {status} {when}{hint}" + (
            f"\nbroker log tail:\n{tail}" if tail else f" (no log output in {self.log_path})"
        )

    def _reap_locked(self) -> None:
        proc = self._child.proc
        if proc is not None and proc.poll() is not None:
            self._child.proc = None

    def check(self) -> None:
        """Raise if the broker was started and has died since.

        Raises:
            BrokerError: the child exited; the message includes its log tail.
        """
        proc = self._child.proc
        if proc is not None:
            rc = proc.poll()
            if rc is not None:
                raise BrokerError(self._describe_exit(proc.pid, rc, "unexpectedly"))

    def wait(self, timeout_s: float | None = None) -> int | None:
        """Block until the broker exits or ``timeout_s`` passes; its exit status or None."""
        proc = self._child.proc
        if proc is None:
            return None
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after ``stop_timeout_s``) and reap it.

        Safe to call when not running; the port and temp dir are kept for `start()`.
        """
        with self._child.lock:
            proc, self._child.proc = self._child.proc, None
            if proc is not None:
                rc = _terminate(proc, self._stop_timeout_s)
                log.info("%s broker pid %d stopped (status %d)", self._kind, proc.pid, rc)

    def restart(self) -> None:
        """Stop and start again on the same port (clients see a broker restart)."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the broker and delete its temp dir (config, log, persistence)."""
        self._finalizer()

    async def aclose(self) -> None:
        """`close()` without blocking the event loop."""
        await asyncio.to_thread(self.close)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<ManagedBroker {self._kind} {self.url} {state}>"
