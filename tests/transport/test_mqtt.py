"""MqttTransport without a broker: sizes, argument checks, connect failures."""

from __future__ import annotations

import asyncio

import pytest

from fedbus.broker import free_port
from fedbus.config import BrokerConfig, ReconnectPolicy
from fedbus.errors import (
    ConfigError,
    ConnectError,
    FedbusError,
    PayloadTooLargeError,
    TransportClosed,
)
from fedbus.transport.base import Transport, packet_overhead
from fedbus.transport.mqtt import MqttTransport


def _unreachable_config(**overrides: object) -> BrokerConfig:
    kwargs: dict[str, object] = {
        "port": free_port("127.0.0.1"),
        "connect_timeout_s": 2.0,
        "reconnect": ReconnectPolicy(initial_s=0.05, max_s=0.2, deadline_s=0.5),
    }
    kwargs.update(overrides)
    return BrokerConfig(**kwargs)  # type: ignore[arg-type]


def test_packet_overhead_bounds_a_publish_packet() -> None:
    # 1 type byte + 4 remaining-length bytes + 2 topic length + topic + 2 packet id + 1 properties
    assert packet_overhead("a/b") == 13
    assert packet_overhead("é") == 12  # UTF-8 bytes, not characters


def test_payload_too_large_is_a_value_error() -> None:
    assert issubclass(PayloadTooLargeError, ValueError)
    assert issubclass(PayloadTooLargeError, FedbusError)


def test_needs_a_running_loop() -> None:
    with pytest.raises(RuntimeError, match="running event loop"):
        MqttTransport(BrokerConfig(), "n1")


async def test_is_a_transport() -> None:
    assert isinstance(MqttTransport(BrokerConfig(), "n1"), Transport)


async def test_certificates_without_tls_are_refused() -> None:
    with pytest.raises(ConfigError, match="mqtts"):
        MqttTransport(BrokerConfig(ca_file="/nonexistent/ca.pem"), "n1")


async def test_missing_ca_file_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="ca_file"):
        MqttTransport(BrokerConfig(tls=True, ca_file="/nonexistent/ca.pem"), "n1")


async def test_unset_password_variable_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDBUS_TEST_UNSET_PW", raising=False)
    with pytest.raises(ConfigError, match="FEDBUS_TEST_UNSET_PW"):
        MqttTransport(BrokerConfig(password_env="FEDBUS_TEST_UNSET_PW"), "n1")


async def test_oversize_publish_raises_before_anything_else() -> None:
    transport = MqttTransport(BrokerConfig(max_payload_bytes=2048), "n1")
    topic = "fedbus/x"
    fits = bytes(2048 - packet_overhead(topic))
    # Not connected: a fitting payload gets as far as the closed check ...
    with pytest.raises(TransportClosed):
        await transport.publish(topic, fits)
    # ... one byte more is refused by the size check first.
    with pytest.raises(PayloadTooLargeError, match="max_payload_bytes=2048"):
        await transport.publish(topic, fits + b"x")


async def test_bad_arguments_raise_value_error() -> None:
    transport = MqttTransport(BrokerConfig(), "n1")
    with pytest.raises(ValueError, match="qos"):
        await transport.publish("a", b"", qos=3)
    with pytest.raises(ValueError, match="wildcard"):
        await transport.publish("a/+", b"")
    with pytest.raises(ValueError, match="client_id"):
        MqttTransport(BrokerConfig(), "")


@pytest.mark.timeout(20)
async def test_connect_error_when_nothing_listens() -> None:
    config = _unreachable_config()
    transport = MqttTransport(config, "n1")
    async with asyncio.timeout(15):
        with pytest.raises(ConnectError, match=r"could not connect to mqtt://127\.0\.0\.1") as info:
            await transport.__aenter__()
    assert isinstance(info.value.__cause__, ConnectionRefusedError)
    assert "0.5 s" in str(info.value)
    # A failed enter leaves the transport closed and reusable.
    with pytest.raises(TransportClosed):
        await transport.publish("a", b"")
    async with asyncio.timeout(15):
        with pytest.raises(ConnectError):
            async with transport:
                pass


@pytest.mark.timeout(20)
@pytest.mark.parametrize("protocol", ["auto", "5", "3.1.1"])
async def test_connect_error_for_every_protocol_setting(protocol: str) -> None:
    transport = MqttTransport(_unreachable_config(protocol=protocol), "n1")
    async with asyncio.timeout(15):
        with pytest.raises(ConnectError):
            async with transport:
                pass
    assert transport.stats.reconnects == 0


@pytest.mark.timeout(20)
async def test_messages_end_immediately_when_not_open() -> None:
    transport = MqttTransport(BrokerConfig(), "n1")
    async with asyncio.timeout(5):
        assert [m async for m in transport.messages()] == []
