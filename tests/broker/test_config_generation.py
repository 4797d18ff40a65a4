"""Unit tests of the broker layer that start no process."""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

import fedbus.broker
from fedbus.broker import BrokerTls, ManagedBroker, free_port, make_password_file
from fedbus.broker._net import is_loopback, port_is_free, probe_host, probe_mqtt
from fedbus.broker.mosquitto import (
    MAX_QUEUED_MESSAGES,
    hash_password,
    read_password_file,
    render_mosquitto_conf,
    verify_password,
)
from fedbus.errors import BrokerError, ConfigError


def _conf(tmp_path: Path, **kwargs: object) -> dict[str, list[str]]:
    args: dict[str, object] = {
        "host": "127.0.0.1",
        "port": 18830,
        "allow_anonymous": True,
        "log_path": tmp_path / "broker.log",
    }
    args.update(kwargs)
    text = render_mosquitto_conf(**args)  # type: ignore[arg-type]
    options: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            options.setdefault(key, []).append(value)
    return options


def test_exported_members() -> None:
    assert sorted(fedbus.broker.__all__) == fedbus.broker.__all__
    for name in fedbus.broker.__all__:
        assert hasattr(fedbus.broker, name)


def test_default_config_is_loopback_with_model_sized_queues(tmp_path: Path) -> None:
    conf = _conf(tmp_path)

    assert conf["listener"] == ["18830 127.0.0.1"]
    assert conf["allow_anonymous"] == ["true"]
    assert conf["max_queued_messages"] == [str(MAX_QUEUED_MESSAGES)]
    assert MAX_QUEUED_MESSAGES >= 10_000
    assert conf["max_queued_bytes"] == ["0"]
    assert conf["persistence"] == ["false"]
    assert conf["log_dest"] == [f"file {tmp_path / 'broker.log'}"]
    assert "max_packet_size" not in conf
    assert "password_file" not in conf


def test_runs_as_the_current_user_so_root_can_read_its_files(tmp_path: Path) -> None:
    import getpass

    assert _conf(tmp_path)["user"] == [getpass.getuser()]
    assert _conf(tmp_path, user="alice")["user"] == ["alice"]


def test_max_payload_bounds_whole_packets(tmp_path: Path) -> None:
    assert _conf(tmp_path, max_payload_bytes=131_072)["max_packet_size"] == ["131072"]
    with pytest.raises(ConfigError, match="max_payload_bytes"):
        _conf(tmp_path, max_payload_bytes=10)


def test_persistence_and_password_file(tmp_path: Path) -> None:
    pw = make_password_file(tmp_path / "pw", {"u": "p"})
    conf = _conf(
        tmp_path, persistence_dir=tmp_path / "data", password_file=pw, allow_anonymous=False
    )

    assert conf["persistence"] == ["true"]
    assert conf["persistence_location"] == [f"{tmp_path / 'data'}/"]
    assert conf["password_file"] == [str(pw.resolve())]
    assert conf["allow_anonymous"] == ["false"]


def test_tls_listener_lines_follow_the_listener(tmp_path: Path) -> None:
    for name in ("c.pem", "k.pem", "ca.pem"):
        (tmp_path / name).write_text("x")
    tls = BrokerTls(
        certfile=str(tmp_path / "c.pem"),
        keyfile=str(tmp_path / "k.pem"),
        cafile=str(tmp_path / "ca.pem"),
        require_certificate=True,
    )
    text = render_mosquitto_conf(
        host="0.0.0.0", port=8883, allow_anonymous=False, log_path=tmp_path / "l", tls=tls
    )
    after_listener = text.split("listener 8883 0.0.0.0\n", 1)[1]

    assert f"certfile {tmp_path / 'c.pem'}" in after_listener
    assert f"keyfile {tmp_path / 'k.pem'}" in after_listener
    assert f"cafile {tmp_path / 'ca.pem'}" in after_listener
    assert "require_certificate true" in after_listener


def test_tls_options_are_validated(tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("x")
    with pytest.raises(ConfigError, match="keyfile"):
        BrokerTls(certfile=str(tmp_path / "c.pem"), keyfile=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="cafile"):
        BrokerTls(
            certfile=str(tmp_path / "c.pem"),
            keyfile=str(tmp_path / "c.pem"),
            require_certificate=True,
        )


def test_config_injection_and_bad_port_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="newline"):
        _conf(tmp_path, host="127.0.0.1\nallow_anonymous true")
    with pytest.raises(ConfigError, match="port"):
        _conf(tmp_path, port=0)


def test_password_file_round_trip(tmp_path: Path) -> None:
    path = make_password_file(tmp_path / "pw", {"alice": "s3cret", "bob": "other"})

    users = read_password_file(path)
    assert set(users) == {"alice", "bob"}
    assert users["alice"].startswith("$7$")
    assert verify_password("s3cret", users["alice"])
    assert not verify_password("wrong", users["alice"])
    assert not verify_password("s3cret", "garbage")
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(ConfigError):
        make_password_file(tmp_path / "bad", {"a:b": "x"})


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd missing")
def test_verify_reads_mosquitto_passwd_hashes(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    path.touch()
    subprocess.run(["mosquitto_passwd", "-b", str(path), "carol", "pa55"], check=True, timeout=10)

    hashed = read_password_file(path)["carol"]
    assert verify_password("pa55", hashed)
    assert not verify_password("pa56", hashed)


def test_hash_is_salted() -> None:
    assert hash_password("x") != hash_password("x")


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", True),
        ("127.3.2.1", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.10", False),
        ("broker.example.org", False),
    ],
)
def test_is_loopback(host: str, expected: bool) -> None:
    assert is_loopback(host) is expected


