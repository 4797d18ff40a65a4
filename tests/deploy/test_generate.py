"""`fedbus deploy`: the generated compose file, configs, ACLs and secrets against the topology."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedbus.cli import main
from fedbus.config import BrokerConfig
from fedbus.deploy import generate, plan_deployment, render_acl
from fedbus.errors import ConfigError
from fedbus.topology import load_topology

CENTRAL = """
name: plant-1
seed: 0
data: {dataset: digits, partition: {kind: iid}}
model: {kind: logreg}
protocol: {kind: centralized, rounds: 2}
nodes:
  server: {id: server}
  clients: {count: 3}
  external: [client-2]
"""

HIER = """
name: hier
seed: 0
data: {dataset: digits, partition: {kind: iid}}
model: {kind: logreg}
protocol: {kind: hierarchical, rounds: 2, edge_rounds: 1}
nodes:
  server: {id: cloud}
  edges:
    - {id: edge-a, clients: 2}
    - id: region-b
      edges:
        - {id: edge-b1, clients: 1}
"""

GOSSIP = """
name: ring
seed: 0
data: {dataset: digits, partition: {kind: iid}}
model: {kind: logreg}
protocol: {kind: gossip, rounds: 2}
nodes:
  peers: {count: 4}
  graph: {kind: ring}
