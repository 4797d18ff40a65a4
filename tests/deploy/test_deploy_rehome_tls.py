"""A hierarchical ``fedbus deploy --tls`` run for real: TLS per broker, and a device re-homing.

The generated mosquitto configs (one broker per edge, TLS listeners that
require a client certificate from the deployment's test CA) run on loopback
ports (`GeneratedBroker`, host paths instead of container ones). Two checks:

* real paho clients against the three TLS brokers: every node logs in where
  the plan sends it with its own certificate and password, and is refused
  without a certificate, with another CA's certificate, or where it has no
  account; each broker's certificate verifies for 127.0.0.1 against the CA;
* a federation through them: ``fedbus run`` runs the cloud, edge-a and one of
  edge-b's devices; edge-b and its other device, edge-b-client-0, run as
  ``fedbus node`` agents, each with only its own generated files (password
  file, certificate, key, CA), as on a board. Once two rounds are done the
  test kills edge-b's process (SIGKILL, by PID); its broker publishes its
  will, and edge-b-client-0 re-homes to the cloud's broker with its
  generated credentials (``rehome: parent``) and keeps training there until
  the run ends.

Each edge keeps its two connections (its own broker and its parent's, no
bridge), as docs/deployment.md describes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedbus.broker import find_mosquitto
from fedbus.deploy import DeploymentPlan, generate, plan_deployment
from fedbus.deploy.certs import CertificateAuthority
from fedbus.topology import load_topology
from tests.integration.acl_support import GeneratedBroker, Node, host_paths, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.timeout(150),
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed"),
]

TOPOLOGY = """
name: hier
seed: 0
data: {dataset: digits, partition: {kind: iid}}
model: {kind: mlp, hidden: [64]}
training: {epochs: 4, batch_size: 16, lr: 0.05}
protocol: {kind: hierarchical, rounds: 20, edge_rounds: 1, rehome: parent,
           round_timeout_s: 20, join_timeout_s: 30}
nodes:
  server: {id: cloud}
  edges:
    - {id: edge-a, clients: 1}
    - {id: edge-b, clients: 2}
  external: [edge-b, edge-b-client-0]
