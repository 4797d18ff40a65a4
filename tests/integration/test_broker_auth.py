"""Credentials and TLS on the managed broker, checked with mosquitto_pub/mosquitto_sub.

We run as root here, so these also cover mosquitto reading root-only (0600)
password, key and config files: it must not drop to the ``mosquitto`` user.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from broker_clients import exchange, pub, require_clients

from fedbus.broker import BrokerTls, ManagedBroker, find_mosquitto, make_password_file

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed")


def _kinds() -> list[object]:
    return [pytest.param("mosquitto", marks=needs_mosquitto), "amqtt"]


@pytest.mark.parametrize("kind", _kinds())
@pytest.mark.parametrize("source", ["fedbus", "mosquitto_passwd"])
def test_password_file(kind: str, source: str, tmp_path: Path, unique_prefix: str) -> None:
    require_clients()
    if kind == "amqtt":
        pytest.importorskip("amqtt")
    path = tmp_path / "passwords"
    if source == "fedbus":
        make_password_file(path, {"node-1": "right horse", "node-2": "other"})
    else:
        if shutil.which("mosquitto_passwd") is None:
            pytest.skip("mosquitto_passwd is not installed")
        path.touch(mode=0o600)
        subprocess.run(
            ["mosquitto_passwd", "-b", str(path), "node-1", "right horse"], check=True, timeout=10
        )
    topic = f"{unique_prefix}/auth"

    broker = ManagedBroker(kind=kind, password_file=path)  # type: ignore[arg-type]
    try:
        broker.start()
        anonymous = pub(broker.port, topic, "anon")
        wrong = pub(broker.port, topic, "wrong", "-u", "node-1", "-P", "wrong horse")
        unknown = pub(broker.port, topic, "who", "-u", "nobody", "-P", "right horse")
        got = exchange(broker.port, topic, "hello", ["-u", "node-1", "-P", "right horse"])
    finally:
        broker.close()

    assert anonymous.returncode != 0
    assert wrong.returncode != 0
    assert unknown.returncode != 0
    assert got == "hello"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA, and a server certificate for 127.0.0.1 / localhost signed by it."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is not installed")
    d = tmp_path_factory.mktemp("certs")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=fedbus test CA", cwd=d)  # fmt: skip
    for name in ("server", "client"):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN=fedbus-{name}", cwd=d)  # fmt: skip
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        ext = ["-extfile", "server.ext"] if name == "server" else []
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", *ext, cwd=d)  # fmt: skip
    for key in d.glob("*.key"):
        key.chmod(0o600)
    return d


@pytest.mark.parametrize("kind", _kinds())
def test_tls_listener(kind: str, certs: Path, unique_prefix: str) -> None:
    require_clients()
    if kind == "amqtt":
        pytest.importorskip("amqtt")
    tls = BrokerTls(certfile=str(certs / "server.pem"), keyfile=str(certs / "server.key"))
    topic = f"{unique_prefix}/tls"

    broker = ManagedBroker(kind=kind, tls=tls)  # type: ignore[arg-type]
    try:
        broker.start()
        url = broker.url
        config = broker.client_config(ca_file=str(certs / "ca.pem"))
        plain = pub(broker.port, topic, "plain")
        untrusted = pub(broker.port, topic, "untrusted", "--cafile", str(certs / "server.pem"))
        got = exchange(broker.port, topic, "secret", ["--cafile", str(certs / "ca.pem")])
    finally:
        broker.close()

    assert url.startswith("mqtts://127.0.0.1:")
    assert config.tls
    assert plain.returncode != 0
    assert untrusted.returncode != 0
    assert got == "secret"


@needs_mosquitto
def test_tls_client_certificate_required(certs: Path, unique_prefix: str) -> None:
    require_clients()
    tls = BrokerTls(
        certfile=str(certs / "server.pem"),
        keyfile=str(certs / "server.key"),
        cafile=str(certs / "ca.pem"),
        require_certificate=True,
    )
    topic = f"{unique_prefix}/mtls"
    ca = ["--cafile", str(certs / "ca.pem")]
    client = ["--cert", str(certs / "client.pem"), "--key", str(certs / "client.key")]

    with ManagedBroker(kind="mosquitto", tls=tls) as broker:
        without = pub(broker.port, topic, "no cert", *ca)
        got = exchange(broker.port, topic, "with cert", [*ca, *client])
    broker.close()

    assert without.returncode != 0
    assert got == "with cert"


@needs_mosquitto
def test_beyond_loopback_with_password_file_starts(tmp_path: Path, unique_prefix: str) -> None:
    require_clients()
    path = make_password_file(tmp_path / "pw", {"u": "p"})
    with ManagedBroker(kind="mosquitto", host="0.0.0.0", password_file=path) as broker:
        anonymous = pub(broker.port, f"{unique_prefix}/x", "anon")
        got = exchange(broker.port, f"{unique_prefix}/x", "ok", ["-u", "u", "-P", "p"])
    broker.close()

    assert anonymous.returncode != 0
    assert got == "ok"