"""


def _deploy(tmp_path: Path, text: str, **kwargs: Any) -> tuple[Path, dict[str, Any]]:
    src = tmp_path / "topo.yaml"
    src.write_text(text, encoding="utf-8")
    out = tmp_path / "dep"
    generate(src, out, **kwargs)
    return out, yaml.safe_load((out / "docker-compose.yml").read_text())


def _secrets(out: Path) -> list[str]:
    return [p.read_text() for p in (out / "secrets" / "passwords").iterdir()]


def test_centralized_compose_matches_the_topology(tmp_path: Path) -> None:
    out, doc = _deploy(tmp_path, CENTRAL, image="me/fedbus:1", user="1000:1000")
    services = doc["services"]
    assert set(services) == {"mosquitto", "server", "client-0", "client-1"}  # client-2 external
    assert doc["name"] == "fedbus-plant-1"
    for node in ("server", "client-0", "client-1"):
        svc = services[node]
        assert svc["image"] == "me/fedbus:1"
        assert svc["user"] == "1000:1000"
        cmd = svc["command"]
        assert cmd[:3] == ["fedbus", "node", "/fedbus/topology.yaml"]
        assert cmd[cmd.index("--id") + 1] == node
        assert cmd[cmd.index("--broker") + 1] == "mqtt://mosquitto:1883"
        assert svc["depends_on"] == ["mosquitto"]
        assert svc["environment"] == {"FEDBUS_PASSWORD_FILE": "/run/secrets/fedbus_password"}
        assert svc["secrets"] == [{"source": f"{node}_password", "target": "fedbus_password"}]
        assert doc["secrets"][f"{node}_password"] == {"file": f"./secrets/passwords/{node}"}
    assert "--out" in services["server"]["command"]
    assert "--out" not in services["client-0"]["command"]
    broker = services["mosquitto"]
    assert broker["image"].startswith("eclipse-mosquitto:2")
    assert broker["ports"] == ["1883:1883"]
    assert "./brokers/mosquitto:/mosquitto/config:ro" in broker["volumes"]
    # Every referenced file exists; no plaintext password anywhere but secrets/.
    for svc in services.values():
        for volume in svc["volumes"]:
            assert (out / volume.split(":")[0]).exists(), volume
    compose_text = (out / "docker-compose.yml").read_text()
    conf_text = (out / "brokers/mosquitto/mosquitto.conf").read_text()
    passwd = (out / "brokers/mosquitto/passwd").read_text()
    for secret in _secrets(out):
        assert len(secret) >= 32
        assert secret not in compose_text
        assert secret not in conf_text
        assert secret not in passwd
    assert sorted(line.split(":")[0] for line in passwd.splitlines()) == [
        "client-0", "client-1", "client-2", "server"
    ]  # fmt: skip
    assert all(line.split(":", 1)[1].startswith("$7$") for line in passwd.splitlines())


def test_secrets_are_private_and_unique(tmp_path: Path) -> None:
    out, _ = _deploy(tmp_path, CENTRAL)
    assert stat.S_IMODE((out / "secrets").stat().st_mode) == 0o700
    files = list((out / "secrets" / "passwords").iterdir())
    assert {f.name for f in files} == {"server", "client-0", "client-1", "client-2"}
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert len({f.read_text() for f in files}) == len(files)
    assert stat.S_IMODE((out / "brokers/mosquitto/passwd").stat().st_mode) == 0o600


def test_mosquitto_conf_is_locked_down(tmp_path: Path) -> None:
    out, _ = _deploy(tmp_path, CENTRAL)
    lines = (out / "brokers/mosquitto/mosquitto.conf").read_text().splitlines()
    assert "allow_anonymous false" in lines
    assert "password_file /mosquitto/config/passwd" in lines
    assert "acl_file /mosquitto/config/acl" in lines
    listener = lines.index("listener 1883 0.0.0.0")
    # A listener setting before the listener line would open a default listener on 1883.
    assert lines.index("use_username_as_clientid true") > listener
    assert not any(line.startswith(("include_dir", "certfile")) for line in lines)


def test_centralized_acl_rules(tmp_path: Path) -> None:
    plan = plan_deployment(load_topology(_write(tmp_path, CENTRAL)))
    acl = render_acl(plan, plan.broker("mosquitto")).splitlines()
    p = "fedbus/plant-1"
    for line in (
        f"pattern write {p}/out/%u/#",
        f"pattern read {p}/to/%u/+",
        f"pattern write {p}/to/server/%u",
        f"topic write {p}/to/+/server",
        f"topic read {p}/out/+/leave",
        f"topic read {p}/out/server/#",
    ):
        assert line in acl, line
    blocks = _user_blocks(acl)
    assert blocks["server"] == [f"topic write {p}/to/+/server", f"topic read {p}/out/+/leave"]
    for client in ("client-0", "client-1", "client-2"):
        assert blocks[client] == [f"topic read {p}/out/server/#"]
    # Nothing grants a wildcard beyond the namespace, or readwrite.
    rules = [line for line in acl if line and not line.startswith("#")]
    assert not [line for line in rules if "readwrite" in line or " #" in line or "$SYS" in line]


def test_gossip_acl_follows_the_graph(tmp_path: Path) -> None:
    out, doc = _deploy(tmp_path, GOSSIP)
    assert set(doc["services"]) == {"mosquitto", "peer-0", "peer-1", "peer-2", "peer-3"}
    blocks = _user_blocks((out / "brokers/mosquitto/acl").read_text().splitlines())
    assert blocks["peer-0"] == [
        "topic write fedbus/ring/to/peer-1/peer-0", "topic read fedbus/ring/out/peer-1/leave",
        "topic write fedbus/ring/to/peer-3/peer-0", "topic read fedbus/ring/out/peer-3/leave",
    ]  # fmt: skip
    assert "--out" in doc["services"]["peer-0"]["command"]


def test_hierarchical_one_broker_per_edge_edges_log_in_upward(tmp_path: Path) -> None:
    out, doc = _deploy(tmp_path, HIER)
    services = doc["services"]
    brokers = {"mosquitto", "mosquitto-edge-a", "mosquitto-region-b", "mosquitto-edge-b1"}
    assert brokers <= set(services)
    topology = load_topology(tmp_path / "topo.yaml")
    for info in topology.node_infos():
        cmd = services[info.id]["command"]
        # --broker replaces the federation's broker only; edges' come from the topology.
        assert cmd[cmd.index("--broker") + 1] == "mqtt://mosquitto:1883"
    assert services["cloud"]["depends_on"] == ["mosquitto"]
    # An edge: its own broker (as the server of its group) and its parent's (as a client).
    assert services["edge-a"]["depends_on"] == ["mosquitto-edge-a", "mosquitto"]
    assert services["edge-b1"]["depends_on"] == ["mosquitto-edge-b1", "mosquitto-region-b"]
    # A device: its edge's broker, then its re-homing fallback (rehome: parent).
    assert services["edge-a-client-0"]["depends_on"] == ["mosquitto-edge-a", "mosquitto"]
    assert services["edge-b1-client-0"]["depends_on"] == [
        "mosquitto-edge-b1", "mosquitto-region-b"
    ]  # fmt: skip
    for broker in brokers:
        assert "depends_on" not in services[broker]  # no bridges: brokers are independent
        conf = (out / "brokers" / broker / "mosquitto.conf").read_text()
        assert "include_dir" not in conf
        assert "connection " not in conf
    assert "ports" not in services["mosquitto-edge-a"]
    assert not (out / "secrets/bridges").exists()
    assert _users(out / "brokers/mosquitto/passwd") == [
        "cloud", "edge-a", "region-b", "edge-a-client-0", "edge-a-client-1"
    ]  # fmt: skip
    assert _users(out / "brokers/mosquitto-region-b/passwd") == [
        "region-b", "edge-b1", "edge-b1-client-0"
    ]  # fmt: skip
    assert _users(out / "brokers/mosquitto-edge-a/passwd") == [
        "edge-a", "edge-a-client-0", "edge-a-client-1"
    ]  # fmt: skip
    # Where each node logs in (one password per node on all of them).
    plan = plan_deployment(topology)
    assert plan.node("edge-b1").brokers == ("mosquitto-edge-b1", "mosquitto-region-b")
    # The edge's own broker: the edge serves hier.edge-a; its devices also watch its will
    # in the parent namespace, as the device runtime subscribes there.
    acl = (out / "brokers/mosquitto-edge-a/acl").read_text().splitlines()
    assert "pattern write fedbus/hier.edge-a/out/%u/#" in acl
    blocks = _user_blocks(acl)
    assert blocks["edge-a"] == [
        "topic write fedbus/hier.edge-a/to/+/edge-a", "topic read fedbus/hier.edge-a/out/+/leave",
    ]  # fmt: skip
    assert blocks["edge-a-client-0"] == [
        "topic read fedbus/hier.edge-a/out/edge-a/#", "topic read fedbus/hier/out/edge-a/leave",
    ]  # fmt: skip
    assert not [
        line for line in acl if "fedbus/hier/to/" in line or "fedbus/hier/out/cloud" in line
    ]
    # The parent's broker: edges and re-homing devices are members of hier.
    cloud = _user_blocks((out / "brokers/mosquitto/acl").read_text().splitlines())
    for member in ("edge-a", "region-b", "edge-a-client-0"):
        assert cloud[member] == ["topic read fedbus/hier/out/cloud/#"]
    region = _user_blocks((out / "brokers/mosquitto-region-b/acl").read_text().splitlines())
    assert region["edge-b1"] == ["topic read fedbus/hier.region-b/out/region-b/#"]
    assert region["edge-b1-client-0"] == [
        "topic read fedbus/hier.region-b/out/region-b/#", "topic read fedbus/hier/out/region-b/leave",
    ]  # fmt: skip


def test_hierarchical_sibling_rehome_grants_the_sibling_brokers(tmp_path: Path) -> None:
    text = HIER.replace("edge_rounds: 1}", "edge_rounds: 1, rehome: sibling}")
    out, doc = _deploy(tmp_path, text)
    # edge-a's devices: region-b (the next sibling), then the cloud.
    assert doc["services"]["edge-a-client-0"]["depends_on"] == [
        "mosquitto-edge-a", "mosquitto-region-b", "mosquitto"
    ]  # fmt: skip
    region = _user_blocks((out / "brokers/mosquitto-region-b/acl").read_text().splitlines())
    assert region["edge-a-client-0"] == [
        "topic read fedbus/hier.region-b/out/region-b/#", "topic read fedbus/hier/out/region-b/leave",
    ]  # fmt: skip
    assert "edge-a-client-0" in _users(out / "brokers/mosquitto-region-b/passwd")
    # edge-b1 has no sibling under region-b: only its grandparent region-b.
    assert doc["services"]["edge-b1-client-0"]["depends_on"] == [
        "mosquitto-edge-b1", "mosquitto-region-b"
    ]  # fmt: skip
    # Nobody but edge-a's group may log in to edge-a's broker.
    assert _users(out / "brokers/mosquitto-edge-a/passwd") == [
        "edge-a", "edge-a-client-0", "edge-a-client-1"
    ]  # fmt: skip

    # The deployment topology gives every edge its broker and still validates.
    deployed = load_topology(out / "topology.yaml")
    edge = deployed.node("edge-b1")
    assert edge.child_broker is not None
    assert edge.child_broker.url == "mqtt://mosquitto-edge-b1:1883"


def test_tls_deployment(tmp_path: Path) -> None:
    pytest.importorskip("ssl")
    out, doc = _deploy(tmp_path, CENTRAL, tls=True)
    svc = doc["services"]["client-0"]
    assert "mqtts://mosquitto:8883" in svc["command"]
    assert {s["target"] for s in svc["secrets"]} == {
        "fedbus_password", "fedbus_node.pem", "fedbus_node.key"
    }  # fmt: skip
    assert doc["services"]["mosquitto"]["ports"] == ["8883:8883"]
    conf = (out / "brokers/mosquitto/mosquitto.conf").read_text().splitlines()
    assert "listener 8883 0.0.0.0" in conf
    assert "require_certificate true" in conf
    for name in ("ca/ca.key", "brokers/mosquitto.key", "nodes/client-0.key"):
        assert stat.S_IMODE((out / "certs" / name).stat().st_mode) == 0o600
    assert (out / "certs/nodes/client-2.pem").is_file()  # external nodes get credentials too
    broker = load_topology(out / "topology.yaml").broker.config
    assert isinstance(broker, BrokerConfig)
    assert (broker.ca_file, broker.cert_file) == (
        "/fedbus/certs/ca.pem", "/run/secrets/fedbus_node.pem"
    )  # fmt: skip
    assert broker.tls
    assert broker.password_env == "FEDBUS_PASSWORD"
    assert broker.username is None


def test_refuses_a_non_empty_dir_and_rotates_with_force(tmp_path: Path) -> None:
    out, _ = _deploy(tmp_path, CENTRAL)
    before = set(_secrets(out))
    with pytest.raises(ConfigError, match="--force"):
        generate(tmp_path / "topo.yaml", out)
    generate(tmp_path / "topo.yaml", out, force=True)
    assert not before & set(_secrets(out))


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _write(tmp_path, CENTRAL)
    assert main(["deploy", str(src), "--out", str(tmp_path / "d")]) == 0
    printed = capsys.readouterr().out
    assert "1 broker(s), 3 node service(s)" in printed
    for secret in _secrets(tmp_path / "d"):
        assert secret not in printed
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\n", encoding="utf-8")
    assert main(["deploy", str(bad), "--out", str(tmp_path / "e")]) == 2


def test_node_id_colliding_with_a_broker_service(tmp_path: Path) -> None:
    text = CENTRAL.replace("server: {id: server}", "server: {id: mosquitto}")
    with pytest.raises(ConfigError, match="collides"):
        plan_deployment(load_topology(_write(tmp_path, text)))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "topo.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _users(passwd: Path) -> list[str]:
    return [line.split(":")[0] for line in passwd.read_text().splitlines()]


def _user_blocks(lines: list[str]) -> dict[str, list[str]]:
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in lines:
        if line.startswith("user "):
            current = blocks.setdefault(line.split()[1], [])
        elif line.startswith("topic ") and current is not None:
            current.append(line)
    return blocks
