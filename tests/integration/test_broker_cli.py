"""``fedbus broker`` as a user runs it: a subprocess, real mosquitto_pub/mosquitto_sub clients."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from broker_clients import children, exchange, pid_gone, require_clients

from fedbus.broker import ManagedBroker, find_mosquitto, free_port
from fedbus.broker._net import probe_mqtt

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

START_DEADLINE_S = 15.0


def _kinds() -> list[object]:
    return [
        pytest.param(
            "mosquitto",
            marks=pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed"),
        ),
        "amqtt",
    ]


def kind_of(args: tuple[str, ...]) -> str:
    """The kind ``fedbus broker`` will report for these arguments."""
    if "--kind" in args and args[args.index("--kind") + 1] != "auto":
        return args[args.index("--kind") + 1]
    return "mosquitto" if find_mosquitto() else "amqtt"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedbus", "broker", *args]


@contextmanager
def running_cli(*args: str, port: int) -> Iterator[subprocess.Popen[str]]:
    """Start ``fedbus broker`` and wait for its "listening" line; SIGTERM it on exit."""
    with subprocess.Popen(
        _cli("--port", str(port), *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], START_DEADLINE_S)
            if not ready:
                pytest.fail("fedbus broker printed nothing in time")
            line = proc.stdout.readline()
            if not line:
                _, err = proc.communicate(timeout=5)
                pytest.fail(f"fedbus broker exited {proc.returncode}: {err}")
            assert (
                line.strip()
                == f"fedbus broker: {kind_of(args)} listening on mqtt://127.0.0.1:{port}"
            )
            assert probe_mqtt("127.0.0.1", port, timeout_s=2.0)
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


@pytest.mark.parametrize("kind", _kinds())
def test_cli_broker_carries_messages_between_mosquitto_clients(
    kind: str, unique_prefix: str
) -> None:
    require_clients()
    if kind == "amqtt":
        pytest.importorskip("amqtt")
    port = free_port()

    with running_cli("--kind", kind, port=port) as proc:
        brokers = children(proc.pid)
        got = exchange(port, f"{unique_prefix}/hello", "from mosquitto_pub")
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        out, err = proc.communicate(timeout=15)

    assert got == "from mosquitto_pub"
    assert proc.returncode == 0, err
    assert out == ""  # the listening line was read by running_cli
    assert len(brokers) == 1
    assert pid_gone(brokers[0]), "the broker child outlived fedbus broker"


def test_cli_port_taken_fails_with_one_line(mosquitto: ManagedBroker) -> None:
    result = subprocess.run(
        _cli("--port", str(mosquitto.port)), capture_output=True, text=True, timeout=30
    )

    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "already in use" in lines[0]
    assert str(mosquitto.port) in lines[0]
    assert result.stdout == ""


def test_cli_refuses_anonymous_beyond_loopback() -> None:
    result = subprocess.run(
        _cli("--host", "0.0.0.0", "--port", str(free_port())),
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 2
    assert "--allow-anonymous" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_sigterm_stops_cleanly() -> None:
    port = free_port()
    with running_cli(port=port) as proc:
        brokers = children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=15)

    assert proc.returncode == 0
    assert brokers
    assert all(pid_gone(pid) for pid in brokers)


def test_cli_reports_a_dead_broker_and_fails() -> None:
    port = free_port()
    with running_cli(port=port) as proc:
        (broker_pid,) = children(proc.pid)
        os.kill(broker_pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=15)

    assert proc.returncode == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "exited with signal 9 unexpectedly" in lines[0]