"""
SERVICES = ("mosquitto", "mosquitto-edge-a", "mosquitto-edge-b")
DEVICE = "edge-b-client-0"
ROUNDS = 20


def _deploy(tmp_path: Path) -> tuple[Path, DeploymentPlan, dict[str, str], Path]:
    src = tmp_path / "topo.yaml"
    src.write_text(TOPOLOGY, encoding="utf-8")
    root = tmp_path / "deploy"
    generate(src, root, tls=True)
    plan = plan_deployment(load_topology(src))
    pw = {p.name: p.read_text() for p in (root / "secrets/passwords").iterdir()}
    work = tmp_path / "run"
    work.mkdir()
    return root, plan, pw, work


@contextlib.contextmanager
def _brokers(root: Path, plan: DeploymentPlan, work: Path) -> Iterator[dict[str, GeneratedBroker]]:
    """The three generated TLS configs, running, by service."""
    with contextlib.ExitStack() as stack:
        brokers = {}
        for service in SERVICES:
            paths = host_paths(root, service, work)
            Path(paths.acl_file).write_text((root / "brokers" / service / "acl").read_text())
            brokers[service] = stack.enter_context(
                GeneratedBroker(plan.broker(service), paths, work, tls=True)
            )
        yield brokers


def _tls(root: Path, node: str) -> dict[str, str]:
    return {
        "ca": str(root / "certs/ca/ca.pem"),
        "cert": str(root / f"certs/nodes/{node}.pem"),
        "key": str(root / f"certs/nodes/{node}.key"),
    }


def _login(port: int, user: str, password: str | None, tls: dict[str, str]) -> bool:
    node = Node(port, user, password, tls=tls)
    try:
        return node.connect()
    finally:
        node.close()


def test_hierarchical_tls_brokers_with_real_clients(tmp_path: Path) -> None:
    root, plan, pw, work = _deploy(tmp_path)
    certs = root / "certs"
    for service in SERVICES:  # one certificate per broker, for its service name and loopback
        text = subprocess.run(
            ["openssl", "x509", "-in", str(certs / "brokers" / f"{service}.pem"), "-noout",
             "-subject", "-ext", "subjectAltName"],
            check=True, capture_output=True, text=True, timeout=30,
        ).stdout  # fmt: skip
        assert f"CN = {service}" in text or f"CN={service}" in text
        assert f"DNS:{service}" in text
        assert "IP Address:127.0.0.1" in text
    for service in SERVICES:
        conf = (root / "brokers" / service / "mosquitto.conf").read_text().splitlines()
        assert "listener 8883 0.0.0.0" in conf
        assert "require_certificate true" in conf
    other = CertificateAuthority(tmp_path / "other-ca", name="not the deployment's CA")
    other.issue(tmp_path / "rogue.pem", tmp_path / "rogue.key", common_name="edge-a")
    rogue = {"ca": str(certs / "ca/ca.pem"), "cert": str(tmp_path / "rogue.pem"),
             "key": str(tmp_path / "rogue.key")}  # fmt: skip
    cases: list[tuple[str, str, str, bool, bool]] = []
    with _brokers(root, plan, work) as brokers:
        ports = {service: broker.port for service, broker in brokers.items()}
        # Where the plan sends each node, with its own certificate and password: allowed.
        for node in plan.nodes:
            for service in node.brokers:
                got = _login(ports[service], node.id, pw[node.id], _tls(root, node.id))
                cases.append((service, node.id, "own cert", True, got))
        # Where it has no account: refused even with a valid certificate.
        for service, node in (
            ("mosquitto-edge-a", "edge-b"), ("mosquitto-edge-a", "cloud"),
            ("mosquitto-edge-b", "edge-a-client-0"), ("mosquitto-edge-b", "edge-a"),
        ):  # fmt: skip
            got = _login(ports[service], node, pw[node], _tls(root, node))
            cases.append((service, node, "no account", False, got))
        for service in SERVICES:
            user = plan.broker(service).aggregator or "cloud"
            no_cert = {"ca": str(certs / "ca/ca.pem")}
            cases.append(
                (service, user, "no cert", False, _login(ports[service], user, pw[user], no_cert))
            )
            cases.append(
                (service, user, "other CA", False, _login(ports[service], user, pw[user], rogue))
            )
            cases.append(
                (
                    service,
                    user,
                    "no password",
                    False,
                    _login(ports[service], user, None, _tls(root, user)),
                )
            )
        # The edge's two connections at once, one identity, over TLS.
        down = Node(ports["mosquitto-edge-a"], "edge-a", pw["edge-a"], tls=_tls(root, "edge-a"))
        up = Node(ports["mosquitto"], "edge-a", pw["edge-a"], tls=_tls(root, "edge-a"))
        try:
            assert down.connect()
            assert up.connect()
            assert down.subscribe("fedbus/hier.edge-a/to/edge-a/+")
            assert up.subscribe("fedbus/hier/out/cloud/#")
            cloud = Node(ports["mosquitto"], "cloud", pw["cloud"], tls=_tls(root, "cloud"))
            assert cloud.connect()
            cloud.publish("fedbus/hier/out/cloud/model", b"over tls")
            assert wait_for(lambda: up.got(b"over tls"))
            cloud.close()
            assert not down.disconnected.is_set()
        finally:
            down.close()
            up.close()
        # The logins above verified each broker's certificate and host name against the
        # CA; a client that trusts only the system CAs refuses the brokers.
        for port in ports.values():
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                pytest.raises(ssl.SSLCertVerificationError),
            ):
                ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1")
    wrong = [c for c in cases if c[3] != c[4]]
    print(f"hierarchical TLS login cases: {len(cases)}, {sum(c[3] for c in cases)} allow")
    assert not wrong, "\n".join(map(str, wrong))


def _host_topology(root: Path, ports: dict[str, int], node: str, path: Path) -> Path:
    """The deployment topology with loopback URLs and ``node``'s files as host paths."""
    text = (root / "topology.yaml").read_text()
    for service in ("mosquitto-edge-a", "mosquitto-edge-b", "mosquitto"):
        text = text.replace(f"mqtts://{service}:8883", f"mqtts://127.0.0.1:{ports[service]}")
    files = _tls(root, node)
    text = text.replace("/fedbus/certs/ca.pem", files["ca"])
    text = text.replace("/run/secrets/fedbus_node.pem", files["cert"])
    text = text.replace("/run/secrets/fedbus_node.key", files["key"])
    path.write_text(text)
    return path


