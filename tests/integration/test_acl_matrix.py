"""The generated ACLs, passwords and TLS, checked with real clients against a real mosquitto.

Every node x {own topics, other nodes' topics, wildcards} x {publish,
subscribe}. mosquitto acknowledges a denied publish at QoS 1 under MQTT
3.1.1 and drops it silently, so a publish counts as allowed only when an
observer (a test-only user who may read ``fedbus/#``, appended to the
generated ACL) receives it. A subscription counts as allowed when its SUBACK
grants it and a probe that the node may read arrives through it; denied when
the SUBACK is 0x80 or the probe never arrives. No timed waits decide a
denial: after its cases every publisher sends a sentinel that is allowed,
and mosquitto delivers one publisher's QoS 1 messages to a subscriber in
order, so once the sentinels are in, anything denied would have come first.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from acl_support import GeneratedBroker, Node, host_paths, wait_for

from fedbus.broker import find_mosquitto
from fedbus.broker.mosquitto import hash_password
from fedbus.deploy import BrokerPlan, generate, plan_deployment
from fedbus.topology import load_topology

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(60),
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed"),
]

NAME = "acl-demo"
P = f"fedbus/{NAME}"
CLIENTS = ("client-0", "client-1", "client-2")
NODES = ("server", *CLIENTS)
TOPOLOGY = f"""
name: {NAME}
seed: 0
data: {{dataset: digits, partition: {{kind: iid}}}}
model: {{kind: logreg}}
training: {{epochs: 1, batch_size: 32, lr: 0.1}}
protocol: {{kind: centralized, rounds: 2, min_clients: 3, round_timeout_s: 20, join_timeout_s: 30}}
nodes:
  server: {{id: server}}
  clients: {{count: 3}}
