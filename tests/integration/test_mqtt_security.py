"""MqttTransport with TLS (a throwaway CA made with the openssl CLI) and passwords."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedbus.broker import BrokerTls, ManagedBroker, make_password_file
from fedbus.config import ReconnectPolicy
from fedbus.errors import ConnectError
from fedbus.transport.mqtt import MqttTransport

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

WAIT_S = 10.0
# A long deadline: a refusal that were retried would hit the test timeout instead.
PATIENT = ReconnectPolicy(initial_s=0.05, max_s=0.2, deadline_s=60.0)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", key.name, "-out", cert.name, "-days", "2",
        "-subj", f"/CN=fedbus test {name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    return key, cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 signed by it, and an unrelated CA."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is not installed")
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert = _make_ca(d, "ca")
    _, other_ca = _make_ca(d, "other-ca")
    (d / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
    )
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1",
        cwd=d,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", ca_cert.name, "-CAkey", ca_key.name,
        "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "server.ext",
        cwd=d,
    )  # fmt: skip
    return {"ca": ca_cert, "other_ca": other_ca, "cert": d / "server.pem", "key": d / "server.key"}


@pytest.fixture(scope="module")
def tls_broker(pki: dict[str, Path]) -> Iterator[ManagedBroker]:
    tls = BrokerTls(certfile=str(pki["cert"]), keyfile=str(pki["key"]))
    broker = ManagedBroker(kind="mosquitto", tls=tls)
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


async def test_tls_round_trip(
    tls_broker: ManagedBroker, pki: dict[str, Path], unique_prefix: str
) -> None:
    config = tls_broker.client_config(ca_file=str(pki["ca"]))
    assert config.url.startswith("mqtts://")
    async with MqttTransport(config, f"{unique_prefix}-tls") as t:
        await t.subscribe(f"{unique_prefix}/#")
        await t.publish(f"{unique_prefix}/secret", b"over TLS")
        async with asyncio.timeout(WAIT_S):
            got = await anext(t.messages())
    assert got.payload == b"over TLS"


async def test_tls_with_the_wrong_ca_is_refused_at_once(
    tls_broker: ManagedBroker, pki: dict[str, Path], unique_prefix: str
) -> None:
    config = tls_broker.client_config(ca_file=str(pki["other_ca"]), reconnect=PATIENT)
    async with asyncio.timeout(WAIT_S):
        with pytest.raises(ConnectError, match="TLS verification") as info:
            async with MqttTransport(config, f"{unique_prefix}-tls"):
                pass
    assert info.value.__cause__ is not None


@pytest.fixture(scope="module")
def password_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedBroker]:
    path = tmp_path_factory.mktemp("auth") / "passwords"
    make_password_file(path, {"node-1": "s3cret", "custom-user": "other"})
    broker = ManagedBroker(kind="mosquitto", password_file=path)
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


async def test_password_login(
    password_broker: ManagedBroker, unique_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDBUS_TEST_PW", "s3cret")
    monkeypatch.setenv("FEDBUS_TEST_PW2", "other")
    # No username: the client id logs in (per-node credentials).
    node_config = password_broker.client_config(password_env="FEDBUS_TEST_PW")
    user_config = password_broker.client_config(
        username="custom-user", password_env="FEDBUS_TEST_PW2"
    )
    async with (
        MqttTransport(node_config, "node-1") as node,
        MqttTransport(user_config, f"{unique_prefix}-x") as other,
    ):
        await node.subscribe(f"{unique_prefix}/#")
        await other.publish(f"{unique_prefix}/hi", b"authenticated")
        async with asyncio.timeout(WAIT_S):
            got = await anext(node.messages())
    assert got.payload == b"authenticated"


@pytest.mark.parametrize("password", ["wrong", None])
async def test_bad_or_missing_password_is_refused_at_once(
    password_broker: ManagedBroker,
    unique_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    password: str | None,
) -> None:
    overrides: dict[str, object] = {"reconnect": PATIENT}
    if password is not None:
        monkeypatch.setenv("FEDBUS_TEST_PW", password)
        overrides["password_env"] = "FEDBUS_TEST_PW"
    config = password_broker.client_config(**overrides)
    async with asyncio.timeout(WAIT_S):
        with pytest.raises(
            ConnectError, match=r"refused the connection: (not authorized|bad user)"
        ):
            async with MqttTransport(config, "node-1"):
                pass