def _start(args: list[str], log: Path, password_file: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "FEDBUS_PASSWORD_FILE": str(password_file), "PYTHONUNBUFFERED": "1"}
    env.pop("FEDBUS_PASSWORD", None)
    with log.open("wb") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "fedbus", "-v", *args], stdout=fh, stderr=subprocess.STDOUT,
            env=env,
        )  # fmt: skip


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _rows(out: Path) -> list[dict[str, Any]]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def test_a_device_rehomes_through_the_generated_tls_brokers(tmp_path: Path) -> None:
    root, plan, _pw, work = _deploy(tmp_path)
    out = tmp_path / "results"
    secrets = root / "secrets/passwords"
    logs = {n: tmp_path / f"{n}.log" for n in ("run", "edge-b", DEVICE)}
    with _brokers(root, plan, work) as brokers:
        ports = {service: broker.port for service, broker in brokers.items()}
        # The board-like agents first, each with only its own password file and certificate.
        procs = {
            "edge-b": _start(
                ["node", str(_host_topology(root, ports, "edge-b", tmp_path / "edge-b.yaml")),
                 "--id", "edge-b"],
                logs["edge-b"], secrets / "edge-b",
            ),
            DEVICE: _start(
                ["node", str(_host_topology(root, ports, DEVICE, tmp_path / "device.yaml")),
                 "--id", DEVICE],
                logs[DEVICE], secrets / DEVICE,
            ),
        }  # fmt: skip
        try:
            died = lambda: any(p.poll() is not None for p in procs.values())  # noqa: E731
            # Both connected before the run starts (edge-b opens its own broker once it does).
            assert wait_for(
                lambda: died() or (_connections(logs["edge-b"]) and _connections(logs[DEVICE])),
                timeout_s=60,
            ), _tails(logs)
            # In one process, every other node shares cloud's certificate (a container has
            # its own; the broker checks the chain, the password file the identity).
            procs["run"] = _start(
                ["run", str(_host_topology(root, ports, "cloud", tmp_path / "run.yaml")),
                 "--broker", f"mqtts://127.0.0.1:{ports['mosquitto']}", "--out", str(out)],
                logs["run"], secrets,
            )  # fmt: skip
            # Kill edge-b once a round has aggregated its group (its devices trained there):
            # edge-a and edge-b take part (per-edge figures list only edges the run started).
            assert wait_for(
                lambda: died() or any(r["participants"] == 2 for r in _rows(out)), timeout_s=90
            ), _tails(logs)
            assert not died(), _tails(logs)
            killed_after = len(_rows(out))
            _stop(procs["edge-b"])  # no clean disconnect: the brokers publish its wills
            rc = {n: procs[n].wait(timeout=110) for n in ("run", DEVICE)}
            broker_logs = {s: b.log_text() for s, b in brokers.items()}
        finally:
            for proc in procs.values():
                _stop(proc)
    text = {n: log.read_text() for n, log in logs.items()}
    assert rc == {"run": 0, DEVICE: 0}, (text, broker_logs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["success"]
    assert summary["rounds_completed"] == ROUNDS
    rows = _rows(out)
    print(f"edge-b killed after round {killed_after}; participants by round:",
          [r["participants"] for r in rows])  # fmt: skip
    # The device re-homed to the cloud and logged in there as itself, with its own
    # certificate and password...
    assert "re-homing from edge-b to cloud" in text[DEVICE], text[DEVICE]
    assert "re-homed to cloud" in text[DEVICE]
    assert f"u'{DEVICE}'" in broker_logs["mosquitto"]
    for log in broker_logs.values():
        assert "not authorised" not in log.lower()
    # ...and kept training: the last rounds aggregate edge-a and edge-b's two devices at
    # the cloud (edge-b itself is gone).
    assert len(rows) == ROUNDS
    assert killed_after < ROUNDS - 5, "the run ended before re-homing could be seen"
    assert rows[-1]["participants"] == 3
    assert rows[-1]["accuracy"] > rows[killed_after - 1]["accuracy"]


def _tails(logs: dict[str, Path]) -> dict[str, str]:
    """The end of each log that exists, for failure messages."""
    return {n: log.read_text()[-3000:] for n, log in logs.items() if log.exists()}


def _connections(log: Path) -> int:
    """How many broker connections a ``fedbus -v node`` log reports."""
    return log.read_text().count("fedbus.transport.mqtt: connected to") if log.exists() else 0