"""


@dataclass
class Matrix:
    """Cases and their verdicts: (actor, action, topic, expected allowed, observed allowed)."""

    rows: list[tuple[str, str, str, bool, bool]] = field(default_factory=list)

    def wrong(self) -> list[tuple[str, str, str, bool, bool]]:
        return [r for r in self.rows if r[3] != r[4]]

    def counts(self) -> tuple[int, int]:
        allowed = sum(1 for r in self.rows if r[3])
        return allowed, len(self.rows) - allowed


def _publish_cases(node: str) -> list[tuple[str, bool]]:
    if node == "server":
        return [
            (f"{P}/out/server/model", True), (f"{P}/out/server/manifest", True),
            (f"{P}/to/client-0/server", True), (f"{P}/out/client-0/leave", False),
            (f"{P}/to/server/client-0", False), ("fedbus/other/out/server/model", False),
        ]  # fmt: skip
    other = next(c for c in CLIENTS if c != node)
    return [
        (f"{P}/to/server/{node}", True), (f"{P}/out/{node}/leave", True),
        (f"{P}/to/server/{other}", False), (f"{P}/out/{other}/leave", False),
        (f"{P}/out/server/model", False), (f"{P}/to/{other}/{node}", False),
        (f"fedbus/other/to/server/{node}", False),
    ]  # fmt: skip


def _subscribe_cases(node: str) -> list[tuple[str, str | None, str | None, bool]]:
    """(filter, probe topic, probe publisher, expected) for ``node``."""
    if node == "server":
        return [
            (f"{P}/to/server/+", f"{P}/to/server/client-0", "client-0", True),
            (f"{P}/out/+/leave", f"{P}/out/client-1/leave", "client-1", True),
            (f"{P}/to/client-0/+", f"{P}/to/client-0/server", "server", False),
            ("#", f"{P}/to/client-1/server", "server", False),
            ("$SYS/#", None, None, False),
        ]
    other = next(c for c in CLIENTS if c != node)
    return [
        (f"{P}/to/{node}/+", f"{P}/to/{node}/server", "server", True),
        (f"{P}/out/server/#", f"{P}/out/server/model", "server", True),
        (f"{P}/to/{other}/+", f"{P}/to/{other}/server", "server", False),
        (f"{P}/out/{other}/#", f"{P}/out/{other}/leave", other, False),
        (f"{P}/to/server/+", f"{P}/to/server/{other}", other, False),
        ("#", f"{P}/to/server/{other}", other, False),
        (f"{P}/out/+/#", f"{P}/out/{other}/leave", other, False),
        ("$SYS/#", None, None, False),
    ]


def _inbox_sentinel(node: str) -> tuple[str, str]:
    """(publisher, topic): a message ``node`` may read, from a node that may send it."""
    if node == "server":
        return "client-0", f"{P}/to/server/client-0"
    return "server", f"{P}/to/{node}/server"


def _deploy(tmp_path: Path, *, tls: bool) -> tuple[Path, dict[str, str], Path]:
    (tmp_path / "topo.yaml").write_text(TOPOLOGY, encoding="utf-8")
    root = tmp_path / "deploy"
    generate(tmp_path / "topo.yaml", root, tls=tls)
    passwords = {n: (root / "secrets/passwords" / n).read_text() for n in NODES}
    work = tmp_path / "run"
    work.mkdir()
    acl = (root / "brokers/mosquitto/acl").read_text()
    (work / "mosquitto.acl").write_text(acl + "\n# test only\nuser observer\ntopic read fedbus/#\n")
    passwd = (root / "brokers/mosquitto/passwd").read_text()
    (work / "passwd").write_text(passwd + f"observer:{hash_password('observer-pw')}\n")
    (work / "passwd").chmod(0o600)
    return root, passwords, work


def _run_matrix(port: int, passwords: dict[str, str], tls_for: object) -> Matrix:
    matrix = Matrix()
    nodes = {n: Node(port, n, passwords[n], tls=tls_for(n)) for n in NODES}  # type: ignore[operator]
    observer = Node(port, "observer", "observer-pw", tls=tls_for("observer"))  # type: ignore[operator]
    try:
        for node in [*nodes.values(), observer]:
            assert node.connect(), f"{node.user} could not connect"
        assert observer.subscribe("fedbus/#")
        ids = itertools.count()
        # Publish: each case, then an allowed sentinel on the actor's own leave channel.
        pub_cases: list[tuple[str, str, bytes, bool]] = []
        for name, node in nodes.items():
            for topic, expected in _publish_cases(name):
                payload = f"pub-{next(ids)}".encode()
                node.publish(topic, payload)
                pub_cases.append((name, topic, payload, expected))
            node.publish(f"{P}/out/{name}/leave", f"sentinel-{name}".encode())
        assert wait_for(lambda: all(observer.got(f"sentinel-{n}".encode()) for n in NODES))
        for name, topic, payload, expected in pub_cases:
            matrix.rows.append((name, "publish", topic, expected, observer.got(payload)))
        # Subscribe: every filter first, then the probes, then each subscriber's sentinel.
        sub_cases = []
        for name, node in nodes.items():
            for filt, probe_topic, publisher, expected in _subscribe_cases(name):
                granted = node.subscribe(filt)
                sub_cases.append((name, filt, probe_topic, publisher, expected, granted))
        probes: list[bytes] = []
        for _name, _filt, probe_topic, publisher, _e, _g in sub_cases:
            payload = f"probe-{next(ids)}".encode()
            probes.append(payload)
            if probe_topic is not None and publisher is not None:
                nodes[publisher].publish(probe_topic, payload)
        for name in NODES:
            publisher, topic = _inbox_sentinel(name)
            nodes[publisher].publish(topic, f"sub-sentinel-{name}".encode())
        assert wait_for(lambda: all(nodes[n].got(f"sub-sentinel-{n}".encode()) for n in NODES)), (
            "a subscriber did not receive its sentinel"
        )
        for (name, filt, probe_topic, _pub, expected, granted), payload in zip(
            sub_cases, probes, strict=True
        ):
            node = nodes[name]
            if probe_topic is None:  # $SYS: retained broker info arrives at once if granted
                arrived = any(t.startswith("$SYS/") for t in node.received)
            else:
                arrived = node.got(payload)
            matrix.rows.append((name, "subscribe", filt, expected, granted and arrived))
    finally:
        for node in [*nodes.values(), observer]:
            node.close()
    return matrix


def _print(matrix: Matrix, label: str) -> None:
    allowed, denied = matrix.counts()
    print(f"ACL matrix ({label}): {len(matrix.rows)} cases, {allowed} allow, {denied} deny")


def test_acl_matrix_with_passwords(tmp_path: Path) -> None:
    root, passwords, work = _deploy(tmp_path, tls=False)
    paths = dataclasses.replace(
        host_paths(root, "mosquitto", work), password_file=str(work / "passwd")
    )
    with GeneratedBroker(_cloud(tmp_path), paths, work, tls=False) as broker:
        # Authentication: anonymous, a wrong password, another node's password, a stranger.
        assert not Node(broker.port, "client-0", None).connect()
        assert not Node(broker.port, "client-0", "wrong").connect()
        assert not Node(broker.port, "client-0", passwords["client-1"]).connect()
        assert not Node(broker.port, "stranger", passwords["client-0"]).connect()
        matrix = _run_matrix(broker.port, passwords, lambda _n: None)
        # use_username_as_clientid: claiming another node's client id takes nothing over.
        victim = Node(broker.port, "client-1", passwords["client-1"])
        thief = Node(broker.port, "client-0", passwords["client-0"], client_id="client-1")
        try:
            assert victim.connect()
            assert thief.connect()
            victim.subscribe(f"{P}/to/client-1/+")
            server = Node(broker.port, "server", passwords["server"])
            assert server.connect()
            server.publish(f"{P}/to/client-1/server", b"still-here")
            assert wait_for(lambda: victim.got(b"still-here")), broker.log_text()
            assert not victim.disconnected.is_set()
            server.close()
        finally:
            victim.close()
            thief.close()
        # Listener settings come after the listener line: no default listener on 1883.
        assert broker.log_text().count("listen socket") == 1, broker.log_text()
        assert "Warning: ACL" not in broker.log_text(), broker.log_text()
    _print(matrix, "passwords")
    assert not matrix.wrong(), "\n".join(map(str, matrix.wrong()))
    assert matrix.counts()[0] >= 15
    assert matrix.counts()[1] >= 35


def _cloud(tmp_path: Path) -> BrokerPlan:
    return plan_deployment(load_topology(tmp_path / "topo.yaml")).broker("mosquitto")


def test_acl_matrix_over_tls_with_client_certificates(tmp_path: Path) -> None:
    root, passwords, work = _deploy(tmp_path, tls=True)
    paths = dataclasses.replace(
        host_paths(root, "mosquitto", work), password_file=str(work / "passwd")
    )
    ca = str(root / "certs/ca/ca.pem")
    # The observer uses the server's certificate: the listener checks the chain, the
    # password file the identity.

    def tls_for(node: str) -> dict[str, str]:
        cert_node = "server" if node == "observer" else node
        return {"ca": ca, "cert": str(root / f"certs/nodes/{cert_node}.pem"),
                "key": str(root / f"certs/nodes/{cert_node}.key")}  # fmt: skip

    with GeneratedBroker(_cloud(tmp_path), paths, work, tls=True) as broker:
        # No client certificate, or no password: refused.
        assert not Node(broker.port, "client-0", passwords["client-0"], tls={"ca": ca}).connect()
        assert not Node(broker.port, "client-0", None, tls=tls_for("client-0")).connect()
        both = Node(broker.port, "client-0", passwords["client-0"], tls=tls_for("client-0"))
        assert both.connect()
        both.close()
        matrix = _run_matrix(broker.port, passwords, tls_for)
    _print(matrix, "TLS")
    assert not matrix.wrong(), "\n".join(map(str, matrix.wrong()))


def test_a_federation_runs_through_the_secured_broker(tmp_path: Path) -> None:
    """`fedbus run` with per-node passwords (a secrets directory) and the generated ACL."""
    root, _passwords, work = _deploy(tmp_path, tls=False)
    paths = host_paths(root, "mosquitto", work)  # the generated passwd and ACL, no observer
    paths = dataclasses.replace(paths, acl_file=str(root / "brokers/mosquitto/acl"))
    out, log = tmp_path / "results", tmp_path / "run.log"
    env = {**os.environ, "FEDBUS_PASSWORD_FILE": str(root / "secrets/passwords")}
    env.pop("FEDBUS_PASSWORD", None)
    with GeneratedBroker(_cloud(tmp_path), paths, work, tls=False) as broker:
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fedbus", "run", str(root / "topology.yaml"),
                 "--broker", f"mqtt://127.0.0.1:{broker.port}", "--out", str(out)],
                stdout=fh, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        try:
            rc = proc.wait(timeout=45)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)
        broker_log = broker.log_text()
    assert rc == 0, log.read_text() + broker_log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    assert summary["success"]
    # Every node logged in as itself; nothing was refused.
    for node in NODES:
        assert f"u'{node}'" in broker_log
    assert "not authorised" not in broker_log.lower()