def test_probe_host_maps_wildcards_to_loopback() -> None:
    assert probe_host("0.0.0.0") == "127.0.0.1"
    assert probe_host("::") == "::1"
    assert probe_host("10.0.0.1") == "10.0.0.1"


def test_free_port_and_port_is_free() -> None:
    port = free_port()
    assert port_is_free("127.0.0.1", port)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        assert not port_is_free("127.0.0.1", port)
        # Something listening that is not MQTT: the probe must say "not ready".
        assert not probe_mqtt("127.0.0.1", port, timeout_s=0.2)
    assert not probe_mqtt("127.0.0.1", port, timeout_s=0.2)


def test_beyond_loopback_needs_credentials() -> None:
    with pytest.raises(ConfigError, match="password file or TLS"):
        ManagedBroker(host="0.0.0.0")
    with pytest.raises(ConfigError, match="password file or TLS"):
        ManagedBroker(host="0.0.0.0", allow_anonymous=False)
    broker = ManagedBroker(host="0.0.0.0", allow_anonymous=True)
    try:
        assert broker.client_config().host == "127.0.0.1"
    finally:
        broker.close()


def test_properties_and_client_config(tmp_path: Path) -> None:
    pw = make_password_file(tmp_path / "pw", {"u": "p"})
    port = free_port()
    broker = ManagedBroker(port=port, password_file=pw, max_payload_bytes=131_072)
    try:
        assert broker.port == port
        assert broker.url == f"mqtt://127.0.0.1:{port}"
        assert broker.pid is None
        assert not broker.running
        assert broker.kind in ("mosquitto", "amqtt")
        config = broker.client_config(username="u", password_env="PW")
        assert (config.host, config.port, config.tls) == ("127.0.0.1", port, False)
        assert config.max_payload_bytes == 131_072
        assert config.username == "u"
        broker.check()  # not started: nothing to report
        broker.stop()  # stopping a stopped broker is harmless
    finally:
        broker.close()
    assert not broker.log_path.parent.exists()


def test_missing_password_file_and_bad_kind(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="password file"):
        ManagedBroker(password_file=tmp_path / "nope")
    with pytest.raises(ConfigError, match="kind"):
        ManagedBroker(kind="emqx")  # type: ignore[arg-type]


def test_kind_mosquitto_missing_is_a_broker_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fedbus.broker.managed.find_mosquitto", lambda: None)
    with pytest.raises(BrokerError, match="mosquitto is not installed"):
        ManagedBroker(kind="mosquitto")


def test_auto_falls_back_to_amqtt_with_a_notice(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    pytest.importorskip("amqtt")
    monkeypatch.setattr("fedbus.broker.managed.find_mosquitto", lambda: None)
    broker = ManagedBroker()
    try:
        assert broker.kind == "amqtt"
        assert broker.notice is not None
        assert "slower" in broker.notice
        assert "3.1.1" in broker.notice
        assert any("amqtt" in r.getMessage() for r in caplog.records)
        assert broker.client_config().protocol == "3.1.1"
    finally:
        broker.close()


def test_amqtt_runner_config() -> None:
    pytest.importorskip("amqtt")
    from fedbus.broker.amqtt_runner import build_config

    args = argparse.Namespace(
        host="::1",
        port=1884,
        allow_anonymous=False,
        password_file="/x/pw",
        tls_cert="c.pem",
        tls_key="k.pem",
        tls_ca=None,
    )
    config = build_config(args)
    listener = config["listeners"]["default"]
    assert listener["bind"] == "[::1]:1884"
    assert listener["ssl"] is True
    (plugin,) = config["plugins"].values()
    assert plugin == {"password_file": "/x/pw", "allow_anonymous": False}


def test_cli_registers_broker_with_defaults() -> None:
    from fedbus.cli import build_parser

    args = build_parser().parse_args(["broker"])
    assert (args.host, args.port, args.kind) == ("127.0.0.1", 1883, "auto")
    assert not args.allow_anonymous
    assert callable(args.handler)
    args = build_parser().parse_args(
        ["broker", "--host", "0.0.0.0", "--port", "8883", "--kind", "amqtt", "--allow-anonymous"]
    )
    assert (args.host, args.port, args.kind, args.allow_anonymous) == (
        "0.0.0.0",
        8883,
        "amqtt",
        True,
    )


def test_cli_tls_options_go_together(capsys: pytest.CaptureFixture[str]) -> None:
    from fedbus.cli import build_parser

    args = build_parser().parse_args(["broker", "--tls-cert", "c.pem", "--port", str(free_port())])
    assert args.handler(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == "fedbus broker: --tls-cert and --tls-key go together"
