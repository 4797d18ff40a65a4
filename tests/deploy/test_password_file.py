"""Per-node passwords from files: ``<password_env>_FILE`` (a compose secret, or a directory)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedbus.config import BrokerConfig
from fedbus.errors import ConfigError
from fedbus.transport._tls import client_credentials

ENV = "FEDBUS_TEST_PASSWORD"


def test_variable_wins_then_file_then_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = BrokerConfig(password_env=ENV)
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.delenv(f"{ENV}_FILE", raising=False)
    with pytest.raises(ConfigError, match=f"{ENV}_FILE"):
        config.password("client-0")
    secret = tmp_path / "one"
    secret.write_text("from-file\n")
    monkeypatch.setenv(f"{ENV}_FILE", str(secret))
    assert client_credentials(config, "client-0") == ("client-0", "from-file")
    folder = tmp_path / "dir"
    folder.mkdir()
    (folder / "client-0").write_text("zero")
    (folder / "client-1").write_text("one")
    monkeypatch.setenv(f"{ENV}_FILE", str(folder))
    assert client_credentials(config, "client-1") == ("client-1", "one")
    with pytest.raises(ConfigError, match="cannot read"):
        config.password("client-9")
    with pytest.raises(ConfigError, match="node id"):
        config.password()
    monkeypatch.setenv(ENV, "direct")
    assert config.password("client-0") == "direct"


def test_managed_broker_takes_an_acl_file(tmp_path: Path) -> None:
    from fedbus.broker.managed import ManagedBroker, find_mosquitto
    from fedbus.broker.mosquitto import render_mosquitto_conf

    acl = tmp_path / "acl"
    acl.write_text("pattern read x/%u\n")
    text = render_mosquitto_conf(
        host="127.0.0.1", port=1883, allow_anonymous=False, log_path=tmp_path / "log",
        acl_file=acl,
    )  # fmt: skip
    assert f"acl_file {acl.resolve()}" in text.splitlines()
    if find_mosquitto() is not None:
        with pytest.raises(ConfigError, match="ACL file"):
            ManagedBroker(kind="mosquitto", acl_file=tmp_path / "missing")


@pytest.mark.parametrize("edge", ["edge-a", "e" * 60])
def test_edge_namespace_matches_the_edge_runtime(edge: str) -> None:
    edge_module = pytest.importorskip("fedbus.nodes.edge")
    from fedbus.deploy import edge_namespace

    assert edge_namespace("hier", edge) == edge_module.namespace_of("hier", edge, server="cloud")
