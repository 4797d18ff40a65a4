"""``fedbus deploy --bridge``: the generated bridge configs, and two real mosquittos bridged."""

from __future__ import annotations

import dataclasses
import re
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedbus.broker import find_mosquitto
from fedbus.broker.mosquitto import hash_password
from fedbus.cli import main
from fedbus.deploy import generate, plan_deployment
from fedbus.deploy.bridge import bridges_of, render_bridge
from fedbus.errors import ConfigError
from fedbus.topology import load_topology
from tests.integration.acl_support import GeneratedBroker, Node, host_paths, wait_for

NESTED = """
name: hier
seed: 0
data: {dataset: digits, partition: {kind: iid}}
model: {kind: logreg}
protocol: {kind: hierarchical, rounds: 2, edge_rounds: 1}
nodes:
  server: {id: cloud}
  edges:
    - {id: edge-a, clients: 1}
    - id: region-b
      edges:
        - {id: edge-b1, clients: 1}
"""


def _deploy(tmp_path: Path, text: str, **kwargs: Any) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = tmp_path / "topo.yaml"
    src.write_text(text, encoding="utf-8")
    out = tmp_path / "dep"
    generate(src, out, **kwargs)
    return out


def _conf(out: Path, service: str) -> list[str]:
    return (out / "brokers" / service / "mosquitto.conf").read_text().splitlines()


def test_bridges_are_generated_per_edge_broker(tmp_path: Path) -> None:
    out = _deploy(tmp_path, NESTED, bridge=True)
    expected = {  # edge broker: (parent broker, mirrored namespace)
        "mosquitto-edge-a": ("mosquitto", "hier.edge-a"),
        "mosquitto-region-b": ("mosquitto", "hier.region-b"),
        "mosquitto-edge-b1": ("mosquitto-region-b", "hier.edge-b1"),
    }
    for service, (parent, ns) in expected.items():
        conf = _conf(out, service)
        user = f"bridge-{service.removeprefix('mosquitto-')}"
        assert f"connection {user}" in conf
        assert f"address {parent}:1883" in conf
        assert f"remote_username {user}" in conf
        assert f"topic fedbus/{ns}/# out 1" in conf  # one way, its own namespace only
        assert not [line for line in conf if line.startswith("topic ") and " out " not in line]
        assert stat.S_IMODE((out / "brokers" / service / "mosquitto.conf").stat().st_mode) == 0o600
        # The parent knows the bridge as a user of its own that may write that namespace only.
        passwd = (out / "brokers" / parent / "passwd").read_text()
        assert re.search(rf"^{user}:\$7\$", passwd, re.M)
        acl = (out / "brokers" / parent / "acl").read_text().splitlines()
        block = acl[acl.index(f"user {user}") + 1 :]
        assert block[0] == f"topic write fedbus/{ns}/#"
        assert len(block) == 1 or not block[1].startswith("topic")
    assert not [line for line in _conf(out, "mosquitto") if line.startswith("connection ")]
    # The bridge passwords are in the edge configs only, nowhere else.
    compose = (out / "docker-compose.yml").read_text()
    for service in expected:
        password = next(
            line.split()[1] for line in _conf(out, service) if line.startswith("remote_password")
        )
        assert len(password) >= 32
        assert password not in compose
        assert password not in (out / "topology.yaml").read_text()
    assert "with --bridge" in compose
    # The edges still log in upward themselves: the topology and services are unchanged.
    plain = _deploy(tmp_path / "plain", NESTED)
    assert (
        yaml.safe_load(compose)["services"].keys()
        == yaml.safe_load((plain / "docker-compose.yml").read_text())["services"].keys()
    )


def test_bridges_with_tls_use_the_edge_broker_certificate(tmp_path: Path) -> None:
    out = _deploy(tmp_path, NESTED, bridge=True, tls=True)
    conf = _conf(out, "mosquitto-edge-a")
    assert "address mosquitto:8883" in conf
    for line in (
        "bridge_cafile /mosquitto/certs/ca.pem",
        "bridge_certfile /mosquitto/certs/server.pem",
        "bridge_keyfile /mosquitto/certs/server.key",
        "bridge_insecure false",
    ):
        assert line in conf


def test_bridge_user_colliding_with_a_node(tmp_path: Path) -> None:
    text = NESTED.replace("server: {id: cloud}", "server: {id: bridge-edge-a}")
    with pytest.raises(ConfigError, match="collide with bridge users"):
        _deploy(tmp_path, text, bridge=True)


def test_cli_bridge_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "t.yaml"
    src.write_text(NESTED, encoding="utf-8")
    assert main(["deploy", str(src), "--out", str(tmp_path / "d"), "--bridge"]) == 0
    assert "3 bridge(s)" in capsys.readouterr().out


