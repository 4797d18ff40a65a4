"""ManagedBroker lifecycle against real processes: start, stop, restart, failures, no orphans."""

from __future__ import annotations

import gc
import os
import signal
import socket
import subprocess

import pytest
from broker_clients import exchange, pid_gone, pub, require_clients

from fedbus.broker import ManagedBroker, find_mosquitto, free_port
from fedbus.broker._net import probe_mqtt
from fedbus.errors import BrokerError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed")


def _kinds() -> list[object]:
    return [pytest.param("mosquitto", marks=needs_mosquitto), "amqtt"]


def test_session_fixtures(
    mosquitto: ManagedBroker, amqtt_broker: ManagedBroker, unique_prefix: str
) -> None:
    require_clients()
    assert mosquitto.kind == "mosquitto"
    assert amqtt_broker.kind == "amqtt"
    assert mosquitto.running
    assert amqtt_broker.running
    assert unique_prefix.startswith("t")
    assert len(unique_prefix) == 9
    assert exchange(mosquitto.port, f"{unique_prefix}/m", "m") == "m"
    assert exchange(amqtt_broker.port, f"{unique_prefix}/a", "a") == "a"


@pytest.mark.parametrize("kind", _kinds())
def test_start_stop_restart_leaves_no_process(kind: str) -> None:
    if kind == "amqtt":
        pytest.importorskip("amqtt")
    broker = ManagedBroker(kind=kind)  # type: ignore[arg-type]
    try:
        broker.start()
        first = broker.pid
        assert first is not None
        assert broker.running
        assert probe_mqtt("127.0.0.1", broker.port, timeout_s=2.0)

        broker.restart()
        second = broker.pid
        assert second is not None
        assert second != first
        assert pid_gone(first)
        assert probe_mqtt("127.0.0.1", broker.port, timeout_s=2.0)

        broker.stop()
        assert broker.pid is None
        assert not broker.running
        assert pid_gone(second)
        assert not probe_mqtt("127.0.0.1", broker.port, timeout_s=0.5)

        broker.start()  # again on the same port, as reconnect tests do
        assert probe_mqtt("127.0.0.1", broker.port, timeout_s=2.0)
        third = broker.pid
    finally:
        broker.close()
    assert third is not None
    assert pid_gone(third)
    assert not broker.log_path.parent.exists()


def test_context_managers_stop_the_broker() -> None:
    with ManagedBroker(kind="auto") as broker:
        pid = broker.pid
        assert pid is not None
        assert broker.running
    assert pid_gone(pid)
    broker.close()


async def test_async_context_manager() -> None:
    broker = ManagedBroker()
    async with broker:
        pid = broker.pid
        assert pid is not None
        assert probe_mqtt("127.0.0.1", broker.port, timeout_s=2.0)
    assert pid_gone(pid)
    await broker.aclose()


def test_garbage_collection_kills_the_broker() -> None:
    broker = ManagedBroker()
    broker.start()
    pid = broker.pid
    assert pid is not None
    del broker
    gc.collect()
    assert pid_gone(pid)


@pytest.mark.parametrize("kind", _kinds())
def test_port_taken_is_a_clear_broker_error(kind: str) -> None:
    if kind == "amqtt":
        pytest.importorskip("amqtt")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        broker = ManagedBroker(kind=kind, port=port)  # type: ignore[arg-type]
        try:
            with pytest.raises(
                BrokerError, match=rf"port {port} on 127\.0\.0\.1 is already in use"
            ):
                broker.start()
            assert broker.pid is None
        finally:
            broker.close()


@pytest.mark.parametrize("kind", _kinds())
def test_child_failing_at_startup_reports_the_log(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Someone takes the port between our check and the broker's bind: the
    # child exits, and the error must say so with the broker's own words.
    if kind == "amqtt":
        pytest.importorskip("amqtt")
    monkeypatch.setattr("fedbus.broker.managed.port_is_free", lambda host, port: True)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        broker = ManagedBroker(kind=kind, port=port)  # type: ignore[arg-type]
        try:
            with pytest.raises(BrokerError, match="exited with status") as info:
                broker.start()
            assert "already in use" in str(info.value).lower()
            assert "log tail" in str(info.value)
            assert not broker.running
        finally:
            broker.close()


def test_dead_broker_is_reported_by_check() -> None:
    broker = ManagedBroker()
    try:
        broker.start()
        pid = broker.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert broker.wait(timeout_s=5.0) == -signal.SIGKILL
        with pytest.raises(BrokerError, match="exited with signal 9 unexpectedly"):
            broker.check()
        broker.start()  # a dead broker can be started again
        broker.check()
        assert broker.running
    finally:
        broker.close()


def test_start_is_idempotent(mosquitto: ManagedBroker) -> None:
    pid = mosquitto.pid
    mosquitto.start()
    assert mosquitto.pid == pid


@needs_mosquitto
def test_persistence_keeps_queued_messages_across_restart(unique_prefix: str) -> None:
    require_clients()
    topic = f"{unique_prefix}/persist"
    client_id = f"{unique_prefix}-sub"
    broker = ManagedBroker(kind="mosquitto", persistence=True)
    try:
        broker.start()
        # A persistent session (-c) subscribes, then goes away.
        subscribe = [
            "mosquitto_sub", "-p", str(broker.port), "-i", client_id, "-c", "-q", "1", "-t", topic,
        ]  # fmt: skip
        subprocess.run([*subscribe, "-E"], check=True, timeout=10, capture_output=True)
        assert pub(broker.port, topic, "queued").returncode == 0

        broker.restart()

        got = subprocess.run(
            [*subscribe, "-C", "1", "-W", "10"], capture_output=True, text=True, timeout=15
        )
        assert got.returncode == 0, got.stderr
        assert got.stdout.strip() == "queued"
    finally:
        broker.close()


@needs_mosquitto
def test_max_payload_bytes_disconnects_oversize_publishers(unique_prefix: str) -> None:
    require_clients()
    with ManagedBroker(kind="mosquitto", max_payload_bytes=4096) as broker:
        small = pub(broker.port, f"{unique_prefix}/s", "x" * 1000)
        big = pub(broker.port, f"{unique_prefix}/b", "x" * 10_000)
    broker.close()
    assert small.returncode == 0, small.stderr
    assert big.returncode != 0


def test_free_port_gives_distinct_usable_ports() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
