"""Helpers of the ACL tests: run a generated broker config for real, drive paho clients.

`GeneratedBroker` starts mosquitto with exactly the config `fedbus deploy`
renders, only with host paths, a free port on 127.0.0.1 and a log file
(`fedbus.deploy.BrokerPaths`); it stops the child by its PID. `Node` is one
paho connection that records SUBACK codes and received payloads; every
wait has a deadline.
"""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from fedbus.broker import find_mosquitto, free_port
from fedbus.broker._net import port_is_free
from fedbus.deploy import BrokerPaths, render_broker_conf
from fedbus.deploy.plan import BrokerPlan

DEADLINE_S = 10.0


def wait_for(predicate: Callable[[], bool], timeout_s: float = DEADLINE_S) -> bool:
    """Poll ``predicate`` until true or the deadline; return its last value."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return predicate()
        time.sleep(0.01)
    return True


def host_paths(root: Path, broker: str, tmp: Path) -> BrokerPaths:
    """The generated files of ``broker`` under deployment ``root``, as host paths."""
    conf = root / "brokers" / broker
    certs = root / "certs"
    return BrokerPaths(
        password_file=str(conf / "passwd"), acl_file=str(tmp / f"{broker}.acl"),
        cafile=str(certs / "ca" / "ca.pem"), certfile=str(certs / "brokers" / f"{broker}.pem"),
        keyfile=str(certs / "brokers" / f"{broker}.key"), log_dest=f"file {tmp / broker}.log",
    )  # fmt: skip


class GeneratedBroker:
    """mosquitto running a deployment's rendered config on 127.0.0.1 and a free port."""

    def __init__(self, plan: BrokerPlan, paths: BrokerPaths, tmp: Path, *, tls: bool) -> None:
        exe = find_mosquitto()
        assert exe is not None
        self.port = free_port()
        self.log = Path(paths.log_dest.removeprefix("file "))
        self.conf = tmp / f"{plan.service}.conf"
        text = render_broker_conf(plan, tls=tls, port=self.port, bind="127.0.0.1", paths=paths)
        # As root, mosquitto would drop to the 'mosquitto' user and fail to read 0600 files.
        self.conf.write_text(f"user {os.environ.get('USER') or 'root'}\n" + text)
        self._cmd = [exe, "-c", str(self.conf)]
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        with open(self.log.with_suffix(".out"), "ab") as out:
            self.proc = subprocess.Popen(
                self._cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        ready = wait_for(lambda: not port_is_free("127.0.0.1", self.port) or self.proc is None
                         or self.proc.poll() is not None)  # fmt: skip
        if not ready or self.proc.poll() is not None:
            self.__exit__(None, None, None)
            raise RuntimeError(f"mosquitto did not start:\n{self.log_text()}")
        return self

    def log_text(self) -> str:
        """The broker's log, for failure messages."""
        parts = [p.read_text(errors="replace") for p in (self.log, self.log.with_suffix(".out"))
                 if p.exists()]  # fmt: skip
        return "\n".join(parts)[-3000:]

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


class Node:
    """One MQTT connection as node ``user``: records SUBACKs and what it receives."""

    def __init__(
        self, port: int, user: str, password: str | None, *, client_id: str | None = None,
        tls: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        self.user = user
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id or user,
            protocol=mqtt.MQTTv311,
        )  # fmt: skip
        if password is not None:
            self.client.username_pw_set(user, password)
        if tls is not None:
            self.client.tls_set(
                ca_certs=tls["ca"], certfile=tls.get("cert"), keyfile=tls.get("key"),
                cert_reqs=ssl.CERT_REQUIRED,
            )  # fmt: skip
        self.connack: Any = None
        self.disconnected = threading.Event()
        self.granted: dict[int, list[Any]] = {}
        self.received: dict[str, list[bytes]] = defaultdict(list)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = lambda *a: self.disconnected.set()
        self._port = port

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.connack = rc

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        self.granted[mid] = list(codes)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self.received[msg.topic].append(bytes(msg.payload))

    def connect(self) -> bool:
        """Connect; True when the broker accepted (CONNACK 0) before the deadline."""
        try:
            self.client.connect("127.0.0.1", self._port, keepalive=30)
        except (OSError, ssl.SSLError):
            return False
        self.client.loop_start()
        wait_for(lambda: self.connack is not None or self.disconnected.is_set())
        return self.connack is not None and not self.connack.is_failure

    def subscribe(self, topic_filter: str) -> bool:
        """Subscribe at QoS 1; True when granted (SUBACK not 0x80)."""
        result, mid = self.client.subscribe(topic_filter, qos=1)
        assert result == mqtt.MQTT_ERR_SUCCESS
        assert wait_for(lambda: mid in self.granted), f"no SUBACK for {topic_filter}"
        return not self.granted[mid][0].is_failure

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish at QoS 1 and wait for the PUBACK (mosquitto acks denied publishes too)."""
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(timeout=DEADLINE_S)
        assert info.is_published(), f"{self.user}: no PUBACK for {topic}"

    def got(self, payload: bytes) -> bool:
        """Whether any message with ``payload`` arrived."""
        return any(payload in msgs for msgs in list(self.received.values()))

    def close(self) -> None:
        """Disconnect cleanly and stop the network thread."""
        self.client.disconnect()
        self.client.loop_stop()