TWO = """
name: hier
seed: 0
data: {dataset: digits, partition: {kind: iid}}
model: {kind: logreg}
protocol: {kind: hierarchical, rounds: 2, edge_rounds: 1}
nodes:
  server: {id: cloud}
  edges:
    - {id: edge-a, clients: 1}
"""


@pytest.mark.integration
@pytest.mark.timeout(90)
@pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto not installed")
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_a_message_crosses_two_real_bridged_mosquittos(tmp_path: Path, tls: bool) -> None:
    out = _deploy(tmp_path, TWO, bridge=True, tls=tls)
    plan = plan_deployment(load_topology(tmp_path / "topo.yaml"))
    (bridge,) = bridges_of(plan)
    password = next(
        line.split()[1]
        for line in _conf(out, "mosquitto-edge-a")
        if line.startswith("remote_password")
    )
    pw = {p.name: p.read_text() for p in (out / "secrets/passwords").iterdir()}
    work = tmp_path / "run"
    work.mkdir()
    # The cloud broker as generated, plus a test-only observer of fedbus/#.
    cloud_paths = host_paths(out, "mosquitto", work)
    (work / "cloud.passwd").write_text(
        (out / "brokers/mosquitto/passwd").read_text() + f"observer:{hash_password('obs')}\n"
    )
    (work / "cloud.passwd").chmod(0o600)
    cloud_paths = dataclasses.replace(cloud_paths, password_file=str(work / "cloud.passwd"))
    Path(cloud_paths.acl_file).write_text(
        (out / "brokers/mosquitto/acl").read_text() + "\nuser observer\ntopic read fedbus/#\n"
    )
    edge_paths = host_paths(out, "mosquitto-edge-a", work)
    Path(edge_paths.acl_file).write_text((out / "brokers/mosquitto-edge-a/acl").read_text())
    cloud = GeneratedBroker(plan.broker("mosquitto"), cloud_paths, work, tls=tls)
    edge = GeneratedBroker(plan.broker("mosquitto-edge-a"), edge_paths, work, tls=tls)
    with cloud:
        # The generated bridge section, with host paths and the cloud's loopback port.
        section = render_bridge(
            bridge, password, tls=tls, address=f"127.0.0.1:{cloud.port}", paths=edge_paths
        )
        edge.conf.write_text(edge.conf.read_text() + section)
        with edge:

            def tls_args(node: str) -> list[str]:
                if not tls:
                    return []
                certs = out / "certs"
                return ["--cafile", str(certs / "ca/ca.pem"),
                        "--cert", str(certs / f"nodes/{node}.pem"),
                        "--key", str(certs / f"nodes/{node}.key")]  # fmt: skip

            topic = "fedbus/hier.edge-a/out/edge-a/model"
            # edge-a publishes in its namespace on its own broker (retained: no race with
            # the bridge connecting or the subscriber subscribing).
            subprocess.run(
                ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(edge.port), "-i", "edge-a",
                 "-u", "edge-a", "-P", pw["edge-a"], *tls_args("edge-a"), "-q", "1", "-r",
                 "-t", topic, "-m", "crossed the bridge"],
                check=True, timeout=20,
            )  # fmt: skip
            got = subprocess.run(
                ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(cloud.port), "-i", "observer",
                 "-u", "observer", "-P", "obs", *tls_args("cloud"), "-t", "fedbus/#", "-v",
                 "-C", "1", "-W", "30"],
                capture_output=True, text=True, timeout=40,
            )  # fmt: skip
            assert got.stdout.strip() == f"{topic} crossed the bridge", (
                got,
                cloud.log_text(),
                edge.log_text(),
            )
            # On the cloud broker the bridge's user writes its namespace and nothing else.
            observer = Node(cloud.port, "observer", "obs", tls=_tls(out, "cloud", tls))
            rogue = Node(cloud.port, bridge.user, password, tls=_tls(out, "edge-a", tls))
            try:
                assert observer.connect()
                assert observer.subscribe("fedbus/#")
                assert rogue.connect()
                rogue.publish("fedbus/hier/out/cloud/model", b"forged")
                rogue.publish("fedbus/hier/to/cloud/edge-a", b"forged")
                rogue.publish("fedbus/hier.edge-a/out/edge-a/leave", b"sentinel")
                assert wait_for(lambda: observer.got(b"sentinel"))
                assert not observer.got(b"forged")
            finally:
                observer.close()
                rogue.close()
        logs = cloud.log_text() + edge.log_text()
    assert f"u'{bridge.user}'" in logs


def _tls(out: Path, node: str, tls: bool) -> dict[str, str] | None:
    if not tls:
        return None
    certs = out / "certs"
    return {"ca": str(certs / "ca/ca.pem"), "cert": str(certs / f"nodes/{node}.pem"),
            "key": str(certs / f"nodes/{node}.key")}  # fmt: skip
